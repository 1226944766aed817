"""One message in flight: the sender's chunk sealer and the receiver's chunk opener/verifier.

This is the data-plane API. The session produces these objects; any transport moves the *same*
sealed chunks: the libp2p stream (wrapped in CHUNK frames by the session), a direct TCP bulk lane,
or a shared-memory ring. Chunk ``i`` covers payload bytes ``[i*chunk_bytes, (i+1)*chunk_bytes)``;
sealed it is ``plain_len + tag_bytes`` long; chunks are sealed and opened in order.

Checksums travel *after* the data (a DIGEST frame): the sender hashes each chunk's plaintext while
it seals it, so the payload is read once, hashing overlaps the transfer, and a payload that never
exists in memory as a whole (a :class:`PayloadSource`) can be sent. The receiver hashes each chunk
as it lands and compares at the end; it either keeps the whole message in one buffer or hands each
opened chunk to a :class:`ChunkSink` (bounded memory, e.g. a file or device memory), which learns
at the end whether the message verified.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import blake3

from .aead import Opener, Sealer
from .envelope import Envelope, TensorSpec
from .errors import ErrorCode, ProtocolError, UsageError

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


def chunk_count(payload_bytes: int, chunk_bytes: int) -> int:
    return -(-payload_bytes // chunk_bytes)


class PayloadSource(Protocol):
    """Payload bytes produced on demand, so a sender never holds a whole large payload at once."""

    nbytes: int

    def chunk(self, offset: int, n: int, scratch: memoryview) -> memoryview:
        """Payload bytes ``[offset, offset+n)``: a view of existing memory, or ``scratch[:n]``
        filled in. Must return the same bytes if asked again (a chunk may be resealed)."""
        ...


class ChunkSink(Protocol):
    """Where a streamed message's plaintext goes, chunk by chunk, in order, *before* it is verified.

    Stage it (a temporary file, a device buffer); commit only once the message is delivered
    (``MessageReceived`` carries the sink). ``abort`` means it failed: discard everything staged.
    ``write`` runs on the session owner's thread (the node's event loop): keep it quick (a file
    write, a device copy) or hand the bytes to a worker; an exception rejects the message.
    """

    def write(self, offset: int, data: memoryview) -> None: ...

    def abort(self) -> None: ...


class MemorySource:
    """One contiguous buffer: chunks are slices of it (no copy)."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.nbytes = view, len(view)

    def chunk(self, offset: int, n: int, scratch: memoryview) -> memoryview:
        return self.view[offset:offset + n]


