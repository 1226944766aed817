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

What a peer can make us spend is bounded here, because every peer is a suspect:

* records: a token bucket per *sending* peer (``updates_per_peer_per_s``, burst one second's
  worth). Records over budget are refused as retryable and fetched again later — the caller asks
  :meth:`SyncEngine.retry_frames` on its anti-entropy tick — so a flood slows down, never corrupts;
* documents: a session another peer created with us as a participant counts against its creator,
  at most ``max_documents_per_peer`` of them; beyond that its genesis is refused, nothing is kept
  or persisted, and the document is remembered as declined (never pulled again; the memory of
  declined documents is bounded, oldest forgotten first). Our own sessions are never limited;
* in-flight requests: bounded table, see ``inflight.py``.

Refusals come back in :attr:`Output.rejected`, each with a low-cardinality ``label``; the caller
logs and counts them. The caller (``service.py``) owns streams and time: it passes ``now`` in and
ships returned frames.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from libp2p.crypto.keys import KeyPair

from crdt_state.inflight import InflightTable
from crdt_state.limits import CrdtLimits
from crdt_state.ratelimit import PeerBuckets
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
    encode,
    encode_records,
)


@dataclass
class Output:
    """What one call produced: frames for the peer it came from, and what changed locally."""

    frames: list[bytes] = field(default_factory=list)
    accepted: dict[str, list[SignedUpdate]] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def refused(self) -> list[Rejected]:
        """The rejections that are refusals of the peer (to log and count): everything except
        the ordinary retryable ones of replication (gaps, not-yet-participants)."""
        return [r for r in self.rejected if not r.retryable or r.label == "update_rate"]


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
        # Documents refused (by accept_session or a limit) -> label: neither pulled nor parsed again.
        self.declined: OrderedDict[str, str] = OrderedDict()
        self.inflight = InflightTable(limits.max_inflight, limits.request_timeout_s)
        self.budget = PeerBuckets(limits.updates_per_peer_per_s, limits.update_burst,
                                  max_peers=limits.max_links)
        self._throttled: OrderedDict[str, set[str]] = OrderedDict()  # peer -> docs to re-pull
        self._created_by: dict[str, int] = {}  # other creator -> its live documents with us
        self._decoders: dict[tuple[str, object], FrameDecoder] = {}

    def _new_replica(self, doc_id: str) -> Replica:
        return Replica(doc_id, self.limits, self.signer, self.writer, self.verifier)

    # -- local side ----------------------------------------------------------------------------

    def _register(self, doc_id: str, rep: Replica) -> None:
        if doc_id not in self.replicas:
            creator = rep.doc.creator
            if creator and creator != self.local_peer:
                self._created_by[creator] = self._created_by.get(creator, 0) + 1
        self.replicas[doc_id] = rep

    def documents_created_by(self, peer: str) -> int:
        """Live documents ``peer`` created with us as a participant (what the limit counts)."""
        return self._created_by.get(peer, 0)

    def _decline(self, doc_id: str, label: str) -> None:
        self.declined.pop(doc_id, None)
        self.declined[doc_id] = label
        while len(self.declined) > self.limits.max_declined:
            self.declined.popitem(last=False)

    def load(self, records: Iterable[SignedUpdate]) -> list[Rejected]:
        """Rebuild replicas from the on-disk log (already checksummed: signatures not re-checked,
        every other rule is). Returns what no longer passes, for the caller to log."""
        by_doc: dict[str, list[SignedUpdate]] = {}
        for rec in records:
            by_doc.setdefault(rec.doc_id, []).append(rec)
        refused: list[Rejected] = []
        for doc_id, recs in by_doc.items():
            rep = self.replicas.get(doc_id) or self._new_replica(doc_id)
            refused.extend(rep.admit(recs, verify=False)[1])
            if rep.log:
                self._register(doc_id, rep)
        return refused

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
        self._register(doc_id, self._new_replica(doc_id))
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

    def retry_frames(self, peer: str, now: float) -> list[bytes]:
        """Once ``peer``'s budget has refilled, ask again (STEP1 with ``want_reply``) for the
        documents whose records from it were refused as over budget."""
        docs = self._throttled.get(peer)
        if not docs or not self.budget.available(peer, now):
            return []
        del self._throttled[peer]
        return [self.step1(d, want_reply=True) if d in self.replicas
                else encode(Step1(d, {}, want_reply=True))
                for d in sorted(docs) if d not in self.declined]

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
            if rep is not None and key in rep.poisoned:
                continue  # behind a refused record: nothing of it can ever be admitted
            start = have.get(key, 0)
            awaited = self.inflight.awaited(msg.doc_id, key, now)
            if awaited is not None:
                start = max(start, awaited)
            if theirs > start:
                ranges.append((key[0], key[1], start + 1, theirs))
                self.inflight.expect(msg.doc_id, key, theirs, now)
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

    def _within_budget(self, peer: str, msg: Records, rep: Replica | None, now: float
                       ) -> tuple[list[SignedUpdate], list[Rejected]]:
        """Split ``msg``'s records into those ``peer``'s token bucket pays for and the rest.
        Duplicates and records of poisoned writers cost nothing: they are dropped unparsed."""
        have = rep.vv() if rep is not None else {}
        poisoned = rep.poisoned if rep is not None else set()
        fresh = [r for r in sorted(msg.records, key=lambda r: (r.key, r.seq))
                 if r.seq > have.get(r.key, 0) and r.key not in poisoned]
        granted = self.budget.take(peer, len(fresh), now)
        if granted == len(fresh):
            return fresh, []
        docs = self._throttled.pop(peer, set())
        if len(docs) < self.limits.max_documents_per_peer + len(self.replicas):
            docs.add(msg.doc_id)
        self._throttled[peer] = docs
        while len(self._throttled) > self.limits.max_links:
            self._throttled.popitem(last=False)
        over = [Rejected(r, f"over {peer}'s budget of {self.limits.updates_per_peer_per_s:g} "
                            "records/s (crdt.updates_per_peer_per_s)", True, "update_rate")
                for r in fresh[granted:]]
        return fresh[:granted], over

    def _refuse_new(self, rep: Replica, accepted: list[SignedUpdate]) -> tuple[str, str] | None:
        """Why a document first seen now is not kept, as (label, reason); None to keep it."""
        doc = rep.doc
        if not accepted or not doc.is_participant(self.local_peer):
            return "not_participant", "not a participant of this session"
        if not self.accept_session(doc):
            return "declined", "invitation declined by accept_session"
        creator = doc.creator or ""
        n = self._created_by.get(creator, 0)
        if creator != self.local_peer and n >= self.limits.max_documents_per_peer:
            return "documents_per_peer", (f"creator {creator} already has {n} live documents with"
                                          " us (crdt.max_documents_per_peer)")
        return None

    def _on_records(self, peer: str, msg: Records, now: float, out: Output) -> None:
        doc_id = msg.doc_id
        rep = self.replicas.get(doc_id)
        if rep is None and doc_id in self.declined:
            return  # refused once: neither kept, nor parsed again
        records, over_budget = self._within_budget(peer, msg, rep, now)
        fresh = rep is None
        if rep is None:
            rep = self._new_replica(doc_id)
        accepted, rejected = rep.admit(records)
        rejected.extend(over_budget)
        if fresh:
            refusal = self._refuse_new(rep, accepted)
            if refusal is not None:
                label, reason = refusal
                self.inflight.drop_doc(doc_id)
                if label != "not_participant":
                    self._decline(doc_id, label)
                if accepted:  # one refusal per document, reported on its first record
                    out.rejected.append(Rejected(accepted[0], reason, label=label))
                out.rejected.extend(rejected)
                if label == "not_participant" and any(
                        r.retryable and r.label != "update_rate" for r in rejected):
                    # A push for a session we have not seen yet: ask for the whole history.
                    out.frames.append(encode(Step1(doc_id, {}, want_reply=True)))
                return
            self._register(doc_id, rep)
        out.rejected.extend(rejected)
        if accepted:
            out.accepted.setdefault(doc_id, []).extend(accepted)
            for rec in accepted:
                if self.on_accept:
                    self.on_accept(rec)
        vv = rep.vv()
        for key in {r.key for r in accepted}:
            upto = self.inflight.known(doc_id, key)
            if upto is not None and vv.get(key, 0) >= upto:
                self.inflight.done(doc_id, key)
            elif upto is not None:  # still arriving: the deadline measures silence, not the whole
                self.inflight.expect(doc_id, key, upto, now)  # transfer
        gap = False
        for rej in rejected:
            key = rej.record.key
            if not rej.retryable:
                if key in rep.poisoned:
                    self.inflight.done(doc_id, key)
                continue
            if rej.label != "update_rate" and rej.record.seq > vv.get(key, 0) + 1:
                gap = gap or self.inflight.awaited(doc_id, key, now) is None  # else: being fetched
            else:  # not yet admissible, or over budget: let a later round ask again
                self.inflight.done(doc_id, key)
        if gap and rep.doc.is_participant(peer):
            out.frames.append(self.step1(doc_id, want_reply=True))
