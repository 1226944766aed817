"""Fuzz every decoder with >= 100,000 malformed inputs: only ProtocolError, bounded memory, no hang.

Inputs are valid frames/bodies mutated by a seeded ``random`` (bit flips, truncation, splicing,
random values swapped into decoded maps), which reaches far deeper than random bytes alone and is
much faster than hypothesis for this volume.
"""

from __future__ import annotations

import math
import random
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack

from tensor_rpc import CIPHERS, ErrorCode, Limits, Opener, ProtocolError, TensorSpec
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
from tensor_rpc.handshake import Hello, decode_auth, decode_hello, encode_auth
from tensor_rpc.session import Role, Session
from tensor_rpc.testing import make_pair, sample_signature

SEED = 20261122
BOUNDS = EnvelopeBounds(max_message_bytes=1 << 30, max_metadata_bytes=1 << 16,
                        max_tensors_per_message=64, residual_gain_max=4.0, num_layers=4)
WEIRD: list[Any] = [None, True, False, 0, -1, 1 << 63, (1 << 64) - 1, -(1 << 63), 1.5, math.nan,
                    math.inf, "", "x" * 300, b"", b"\x00" * 33, [], [1, 2], {}, {"a": 1},
                    [[[[[]]]]], list(range(100)), "KV_CACHE", "bfloat16", [0, 1 << 40], [5, 2]]
TOTAL: dict[str, int] = {}


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
        elif keys:  # mutate inside a nested list
            k = rng.choice(keys)
            if isinstance(d.get(k), list) and d[k]:
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


def run(name: str, n: int, samples: list[bytes], maps: list[dict[str, Any]],
        decode: Callable[[bytes], Any], check: Callable[[Any], None] | None = None,
        max_peak: int = 4 << 20) -> None:
    """Feed ``n`` mutated inputs to ``decode``; anything but ProtocolError fails the test."""
    rng = random.Random(f"{SEED}-{name}")
    t0 = time.perf_counter()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    codes: set[ErrorCode] = set()
    for i in range(n):
        data = mutate_map(rng, rng.choice(maps)) if maps and i % 2 else mutate_bytes(
            rng, rng.choice(samples))
        try:
            out = decode(data)
        except ProtocolError as err:
            codes.add(err.code)
            continue
        except Exception as exc:  # pragma: no cover - the failure we hunt for
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc} on {data[:200]!r}") from exc
        if check is not None:
            check(out)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < max_peak, f"{name}: peak allocation {peak} bytes"
    assert time.perf_counter() - t0 < 30, f"{name}: too slow (hang?)"
    assert ErrorCode.MALFORMED in codes or ErrorCode.DECRYPT in codes
    TOTAL[name] = n


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
    run("frames", 25_000, samples, [], decode)


def test_fuzz_hello_and_auth():
    h = _hello()
    hello_map = msgpack.unpackb(h.encode())
    run("hello", 15_000, [h.encode()], [hello_map], decode_hello)
    auth = encode_auth(b"\x08\x01\x12\x20" + b"p" * 32, b"s" * 64, None)
    run("auth", 10_000, [auth], [msgpack.unpackb(auth)], decode_auth)


def test_fuzz_envelope():
    body = encode_envelope(_envelope())
    env_map = msgpack.unpackb(body)

    def check(env: Envelope) -> None:  # anything accepted is within the bounds
        assert env.payload_bytes <= BOUNDS.max_message_bytes
        assert len(env.tensors) <= BOUNDS.max_tensors_per_message
    run("envelope", 30_000, [body], [env_map], lambda b: decode_envelope(b, BOUNDS), check)


def test_fuzz_control_messages():
    ack = encode_ack(Ack(3, 28, (b"a" * 32, b"b" * 32)))
    run("ack", 6_000, [ack], [msgpack.unpackb(ack)], lambda b: decode_ack(b, 64))
    err = encode_error(ProtocolError(ErrorCode.INCOMPATIBLE_MODEL, "x", ["rope.theta"]), 5)
    run("error", 6_000, [err], [msgpack.unpackb(err)], decode_error)
    run("credit", 4_000, [pack({"bytes": 4096})], [{"bytes": 4096}], decode_credit)
    dig = encode_digest(9, (b"a" * 32, b"b" * 32))
    run("digest", 4_000, [dig], [msgpack.unpackb(dig)], lambda b: decode_digest(b, 64))


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
        run(f"open-{name}", 3_000, [bytes(80), bytes(48)], [], open_chunk)
        run(f"control-{name}", 2_000, [bytes(80)], [], lambda b, o=opener: o.open_control(0, 0x10, b))


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
    run("session-handshake", 3_000, [hello_frame, hello_frame + bytes(10)], [], decode)


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
    run("session-ready", 1_000, samples, [], decode, max_peak=16 << 20)


def test_fuzz_total_is_at_least_100k():
    # runs last in file order; counts inputs of all the fuzzers above
    assert sum(TOTAL.values()) >= 100_000, TOTAL