class GatherSource:
    """Several buffers back to back without packing them first: a chunk inside one buffer is a
    slice of it; one that straddles buffers is gathered into ``scratch`` (which the sealer then
    encrypts in place), so the sender never allocates a payload-sized pack buffer."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.views = [v for v in views if len(v)]
        self.starts, off = [], 0
        for v in self.views:
            self.starts.append(off)
            off += len(v)
        self.nbytes = off

    def chunk(self, offset: int, n: int, scratch: memoryview) -> memoryview:
        i = bisect.bisect_right(self.starts, offset) - 1
        rel = offset - self.starts[i]
        if rel + n <= len(self.views[i]):
            return self.views[i][rel:rel + n]
        done = 0
        while done < n:
            v = self.views[i]
            take = min(len(v) - rel, n - done)
            scratch[done:done + take] = v[rel:rel + take]
            done += take
            i, rel = i + 1, 0
        return scratch[:n]


class _TensorHashes:
    """One BLAKE3 per tensor, fed with consecutive payload ranges that may cross tensor bounds."""

    def __init__(self, specs: Sequence[TensorSpec], hash_threads: int) -> None:
        self._spans: list[tuple[int, int, Any]] = []
        off = 0
        for spec in specs:
            threads = _threads(spec.byte_length, hash_threads)
            self._spans.append((off, off + spec.byte_length, blake3.blake3(max_threads=threads)))
            off += spec.byte_length
        self._span = 0

    def update(self, lo: int, data: memoryview) -> None:
        """Hash ``data``, which holds payload bytes ``[lo, lo+len(data))``."""
        hi = lo + len(data)
        while self._span < len(self._spans):
            start, end, hasher = self._spans[self._span]
            a, b = max(lo, start), min(hi, end)
            if a < b:
                hasher.update(data[a - lo:b - lo])
            if end > hi:
                return
            self._span += 1

    def digests(self) -> list[bytes]:
        return [h.digest() for _, _, h in self._spans]


class OutgoingMessage:
    """Sender side of one message: seals its chunks in order, hashing each one's plaintext on the
    way; once the last chunk is sealed :attr:`digests` holds the per-tensor BLAKE3 (DIGEST frame)."""

    def __init__(self, envelope: Envelope, payload: PayloadSource, sealer: Sealer,
                 chunk_bytes: int, inline: bool, sent_at: float = 0.0, hash_threads: int = 1) -> None:
        self.envelope = envelope
        self.sent_at = sent_at
        self.source = payload
        self.nbytes = payload.nbytes
        self.chunk_bytes = chunk_bytes
        self.n_chunks = chunk_count(self.nbytes, chunk_bytes)
        self.inline = inline
        self.next_chunk = 0  # for the session's inline emitter
        self.header_sent = False
        self.digest_sent = False
        self._sealer = sealer
        self._hashes = _TensorHashes(envelope.tensors, hash_threads)
        self._hashed = 0  # chunks hashed so far (each exactly once, in order)
        self.digests: tuple[bytes, ...] | None = None
        if self.n_chunks == 0:
            self._complete()

    @property
    def message_id(self) -> int:
        return self.envelope.message_id

    @property
    def tag_bytes(self) -> int:
        return self._sealer.tag_bytes

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, plaintext length) of chunk ``index``."""
        if not 0 <= index < self.n_chunks:
            raise UsageError(ErrorCode.STATE, f"chunk {index} out of range 0..{self.n_chunks}")
        off = index * self.chunk_bytes
        return off, min(self.chunk_bytes, self.nbytes - off)

    def sealed_size(self, index: int) -> int:
        return self.chunk_span(index)[1] + self.tag_bytes

    def seal_chunk(self, index: int, out: memoryview | bytearray | None = None) -> memoryview:
        """Encrypt chunk ``index`` into ``out`` (or a new buffer); returns the sealed bytes view.

        Chunks are first sealed in order (each is hashed then); resealing an earlier one is allowed.
        The nonce is derived from (message id, index): resealing is only safe while the payload is
        unchanged, so it must stay untouched until the ACK. A source may fill ``out`` itself, which
        is then encrypted in place.
        """
        off, n = self.chunk_span(index)
        if index > self._hashed:
            raise UsageError(ErrorCode.STATE, f"chunk {index} sealed before chunk {self._hashed}")
        dst = memoryview(out if out is not None else bytearray(n + self.tag_bytes))
        plain = self.source.chunk(off, n, dst[:n])
        if len(plain) != n:
            raise UsageError(ErrorCode.STATE, f"payload source gave {len(plain)} of {n} bytes")
        if index == self._hashed:
            self._hashes.update(off, plain)
            self._hashed += 1
            if self._hashed == self.n_chunks:
                self._complete()
        written = self._sealer.seal_chunk_into(self.message_id, index, index == self.n_chunks - 1,
                                               plain, dst)
        return dst[:written]

    def _complete(self) -> None:
        sums = tuple(self._hashes.digests())
        self.envelope = self.envelope.with_checksums(sums)
        self.digests = sums  # last: another thread polls it (lanes seal in worker threads)


