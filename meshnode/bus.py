"""Typed events between the node's capabilities: publish a dataclass, subscribe by type.

Capabilities never call each other's private methods or pass string-tagged callbacks
(DESIGN.md §5): the tensor service publishes what happened to transfers, the session log and the
metrics subscribe. ``publish`` never blocks the publisher (it runs on the data path): each
subscriber has a bounded queue, and one that falls that far behind loses events — counted in
``dropped`` and logged — rather than stalling a transfer.
"""

from __future__ import annotations

import logging

import trio

log = logging.getLogger("meshnode.bus")


class EventBus:
    def __init__(self, buffer: int = 4096) -> None:
        self.buffer = buffer
        self.dropped = 0
        self._subs: list[tuple[tuple[type, ...], trio.MemorySendChannel[object]]] = []

    def subscribe(self, *types: type) -> trio.MemoryReceiveChannel[object]:
        """Every event that is an instance of one of ``types``, in publish order."""
        send, recv = trio.open_memory_channel[object](self.buffer)
        self._subs.append((types, send))
        return recv

    def publish(self, event: object) -> None:
        for types, ch in list(self._subs):
            if not isinstance(event, types):
                continue
            try:
                ch.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
                log.warning("event subscriber %s behind: dropped %s", types, type(event).__name__)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subs.remove((types, ch))
