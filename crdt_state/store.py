"""Append-only on-disk log of signed updates, one file per document.

Record layout: ``u32 big-endian payload length || 32-byte BLAKE3(payload) || payload`` where the
payload is :meth:`SignedUpdate.to_bytes`. Each record goes out in a single ``write`` on an
unbuffered file, so a killed process loses at most the record being written; on load, a short or
corrupt record ends the log: the file is truncated to the last valid record and a warning logged.
Everything after a corrupt record is dropped too, because the log is only meaningful as a prefix
(peers resend whatever was lost; see ``sync.py``).

fsync policy: ``always`` (fsync each record: survives power loss), ``batch`` (fsync when the owner
calls :meth:`flush`, e.g. on each anti-entropy tick), ``never`` (leave it to the OS).
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import BinaryIO

import blake3

from crdt_state.limits import CrdtLimits
from crdt_state.wire import SignedUpdate, SyncProtocolError

log = logging.getLogger(__name__)

HEADER = struct.Struct(">I32s")
SUFFIX = ".crdtlog"
FSYNC_POLICIES = ("always", "batch", "never")


def encode_record(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), blake3.blake3(payload).digest()) + payload


class UpdateStore:
    def __init__(self, data_dir: str | os.PathLike[str], limits: CrdtLimits | None = None,
                 fsync: str | None = None) -> None:
        self.limits = limits or CrdtLimits()
        self.fsync = fsync or self.limits.fsync
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"crdt.fsync must be one of {FSYNC_POLICIES}, got {self.fsync!r}")
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, BinaryIO] = {}
        self._dirty: set[str] = set()

    def path_for(self, doc_id: str) -> Path:
        return self.dir / (blake3.blake3(doc_id.encode()).hexdigest()[:32] + SUFFIX)

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> list[SignedUpdate]:
        """All valid records of all documents, in append order; repairs corrupt tails."""
        out: list[SignedUpdate] = []
        for path in sorted(self.dir.glob("*" + SUFFIX)):
            out.extend(self._load_file(path))
        return out

    def _load_file(self, path: Path) -> list[SignedUpdate]:
        data = path.read_bytes()
        recs: list[SignedUpdate] = []
        pos = 0
        problem = ""
        while pos < len(data):
            if len(data) - pos < HEADER.size:
                problem = "partial record header"
                break
            n, digest = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + n
            if n > self.limits.max_frame_bytes:
                problem = f"record length {n} over limit"
                break
            if end > len(data):
                problem = "partial record"
                break
            payload = data[pos + HEADER.size:end]
            if blake3.blake3(payload).digest() != digest:
                problem = "checksum mismatch"
                break
            try:
                recs.append(SignedUpdate.from_bytes(payload, self.limits))
            except SyncProtocolError as exc:
                problem = f"undecodable record ({exc})"
                break
            pos = end
        if problem:
            log.warning("crdt store %s: %s at offset %d; truncating %d trailing bytes "
                        "(%d valid records kept)", path.name, problem, pos, len(data) - pos,
                        len(recs))
            with open(path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
        return recs

    # -- writing -------------------------------------------------------------------------------

    def append(self, rec: SignedUpdate) -> None:
        f = self._files.get(rec.doc_id)
        if f is None:
            path = self.path_for(rec.doc_id)
            created = not path.exists()
            f = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open for the store's life
            self._files[rec.doc_id] = f
            if created and self.fsync == "always":
                self._fsync_dir()
        f.write(encode_record(rec.to_bytes()))
        if self.fsync == "always":
            os.fsync(f.fileno())
        elif self.fsync == "batch":
            self._dirty.add(rec.doc_id)

    def flush(self) -> None:
        """fsync documents written since the last flush (the ``batch`` policy's commit point)."""
        for doc_id in self._dirty:
            f = self._files.get(doc_id)
            if f is not None:
                os.fsync(f.fileno())
        if self._dirty:
            self._fsync_dir()
        self._dirty.clear()

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fsync != "never":
            self.flush()
        for f in self._files.values():
            f.close()
        self._files.clear()
