"""Every refusal of a peer is counted, and logged with its reason and the peer's ID — but at most
once per second per (peer, reason label), so that a flood cannot flood the log as well.

The count goes to ``on_refuse(label)`` (the node wires it to its ``/metrics`` counter); labels are
low-cardinality ("links_per_peer", "update_rate", "forged_outcome", ...), the log line carries the
full reason and how many similar refusals were not logged since the last line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

LOG_EVERY_S = 1.0


class RefusalLog:
    def __init__(self, logger: logging.Logger, on_refuse: Callable[[str], None] | None,
                 max_keys: int) -> None:
        self._log = logger
        self._on_refuse = on_refuse
        self._max_keys = max_keys
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (logged at, suppressed)
        self.counts: dict[str, int] = {}

    @property
    def tracked(self) -> int:
        """(peer, label) pairs remembered for throttling (bounded by ``max_keys``)."""
        return len(self._last)

    def refuse(self, label: str, peer: str, reason: str, now: float) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1
        if self._on_refuse is not None:
            self._on_refuse(label)
        key = (peer, label)
        at, suppressed = self._last.get(key, (None, 0))
        if at is not None and now - at < LOG_EVERY_S:
            self._last[key] = (at, suppressed + 1)
            return
        if len(self._last) >= self._max_keys:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < LOG_EVERY_S}
            if len(self._last) >= self._max_keys:  # that many peers within a second: start over
                self._last.clear()
        self._last[key] = (now, 0)
        more = f" (+{suppressed} more since the last report)" if suppressed else ""
        self._log.warning("crdt: refused %s from %s: %s%s", label, peer, reason, more)
