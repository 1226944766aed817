"""Access control, abuse limits, timeouts, versioning and state-machine rules."""

from __future__ import annotations

import pytest

from tensor_rpc import (
    AccessPolicy,
    Closed,
    ErrorCode,
    Kind,
    Limits,
    MessageReceived,
    MessageRejected,
    ProtocolError,
    State,
    TensorSpec,
    TokenBucket,
    UsageError,
)
from tensor_rpc.codec import pack
from tensor_rpc.framing import FrameType, encode_frame
from tensor_rpc.handshake import SUPPORTED_VERSIONS, decode_hello
from tensor_rpc.testing import make_pair, split_frames

LIM = Limits(chunk_bytes=4096)
ONE = [TensorSpec("x", "uint8", (10,), 10)]


def _send(p, now=1.0, n=1):
    for _ in range(n):
        p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=ONE,
                         payload=bytes(10), now=now)
    p.pump(now)


def _closed_error(events):
    closed = [e for e in events if isinstance(e, Closed)]
    return closed[-1].error.code if closed and closed[-1].error else None


def test_denylist_and_allowlist():
    p = make_pair(LIM, LIM, handshake=False)
    peer_a = str(p.b.remote_peer_id)
    pol = AccessPolicy(Limits(denylist=(peer_a,)))
    p.b._policy = pol
    p.events_a += p.a.start(0)
    p.events_b += p.b.start(0)
    p.pump()
    assert _closed_error(p.events_b) is ErrorCode.ACCESS_DENIED
    assert _closed_error(p.events_a) is ErrorCode.ACCESS_DENIED  # told by ABORT
    with pytest.raises(ProtocolError) as ei:
        AccessPolicy(Limits(allowlist=("someone-else",))).check_peer(peer_a)
    assert ei.value.code is ErrorCode.ACCESS_DENIED
    AccessPolicy(Limits(allowlist=(peer_a,))).check_peer(peer_a)


@pytest.mark.parametrize("token_a,token_b,ok", [
    ("s3cret", "s3cret", True), ("wrong", "s3cret", False), ("", "s3cret", False),
])
def test_shared_token(token_a, token_b, ok):
    p = make_pair(Limits(shared_token=token_a), Limits(shared_token=token_b))
    if ok:
        assert p.a.state is State.READY and p.b.state is State.READY
    else:
        assert _closed_error(p.events_b) is ErrorCode.ACCESS_DENIED


def test_max_sessions_per_peer_and_release():
    pol = AccessPolicy(Limits(max_sessions_per_peer=2))
    for _ in range(2):
        pol.acquire("peer")
    with pytest.raises(ProtocolError) as ei:
        pol.acquire("peer")
    assert ei.value.code is ErrorCode.LIMIT
    pol.release("peer")
    pol.acquire("peer")
    # the node holds the slot until the session's tasks ended (tests/test_tensor_service.py);
    # a session itself never takes one
    p = make_pair(LIM, LIM, policy=AccessPolicy(Limits(max_sessions_per_peer=1)))
    assert p.b._policy.sessions(str(p.b.remote_peer_id)) == 0 and p.b.state is State.READY


def test_rate_limit_messages_per_second():
    lim = Limits(chunk_bytes=4096, messages_per_s=2)
    p = make_pair(lim, lim, policy=AccessPolicy(lim))
    _send(p, now=1.0, n=4)
    rejected = [e for e in p.events_b if isinstance(e, MessageRejected)]
    assert len([e for e in p.events_b if isinstance(e, MessageReceived)]) == 2
    assert [e.error.code for e in rejected] == [ErrorCode.RATE_LIMITED] * 2
    assert sum(isinstance(e, MessageRejected) and not e.local for e in p.events_a) == 2
    _send(p, now=2.0, n=1)  # refilled after a second
    assert len([e for e in p.events_b if isinstance(e, MessageReceived)]) == 3
    assert p.a.state is State.READY and p.b.state is State.READY


def test_rate_limit_bytes_per_second():
    bucket = TokenBucket(rate=100, burst=100)
    assert bucket.take(60, 0.0) and not bucket.take(60, 0.0)
    assert bucket.take(60, 0.6)
    assert TokenBucket(rate=10, burst=10).take(1000, 0.0)  # oversize passes on a full bucket only
    lim = Limits(chunk_bytes=4096, bytes_per_s=15)
    p = make_pair(lim, lim, policy=AccessPolicy(lim))
    _send(p, now=1.0, n=2)
    assert [e.error.code for e in p.events_b if isinstance(e, MessageRejected)] == [
        ErrorCode.RATE_LIMITED]


