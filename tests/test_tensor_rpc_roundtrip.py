"""Round trips: every message kind, apply mode and dtype (bf16 included) survives the protocol."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensor_rpc import (
    DTYPES,
    SUPPORTED_VERSIONS,
    AckReceived,
    ApplyMode,
    Envelope,
    EnvelopeBounds,
    ErrorCode,
    HandshakeComplete,
    Kind,
    Limits,
    MessageReceived,
    MessageStarted,
    State,
    TensorSpec,
    UsageError,
    pack_tensors,
)
from tensor_rpc.envelope import decode_envelope, encode_envelope
from tensor_rpc.testing import make_pair

SMALL = Limits(chunk_bytes=4096, recv_window_bytes=16384)
NP = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
      "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
      "uint8": np.uint8, "bool": np.bool_}

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
tensor = st.tuples(st.sampled_from(sorted(DTYPES)), shapes, st.integers(0, 2**32 - 1))
meta = st.dictionaries(st.text(max_size=8), st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=16), st.booleans(),
    st.none(), st.lists(st.integers(0, 10**9), max_size=8)), max_size=5)


def _arrays(draw_tensors: list[tuple[str, tuple[int, ...], int]]) -> list[tuple[str, str, tuple[int, ...], np.ndarray]]:
    out = []
    for i, (dtype, shape, seed) in enumerate(draw_tensors):
        raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * DTYPES[dtype],
                                                   dtype=np.uint8)
        out.append((f"t{i}", dtype, shape, raw.view(NP[dtype]).reshape(shape)))
    return out


@pytest.fixture(scope="module")
def pair():
    p = make_pair(SMALL, SMALL)
    assert p.a.state is State.READY and p.b.state is State.READY
    assert isinstance(p.events_a[0], HandshakeComplete)
    return p


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(list(Kind)), apply=st.sampled_from(list(ApplyMode)),
       tensors=st.lists(tensor, min_size=0, max_size=4), meta=meta, slot=st.integers(0, 7),
       gain=st.floats(-4.0, 4.0), inline=st.booleans())
def test_session_round_trip(pair, kind, apply, tensors, meta, slot, gain, inline):
    arrays = _arrays(tensors)
    specs, payload = pack_tensors(arrays)
    pair.events_a.clear()
    pair.events_b.clear()
    msg = pair.a.send_message(kind=kind, layers=(0, 4), tokens=(3, 9), tensors=specs,
                              payload=payload, now=1.0, batch_slot=slot, apply=apply,
                              gain=gain if apply is ApplyMode.ADDITIVE else None, meta=meta,
                              inline=inline)
    if not inline:
        pair.events_b += pair.b.receive_data(pair.a.data_to_send(), 1.0)
        for i in range(msg.n_chunks):
            pair.events_b += pair.b.receive_chunk(msg.message_id, i, msg.seal_chunk(i), 1.0)
    pair.pump(1.0)
    started = [e for e in pair.events_b if isinstance(e, MessageStarted)]
    got = [e for e in pair.events_b if isinstance(e, MessageReceived)]
    acks = [e for e in pair.events_a if isinstance(e, AckReceived)]
    assert len(started) == len(got) == len(acks) == 1, (pair.events_a, pair.events_b)
    h = got[0].header
    assert (h.kind, h.apply, h.batch_slot, h.layers, h.tokens) == (kind, apply, slot, (0, 4), (3, 9))
    assert dict(h.meta) == meta
    assert acks[0].checksums == tuple(t.blake3 for t in msg.envelope.tensors)
    for (name, dtype, shape, arr), (spec, view) in zip(arrays, got[0].tensors, strict=True):
        assert (spec.name, spec.dtype, spec.shape) == (name, dtype, shape)
        back = np.frombuffer(view, dtype=NP[dtype]).reshape(shape)
        assert back.tobytes() == arr.tobytes()
    assert pair.a.state is State.READY and pair.b.state is State.READY


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(Kind)), apply=st.sampled_from(list(ApplyMode)),
       tensors=st.lists(tensor, max_size=6), meta=meta, mid=st.integers(1, 2**63 - 1),
       layers=st.tuples(st.integers(0, 4), st.integers(0, 4)).map(sorted).map(tuple))
def test_envelope_round_trip(kind, apply, tensors, meta, mid, layers):
    specs = tuple(TensorSpec(f"x{i}", d, s, int(np.prod(s)) * DTYPES[d])
                  for i, (d, s, _) in enumerate(tensors))
    env = Envelope(b"s" * 16, mid, kind, layers, (0, 5), 1, apply, specs,
                   1.5 if apply is ApplyMode.ADDITIVE else None, meta)
    bounds = EnvelopeBounds(1 << 31, 1 << 20, 4096, 4.0, num_layers=4)
    assert decode_envelope(encode_envelope(env), bounds) == env


def test_every_dtype_and_kind_negotiated():
    p = make_pair()
    ag = p.events_a[0].agreement
    assert ag.dtypes == frozenset(DTYPES) and "bfloat16" in ag.dtypes
    assert ag.kinds == frozenset(k.value for k in Kind)
    assert ag.cipher == "aegis128l" and ag.version == max(SUPPORTED_VERSIONS)


def test_cipher_fallback_xchacha_and_min_limits():
    la = Limits(ciphers=("aegis256", "xchacha20poly1305"), chunk_bytes=8192, max_message_bytes=10**6)
    lb = Limits(ciphers=("xchacha20poly1305",), chunk_bytes=4096, max_tensors_per_message=7)
    p = make_pair(la, lb)
    ag = p.events_b[0].agreement
    assert (ag.cipher, ag.chunk_bytes, ag.max_message_bytes, ag.max_tensors_per_message) == \
        ("xchacha20poly1305", 4096, 10**6, 7)
    x = np.arange(5000, dtype=np.float32)
    specs, payload = pack_tensors([("x", "float32", x.shape, x)])
    p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=specs,
                     payload=payload, now=0)
    p.pump()
    assert any(isinstance(e, MessageReceived) for e in p.events_b)
    with pytest.raises(UsageError) as ei:
        p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                         tensors=[TensorSpec("x", "uint8", (10**6 + 1,), 10**6 + 1)],
                         payload=bytes(10**6 + 1), now=0)
    assert ei.value.code is ErrorCode.LIMIT


def test_no_common_cipher_or_version():
    p = make_pair(Limits(ciphers=("aegis256",)), Limits(ciphers=("xchacha20poly1305",)))
    assert p.events_a[-1].error.code is ErrorCode.UNSUPPORTED
    assert p.a.state is State.ERROR and p.b.state is State.ERROR


def test_empty_message_and_large_multi_chunk():
    p = make_pair(SMALL, SMALL)
    p.a.send_message(kind=Kind.VIRTUAL_PREFIX, layers=(0, 0), tokens=(0, 0), tensors=[],
                     payload=b"", now=0, apply=ApplyMode.MEMORY)
    big = np.random.default_rng(1).standard_normal(300_000).astype(np.float32)
    specs, payload = pack_tensors([("big", "float32", big.shape, big)])
    p.a.send_message(kind=Kind.KV_CACHE_DELTA, layers=(0, 4), tokens=(0, 1), tensors=specs,
                     payload=payload, now=0, apply=ApplyMode.APPEND)
    p.pump()
    got = [e for e in p.events_b if isinstance(e, MessageReceived)]
    assert [len(e.buffer) for e in got] == [0, big.nbytes]
    assert bytes(got[1].buffer) == big.tobytes()
    assert sum(isinstance(e, AckReceived) for e in p.events_a) == 2


def test_limits_from_node_config():
    from meshnode.config import Config

    cfg = Config()
    lim = Limits.from_config(cfg)
    assert lim.max_message_bytes == cfg.protocol.max_message_bytes
    assert lim.ciphers == tuple(cfg.protocol.ciphers)
    assert lim.messages_per_s == cfg.limits.messages_per_s
    assert lim.recv_window_bytes == cfg.transport.recv_window_bytes
    assert lim.transfer_timeout_s == cfg.transport.transfer_timeout_s
