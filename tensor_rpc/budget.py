"""Receive memory budget: payload bytes held for peers, node-wide and per peer.

A header alone reserves nothing: memory is charged as chunks land (each opened chunk's plaintext),
so a peer that declares a 2 GiB message and sends no chunk costs a few hundred bytes of
bookkeeping. Bytes stay charged while the message is incomplete, and after delivery until the
application takes the message (the node releases them then); a rejected, abandoned or timed-out
message releases what it held at once. One instance is shared by every session of a node, like
:class:`~tensor_rpc.access.AccessPolicy`; the sans-I/O session calls it, nothing here blocks.
"""

from __future__ import annotations

from .errors import ErrorCode, ProtocolError


class ReceiveBudget:
    """``total`` bytes across all peers, at most ``per_peer`` for any one of them."""

    def __init__(self, total: int, per_peer: int) -> None:
        if per_peer < 1 or total < per_peer:
            raise ValueError("need 1 <= per_peer <= total")
        self.total, self.per_peer = total, per_peer
        self.used = 0
        self._peers: dict[str, int] = {}

    def reserve(self, peer: str, n: int) -> None:
        """Charge ``n`` bytes to ``peer``; ``LIMIT`` (nothing charged) if either bound would break."""
        held = self._peers.get(peer, 0)
        if held + n > self.per_peer:
            raise ProtocolError(ErrorCode.LIMIT, f"receive budget: peer would hold {held + n} bytes, "
                                f"limit {self.per_peer} (limits.inflight_bytes_per_peer)")
        if self.used + n > self.total:
            raise ProtocolError(ErrorCode.LIMIT, f"receive budget: node would hold {self.used + n} "
                                f"bytes, limit {self.total} (limits.inflight_bytes)")
        self._peers[peer] = held + n
        self.used += n

    def release(self, peer: str, n: int) -> None:
        held = self._peers.get(peer, 0)
        n = min(n, held)
        if held - n:
            self._peers[peer] = held - n
        else:
            self._peers.pop(peer, None)
        self.used -= n

    def held(self, peer: str) -> int:
        return self._peers.get(peer, 0)

    def by_peer(self) -> dict[str, int]:
        return dict(self._peers)
