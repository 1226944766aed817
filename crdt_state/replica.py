"""One document replica: the pycrdt document plus the log of signed updates that built it.

The log, not the merged pycrdt state, is what replicates: every update travels as its author
signed it, so a record relayed through any number of peers is still verifiable, and a peer's
knowledge is summarised by a version vector (writer -> highest contiguous sequence number).

Admission rules (each failure leaves the document untouched, because pycrdt only sees an update
after every check has passed): the signature verifies and the key hashes to the author; the
update fits ``max_update_bytes`` and the document stays under ``max_document_bytes``; the sequence
number is the writer's next one; the author is a participant — or, for the very first record of
a document, the update itself creates the session with its author as creator and participant;
and the author may write every key the update writes (``ownership.py``: an outcome only by the
message's receiver, a message only by its sender, ...).

A writer whose record breaks a rule is *poisoned* in this document: its later records can never
follow (sequence numbers are contiguous), so they are dropped without being fetched or parsed
again. Every honest replica refuses the same record, so they all keep the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from libp2p.peer.id import ID

from crdt_state.limits import CrdtLimits
from crdt_state.ownership import KeyIndex, Refusal, check, client_id
from crdt_state.schema import SessionDoc
from crdt_state.signing import BadSignature, Signer, Verifier
from crdt_state.wire import SignedUpdate, WriterKey


@dataclass(frozen=True)
class Rejected:
    record: SignedUpdate
    reason: str
    retryable: bool = False  # gap or not-yet-participant: a later sync round may succeed
    label: str = "rejected"  # low-cardinality reason, for metrics


class Replica:
    def __init__(self, doc_id: str, limits: CrdtLimits, signer: Signer, writer: bytes,
                 verifier: Verifier) -> None:
        self.doc_id = doc_id
        self.limits = limits
        self._client = client_id(signer.author, writer)
        self.doc = SessionDoc(on_local_update=self._on_local, client_id=self._client,
                              owner=signer.peer_id.to_base58())
        self.log: dict[WriterKey, list[SignedUpdate]] = {}
        self.nbytes = 0
        self.index = KeyIndex()
        self.poisoned: set[WriterKey] = set()  # bounded by max_writers_per_doc
        self._signer = signer
        self._writer = writer
        self._verifier = verifier
        self.outbox: list[SignedUpdate] = []

    # -- knowledge -----------------------------------------------------------------------------

    def vv(self) -> dict[WriterKey, int]:
        return {k: len(v) for k, v in self.log.items()}

    def records_in(self, key: WriterKey, first: int, last: int) -> list[SignedUpdate]:
        return self.log.get(key, [])[first - 1:last]

    # -- local edits ---------------------------------------------------------------------------

    def _on_local(self, update: bytes) -> None:
        key = (self._signer.author, self._writer)
        try:
            checked = check(update, self._signer.peer_id.to_base58(), self._client, self.index,
                            self.doc_id, genesis=not self.log)
        except Refusal as exc:  # a caller wrote through SessionDoc around the service API
            raise RuntimeError(f"local edit breaks the ownership rules: {exc.reason}") from None
        self.index.add(checked.client, checked.targets)
        seq = len(self.log.get(key, [])) + 1
        rec = self._signer.sign(self.doc_id, self._writer, seq, update)
        self.log.setdefault(key, []).append(rec)
        self.nbytes += len(update)
        self.outbox.append(rec)

    def drain(self) -> list[SignedUpdate]:
        out, self.outbox = self.outbox, []
        return out

    # -- remote records ------------------------------------------------------------------------

    def _try(self, rec: SignedUpdate, author: str) -> Rejected | None:
        """Apply ``rec`` if it passes every rule; else say why (retryable: wait in ``rest``)."""
        genesis = not self.log
        if not genesis and not self.doc.is_participant(author):
            return Rejected(rec, f"author {author} is not a participant", True, "not_participant")
        try:
            checked = check(rec.update, author, client_id(rec.author, rec.writer), self.index,
                            self.doc_id, genesis)
        except Refusal as exc:
            if genesis:  # no document yet: nothing to poison; maybe its genesis is still coming
                return Rejected(rec, f"not a valid first record ({exc.reason})", True,
                                "not_participant")
            if not exc.retryable:
                self._poison(rec.key)
            return Rejected(rec, exc.reason, exc.retryable, exc.label)
        if genesis and not checked.genesis_ok:
            return Rejected(rec, f"author {author} is not a participant", True, "not_participant")
        if self.nbytes + len(rec.update) > self.limits.max_document_bytes:
            return Rejected(rec, "document size limit reached", False, "document_size")
        try:
            self.doc.apply_update(rec.update)
        except ValueError:
            self._poison(rec.key)
            return Rejected(rec, "undecodable pycrdt update", False, "undecodable")
        self.index.add(checked.client, checked.targets)
        self.log.setdefault(rec.key, []).append(rec)
        self.nbytes += len(rec.update)
        return None

    def _poison(self, key: WriterKey) -> None:
        if len(self.poisoned) < self.limits.max_writers_per_doc:
            self.poisoned.add(key)

    def admit(self, records: list[SignedUpdate], verify: bool = True
              ) -> tuple[list[SignedUpdate], list[Rejected]]:
        """Apply what passes every check, in causal-enough order; report the rest."""
        accepted: list[SignedUpdate] = []
        rejected: list[Rejected] = []
        candidates: list[tuple[SignedUpdate, str]] = []
        for rec in sorted(records, key=lambda r: (r.key, r.seq)):
            if rec.doc_id != self.doc_id:
                rejected.append(Rejected(rec, "record for another document", label="malformed"))
            elif rec.seq <= len(self.log.get(rec.key, [])) or rec.key in self.poisoned:
                continue  # duplicate, or behind a refused record of the same writer
            elif len(rec.update) > self.limits.max_update_bytes:
                rejected.append(Rejected(rec, f"oversized update ({len(rec.update)} bytes)",
                                         label="oversized"))
            else:
                try:
                    author = self._verifier.verify(rec) if verify else ID(rec.author).to_base58()
                except BadSignature as exc:
                    rejected.append(Rejected(rec, str(exc), label="bad_signature"))
                    continue
                candidates.append((rec, author))
        # Several passes: a batch may add a participant and carry that participant's edits.
        progress = True
        waiting: dict[WriterKey, Rejected] = {}
        while candidates and progress:
            progress = False
            rest: list[tuple[SignedUpdate, str]] = []
            for rec, author in candidates:
                have = len(self.log.get(rec.key, []))
                if rec.seq <= have or rec.key in self.poisoned:
                    continue
                if rec.seq != have + 1:
                    rest.append((rec, author))
                    continue
                rej = self._try(rec, author)
                if rej is None:
                    accepted.append(rec)
                    progress = True
                elif rej.retryable:
                    waiting[rec.key] = rej
                    rest.append((rec, author))
                else:
                    rejected.append(rej)
            candidates = rest
        for rec, _author in candidates:
            have = len(self.log.get(rec.key, []))
            if rec.key in self.poisoned:
                continue
            if rec.seq != have + 1:
                rejected.append(Rejected(rec, "gap in writer sequence", True, "gap"))
            else:
                rejected.append(waiting[rec.key])
        return accepted, rejected
