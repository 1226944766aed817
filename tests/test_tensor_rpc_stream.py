"""Checksums after the data (DIGEST), payload sources and chunk sinks (bounded memory), sans-I/O."""

from __future__ import annotations

import blake3
import numpy as np
import pytest

from tensor_rpc import (
    AckReceived,
    Closed,
    ErrorCode,
    GatherSource,
    Kind,
    Limits,
    MessageReceived,
    MessageRejected,
    TensorSpec,
    UsageError,
    control,
    pack_tensors,
    tensor_source,
)
from tensor_rpc.framing import FrameType
from tensor_rpc.testing import make_pair

LIM = Limits(chunk_bytes=4096, recv_window_bytes=8192, handshake_timeout_s=50,
             idle_timeout_s=10_000, transfer_timeout_s=50)
RNG = np.random.default_rng(3)
A = RNG.integers(0, 255, 5000, dtype=np.uint8)
B = RNG.integers(0, 255, 7001, dtype=np.uint8)  # 12001 bytes: 3 chunks, tensors straddle chunk 1


def _items():
    return [("a", "uint8", A.shape, A), ("b", "uint8", B.shape, B)]


class PatternSource:
    """A payload produced on demand (never held whole): byte i = (i * 7 + seed) mod 251."""

    def __init__(self, nbytes: int, seed: int = 1) -> None:
        self.nbytes, self.seed, self.calls = nbytes, seed, 0

    def expected(self) -> bytes:
        return ((np.arange(self.nbytes, dtype=np.int64) * 7 + self.seed) % 251).astype(np.uint8).tobytes()

    def chunk(self, offset, n, scratch):
        self.calls += 1
        scratch[:n] = ((np.arange(offset, offset + n, dtype=np.int64) * 7 + self.seed) % 251).astype(np.uint8).tobytes()
        return scratch[:n]


class RecordingSink:
    def __init__(self) -> None:
        self.parts: list[tuple[int, bytes]] = []
        self.aborted = False

    def write(self, offset, data):
        self.parts.append((offset, bytes(data)))

    def abort(self):
        self.aborted = True

    def data(self) -> bytes:
        return b"".join(d for _, d in self.parts)


def _lane_send(p, specs, payload, deliver_digest_first=True):
    """Send on a 'lane': header on the control stream, sealed chunks fed to receive_chunk."""
    msg = p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=specs,
                           payload=payload, now=1.0, inline=False)
    p.events_b += p.b.receive_data(p.a.data_to_send(), 1.0)
    chunks = [bytes(msg.seal_chunk(i)) for i in range(msg.n_chunks)]
    digest = p.a.data_to_send()
    if deliver_digest_first:
        p.events_b += p.b.receive_data(digest, 1.0)
    for i, c in enumerate(chunks):
        p.events_b += p.b.receive_chunk(msg.message_id, i, c, 1.0)
    if not deliver_digest_first:
        assert not [e for e in p.events_b if isinstance(e, MessageReceived)], "delivered before DIGEST"
        p.events_b += p.b.receive_data(digest, 1.0)
    p.pump(1.0)
    return msg


def _header_sent(p):
    """A lane message of the two test tensors whose HEADER reached b; chunks not sealed yet."""
    specs, src = tensor_source(_items())
    msg = p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=specs,
                           payload=src, now=1.0, inline=False)
    p.events_b += p.b.receive_data(p.a.data_to_send(), 1.0)
    return msg


def _delivered(p):
    return [e for e in p.events_b if isinstance(e, MessageReceived)]


@pytest.mark.parametrize("digest_first", [True, False])
def test_digest_before_or_after_the_last_lane_chunk(digest_first):
    p = make_pair(LIM, LIM)
    specs, src = tensor_source(_items())
    msg = _lane_send(p, specs, src, digest_first)
    got = _delivered(p)
    assert len(got) == 1
    assert [bytes(v) for _, v in got[0].tensors] == [A.tobytes(), B.tobytes()]
    sums = (blake3.blake3(A.tobytes()).digest(), blake3.blake3(B.tobytes()).digest())
    assert msg.digests == sums
    assert [s.blake3 for s, _ in got[0].tensors] == list(sums)
    assert [e.checksums for e in p.events_a if isinstance(e, AckReceived)] == [sums]


