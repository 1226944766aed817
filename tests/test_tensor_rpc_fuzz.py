"""Fuzz every decoder with >= 100,000 malformed inputs: only ProtocolError, bounded memory, no hang.

Inputs are valid frames/bodies mutated by a seeded ``random`` (bit flips, truncation, splicing,
random values swapped into decoded maps, nested maps included), which reaches far deeper than
random bytes alone and is much faster than hypothesis for this volume. ``COUNTS`` is the plan
(inputs per decoder); each run counts the decoder calls it really made and must match its plan,
and the last test checks the measured total.
"""

from __future__ import annotations

import ipaddress
import math
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack

from tensor_rpc import CIPHERS, DTYPES, ErrorCode, Limits, Opener, ProtocolError, TensorSpec
from tensor_rpc.codec import pack
from tensor_rpc.control import (
    Ack,
    decode_ack,
    decode_credit,
    decode_digest,
    decode_error,
    encode_ack,
    encode_digest,
    encode_error,
)
from tensor_rpc.envelope import (
    ApplyMode,
    Envelope,
    EnvelopeBounds,
    Kind,
    decode_envelope,
    encode_envelope,
)
from tensor_rpc.framing import FrameDecoder, FrameType, encode_frame
from tensor_rpc.handshake import Hello, RuntimeTerms, decode_auth, decode_hello, encode_auth
from tensor_rpc.lanectl import (
    MAX_BULK_ADDRS,
    SHM_NAME,
    LaneOffer,
    decode_lanes,
    decode_mid,
    encode_lanes,
    encode_mid,
)
from tensor_rpc.session import Role, Session
from tensor_rpc.testing import make_pair, sample_signature

SEED = 20261122
BOUNDS = EnvelopeBounds(max_message_bytes=1 << 30, max_metadata_bytes=1 << 16,
                        max_tensors_per_message=64, residual_gain_max=4.0, num_layers=4)
WEIRD: list[Any] = [None, True, False, 0, -1, 1 << 63, (1 << 64) - 1, -(1 << 63), 1.5, math.nan,
                    math.inf, "", "x" * 300, b"", b"\x00" * 33, [], [1, 2], {}, {"a": 1},
                    [[[[[]]]]], list(range(100)), "KV_CACHE", "bfloat16", [0, 1 << 40], [5, 2]]
#: inputs per decoder (the plan); ``run`` asserts it made exactly this many decoder calls
COUNTS: dict[str, int] = {
    "frames": 25_000, "hello": 15_000, "hello-runtime": 8_000, "auth": 10_000,
    "envelope": 30_000, "ack": 6_000, "error": 6_000, "credit": 4_000, "digest": 4_000,
    "lanes": 10_000, "mid": 4_000,
    **{f"open-{c}": 3_000 for c in CIPHERS}, **{f"control-{c}": 2_000 for c in CIPHERS},
    "session-handshake": 3_000, "session-ready": 1_000,
    "session-LANES": 300, "session-ABANDON": 300, "session-ABANDONED": 300,
}
MIN_TOTAL = 100_000
TOTAL: dict[str, int] = {}  # measured: decoder calls each run really made


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            del b[rng.randrange(len(b) + 1):]
        elif op == 3:
            b += rng.randbytes(rng.randint(1, 64))
        elif op == 4 and b:
            i = rng.randrange(len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 5 and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 16)]
        elif op == 6 and len(b) > 4:
            i, j = sorted(rng.sample(range(len(b)), 2))
            b[i:i] = b[i:j]
        else:
            b = bytearray(rng.randbytes(rng.randint(0, 128)))
    return bytes(b)


