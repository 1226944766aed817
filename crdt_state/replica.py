"""One document replica: the pycrdt document plus the log of signed updates that built it.

The log, not the merged pycrdt state, is what replicates: every update travels as its author
signed it, so a record relayed through any number of peers is still verifiable, and a peer's
knowledge is summarised by a version vector (writer -> highest contiguous sequence number).

Admission rules (each failure leaves the document untouched, because pycrdt only sees an update
after every check has passed): the signature verifies and the key hashes to the author; the
update fits ``max_update_bytes`` and the document stays under ``max_document_bytes``; the sequence
number is the writer's next one; the author is a participant — or, for the very first record of
a document, the update itself creates the session with its author as creator and participant.
"""

from __future__ import annotations

from dataclasses import dataclass

from libp2p.peer.id import ID

from crdt_state.limits import CrdtLimits
from crdt_state.schema import SessionDoc
from crdt_state.signing import BadSignature, Signer, Verifier
from crdt_state.wire import SignedUpdate, WriterKey


@dataclass(frozen=True)
class Rejected:
    record: SignedUpdate
    reason: str
    retryable: bool = False  # gap or not-yet-participant: a later sync round may succeed


class Replica:
    def __init__(self, doc_id: str, limits: CrdtLimits, signer: Signer, writer: bytes,
                 verifier: Verifier) -> None:
        self.doc_id = doc_id
        self.limits = limits
        self.doc = SessionDoc(on_local_update=self._on_local)
        self.log: dict[WriterKey, list[SignedUpdate]] = {}
        self.nbytes = 0
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
        seq = len(self.log.get(key, [])) + 1
        rec = self._signer.sign(self.doc_id, self._writer, seq, update)
        self.log.setdefault(key, []).append(rec)
        self.nbytes += len(update)
        self.outbox.append(rec)

    def drain(self) -> list[SignedUpdate]:
        out, self.outbox = self.outbox, []
        return out

    # -- remote records ------------------------------------------------------------------------

    def _authorized(self, rec: SignedUpdate, author: str) -> bool:
        if self.doc.is_participant(author):
            return True
        if self.log:
            return False
        # Genesis: try it on a scratch document; it must create this session with its author
        # as creator and participant.
        scratch = SessionDoc()
        try:
            scratch.apply_update(rec.update)
        except ValueError:
            return False
        return (scratch.session_id == self.doc_id and scratch.creator == author
                and scratch.is_participant(author))

    def admit(self, records: list[SignedUpdate], verify: bool = True
              ) -> tuple[list[SignedUpdate], list[Rejected]]:
        """Apply what passes every check, in causal-enough order; report the rest."""
        accepted: list[SignedUpdate] = []
        rejected: list[Rejected] = []
        candidates: list[tuple[SignedUpdate, str]] = []
        for rec in sorted(records, key=lambda r: (r.key, r.seq)):
            if rec.doc_id != self.doc_id:
                rejected.append(Rejected(rec, "record for another document"))
            elif rec.seq <= len(self.log.get(rec.key, [])):
                continue  # duplicate: already have it
            elif len(rec.update) > self.limits.max_update_bytes:
                rejected.append(Rejected(rec, f"oversized update ({len(rec.update)} bytes)"))
            else:
                try:
                    author = self._verifier.verify(rec) if verify else ID(rec.author).to_base58()
                except BadSignature as exc:
                    rejected.append(Rejected(rec, str(exc)))
                    continue
                candidates.append((rec, author))
        # Several passes: a batch may add a participant and carry that participant's edits.
        progress = True
        while candidates and progress:
            progress = False
            rest: list[tuple[SignedUpdate, str]] = []
            for rec, author in candidates:
                have = len(self.log.get(rec.key, []))
                if rec.seq <= have:
                    continue
                if rec.seq != have + 1 or not self._authorized(rec, author):
                    rest.append((rec, author))
                    continue
                if self.nbytes + len(rec.update) > self.limits.max_document_bytes:
                    rejected.append(Rejected(rec, "document size limit reached"))
                    continue
                try:
                    self.doc.apply_update(rec.update)
                except ValueError:
                    rejected.append(Rejected(rec, "undecodable pycrdt update"))
                    continue
                self.log.setdefault(rec.key, []).append(rec)
                self.nbytes += len(rec.update)
                accepted.append(rec)
                progress = True
            candidates = rest
        for rec, author in candidates:
            have = len(self.log.get(rec.key, []))
            if rec.seq != have + 1:
                rejected.append(Rejected(rec, "gap in writer sequence", retryable=True))
            else:
                rejected.append(Rejected(rec, f"author {author} is not a participant",
                                         retryable=True))
        return accepted, rejected