def test_gather_source_seals_straight_from_tensor_memory():
    specs, src = tensor_source(_items())
    assert isinstance(src, GatherSource) and src.nbytes == 12001
    packed = pack_tensors(_items())[1].tobytes()
    scratch = memoryview(bytearray(4096))
    for off in range(0, 12001, 4096):
        n = min(4096, 12001 - off)
        assert bytes(src.chunk(off, n, scratch)) == packed[off:off + n]
    inside = src.chunk(0, 4096, scratch)  # inside tensor a: a view of it, not the scratch
    assert inside.obj is not scratch.obj


def test_inline_message_from_a_source_into_a_sink():
    sink = RecordingSink()
    p = make_pair(LIM, LIM)
    p.b.sink_factory = lambda env: sink
    src = PatternSource(10_000)
    p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                     tensors=[TensorSpec("x", "uint8", (10_000,), 10_000)], payload=src, now=1.0)
    p.pump(1.0)
    got = _delivered(p)
    assert len(got) == 1 and got[0].sink is sink and not sink.aborted
    assert got[0].tensors == [] and len(got[0].buffer) == 0
    assert sink.data() == src.expected()
    assert [o for o, _ in sink.parts] == [0, 4096, 8192]
    assert got[0].header.tensors[0].blake3 == blake3.blake3(src.expected()).digest()
    assert src.calls == 3  # one pass over the payload


def test_sink_staging_is_one_chunk():
    sizes = []
    p = make_pair(LIM, LIM, buffer_factory=lambda n: sizes.append(n) or memoryview(bytearray(n)))
    p.b.sink_factory = lambda env: RecordingSink()
    _lane_send(p, *tensor_source(_items()))
    assert len(_delivered(p)) == 1 and max(sizes) == 4096


def test_tampered_chunk_aborts_the_sink_and_delivers_nothing():
    sink = RecordingSink()
    p = make_pair(LIM, LIM)
    p.b.sink_factory = lambda env: sink
    msg = _header_sent(p)
    c0 = bytes(msg.seal_chunk(0))
    c1 = bytearray(msg.seal_chunk(1))
    c1[10] ^= 1
    p.events_b += p.b.receive_chunk(msg.message_id, 0, c0, 1.0)
    p.events_b += p.b.receive_chunk(msg.message_id, 1, bytes(c1), 1.0)
    assert sink.aborted and not _delivered(p)
    rej = [e for e in p.events_b if isinstance(e, MessageRejected)]
    assert rej and rej[0].error.code is ErrorCode.DECRYPT
    # the rest of the message, its DIGEST included, is ignored; the session lives on
    msg.seal_chunk(2)
    p.pump(1.0)
    assert not [e for e in p.events_b if isinstance(e, Closed)]


def test_sink_aborted_when_the_digest_never_comes():
    sink = RecordingSink()
    p = make_pair(LIM, LIM)
    p.b.sink_factory = lambda env: sink
    msg = _header_sent(p)
    for i in range(msg.n_chunks):
        p.events_b += p.b.receive_chunk(msg.message_id, i, bytes(msg.seal_chunk(i)), 1.0)
    assert not _delivered(p) and not sink.aborted  # complete, waiting for the checksums
    p.events_b += p.b.tick(60.0)
    assert sink.aborted and not _delivered(p)
    assert [e.error.code for e in p.events_b if isinstance(e, MessageRejected)] == [ErrorCode.TIMEOUT]


def test_sink_aborted_when_the_session_closes():
    sink = RecordingSink()
    p = make_pair(LIM, LIM)
    p.b.sink_factory = lambda env: sink
    msg = _header_sent(p)
    p.events_b += p.b.receive_chunk(msg.message_id, 0, bytes(msg.seal_chunk(0)), 1.0)
    p.b.close("bye")
    assert sink.aborted