def mutate_map(rng: random.Random, d: dict[str, Any]) -> bytes:
    d = dict(d)
    keys = list(d)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        if op == 0 and keys:
            d[rng.choice(keys)] = rng.choice(WEIRD)
        elif op == 1 and keys:
            d.pop(rng.choice(keys), None)
        elif op == 2:
            d[rng.choice(["zz", "len", "n", "mid", "sig"])] = rng.choice(WEIRD)
        elif keys:  # mutate inside a nested map or list
            k = rng.choice(keys)
            if isinstance(d.get(k), dict):
                inner_map = dict(d[k])
                sub_keys = list(inner_map) + ["zz"]
                key = rng.choice(sub_keys)
                if rng.randrange(3) == 0:
                    inner_map.pop(key, None)
                else:
                    inner_map[key] = rng.choice(WEIRD)
                d[k] = inner_map
            elif isinstance(d.get(k), list) and d[k]:
                inner = list(d[k])
                j = rng.randrange(len(inner))
                if isinstance(inner[j], list) and inner[j]:
                    sub = list(inner[j])
                    sub[rng.randrange(len(sub))] = rng.choice(WEIRD)
                    inner[j] = sub
                else:
                    inner[j] = rng.choice(WEIRD)
                d[k] = inner
    return pack(d)


def run(name: str, samples: list[bytes], maps: list[dict[str, Any]],
        decode: Callable[[bytes], Any], check: Callable[[Any], None] | None = None,
        max_peak: int = 4 << 20) -> None:
    """Feed ``COUNTS[name]`` mutated inputs to ``decode``; anything but ProtocolError fails."""
    n = COUNTS[name]
    rng = random.Random(f"{SEED}-{name}")
    calls = accepted = rejected = 0

    def counted(data: bytes) -> Any:
        nonlocal calls
        calls += 1
        return decode(data)

    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    codes: set[ErrorCode] = set()
    for i in range(n):
        data = mutate_map(rng, rng.choice(maps)) if maps and i % 2 else mutate_bytes(
            rng, rng.choice(samples))
        try:
            out = counted(data)
        except ProtocolError as err:
            codes.add(err.code)
            rejected += 1
            continue
        except Exception as exc:  # pragma: no cover - the failure we hunt for
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc} on {data[:200]!r}") from exc
        accepted += 1
        if check is not None:
            check(out)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < max_peak, f"{name}: peak allocation {peak} bytes"
    assert ErrorCode.MALFORMED in codes or ErrorCode.DECRYPT in codes
    assert calls == accepted + rejected == n, (name, calls, accepted, rejected, n)
    assert name not in TOTAL, f"{name} fuzzed twice"
    TOTAL[name] = calls


def _hello() -> Hello:
    return Hello.from_limits(Limits(), b"s" * 16, "i", sample_signature(), b"k" * 32)


def _envelope() -> Envelope:
    specs = (TensorSpec("k", "bfloat16", (2, 3), 12, b"a" * 32),
             TensorSpec("v", "float32", (4,), 16, b"b" * 32))
    return Envelope(b"s" * 16, 7, Kind.RESIDUAL_PATCH, (0, 2), (0, 3), 0, ApplyMode.ADDITIVE,
                    specs, 0.5, {"cum": [1, 2], "next_token": 4})


def test_fuzz_frame_decoder():
    samples = [encode_frame(FrameType.HELLO, _hello().encode()), encode_frame(FrameType.CHUNK, b"x" * 100),
               encode_frame(FrameType.CREDIT, b"\x81\xa5bytes\x01") * 3]

    def decode(data: bytes) -> None:
        dec = FrameDecoder(max_body=4096)
        dec.feed(data)
        while dec.next_frame() is not None:
            pass
        assert dec.buffered <= 4096 + 5 + len(data)
    run("frames", samples, [], decode)


def _check_hello(h: Hello) -> None:  # anything accepted is within the documented bounds
    if h.runtime is not None:
        assert set(h.runtime) == {"kv_dtype", "threads"}
        assert h.runtime["kv_dtype"] in DTYPES
        th = h.runtime["threads"]
        assert isinstance(th, int) and not isinstance(th, bool) and 0 < th < 1 << 16


