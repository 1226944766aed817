"""One message in flight: the sender's chunk sealer and the receiver's chunk opener/verifier.

This is the data-plane API. The session produces these objects; any transport moves the *same*
sealed chunks: the libp2p stream (wrapped in CHUNK frames by the session), a direct TCP bulk lane,
or a shared-memory ring. Chunk ``i`` covers payload bytes ``[i*chunk_bytes, (i+1)*chunk_bytes)``;
sealed it is ``plain_len + tag_bytes`` long. The receiver decrypts chunk ``i`` straight into its
one preallocated message buffer at offset ``i*chunk_bytes``; chunks must arrive in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import blake3

from .aead import Opener, Sealer
from .envelope import Envelope, TensorSpec
from .errors import ErrorCode, ProtocolError

#: With ``hash_threads != 1``, only tensors at least this large use several threads.
PARALLEL_HASH_BYTES = 8 * 1024 * 1024


def _threads(nbytes: int, hash_threads: int) -> int:
    """blake3 ``max_threads`` for a tensor: 1 by default, because on a shared 2-vCPU box AUTO was
    slower (2.1 vs 3.4 GB/s measured) and AUTO hangs in a fork child (DESIGN.md §6)."""
    if hash_threads == 1 or nbytes < PARALLEL_HASH_BYTES:
        return 1
    return blake3.blake3.AUTO if hash_threads <= 0 else hash_threads


def checksum(data: memoryview, hash_threads: int = 1) -> bytes:
    """BLAKE3 of one tensor's bytes (``hash_threads``: 1 single, 0 AUTO, n threads)."""
    return blake3.blake3(data, max_threads=_threads(len(data), hash_threads)).digest()


def checksums(payload: memoryview, specs: Sequence[TensorSpec], hash_threads: int = 1) -> list[bytes]:
    out, off = [], 0
    for s in specs:
        out.append(checksum(payload[off:off + s.byte_length], hash_threads))
        off += s.byte_length
    return out


def chunk_count(payload_bytes: int, chunk_bytes: int) -> int:
    return -(-payload_bytes // chunk_bytes)


class OutgoingMessage:
    """Sender side of one message: its envelope and a sealer for each of its chunks."""

    def __init__(self, envelope: Envelope, payload: memoryview, sealer: Sealer,
                 chunk_bytes: int, inline: bool, sent_at: float = 0.0) -> None:
        self.envelope = envelope
        self.sent_at = sent_at
        self.payload = payload
        self.chunk_bytes = chunk_bytes
        self.n_chunks = chunk_count(len(payload), chunk_bytes)
        self.inline = inline
        self.next_chunk = 0  # for the session's inline emitter
        self.header_sent = False
        self._sealer = sealer

    @property
    def message_id(self) -> int:
        return self.envelope.message_id

    @property
    def tag_bytes(self) -> int:
        return self._sealer.tag_bytes

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, plaintext length) of chunk ``index``."""
        if not 0 <= index < self.n_chunks:
            raise ProtocolError(ErrorCode.STATE, f"chunk {index} out of range 0..{self.n_chunks}")
        off = index * self.chunk_bytes
        return off, min(self.chunk_bytes, len(self.payload) - off)

    def sealed_size(self, index: int) -> int:
        return self.chunk_span(index)[1] + self.tag_bytes

    def seal_chunk(self, index: int, out: memoryview | bytearray | None = None) -> memoryview:
        """Encrypt chunk ``index`` into ``out`` (or a new buffer); returns the sealed bytes view.

        The nonce is derived from (message id, index): resealing the same index is only safe while
        the payload is unchanged, so the payload must stay untouched until the ACK.
        """
        off, n = self.chunk_span(index)
        dst = memoryview(out if out is not None else bytearray(n + self.tag_bytes))
        written = self._sealer.seal_chunk_into(self.message_id, index, index == self.n_chunks - 1,
                                               self.payload[off:off + n], dst)
        return dst[:written]


class IncomingMessage:
    """Receiver side of one message: opens chunks in order into ``buffer`` and verifies at the end."""

    def __init__(self, envelope: Envelope, buffer: memoryview, opener: Opener,
                 chunk_bytes: int, started_at: float = 0.0, hash_threads: int = 1) -> None:
        if len(buffer) != envelope.payload_bytes:
            raise ProtocolError(ErrorCode.LIMIT, "receive buffer does not match the payload size")
        self.envelope = envelope
        self.buffer = buffer
        self.chunk_bytes = chunk_bytes
        self.n_chunks = chunk_count(len(buffer), chunk_bytes)
        self.next_chunk = 0
        self.started_at = started_at
        self._opener = opener
        # BLAKE3 runs as chunks land (data still in cache), one hasher per tensor, in order
        self._spans: list[tuple[int, int, Any]] = []
        off = 0
        for spec in envelope.tensors:
            threads = _threads(spec.byte_length, hash_threads)
            self._spans.append((off, off + spec.byte_length, blake3.blake3(max_threads=threads)))
            off += spec.byte_length
        self._span = 0

    @property
    def message_id(self) -> int:
        return self.envelope.message_id

    @property
    def complete(self) -> bool:
        return self.next_chunk == self.n_chunks

    def open_chunk(self, index: int, sealed: bytes | bytearray | memoryview) -> int:
        """Decrypt chunk ``index`` into its slot; ORDER if not the next one, DECRYPT if tampered."""
        if index != self.next_chunk:
            raise ProtocolError(ErrorCode.ORDER, f"chunk {index} arrived, expected {self.next_chunk}")
        off = index * self.chunk_bytes
        n = min(self.chunk_bytes, len(self.buffer) - off)
        if len(sealed) != n + self._opener.tag_bytes:
            raise ProtocolError(ErrorCode.ORDER, f"chunk {index} has {len(sealed)} sealed bytes, "
                                f"expected {n + self._opener.tag_bytes}")
        self._opener.open_chunk_into(self.message_id, index, index == self.n_chunks - 1,
                                     sealed, self.buffer[off:off + n])
        self.next_chunk += 1
        self._hash_range(off, off + n)
        return n

    def _hash_range(self, lo: int, hi: int) -> None:
        while self._span < len(self._spans):
            start, end, hasher = self._spans[self._span]
            a, b = max(lo, start), min(hi, end)
            if a < b:
                hasher.update(self.buffer[a:b])
            if end > hi:
                return
            self._span += 1

    def verify(self) -> tuple[list[bytes], list[tuple[TensorSpec, memoryview]]]:
        """Recompute every BLAKE3 over the plaintext (invariant C); CHECKSUM on any mismatch."""
        if not self.complete:
            raise ProtocolError(ErrorCode.ORDER, f"message truncated at chunk {self.next_chunk}")
        sums = [h.digest() for _, _, h in self._spans]
        views, off = [], 0
        for spec, got in zip(self.envelope.tensors, sums, strict=True):
            if got != spec.blake3:
                raise ProtocolError(ErrorCode.CHECKSUM, f"BLAKE3 mismatch for tensor {spec.name!r}")
            views.append((spec, self.buffer[off:off + spec.byte_length]))
            off += spec.byte_length
        return sums, views