def test_handshake_timeout():
    p = make_pair(Limits(handshake_timeout_s=5), Limits(handshake_timeout_s=5), handshake=False)
    p.a.start(0.0)
    assert p.a.tick(4.9) == []
    ev = p.a.tick(5.0)
    assert ev[0].error.code is ErrorCode.TIMEOUT and p.a.state is State.ERROR
    assert FrameType.ABORT in [f[0] for f in (split_frames(p.a.data_to_send()))]


def test_idle_timeout():
    lim = Limits(idle_timeout_s=30)
    p = make_pair(lim, lim)
    assert p.a.tick(29.0) == []
    _send(p, now=20.0)
    assert p.a.tick(49.0) == []
    ev = p.a.tick(50.5)
    assert ev[0].error.code is ErrorCode.TIMEOUT
    p.pump(51.0)
    assert _closed_error(p.events_b) is ErrorCode.TIMEOUT and p.b.state is State.ERROR


def _hello_patch(**changes):
    def mutate(d, n, f):
        if d == "a>b" and n == 0:
            h = decode_hello(f[5:])
            fields = {"proto": "latentlink/tensor", "versions": list(h.versions), "sid": h.session_id,
                      "role": h.role, "sig": h.signature, "dtypes": list(h.dtypes),
                      "kinds": list(h.kinds), "max_message_bytes": h.max_message_bytes,
                      "max_metadata_bytes": h.max_metadata_bytes,
                      "max_tensors_per_message": h.max_tensors_per_message,
                      "chunk_bytes": h.chunk_bytes, "recv_window_bytes": h.recv_window_bytes,
                      "ciphers": list(h.ciphers), "residual_gain_max": h.residual_gain_max,
                      "eph": h.ephemeral_key}
            fields.update(changes)
            return encode_frame(FrameType.HELLO, pack(fields))
        return f
    return mutate


def test_version_negotiation():
    p = make_pair(LIM, LIM, mutate=_hello_patch(versions=[1, 2]))  # both retired
    assert _closed_error(p.events_b) is ErrorCode.VERSION
    assert _closed_error(p.events_a) is ErrorCode.VERSION
    # a newer peer that also speaks ours gets ours (then fails AUTH here only because we altered
    # its hello)
    ours = max(SUPPORTED_VERSIONS)
    p = make_pair(LIM, LIM, mutate=_hello_patch(versions=[ours, ours + 4]))
    assert p.b.agreement is not None and p.b.agreement.version == ours


def test_hello_limits_are_bounded():
    p = make_pair(LIM, LIM, mutate=_hello_patch(chunk_bytes=1024))
    assert _closed_error(p.events_b) is ErrorCode.LIMIT
    p = make_pair(LIM, LIM, mutate=_hello_patch(role="r"))
    assert _closed_error(p.events_b) is ErrorCode.STATE


def test_frames_in_wrong_state():
    p = make_pair(LIM, LIM, handshake=False)
    p.b.start(0)
    ev = p.b.receive_data(encode_frame(FrameType.CREDIT, b"\x00" * 40), 0)
    assert ev[0].error.code is ErrorCode.STATE
    p = make_pair(LIM, LIM)
    ev = p.b.receive_data(encode_frame(FrameType.HELLO, b"\x80"), 0)
    assert ev[0].error.code is ErrorCode.STATE
    with pytest.raises(UsageError):
        make_pair(LIM, LIM, handshake=False).a.send_message(
            kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=[], payload=b"", now=0)


def test_oversized_frame_rejected_before_buffering():
    p = make_pair(LIM, LIM, handshake=False)
    p.b.start(0)
    ev = p.b.receive_data(b"\x01\xff\xff\xff\xff", 0)  # HELLO claiming 4 GiB
    assert ev[0].error.code is ErrorCode.LIMIT and p.b.pending_input_bytes <= 5


def test_header_exceeding_negotiated_limits_rejected():
    lim = Limits(chunk_bytes=4096, max_message_bytes=1000)
    p = make_pair(lim, Limits(chunk_bytes=4096))
    with pytest.raises(UsageError) as ei:
        p.b.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                         tensors=[TensorSpec("x", "uint8", (2000,), 2000)], payload=bytes(2000), now=0)
    assert ei.value.code is ErrorCode.LIMIT
    with pytest.raises(UsageError) as ei:
        p.b.send_message(kind=Kind.KV_CACHE, layers=(0, 9), tokens=(0, 1), tensors=[],
                         payload=b"", now=0)  # the model has 4 layers
    assert ei.value.code is ErrorCode.LIMIT
