"""Sans-I/O replication engine: bytes from a peer in, bytes for peers out. No sockets, no clock.

Protocol (per document, symmetric):

1. On connect and every anti-entropy tick each side sends STEP1 — its version vector.
2. A side that sees the peer holds records it lacks sends REQUEST for exactly those ranges, unless
   the same ranges are already requested from another peer (in flight, with a deadline): after a
   partition heals, each record crosses to each node once instead of once per peer.
3. The peer answers with RECORDS: the original signed updates, never a merged diff, so they stay
   verifiable however many hops they travel.
4. Local edits are pushed at once as RECORDS to participants (incremental update). A receiver that
   finds a gap asks the pusher for its version vector (STEP1 with ``want_reply``) and pulls.

The caller (``service.py``) owns streams and time: it passes ``now`` in and ships returned frames.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from libp2p.crypto.keys import KeyPair

from crdt_state.limits import CrdtLimits
from crdt_state.replica import Rejected, Replica
from crdt_state.schema import SessionDoc
from crdt_state.signing import Signer, Verifier
from crdt_state.wire import (
    MAX_DOC_ID,
    FrameDecoder,
    Records,
    Request,
    SignedUpdate,
    Step1,
    WriterKey,
    encode,
    encode_records,
)


@dataclass
class Output:
    """What one call produced: frames for the peer it came from, and what changed locally."""

    frames: list[bytes] = field(default_factory=list)
    accepted: dict[str, list[SignedUpdate]] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)


class SyncEngine:
    def __init__(self, key_pair: KeyPair, limits: CrdtLimits,
                 on_accept: Callable[[SignedUpdate], None] | None = None,
                 accept_session: Callable[[SessionDoc], bool] | None = None) -> None:
        self.limits = limits
        self.signer = Signer(key_pair)
        self.local_peer = self.signer.peer_id.to_base58()
        # A fresh incarnation per start: sequence numbers lost in a crash are never reused.
        self.writer = os.urandom(8)
        self.verifier = Verifier()
        self.replicas: dict[str, Replica] = {}
        self.on_accept = on_accept
        self.accept_session = accept_session or (lambda doc: True)
        self.declined: set[str] = set()  # invitations refused by accept_session: not pulled again
        self._inflight: dict[tuple[str, WriterKey], tuple[int, float]] = {}
        self._decoders: dict[tuple[str, object], FrameDecoder] = {}

    def _new_replica(self, doc_id: str) -> Replica:
        return Replica(doc_id, self.limits, self.signer, self.writer, self.verifier)

    # -- local side ----------------------------------------------------------------------------

    def load(self, records: Iterable[SignedUpdate]) -> None:
        """Rebuild replicas from the on-disk log (already checksummed: signatures not re-checked)."""
        by_doc: dict[str, list[SignedUpdate]] = {}
        for rec in records:
            by_doc.setdefault(rec.doc_id, []).append(rec)
        for doc_id, recs in by_doc.items():
            rep = self.replicas.get(doc_id) or self._new_replica(doc_id)
            rep.admit(recs, verify=False)
            if rep.log:
                self.replicas[doc_id] = rep

    def edit(self, doc_id: str, fn: Callable[[SessionDoc], object]) -> list[SignedUpdate]:
        """Run a local edit; returns the signed records to push (already persisted via hook)."""
        rep = self.replicas.get(doc_id)
        if rep is None:
            raise KeyError(f"unknown session {doc_id!r}")
        fn(rep.doc)
        recs = rep.drain()
        for rec in recs:
            if self.on_accept:
                self.on_accept(rec)
        return recs

    def create(self, doc_id: str, compat_key: str, participants: dict[str, str]
               ) -> list[SignedUpdate]:
        if not 0 < len(doc_id) <= MAX_DOC_ID:
            raise ValueError(f"session id must be 1..{MAX_DOC_ID} characters")
        if doc_id in self.replicas:
            raise ValueError(f"session {doc_id!r} already exists")
        if self.local_peer not in participants:
            raise ValueError("the creator must be a participant")
        self.replicas[doc_id] = self._new_replica(doc_id)
        return self.edit(doc_id, lambda d: d.init(doc_id, compat_key, self.local_peer,
                                                  participants))

    def docs_shared_with(self, peer: str) -> list[str]:
        return [d for d, r in self.replicas.items() if r.doc.is_participant(peer)]

    def step1(self, doc_id: str, want_reply: bool = False) -> bytes:
        return encode(Step1(doc_id, self.replicas[doc_id].vv(), want_reply))

    def hello(self, peer: str) -> list[bytes]:
        """STEP1 for every document this peer takes part in (on connect and anti-entropy)."""
        return [self.step1(d) for d in self.docs_shared_with(peer)]

    def push_frames(self, doc_id: str, records: list[SignedUpdate]) -> list[bytes]:
        return encode_records(doc_id, records, self.limits)

    # -- remote side ---------------------------------------------------------------------------

    def forget(self, peer: str, channel: object = None) -> None:
        """Drop the partial-frame buffer of a closed stream."""
        self._decoders.pop((peer, channel), None)

    def receive(self, peer: str, data: bytes, now: float, channel: object = None) -> Output:
        """Feed raw bytes of one stream (``channel`` tells a peer's streams apart).

        Raises SyncProtocolError on malformed input: the caller should drop that stream.
        """
        dec = self._decoders.setdefault((peer, channel), FrameDecoder(self.limits))
        out = Output()
        for msg in dec.feed(data):
            if isinstance(msg, Step1):
                self._on_step1(peer, msg, now, out)
            elif isinstance(msg, Request):
                self._on_request(peer, msg, out)
            else:
                self._on_records(peer, msg, now, out)
        return out

    def _on_step1(self, peer: str, msg: Step1, now: float, out: Output) -> None:
        rep = self.replicas.get(msg.doc_id)
        if rep is None and msg.doc_id in self.declined:
            return
        have = rep.vv() if rep else {}
        ranges = []
        for key, theirs in msg.vv.items():
            start = have.get(key, 0)
            flight = self._inflight.get((msg.doc_id, key))
            if flight and flight[1] > now:
                start = max(start, flight[0])
            if theirs > start:
                ranges.append((key[0], key[1], start + 1, theirs))
                self._inflight[(msg.doc_id, key)] = (theirs, now + self.limits.request_timeout_s)
        if ranges:
            out.frames.append(encode(Request(msg.doc_id, ranges)))
        if msg.want_reply and rep is not None and rep.doc.is_participant(peer):
            out.frames.append(self.step1(msg.doc_id))

    def _on_request(self, peer: str, msg: Request, out: Output) -> None:
        rep = self.replicas.get(msg.doc_id)
        if rep is None or not rep.doc.is_participant(peer):
            return  # never leak a session to someone outside it
        recs: list[SignedUpdate] = []
        for author, writer, first, last in msg.ranges:
            recs.extend(rep.records_in((author, writer), first, last))
        out.frames.extend(encode_records(msg.doc_id, recs, self.limits))

    def _on_records(self, peer: str, msg: Records, now: float, out: Output) -> None:
        rep = self.replicas.get(msg.doc_id)
        fresh = rep is None
        if rep is None:
            rep = self._new_replica(msg.doc_id)
        accepted, rejected = rep.admit(msg.records)
        if fresh:
            declined = bool(accepted) and rep.doc.is_participant(self.local_peer) \
                and not self.accept_session(rep.doc)
            if declined and len(self.declined) < 65536:
                self.declined.add(msg.doc_id)
            if not accepted or not rep.doc.is_participant(self.local_peer) or declined:
                # Not a session we belong to (or nothing usable): keep nothing.
                out.rejected.extend(Rejected(r, "not a participant of this session")
                                    for r in accepted)
                out.rejected.extend(rejected)
                if any(r.retryable for r in rejected):
                    # A push for a session we have not seen yet: ask for the whole history.
                    out.frames.append(encode(Step1(msg.doc_id, {}, want_reply=True)))
                return
            self.replicas[msg.doc_id] = rep
        out.rejected.extend(rejected)
        if accepted:
            out.accepted.setdefault(msg.doc_id, []).extend(accepted)
            for rec in accepted:
                if self.on_accept:
                    self.on_accept(rec)
        vv = rep.vv()
        gap = False
        for rej in rejected:
            if not rej.retryable:
                continue
            flight_key = (msg.doc_id, rej.record.key)
            if rej.record.seq > vv.get(rej.record.key, 0) + 1:
                flight = self._inflight.get(flight_key)
                gap = gap or not (flight and flight[1] > now)  # else: already being fetched
            else:
                self._inflight.pop(flight_key, None)  # author not yet a participant: ask again
        for key in {r.key for r in accepted}:
            flight = self._inflight.get((msg.doc_id, key))
            if flight and vv.get(key, 0) >= flight[0]:
                del self._inflight[(msg.doc_id, key)]
            elif flight:  # still arriving: the deadline measures silence, not the whole transfer
                self._inflight[(msg.doc_id, key)] = (flight[0], now + self.limits.request_timeout_s)
        if gap and rep.doc.is_participant(peer):
            out.frames.append(self.step1(msg.doc_id, want_reply=True))