class IncomingMessage:
    """Receiver side of one message: opens chunks in order, hashes them, verifies at the end.

    Without a sink, chunk ``i`` is decrypted straight into ``buffer`` at its final offset. With a
    sink, ``buffer`` is a one-chunk staging area and each opened chunk is handed to the sink.
    The buffer is allocated when the first chunk arrives, never for a header alone, through
    ``allocate(n)`` (fresh anonymous memory is committed page by page as chunks land).
    """

    def __init__(self, envelope: Envelope, opener: Opener, chunk_bytes: int,
                 started_at: float = 0.0, hash_threads: int = 1, sink: ChunkSink | None = None,
                 allocate: Callable[[int], Any] | None = None) -> None:
        self.envelope = envelope
        self.sink = sink
        self.nbytes = envelope.payload_bytes
        self.chunk_bytes = chunk_bytes
        self.n_chunks = chunk_count(self.nbytes, chunk_bytes)
        self.next_chunk = 0
        self.started_at = started_at
        self.progress_at = started_at  # last chunk or DIGEST (the progress timeout runs from here)
        self.charged = 0  # bytes this message holds in the receive budget
        self.expected: tuple[bytes, ...] | None = None  # from the DIGEST frame
        self.buffer: memoryview | None = None
        self._owner: Any = None  # what allocate() returned (may commit memory ahead, see below)
        self._allocate = allocate or bytearray
        self._opener = opener
        # BLAKE3 runs as chunks land (data still in cache), one hasher per tensor, in order
        self._hashes = _TensorHashes(envelope.tensors, hash_threads)

    @property
    def buffer_size(self) -> int:
        return min(self.chunk_bytes, self.nbytes) if self.sink is not None else self.nbytes

    def set_buffer(self, buffer: Any) -> None:
        """Use ``buffer`` (e.g. pinned memory) instead of allocating; only before the first chunk."""
        view = _flat(buffer)
        if self.next_chunk or len(view) < self.buffer_size:
            raise UsageError(ErrorCode.LIMIT, "receive buffer does not match the payload size")
        self.buffer = view[:self.buffer_size]

    def _ensure_buffer(self) -> memoryview:
        if self.buffer is None:
            self._owner = self._allocate(self.buffer_size)
            self.set_buffer(self._owner)
        assert self.buffer is not None
        return self.buffer

    def _commit_ahead(self, start: int, end: int) -> None:
        """Let the buffer's owner commit payload bytes ``[start, end)`` before chunks land there,
        if it can (an object with ``commit(start, end)``, e.g. the node's receive maps, which
        populate pages in a worker thread): the event loop then never waits on page faults."""
        commit = getattr(self._owner, "commit", None)
        if commit is not None and end > start:
            commit(start, end)

    @property
    def message_id(self) -> int:
        return self.envelope.message_id

    @property
    def complete(self) -> bool:
        return self.next_chunk == self.n_chunks

    @property
    def ready(self) -> bool:
        """Every chunk opened and the sender's digests known: time to verify."""
        return self.complete and self.expected is not None

    def chunk_size(self, index: int) -> int:
        """Plaintext bytes of chunk ``index``."""
        return min(self.chunk_bytes, self.nbytes - index * self.chunk_bytes)

    def slot(self, index: int) -> memoryview:
        """Where chunk ``index``'s plaintext goes: its final place in ``buffer``, or the staging."""
        buf = self._ensure_buffer()
        off = index * self.chunk_bytes
        n = self.chunk_size(index)
        return buf[:n] if self.sink is not None else buf[off:off + n]

    def open_chunk(self, index: int, sealed: bytes | bytearray | memoryview,
                   commit_upto: int = 0) -> int:
        """Decrypt chunk ``index`` into its slot; ORDER if not the next one, DECRYPT if tampered.
        ``commit_upto``: payload bytes the receiver already charged, which the buffer may commit
        ahead (past this chunk) while this one is opened."""
        if index != self.next_chunk:
            raise ProtocolError(ErrorCode.ORDER, f"chunk {index} arrived, expected {self.next_chunk}")
        n = self.chunk_size(index)
        if len(sealed) != n + self._opener.tag_bytes:
            raise ProtocolError(ErrorCode.ORDER, f"chunk {index} has {len(sealed)} sealed bytes, "
                                f"expected {n + self._opener.tag_bytes}")
        dst = self.slot(index)  # checked first: a bad chunk never makes us allocate
        if self.sink is None:
            self._commit_ahead(index * self.chunk_bytes + n, commit_upto)
        self._opener.open_chunk_into(self.message_id, index, index == self.n_chunks - 1, sealed, dst)
        self.next_chunk += 1
        off = index * self.chunk_bytes
        self._hashes.update(off, dst)
        if self.sink is not None:
            try:
                self.sink.write(off, dst)
            except Exception as exc:  # the application's sink (disk full, ...): this message only
                raise ProtocolError(ErrorCode.LIMIT, f"receiver's sink failed: {exc}"[:200]) from None
        return n

    def set_expected(self, sums: Sequence[bytes]) -> None:
        """The sender's per-tensor BLAKE3 (its DIGEST frame): exactly one, one digest per tensor."""
        if self.expected is not None:
            raise ProtocolError(ErrorCode.REPLAY, "second DIGEST for one message")
        if len(sums) != len(self.envelope.tensors):
            raise ProtocolError(ErrorCode.MALFORMED, f"DIGEST has {len(sums)} checksums for "
                                f"{len(self.envelope.tensors)} tensors")
        self.expected = tuple(sums)

    def discard(self) -> None:
        """The message will never be delivered: tell the sink to drop what it staged."""
        if self.sink is not None:
            sink, self.sink = self.sink, None
            try:
                sink.abort()
            except Exception:  # nothing more to undo; the message is rejected either way
                pass

    def verify(self) -> tuple[list[bytes], list[tuple[TensorSpec, memoryview]]]:
        """Compare every BLAKE3 of the plaintext with the sender's (invariant C); CHECKSUM on any
        mismatch. Returns the sums and, without a sink, zero-copy views of each tensor."""
        if not self.complete:
            raise ProtocolError(ErrorCode.ORDER, f"message truncated at chunk {self.next_chunk}")
        if self.expected is None:
            raise ProtocolError(ErrorCode.ORDER, "no DIGEST for this message")
        sums = self._hashes.digests()
        for spec, got, want in zip(self.envelope.tensors, sums, self.expected, strict=True):
            if got != want:
                raise ProtocolError(ErrorCode.CHECKSUM, f"BLAKE3 mismatch for tensor {spec.name!r}")
        self.envelope = self.envelope.with_checksums(sums)
        views, off = [], 0
        if self.sink is None:
            self._ensure_buffer()  # an empty payload has no chunk that would have allocated it
            assert self.buffer is not None
            for spec in self.envelope.tensors:
                views.append((spec, self.buffer[off:off + spec.byte_length]))
                off += spec.byte_length
        return sums, views


def _flat(buf: Any) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