def test_fuzz_hello_and_auth():
    h = _hello()
    hello_map = msgpack.unpackb(h.encode())
    run("hello", [h.encode()], [hello_map], decode_hello, _check_hello)
    terms = RuntimeTerms("bfloat16", 2, ("bfloat16", "float32"))
    hr = Hello.from_limits(Limits(), b"s" * 16, "r", sample_signature(), b"k" * 32, terms)
    hr_map = msgpack.unpackb(hr.encode())
    runtime_maps = [hr_map] + [{**hr_map, "runtime": v} for v in (
        {"kv_dtype": "float32", "threads": 1}, {"kv_dtype": "bfloat16"}, {"threads": 3},
        {"kv_dtype": "f33", "threads": 1}, {"kv_dtype": "float16", "threads": 1 << 16})]
    run("hello-runtime", [hr.encode()], runtime_maps, decode_hello, _check_hello)
    auth = encode_auth(b"\x08\x01\x12\x20" + b"p" * 32, b"s" * 64, None)
    run("auth", [auth], [msgpack.unpackb(auth)], decode_auth)


def test_fuzz_envelope():
    body = encode_envelope(_envelope())
    env_map = msgpack.unpackb(body)

    def check(env: Envelope) -> None:  # anything accepted is within the bounds
        assert env.payload_bytes <= BOUNDS.max_message_bytes
        assert len(env.tensors) <= BOUNDS.max_tensors_per_message
    run("envelope", [body], [env_map], lambda b: decode_envelope(b, BOUNDS), check)


def test_fuzz_control_messages():
    ack = encode_ack(Ack(3, 28, (b"a" * 32, b"b" * 32)))
    run("ack", [ack], [msgpack.unpackb(ack)], lambda b: decode_ack(b, 64))
    err = encode_error(ProtocolError(ErrorCode.INCOMPATIBLE_MODEL, "x", ["rope.theta"]), 5)
    run("error", [err], [msgpack.unpackb(err)], decode_error)
    run("credit", [pack({"bytes": 4096})], [{"bytes": 4096}], decode_credit)
    dig = encode_digest(9, (b"a" * 32, b"b" * 32))
    run("digest", [dig], [msgpack.unpackb(dig)], lambda b: decode_digest(b, 64))


def test_fuzz_lane_control():
    offer = LaneOffer((("10.0.0.1", 4001), ("::1", 65535), ("192.168.1.7", 1)),
                      "latentlink-lane-" + "0f" * 16)
    lanes = encode_lanes(offer)
    knocked = encode_lanes(LaneOffer((("10.0.0.1", 4001),), None, ("11.0.1.2", 4002), 40001))
    lanes_maps = [msgpack.unpackb(lanes), {"bulk": [], "shm": None},
                  {"bulk": [["127.0.0.1", 80]] * MAX_BULK_ADDRS, "shm": None},
                  msgpack.unpackb(knocked)]

    def check_lanes(o: LaneOffer) -> None:
        assert len(o.bulk) <= MAX_BULK_ADDRS
        for host, port in o.bulk:
            ipaddress.ip_address(host)
            assert isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
        assert o.shm is None or SHM_NAME.fullmatch(o.shm)
        if o.knocked is not None:
            ipaddress.ip_address(o.knocked[0])
            assert 0 < o.knocked[1] < 65536
        assert o.knock is None or 0 < o.knock < 65536
    run("lanes", [lanes, knocked, encode_lanes(LaneOffer())], lanes_maps, decode_lanes, check_lanes)

    def check_mid(mid: int) -> None:
        assert isinstance(mid, int) and not isinstance(mid, bool) and 0 <= mid < 1 << 63
    run("mid", [encode_mid(7), encode_mid((1 << 63) - 1)], [{"mid": 7}], decode_mid, check_mid)


def test_frame_decoder_is_split_invariant():
    """However a stream of frames is cut into reads (and whatever buffer type each read is), the
    decoder yields the same frames; CHUNK bodies are views, the rest bytes."""
    rng = random.Random(SEED)
    for _ in range(300):
        frames = [(rng.choice([FrameType.CHUNK, FrameType.HEADER, FrameType.CREDIT]),
                   rng.randbytes(rng.choice([0, 1, 5, 100, 5000])))
                  for _ in range(rng.randint(1, 6))]
        wire = b"".join(encode_frame(t, b) for t, b in frames)
        cuts = sorted(rng.sample(range(len(wire) + 1), min(len(wire) + 1, rng.randint(0, 8))))
        dec, got = FrameDecoder(max_body=8192), []
        for lo, hi in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            piece = wire[lo:hi]
            dec.feed(rng.choice([bytes, bytearray, memoryview])(piece))
            while (f := dec.next_frame()) is not None:
                assert isinstance(f[1], memoryview if f[0] is FrameType.CHUNK else bytes)
                got.append((f[0], bytes(f[1])))
        assert got == frames and dec.buffered == 0


