"""Bootstrap: dial the configured peers at start, each with exponential backoff, then stop.

One capability of the node (``run(task_status=...)``), composed in ``node.py``. A bootstrap peer
that cannot be reached is logged after ``host.bootstrap_retries`` attempts; the node keeps
running (peer exchange and the DHT may still find the mesh through the others).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from meshnode.config import HostSection
from meshnode.logs import get_logger, kv

log = get_logger("meshnode.node")


class Bootstrap:
    def __init__(self, host: Any, settings: HostSection, on_dial: Callable[[bool], None]) -> None:
        self.host, self.s, self._on_dial = host, settings, on_dial

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as n:
            for addr in self.s.bootstrap:
                n.start_soon(self._dial_with_backoff, addr)

    async def _dial_with_backoff(self, addr: str) -> None:
        h = self.s
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:  # config validation checks the syntax; this is the last guard
            log.error("bad bootstrap address", extra=kv(addr=addr, err=exc))
            return
        if info.peer_id == self.host.get_id():
            return
        delay = h.bootstrap_backoff_s
        for attempt in range(h.bootstrap_retries + 1):
            try:
                with trio.fail_after(h.dial_timeout_s):
                    await self.host.connect(info)
                self._on_dial(True)
                log.info("bootstrap peer connected", extra=kv(peer=info.peer_id, attempt=attempt))
                return
            except Exception as exc:  # unreachable for now: retry after the backoff
                self._on_dial(False)
                log.warning("bootstrap dial failed", extra=kv(addr=addr, attempt=attempt, err=exc))
                await trio.sleep(delay)
                delay = min(delay * 2, h.bootstrap_backoff_max_s)
        log.error("bootstrap peer unreachable", extra=kv(addr=addr, attempts=h.bootstrap_retries + 1))
