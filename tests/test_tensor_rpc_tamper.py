"""Tampering, replay, reordering, truncation, splicing, identity binding and invariant A."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from discovery.signature import COMPAT_FIELDS
from tensor_rpc import (
    AckReceived,
    Closed,
    ErrorCode,
    Kind,
    Limits,
    MessageReceived,
    MessageRejected,
    State,
    pack_tensors,
)
from tensor_rpc.testing import make_pair, sample_signature

LIM = Limits(chunk_bytes=4096, recv_window_bytes=8192, handshake_timeout_s=50,
             idle_timeout_s=10_000, transfer_timeout_s=50)
DATA = np.random.default_rng(7).standard_normal(2500).astype(np.float32)  # 10000 B = 3 chunks
SPECS, PAYLOAD = pack_tensors([("k", "float32", DATA.shape, DATA), ("v", "bfloat16", (2,), b"abcd")])


def _scenario(mutate=None):
    """Handshake, one 3-chunk inline message, ack, clean close. Returns the pair after timeouts."""
    p = make_pair(LIM, LIM, mutate=mutate)
    p.leftover = 0
    if p.a.state is State.READY:
        p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 4), tokens=(0, 7), tensors=SPECS,
                         payload=PAYLOAD, now=1.0, meta={"next_token": 3})
        p.pump(1.0)
        if p.a.state is State.READY and any(isinstance(e, AckReceived) for e in p.events_a):
            p.leftover = p.a.pending_input_bytes  # an unconsumed (never acted on) frame
            p.events_a += p.a.close("done")
            p.pump(2.0)
    for s, ev in ((p.a, p.events_a), (p.b, p.events_b)):
        ev += s.tick(100.0)
        ev += s.receive_eof()  # the transport closes the stream at the end
    return p


def _delivered(p):
    return [e for e in p.events_b if isinstance(e, MessageReceived)]


def _success(p):
    got = _delivered(p)
    return (len(got) == 1 and bytes(got[0].buffer) == PAYLOAD.tobytes()
            and any(isinstance(e, AckReceived) for e in p.events_a)
            and p.a.state is State.CLOSED and p.b.state is State.CLOSED)


def _errors(p):
    return [e for e in p.events_a + p.events_b
            if (isinstance(e, Closed) and e.error is not None) or isinstance(e, MessageRejected)]


def test_clean_scenario_succeeds():
    p = _scenario()
    assert _success(p) and not _errors(p)


def _frame_counts():
    counts = {"a>b": 0, "b>a": 0}

    def count(d, n, f):
        counts[d] = max(counts[d], n + 1)
        return f
    _scenario(count)
    return counts


def test_flipping_any_byte_of_any_frame_is_detected():
    counts = _frame_counts()
    sizes: dict[tuple[str, int], int] = {}

    def size(d, n, f):
        sizes[(d, n)] = len(f)
        return f
    _scenario(size)
    rng = random.Random(4)
    runs = 0
    for (direction, n), length in sorted(sizes.items()):
        assert n < counts[direction]
        positions = range(length) if length <= 400 else sorted(
            set(range(24)) | set(range(length - 40, length)) | set(rng.sample(range(length), 24)))
        for pos in positions:
            mask = 1 << (pos % 8) if pos % 3 else 0xFF

            def flip(d, k, f, direction=direction, n=n, pos=pos, mask=mask):
                if (d, k) != (direction, n):
                    return f
                b = bytearray(f)
                b[pos] ^= mask
                return bytes(b)
            p = _scenario(flip)
            runs += 1
            # detected = an error surfaced, or the damaged frame was never consumed at all
            assert _errors(p) or p.leftover, (direction, n, pos)
            assert not _success(p) or p.leftover, (direction, n, pos)
            for e in _delivered(p):  # anything delivered must be exactly what was sent
                assert bytes(e.buffer) == PAYLOAD.tobytes()
    assert runs > 500


def _ready_pair(**kw):
    p = make_pair(LIM, LIM, **kw)
    assert p.a.state is State.READY
    return p


def _oob(p, now=1.0):
    msg = p.a.send_message(kind=Kind.HIDDEN_SLICE, layers=(1, 2), tokens=(0, 7), tensors=SPECS,
                           payload=PAYLOAD, now=now, inline=False)
    p.events_b += p.b.receive_data(p.a.data_to_send(), now)
    chunks = [bytes(msg.seal_chunk(i)) for i in range(msg.n_chunks)]
    p.events_b += p.b.receive_data(p.a.data_to_send(), now)  # the DIGEST may beat the lane's chunks
    return msg, chunks


def _rejected(p, code=None):
    rej = [e for e in p.events_b if isinstance(e, MessageRejected)]
    return rej and (code is None or rej[-1].error.code is code)


def test_reordered_chunks_rejected():
    p = _ready_pair()
    msg, chunks = _oob(p)
    p.events_b += p.b.receive_chunk(msg.message_id, 1, chunks[1], 1.0)
    assert _rejected(p, ErrorCode.ORDER) and not _delivered(p)
    p.pump(1.0)
    assert any(isinstance(e, MessageRejected) and not e.local for e in p.events_a)
    # a chunk that claims another index fails authentication
    p2 = _ready_pair()
    msg, chunks = _oob(p2)
    p2.events_b += p2.b.receive_chunk(msg.message_id, 0, chunks[1][:4096 + 32], 1.0)
    assert _rejected(p2, ErrorCode.DECRYPT)


def test_replayed_chunks_rejected():
    p = _ready_pair()
    msg, chunks = _oob(p)
    p.events_b += p.b.receive_chunk(msg.message_id, 0, chunks[0], 1.0)
    p.events_b += p.b.receive_chunk(msg.message_id, 0, chunks[0], 1.0)
    assert _rejected(p, ErrorCode.ORDER) and not _delivered(p)
    # replay of a chunk of an already delivered message kills the session
    p = _ready_pair()
    msg, chunks = _oob(p)
    for i, c in enumerate(chunks):
        p.events_b += p.b.receive_chunk(msg.message_id, i, c, 1.0)
    assert len(_delivered(p)) == 1
    p.events_b += p.b.receive_chunk(msg.message_id, 2, chunks[2], 1.0)
    assert isinstance(p.events_b[-1], Closed) and p.events_b[-1].error.code is ErrorCode.ORDER


def test_replayed_control_frame_rejected():
    wire: list[bytes] = []

    def record(d, n, f):
        if d == "a>b" and n >= 2:  # everything after HELLO and AUTH
            wire.append(f)
        return f
    p = make_pair(LIM, LIM, mutate=record)
    p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=SPECS,
                     payload=PAYLOAD, now=1.0)
    p.pump(1.0)
    assert len(_delivered(p)) == 1
    p.events_b += p.b.receive_data(b"".join(wire), 1.0)  # the whole conversation again
    assert p.events_b[-1].error.code is ErrorCode.DECRYPT and len(_delivered(p)) == 1


def test_truncated_chunks_rejected():
    p = _ready_pair()
    msg, chunks = _oob(p)
    p.events_b += p.b.receive_chunk(msg.message_id, 0, chunks[0], 1.0)
    p.events_b += p.b.receive_chunk(msg.message_id, 1, chunks[1][:-1], 1.0)
    assert _rejected(p) and not _delivered(p)
    # the last chunk never comes: nothing delivered, rejected on the transfer timeout
    p = _ready_pair()
    msg, chunks = _oob(p)
    for i in range(2):
        p.events_b += p.b.receive_chunk(msg.message_id, i, chunks[i], 1.0)
    assert not p.b.tick(10.0)
    p.events_b += p.b.tick(60.0)
    assert _rejected(p, ErrorCode.TIMEOUT) and not _delivered(p)
    p.pump(60.0)
    p.events_a += p.a.tick(61.0)
    assert any(isinstance(e, MessageRejected) and e.message_id == msg.message_id
               for e in p.events_a)


def test_spliced_chunks_from_another_session_rejected():
    p, q = _ready_pair(), _ready_pair()
    msg_p, chunks_p = _oob(p)
    msg_q, chunks_q = _oob(q)
    assert msg_p.message_id == msg_q.message_id
    p.events_b += p.b.receive_chunk(msg_p.message_id, 0, chunks_q[0], 1.0)
    assert _rejected(p, ErrorCode.DECRYPT) and not _delivered(p)


def test_header_tamper_cannot_change_checksums():
    """A header is sealed; an ACK that does not echo the sent checksums is refused by the sender."""
    from tensor_rpc import control
    from tensor_rpc.framing import FrameType

    p = _ready_pair()
    msg, chunks = _oob(p)
    for i, c in enumerate(chunks):
        p.b.receive_chunk(msg.message_id, i, c, 1.0)
    p.b.data_to_send()  # drop the genuine ACK (and keep the counter in step by sending a fake)
    p.b._send_seq -= 1
    fake = control.Ack(msg.message_id, len(PAYLOAD), (bytes(32), bytes(32)))
    p.b._send_control(FrameType.ACK, control.encode_ack(fake))
    ev = p.a.receive_data(p.b.data_to_send(), 1.0)
    assert isinstance(ev[0], MessageRejected) and ev[0].error.code is ErrorCode.CHECKSUM


def _mutated(field):
    base = sample_signature()
    value = getattr(base, field)
    if isinstance(value, str):
        return replace(base, **{field: value + "x"}), [field]
    if isinstance(value, int):
        return replace(base, **{field: value + 1}), [field]
    key = sorted(value)[0]
    changed = dict(value)
    changed[key] = "different"
    return replace(base, **{field: changed}), [f"{field}.{key}"]


@pytest.mark.parametrize("field", COMPAT_FIELDS)
def test_signature_mismatch_in_each_field_is_named(field):
    other, names = _mutated(field)
    p = make_pair(LIM, LIM, sig_b=other)
    for events, state in ((p.events_a, p.a.state), (p.events_b, p.b.state)):
        closed = [e for e in events if isinstance(e, Closed)]
        assert closed and closed[0].error.code is ErrorCode.INCOMPATIBLE_MODEL
        assert list(closed[0].error.fields) == names
        assert state is State.ERROR


def test_multiple_mismatches_all_named():
    other = replace(sample_signature(), num_layers=8, vocab_size=9, rope={"type": "yarn", "theta": 10000.0})
    p = make_pair(LIM, LIM, sig_b=other)
    assert p.events_a[-1].error.fields == ("num_layers", "rope.type", "vocab_size")


def test_peer_key_not_bound_to_peer_id_rejected():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    stranger = ID.from_pubkey(create_new_key_pair().public_key)
    p = make_pair(LIM, LIM, bind_a=stranger)  # a expects someone else than b's key
    assert p.events_a[-1].error.code is ErrorCode.AUTH
    assert p.a.state is State.ERROR and p.b.state is State.ERROR
    assert not p.a._keys.send.strip(b"\x00")  # keys wiped


def test_forged_auth_signature_rejected():
    def forge(d, n, f):
        if d == "b>a" and f[0] == 0x02:  # AUTH frame: corrupt the signature bytes at the end
            b = bytearray(f)
            b[-40] ^= 1
            return bytes(b)
        return f
    p = make_pair(LIM, LIM, mutate=forge)
    assert any(isinstance(e, Closed) and e.error.code is ErrorCode.AUTH for e in p.events_a)


def test_keys_wiped_on_close():
    p = _ready_pair()
    send, recv = p.a._keys.send, p.a._keys.recv
    assert send.strip(b"\x00") and recv.strip(b"\x00")
    p.a.close()
    assert not send.strip(b"\x00") and not recv.strip(b"\x00")
