"""Each peer's path as an explicit state (iroh's ``PathStatus``), and what failed before.

States, per peer with a relayed connection: ``pending`` (we dialled through a relay; the other
side drives the upgrade) → ``punching`` → ``direct`` | ``relay_only``. Every change is returned
as a :class:`PathChanged` for the bus; :meth:`PeerPaths.wait_settled` lets a caller (a tensor
session about to move a KV cache) wait for an upgrade in progress instead of polling.
:class:`PunchMemory` is the spec's "stop after the last attempt": a peer whose punches all
failed is not punched again while the addresses it names stay the same. No I/O here: time is
passed in.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import trio

PENDING, PUNCHING, DIRECT, RELAY_ONLY = "pending", "punching", "direct", "relay_only"
SETTLED = (DIRECT, RELAY_ONLY)


@dataclass(frozen=True)
class PathChanged:
    """Published on the node's bus when the path to a peer changes."""

    peer: str
    old: str | None
    new: str
    via: str = ""  # "unilateral" | "punch" when new == DIRECT
    attempts: int = 0  # punch rounds used (0: none)
    elapsed_s: float = 0.0  # since the relayed connection opened


class PeerPaths:
    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.state: dict[Hashable, str] = {}
        self.outcomes: OrderedDict[str, dict] = OrderedDict()  # peer -> last settled outcome
        self._since: dict[Hashable, float] = {}
        self._changed: dict[Hashable, trio.Event] = {}

    def get(self, peer: Hashable) -> str | None:
        return self.state.get(peer)

    def set(self, peer: Hashable, new: str, now: float, via: str = "",
            attempts: int = 0) -> PathChanged | None:
        """Record ``new``; the change (``None`` if the path was already ``new``)."""
        old = self.state.get(peer)
        if new == PENDING or old is None:
            self._since.setdefault(peer, now)
        if old == new:
            return None
        elapsed = now - self._since.get(peer, now)
        self.state[peer] = new
        self._wake(peer)
        if new in SETTLED:
            self.outcomes[str(peer)] = {"path": new, "via": via, "attempts": attempts,
                                        "elapsed_s": round(elapsed, 4), "at": time.time()}
            self.outcomes.move_to_end(str(peer))
            while len(self.outcomes) > self.memory:
                self.outcomes.popitem(last=False)
            self._since.pop(peer, None)
        return PathChanged(str(peer), old, new, via, attempts, elapsed)

    def forget(self, peer: Hashable) -> None:
        """The peer is gone (its last connection closed): its path is unknown again."""
        self.state.pop(peer, None)
        self._since.pop(peer, None)
        self._wake(peer)

    def _wake(self, peer: Hashable) -> None:
        ev = self._changed.pop(peer, None)
        if ev is not None:
            ev.set()

    async def wait_settled(self, peer: Hashable, timeout_s: float) -> str | None:
        """The path once not ``pending``/``punching`` (or after ``timeout_s``)."""
        with trio.move_on_after(timeout_s):
            while self.state.get(peer) in (PENDING, PUNCHING):
                await self._changed.setdefault(peer, trio.Event()).wait()
        return self.state.get(peer)


class PunchMemory:
    """Peers whose upgrade failed, and the addresses they named then (oldest forgotten first)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._failed: OrderedDict[Hashable, frozenset] = OrderedDict()

    def failed(self, peer: Hashable, addrs: list) -> None:
        self._failed[peer] = frozenset(addrs)
        self._failed.move_to_end(peer)
        while len(self._failed) > self.limit:
            self._failed.popitem(last=False)

    def unchanged(self, peer: Hashable, addrs: list) -> bool:
        """Whether ``peer`` failed before with exactly these addresses (then: do not punch)."""
        return self._failed.get(peer) == frozenset(addrs)

    def __len__(self) -> int:
        return len(self._failed)
