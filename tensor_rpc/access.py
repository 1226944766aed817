"""Who may open sessions, how many, and how fast: one registry shared by all sessions of a node.

Time is passed in (``now``), never read, so tests drive the buckets exactly and the sans-I/O core
stays deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ErrorCode, ProtocolError
from .limits import Limits


@dataclass
class TokenBucket:
    """Classic token bucket: ``rate`` per second, burst = one second's worth (at least ``min_burst``)."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, amount: float, now: float) -> bool:
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now if self.stamp is None else max(self.stamp, now)
        if amount <= self.tokens:
            self.tokens -= amount
            return True
        # a single message larger than the burst passes only on a full bucket (never starves)
        if amount > self.burst and self.tokens >= self.burst:
            self.tokens -= amount
            return True
        return False


@dataclass
class _PeerState:
    sessions: int = 0
    messages: TokenBucket | None = None
    nbytes: TokenBucket | None = None


class AccessPolicy:
    """Allow/deny lists, shared token, per-peer session count and message/byte rate limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._peers: dict[str, _PeerState] = {}

    def check_peer(self, peer_id: str) -> None:
        """Raise ACCESS_DENIED if the lists refuse ``peer_id``."""
        if peer_id in self.limits.denylist:
            raise ProtocolError(ErrorCode.ACCESS_DENIED, "peer is on the denylist")
        if self.limits.allowlist and peer_id not in self.limits.allowlist:
            raise ProtocolError(ErrorCode.ACCESS_DENIED, "peer is not on the allowlist")

    @property
    def requires_token(self) -> bool:
        return bool(self.limits.shared_token)

    def acquire(self, peer_id: str) -> None:
        """Count one more live session for ``peer_id`` (call :meth:`release` when it ends)."""
        self.check_peer(peer_id)
        st = self._state(peer_id)
        if st.sessions >= self.limits.max_sessions_per_peer:
            raise ProtocolError(ErrorCode.LIMIT, f"peer already has {st.sessions} sessions "
                                "(limits.max_sessions_per_peer)")
        st.sessions += 1

    def release(self, peer_id: str) -> None:
        st = self._peers.get(peer_id)
        if st is not None and st.sessions > 0:
            st.sessions -= 1

    def sessions(self, peer_id: str) -> int:
        st = self._peers.get(peer_id)
        return st.sessions if st else 0

    def charge(self, peer_id: str, nbytes: int, now: float) -> None:
        """Account one incoming message of ``nbytes``; RATE_LIMITED if over budget."""
        st = self._state(peer_id)
        assert st.messages is not None and st.nbytes is not None
        if not st.messages.take(1, now):
            raise ProtocolError(ErrorCode.RATE_LIMITED, "messages per second exceeded")
        if not st.nbytes.take(nbytes, now):
            st.messages.tokens += 1  # refund: the message was not admitted
            raise ProtocolError(ErrorCode.RATE_LIMITED, "bytes per second exceeded")

    def _state(self, peer_id: str) -> _PeerState:
        st = self._peers.get(peer_id)
        if st is None:
            lim = self.limits
            st = _PeerState(0, TokenBucket(lim.messages_per_s, max(1.0, lim.messages_per_s)),
                            TokenBucket(lim.bytes_per_s, max(1.0, lim.bytes_per_s)))
            self._peers[peer_id] = st
        return st
