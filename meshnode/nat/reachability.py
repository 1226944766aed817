"""Reachability as one explicit state machine (sans-I/O): evidence in, state changes out.

States: ``unknown`` → ``public`` | ``private`` (and back, as evidence ages or changes).

Evidence is one result per (server, address), each as fresh as its last report and forgotten after
``evidence_ttl_s``:

* ``reachable`` — the server dialled the address on a *new* connection and delivered our nonce
  (AutoNAT v2). This is proof, not a vote: no one can deliver the nonce to an address we do not
  listen on.
* ``unreachable`` — the server tried the address and failed (closed port, NAT, firewall).
* ``refused`` — the server would dial none of our addresses: with our own servers that means no
  address we have carries the IP it sees us from, i.e. we are behind a NAT.

Servers that fail, time out or reject the request (rate limit) give no evidence at all: an
unreachable *server* is not a vote for PRIVATE (the py-libp2p 0.8.1 AutoNAT v1 mistake,
DESIGN.md §11).

The rule: ``public`` when one address was proved reachable by ``confirmations`` distinct servers;
``private`` when no address is, and ``confirmations`` distinct servers reported ``unreachable``
or ``refused``; ``unknown`` otherwise. A node behind a NAT can never be ``public``: that needs a
delivered nonce.
"""

from __future__ import annotations

from dataclasses import dataclass

UNKNOWN, PUBLIC, PRIVATE = "unknown", "public", "private"
OUTCOMES = ("reachable", "unreachable", "refused")


@dataclass(frozen=True)
class ReachabilityChanged:
    """Published on the node's bus whenever the state changes."""

    old: str
    new: str
    public_addrs: tuple[str, ...]  # addresses proved reachable (empty unless ``public``)


class Reachability:
    def __init__(self, confirmations: int, evidence_ttl_s: float, max_entries: int = 4096) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        self.confirmations = confirmations
        self.evidence_ttl_s = evidence_ttl_s
        self.max_entries = max_entries
        self.state = UNKNOWN
        self.public_addrs: tuple[str, ...] = ()
        self._evidence: dict[tuple[str, str], tuple[str, float]] = {}  # (server, addr) -> (outcome, t)

    def report(self, server: str, addr: str, outcome: str, now: float) -> ReachabilityChanged | None:
        """One result from one server (``addr`` is ``""`` for ``refused``). Returns the change,
        if the state changed."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown reachability outcome {outcome!r}")
        self._evidence.pop((server, addr), None)
        self._evidence[(server, addr)] = (outcome, now)
        while len(self._evidence) > self.max_entries:  # oldest first (dicts keep insertion order)
            self._evidence.pop(next(iter(self._evidence)))
        return self.update(now)

    def update(self, now: float) -> ReachabilityChanged | None:
        """Forget evidence older than the TTL and recompute the state."""
        cutoff = now - self.evidence_ttl_s
        for key in [k for k, (_, t) in self._evidence.items() if t < cutoff]:
            del self._evidence[key]
        proved: dict[str, set[str]] = {}
        against: set[str] = set()
        for (server, addr), (outcome, _) in self._evidence.items():
            if outcome == "reachable":
                proved.setdefault(addr, set()).add(server)
            else:
                against.add(server)
        public = tuple(sorted(a for a, s in proved.items() if len(s) >= self.confirmations))
        if public:
            new = PUBLIC
        elif not proved and len(against) >= self.confirmations:
            new = PRIVATE
        else:
            new = UNKNOWN
        old, self.state, self.public_addrs = self.state, new, public
        if new == old:
            return None
        return ReachabilityChanged(old, new, public)

    def servers_heard(self) -> int:
        return len({server for server, _ in self._evidence})