def test_fuzz_aead_open():
    key = bytearray(b"k" * 32)
    for name, suite in CIPHERS.items():
        opener = Opener(suite, key, b"s" * 16)
        out = memoryview(bytearray(64))

        def open_chunk(data: bytes, opener=opener, out=out) -> None:
            n = len(data) - opener.tag_bytes
            opener.open_chunk_into(1, 0, True, data, out[:max(n, 0)] if n >= 0 else out[:0])
        run(f"open-{name}", [bytes(80), bytes(48)], [], open_chunk)
        run(f"control-{name}", [bytes(80)], [], lambda b, o=opener: o.open_control(0, 0x10, b))


def test_fuzz_session_handshake():
    pair = make_pair(handshake=False)
    pair.a.start(0.0)
    hello_frame = pair.a.data_to_send()
    sig = sample_signature()

    def decode(data: bytes) -> None:
        s = Session(Role.RESPONDER, Limits(), sig, pair.key_b, pair.b.remote_peer_id)
        s.start(0.0)
        for ev in s.receive_data(data, 0.0):  # errors become Closed events, never exceptions
            err = getattr(ev, "error", None)
            if err is not None:
                raise err
    run("session-handshake", [hello_frame, hello_frame + bytes(10)], [], decode)


def test_fuzz_session_ready():
    """Mutated post-handshake traffic (sealed header, chunks, credit) against live sessions."""
    state: dict[str, Any] = {}
    first = make_pair()
    keys = (first.key_a, first.key_b)

    def fresh() -> None:
        p = make_pair(Limits(chunk_bytes=4096), Limits(chunk_bytes=4096), keys=keys)
        p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                         tensors=[TensorSpec("x", "uint8", (5000,), 5000)], payload=bytes(5000), now=0)
        state["pair"], state["wire"] = p, p.a.data_to_send()
    fresh()
    samples = [state["wire"]]

    def decode(data: bytes) -> None:
        p = state["pair"]
        for ev in p.b.receive_data(data, 0.0):
            err = getattr(ev, "error", None)
            if err is not None and p.b.state.value in ("ERROR", "CLOSED"):
                fresh()
                raise err
    run("session-ready", samples, [], decode, max_peak=16 << 20)


def test_fuzz_lane_control_in_a_live_session():
    """Mutated LANES / ABANDON / ABANDONED bodies, sealed by an authenticated peer, against a
    READY session: events only (an error is a Closed event), never an exception."""
    first = make_pair()
    keys = (first.key_a, first.key_b)
    state: dict[str, Any] = {}

    def fresh() -> None:
        state["pair"] = make_pair(Limits(chunk_bytes=4096), Limits(chunk_bytes=4096), keys=keys)
    fresh()
    bodies = {FrameType.LANES: encode_lanes(LaneOffer((("10.0.0.1", 4001),), None)),
              FrameType.ABANDON: encode_mid(0), FrameType.ABANDONED: encode_mid(1)}
    for ftype, body in bodies.items():
        def decode(data: bytes, ftype: FrameType = ftype) -> None:
            p = state["pair"]
            frame = p.a._seal_frame(ftype, data)  # what a hostile authenticated peer can send
            for ev in p.b.receive_data(frame, 0.0):
                err = getattr(ev, "error", None)
                if err is not None and p.b.state.value in ("ERROR", "CLOSED"):
                    fresh()
                    raise err
        run(f"session-{ftype.name}", [body], [msgpack.unpackb(body)], decode, max_peak=16 << 20)


def test_fuzz_total_is_at_least_100k():
    """Runs last in file order: every planned decoder ran exactly its planned inputs (measured
    by counting calls), and the measured total reaches the minimum."""
    assert TOTAL, "run the whole module: this test sums what the fuzzers above measured"
    assert TOTAL == COUNTS
    assert sum(TOTAL.values()) >= MIN_TOTAL, TOTAL