def _sealed_digest(p, mid, sums):
    """A DIGEST frame as the sender's session would seal it (a hostile but authenticated peer)."""
    return p.a._seal_frame(FrameType.DIGEST, control.encode_digest(mid, sums))


def test_wrong_digest_count_or_second_digest_rejects_the_message():
    p = make_pair(LIM, LIM)
    msg = _header_sent(p)
    p.events_b += p.b.receive_data(_sealed_digest(p, msg.message_id, (bytes(32),)), 1.0)
    rej = [e for e in p.events_b if isinstance(e, MessageRejected)]
    assert rej and rej[0].error.code is ErrorCode.MALFORMED
    p = make_pair(LIM, LIM)
    msg = _header_sent(p)
    for _ in range(2):
        p.events_b += p.b.receive_data(_sealed_digest(p, msg.message_id, (bytes(32),) * 2), 1.0)
    rej = [e for e in p.events_b if isinstance(e, MessageRejected)]
    assert rej and rej[0].error.code is ErrorCode.REPLAY and not _delivered(p)


def test_false_digest_is_a_checksum_reject():
    p = make_pair(LIM, LIM)
    msg = _header_sent(p)
    p.events_b += p.b.receive_data(_sealed_digest(p, msg.message_id, (bytes(32),) * 2), 1.0)
    for i in range(msg.n_chunks):
        p.events_b += p.b.receive_chunk(msg.message_id, i, bytes(msg.seal_chunk(i)), 1.0)
    rej = [e for e in p.events_b if isinstance(e, MessageRejected)]
    assert rej and rej[0].error.code is ErrorCode.CHECKSUM and not _delivered(p)


def test_digest_for_an_unknown_message_ends_the_session():
    p = make_pair(LIM, LIM)
    p.events_b += p.b.receive_data(_sealed_digest(p, 99, (bytes(32),)), 1.0)
    assert isinstance(p.events_b[-1], Closed) and p.events_b[-1].error.code is ErrorCode.ORDER


def test_chunks_must_first_be_sealed_in_order():
    p = make_pair(LIM, LIM)
    msg = p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                           tensors=tensor_source(_items())[0], payload=tensor_source(_items())[1],
                           now=1.0, inline=False)
    with pytest.raises(UsageError) as err:
        msg.seal_chunk(1)
    assert err.value.code is ErrorCode.STATE
    first = bytes(msg.seal_chunk(0))
    assert bytes(msg.seal_chunk(0)) == first  # resealing an earlier chunk is fine (same bytes)
    assert msg.digests is None


class FailingSink(RecordingSink):
    def write(self, offset, data):
        if offset:
            raise OSError("disk full")
        super().write(offset, data)


def test_a_failing_sink_rejects_only_that_message():
    p = make_pair(LIM, LIM)
    sinks = iter([FailingSink(), None])
    p.b.sink_factory = lambda env: next(sinks)
    specs, src = tensor_source(_items())
    _lane_send(p, specs, src)
    rej = [e for e in p.events_b if isinstance(e, MessageRejected)]
    assert len(rej) == 1 and rej[0].error.code is ErrorCode.LIMIT and "disk full" in rej[0].error.message
    assert not _delivered(p)
    _lane_send(p, specs, src)  # the session lives on; the next message goes to a buffer
    assert len(_delivered(p)) == 1


def test_a_sink_factory_that_raises_rejects_the_message():
    p = make_pair(LIM, LIM)
    p.b.sink_factory = lambda env: 1 / 0
    _lane_send(p, *tensor_source(_items()))
    rej = [e for e in p.events_b if isinstance(e, MessageRejected)]
    assert rej and rej[0].error.code is ErrorCode.UNSUPPORTED and not _delivered(p)
    assert "division by zero" in rej[0].error.message
    assert not [e for e in p.events_b if isinstance(e, Closed)]
