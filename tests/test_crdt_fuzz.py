"""Fuzz the wire decoder: whatever a peer sends, only SyncProtocolError may come out."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair

from crdt_state.limits import CrdtLimits
from crdt_state.signing import Signer
from crdt_state.sync import SyncEngine
from crdt_state.wire import (
    LEN,
    FrameDecoder,
    Records,
    Request,
    SignedUpdate,
    Step1,
    SyncProtocolError,
    decode_body,
    encode,
)
from discovery.streamio import FrameReader, frame, pack

LIMITS = CrdtLimits(max_update_bytes=2048, max_records_per_frame=64, max_writers_per_doc=64)
SIGNER = Signer(create_new_key_pair())
REC = SIGNER.sign("doc", b"w" * 8, 1, b"\x01\x00\x00")
VALID = [
    encode(Step1("doc", {(SIGNER.author, b"w" * 8): 3}, True)),
    encode(Request("doc", [(SIGNER.author, b"w" * 8, 1, 3)])),
    encode(Records("doc", [REC])),
]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=40))
objects = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=30,
)
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _feed(data: bytes) -> None:
    try:
        FrameDecoder(LIMITS).feed(data)
    except SyncProtocolError:
        pass


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _feed(data)
    _feed(LEN.pack(len(data)) + data)


@SETTINGS
@given(st.lists(objects, max_size=6), st.integers(0, 3))
def test_structured_bodies(body: list, kind: int) -> None:
    if body:
        body[0] = kind
    if len(body) > 1 and kind % 2:
        body[1] = "doc"
    raw = msgpack.packb(body, use_bin_type=True)
    try:
        decode_body(raw, LIMITS)
    except SyncProtocolError:
        pass


@SETTINGS
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                        max_size=6), st.integers(0, 400))
def test_mutated_valid_frames(frame: bytes, flips: list, cut: int) -> None:
    buf = bytearray(frame)
    for pos, val in flips:
        buf[pos % len(buf)] = val
    _feed(bytes(buf[: max(0, len(buf) - cut % len(buf))]))
    _feed(bytes(buf))


@SETTINGS
@given(st.binary(max_size=300))
def test_stored_record_decoder(data: bytes) -> None:
    try:
        SignedUpdate.from_bytes(data, LIMITS)
    except SyncProtocolError:
        pass


@SETTINGS
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                        min_size=1, max_size=4))
def test_engine_receive_mutated(frame: bytes, flips: list) -> None:
    """The full receive path (decode, verify, admit) either works or raises our error."""
    buf = bytearray(frame)
    for pos, val in flips:
        buf[pos % len(buf)] = val
    eng = SyncEngine(create_new_key_pair(), LIMITS)
    try:
        eng.receive("peer", bytes(buf), 0.0)
    except SyncProtocolError:
        pass


def test_oversized_frame_refused_before_buffering() -> None:
    dec = FrameDecoder(LIMITS)
    try:
        dec.feed(LEN.pack(LIMITS.max_frame_bytes + 1))
    except SyncProtocolError as exc:
        assert "exceeds" in str(exc)
    else:
        raise AssertionError("oversized frame accepted")


PARTICIPANT_KP = create_new_key_pair()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_signed_garbage_updates_from_a_participant(update: bytes) -> None:
    """A participant's key does not make garbage pycrdt bytes dangerous: rejected or applied.

    (Few examples: yrs can spend ~1 s decoding some random inputs.)
    """
    eng = SyncEngine(PARTICIPANT_KP, LIMITS)
    eng.create("doc", "ck", {eng.local_peer: "owner"})
    before = eng.replicas["doc"].doc.snapshot()
    rec = eng.signer.sign("doc", b"g" * 8, 1, update)
    out = eng.receive("peer", encode(Records("doc", [rec])), 0.0)
    if not out.accepted:
        assert eng.replicas["doc"].doc.snapshot() == before


def test_frames_are_the_shared_helpers_and_its_errors_map_onto_ours() -> None:
    """crdt frames are streamio frames: the shared reader splits them, and every FrameError the
    helper raises (oversized length, malformed body) reaches callers as SyncProtocolError."""
    reader = FrameReader(LIMITS.max_frame_bytes)
    bodies = reader.feed(b"".join(VALID))
    assert [decode_body(b, LIMITS) for b in bodies] == FrameDecoder(LIMITS).feed(b"".join(VALID))
    with pytest.raises(SyncProtocolError, match="exceeds"):
        FrameDecoder(LIMITS).feed(LEN.pack(LIMITS.max_frame_bytes + 1))
    with pytest.raises(SyncProtocolError, match="undecodable"):
        FrameDecoder(LIMITS).feed(frame(b"\xc1"))  # never-used msgpack byte
    with pytest.raises(SyncProtocolError, match="bad array"):  # no body of ours holds a map
        FrameDecoder(LIMITS).feed(frame(pack([1, "doc", False, {"a": 1}])))
