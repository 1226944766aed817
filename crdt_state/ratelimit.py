"""Per-peer token buckets: how many CRDT records each sending peer may have us verify and apply.

Sans-I/O like the engine: the caller passes ``now``. Why per *sending* peer (the stream's peer, not
the record's author): relayed records are real work too, and the link is what a flooder controls.
A bucket that has refilled completely carries no information, so such buckets are forgotten when
the table reaches ``max_peers``; if every one is still draining, the oldest goes (that peer gets a
fresh burst: a bounded gift, where an unbounded table would be a leak).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class PeerBuckets:
    def __init__(self, rate_per_s: float, burst: float, max_peers: int) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.max_peers = max_peers
        self._buckets: dict[str, _Bucket] = {}

    def _refilled(self, peer: str, now: float) -> _Bucket:
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= self.max_peers:
                self._forget_full(now)
            if len(self._buckets) >= self.max_peers:
                del self._buckets[next(iter(self._buckets))]
            b = self._buckets[peer] = _Bucket(self.burst, now)
        elif now > b.at:
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
        return b

    def take(self, peer: str, n: int, now: float) -> int:
        """Take up to ``n`` tokens for ``peer``; returns how many were granted."""
        b = self._refilled(peer, now)
        granted = min(n, int(b.tokens))
        b.tokens -= granted
        return granted

    def available(self, peer: str, now: float) -> bool:
        """Whether at least one record from ``peer`` would be accepted now."""
        return self._refilled(peer, now).tokens >= 1

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        for peer in [p for p, b in self._buckets.items()
                     if b.tokens + (now - b.at) * self.rate >= self.burst]:
            del self._buckets[peer]
