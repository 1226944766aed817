"""Capabilities that follow the node's reachability (one subscriber on the bus, no polling)."""

from __future__ import annotations

from typing import Any

import trio

from meshnode.bus import EventBus
from meshnode.logs import get_logger, kv
from meshnode.nat.reachability import PUBLIC, UNKNOWN, ReachabilityChanged
from meshnode.nat.relay_client import AddressesChanged

log = get_logger("meshnode.nat")


async def dht_addrs_follow(bus: EventBus, discovery: Any, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Re-announce our provider records when our (circuit) addresses change."""
    events = bus.subscribe(AddressesChanged)
    task_status.started()
    async for _ev in events:
        try:
            await discovery.addresses_changed()
        except Exception as exc:  # boundary: the next refresh announces us anyway
            log.warning("re-announce after an address change failed", extra=kv(err=exc))


async def dht_mode_follows(bus: EventBus, discovery: Any, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The DHT serves queries while we are public (or unknown: a fresh node on a LAN), and turns
    client when we learn we are private (``Discovery.set_server_mode``)."""
    events = bus.subscribe(ReachabilityChanged)
    task_status.started()
    async for ev in events:
        assert isinstance(ev, ReachabilityChanged)
        discovery.set_server_mode(ev.new in (PUBLIC, UNKNOWN))
