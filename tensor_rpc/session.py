"""The sans-I/O session: bytes in, events out, time passed in. No sockets, no clocks.

Lifecycle: HANDSHAKE -> READY <-> STREAMING -> CLOSED, or ERROR from anywhere. The owner feeds
received bytes to :meth:`Session.receive_data`, writes :meth:`Session.data_to_send` to the
libp2p stream, calls :meth:`Session.tick` now and then, and reacts to the returned events.

Error policy: problems scoped to one message (bad header, rate limit, tampered chunk, checksum)
reject that message (``MessageRejected`` + a REJECT frame) and the session lives on; anything that
breaks the control conversation (framing, a sealed control frame that fails authentication, a
handshake failure) ends the session (``Closed`` with the error, ABORT/CLOSE frame to the peer).
Local API misuse raises :class:`ProtocolError` (code STATE/LIMIT) directly.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from discovery.signature import ModelSignature

from . import binding, control
from .access import AccessPolicy
from .aead import CIPHERS, Opener, Sealer
from .envelope import (
    ApplyMode,
    Envelope,
    Kind,
    TensorSpec,
    decode_envelope,
    encode_envelope,
    validate_specs,
)
from .errors import ErrorCode, ProtocolError
from .events import (
    AckReceived,
    Closed,
    CreditGranted,
    Event,
    HandshakeComplete,
    MessageReceived,
    MessageRejected,
    MessageStarted,
)
from .framing import HEADER, HEADER_BYTES, FrameDecoder, FrameType, encode_frame
from .handshake import (
    SESSION_ID_BYTES,
    Agreement,
    Hello,
    decode_auth,
    decode_hello,
    encode_auth,
    negotiate,
)
from .keys import EphemeralKey, SessionKeys
from .limits import MAX_HANDSHAKE_FRAME, Limits
from .message import ChunkSink, IncomingMessage, MemorySource, OutgoingMessage, PayloadSource
from .tensors import byte_view

CHUNK_PREFIX = struct.Struct(">QI")  # message id, chunk index (in-band CHUNK frame body prefix)
_CONTROL_SLACK = 64 * 1024
_MAX_DROPPED = 64


class State(enum.Enum):
    HANDSHAKE = "HANDSHAKE"
    READY = "READY"
    STREAMING = "STREAMING"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class Role(enum.Enum):
    INITIATOR = "i"
    RESPONDER = "r"


BufferFactory = Callable[[int], memoryview]
#: Decides, per incoming header, whether the message streams into a sink (bounded memory) instead
#: of one payload-sized buffer; ``None`` = buffer.
SinkFactory = Callable[[Envelope], "ChunkSink | None"]


def _default_buffer(n: int) -> memoryview:
    return memoryview(bytearray(n))


class Session:
    """One end of one tensor session with one authenticated peer."""

    def __init__(self, role: Role, limits: Limits, signature: ModelSignature, identity: Any,
                 remote_peer_id: Any, *, policy: AccessPolicy | None = None,
                 buffer_factory: BufferFactory = _default_buffer,
                 sink_factory: SinkFactory | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.role = role
        self.limits = limits
        self.signature = signature
        self.remote_peer_id = remote_peer_id
        self.state = State.HANDSHAKE
        self.agreement: Agreement | None = None
        self._peer = str(remote_peer_id)
        self._identity = identity
        self._policy = policy
        self._acquired = False
        self._buffer_factory = buffer_factory
        self.sink_factory = sink_factory
        self._rng = rng
        self._decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self._out: list[bytes | bytearray] = []
        self._eph = EphemeralKey()
        self._my_hello: Hello | None = None
        self._hello_i: bytes | None = None
        self._hello_r: bytes | None = None
        self._transcript = b""
        self._keys: SessionKeys | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._peer_authed = False
        self._started_at: float | None = None
        self._last_activity = 0.0
        self._send_seq = 0
        self._recv_seq = 0
        self._next_mid = 1
        self._last_remote_mid = 0
        self._outbox: deque[OutgoingMessage] = deque()  # inline messages whose chunks are pending
        self._lane_msgs: list[OutgoingMessage] = []  # lane messages whose DIGEST is not sent yet
        self._spare_frames: list[bytearray] = []  # written CHUNK frames handed back for reuse
        self._unacked: dict[int, OutgoingMessage] = {}
        self._incoming: dict[int, IncomingMessage] = {}
        self._dropped: deque[int] = deque(maxlen=_MAX_DROPPED)
        self._credit = 0
        self._inline_unacked_bytes = 0  # in-band chunk bytes received but not yet credited back
        self._session_id = b""

    # -- public: lifecycle --------------------------------------------------------------------
    @property
    def session_id(self) -> bytes:
        return self._session_id

    def start(self, now: float) -> list[Event]:
        """Check access, start the handshake clock; the initiator queues its HELLO."""
        self._started_at = self._last_activity = now
        try:
            if self._policy is not None:
                self._policy.acquire(self._peer)
                self._acquired = True
            if self.role is Role.INITIATOR:
                self._session_id = self._rng(SESSION_ID_BYTES)
                self._my_hello = self._make_hello()
                self._hello_i = self._my_hello.encode()
                self._out.append(encode_frame(FrameType.HELLO, self._hello_i))
        except ProtocolError as err:
            return self._fail(err)
        return []

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed bytes from the control stream; returns what happened."""
        if self.state in (State.CLOSED, State.ERROR):
            return []
        events: list[Event] = []
        try:
            self._decoder.feed(data)
            while self.state not in (State.CLOSED, State.ERROR):
                frame = self._decoder.next_frame()
                if frame is None:
                    break
                self._last_activity = now
                events.extend(self._on_frame(frame[0], frame[1], now))
        except ProtocolError as err:
            events.extend(self._fail(err))
        return events

    def receive_eof(self) -> list[Event]:
        """The stream ended. Clean only after CLOSE/ABORT; a half frame is MALFORMED (truncation)."""
        if self.state in (State.CLOSED, State.ERROR):
            return []
        if self._decoder.buffered:
            err = ProtocolError(ErrorCode.MALFORMED, "stream ended inside a frame")
        else:
            err = ProtocolError(ErrorCode.CLOSED, "stream ended without CLOSE")
        self._terminate(State.ERROR)
        return [Closed(err.message, err, False)]

    def receive_chunk(self, message_id: int, index: int, sealed: bytes | bytearray | memoryview,
                      now: float) -> list[Event]:
        """Feed one sealed chunk that came over a separate data lane (bulk TCP, shm)."""
        if self.state in (State.CLOSED, State.ERROR):
            return []
        try:
            if self.state is State.HANDSHAKE:
                raise ProtocolError(ErrorCode.STATE, "chunk before the handshake completed")
            self._last_activity = now
            return self._on_chunk(message_id, index, sealed, inline=False)
        except ProtocolError as err:
            return self._fail(err)

    def tick(self, now: float) -> list[Event]:
        """Enforce handshake and idle timeouts."""
        if self.state is State.HANDSHAKE and self._started_at is not None:
            if now - self._started_at >= self.limits.handshake_timeout_s:
                return self._fail(ProtocolError(ErrorCode.TIMEOUT, "handshake timed out"))
        elif self.state in (State.READY, State.STREAMING):
            if now - self._last_activity >= self.limits.idle_timeout_s:
                return self._fail(ProtocolError(ErrorCode.TIMEOUT, "session idle"))
            events: list[Event] = []
            for msg in list(self._incoming.values()):
                if now - msg.started_at >= self.limits.transfer_timeout_s:
                    del self._incoming[msg.message_id]
                    msg.discard()
                    err = ProtocolError(ErrorCode.TIMEOUT, f"message truncated or stalled at "
                                        f"chunk {msg.next_chunk} of {msg.n_chunks}")
                    events.extend(self._reject(msg.message_id, err))
            for out in list(self._unacked.values()):
                if now - out.sent_at >= self.limits.transfer_timeout_s:
                    self._cancel(out.message_id)
                    err = ProtocolError(ErrorCode.TIMEOUT, "no acknowledgement in time")
                    events.append(MessageRejected(out.message_id, err, True))
            self._settle_state()
            return events
        return []

    def close(self, reason: str = "closed") -> list[Event]:
        """Clean local close: tells the peer, wipes keys."""
        if self.state in (State.CLOSED, State.ERROR):
            return []
        err = ProtocolError(ErrorCode.CLOSED, reason)
        if self._sealer is not None and self.state is not State.HANDSHAKE:
            self._send_control(FrameType.CLOSE, control.encode_error(err))
        else:
            self._out.append(encode_frame(FrameType.ABORT, control.encode_error(err)))
        self._terminate(State.CLOSED)
        return [Closed(reason, None, True)]

    # -- public: output -----------------------------------------------------------------------
    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Bytes for the control stream: queued control frames, then in-band chunks within credit."""
        return b"".join(self.frames_to_send(max_bytes))

    def frames_to_send(self, max_bytes: int | None = None) -> list[bytes | bytearray]:
        """Like :meth:`data_to_send` but without joining (avoids one copy of bulk chunk frames)."""
        for msg in [m for m in self._lane_msgs if m.digests is not None]:
            self._lane_msgs.remove(msg)  # a lane sealed its last chunk: the checksums follow
            self._digest_frame(msg)
        out, self._out = self._out, []
        budget = max_bytes if max_bytes is not None else 1 << 62
        budget -= sum(len(f) for f in out)
        while self._outbox and budget > 0 and self.state in (State.READY, State.STREAMING):
            msg = self._outbox[0]
            if not msg.header_sent:
                out.append(self._header_frame(msg))
            if msg.next_chunk >= msg.n_chunks:
                self._outbox.popleft()
                out.append(self._digest_frame(msg, queue=False))
                continue
            _, n = msg.chunk_span(msg.next_chunk)
            window = self.agreement.send_window_bytes if self.agreement else 0
            if self._credit < min(n, window):
                break
            frame = self._chunk_frame(HEADER_BYTES + CHUNK_PREFIX.size + n + msg.tag_bytes)
            HEADER.pack_into(frame, 0, int(FrameType.CHUNK), len(frame) - HEADER_BYTES)
            CHUNK_PREFIX.pack_into(frame, HEADER_BYTES, msg.message_id, msg.next_chunk)
            msg.seal_chunk(msg.next_chunk, memoryview(frame)[HEADER_BYTES + CHUNK_PREFIX.size:])
            msg.next_chunk += 1
            self._credit -= n
            budget -= len(frame)
            out.append(frame)
        return out

    def release_frame(self, frame: bytes | bytearray) -> None:
        """The owner wrote a CHUNK frame from :meth:`frames_to_send` and no longer references it:
        the next chunk is sealed into it (a fresh multi-MiB buffer costs a page fault per 4 KiB)."""
        if isinstance(frame, bytearray) and len(self._spare_frames) < 2:
            self._spare_frames.append(frame)

    def _chunk_frame(self, size: int) -> bytearray:
        for i, f in enumerate(self._spare_frames):
            if len(f) == size:
                return self._spare_frames.pop(i)
        return bytearray(size)

    @property
    def pending_input_bytes(self) -> int:
        """Bytes of an incomplete frame waiting for more input (diagnostics, EOF handling)."""
        return self._decoder.buffered

    @property
    def send_credit(self) -> int:
        return self._credit

    # -- public: sending ----------------------------------------------------------------------
    def send_message(self, *, kind: Kind, layers: tuple[int, int], tokens: tuple[int, int],
                     tensors: Sequence[TensorSpec],
                     payload: bytes | bytearray | memoryview | PayloadSource,
                     now: float, batch_slot: int = 0, apply: ApplyMode = ApplyMode.OVERWRITE,
                     gain: float | None = None, meta: Mapping[str, Any] | None = None,
                     inline: bool = True) -> OutgoingMessage:
        """Queue the header of ``payload`` (tensors back to back, in ``tensors`` order).

        ``payload`` is a buffer or a :class:`PayloadSource` (produced chunk by chunk: bounded
        memory). Chunks are hashed while sealed; the DIGEST frame follows the last one.
        ``inline=True``: chunks follow on this byte stream as credit allows (libp2p path).
        ``inline=False``: the header is queued now; the caller seals chunks in order with
        ``OutgoingMessage.seal_chunk`` and carries them itself (bulk lane, shm); the next
        :meth:`frames_to_send` after the last one carries the DIGEST. ``payload`` must not change
        until the ACK arrives.
        """
        if self.state not in (State.READY, State.STREAMING):
            raise ProtocolError(ErrorCode.STATE, f"cannot send in state {self.state.value}")
        if not inline and self._outbox:
            raise ProtocolError(ErrorCode.STATE, "inline messages pending; wait before a lane send")
        assert self.agreement is not None and self._sealer is not None
        source = payload if hasattr(payload, "chunk") else MemorySource(byte_view(payload))
        bounds = self.agreement.bounds(self.signature.num_layers)
        specs = [TensorSpec(t.name, t.dtype, tuple(t.shape), t.byte_length) for t in tensors]
        validate_specs(specs, bounds)
        if sum(s.byte_length for s in specs) != source.nbytes:
            raise ProtocolError(ErrorCode.LIMIT, "tensor byte lengths do not add up to the payload")
        env = Envelope(self._session_id, self._next_mid, kind, tuple(layers), tuple(tokens),
                       batch_slot, apply, tuple(specs), gain, dict(meta or {}))
        body = encode_envelope(env)
        decode_envelope(body, bounds)  # same rules the peer applies: fail here, not there
        self._next_mid += 1
        msg = OutgoingMessage(env, source, self._sealer, self.agreement.chunk_bytes, inline, now,
                              self.limits.hash_threads)
        self._unacked[msg.message_id] = msg
        if inline:
            self._outbox.append(msg)
        else:
            self._out.append(self._header_frame(msg))
            self._lane_msgs.append(msg)
        self.state = State.STREAMING
        self._last_activity = now
        return msg

    def set_receive_buffer(self, message_id: int, buffer: memoryview) -> None:
        """Replace the buffer of a started message (before its first chunk), e.g. a pinned pool."""
        msg = self._incoming.get(message_id)
        if msg is None or msg.next_chunk:
            raise ProtocolError(ErrorCode.STATE, "buffer can only be set before the first chunk")
        assert self._opener is not None
        self._incoming[message_id] = IncomingMessage(msg.envelope, byte_view(buffer),
                                                     self._opener, msg.chunk_bytes, msg.started_at,
                                                     self.limits.hash_threads, msg.sink)

    # -- internals: frames --------------------------------------------------------------------
    def _on_frame(self, ftype: FrameType, body: bytes, now: float) -> list[Event]:
        if ftype is FrameType.ABORT:
            _, err = control.decode_error(body)
            return self._remote_closed(err)
        if self.state is State.HANDSHAKE:
            return self._on_handshake_frame(ftype, body)
        if ftype is FrameType.CHUNK:
            if len(body) < CHUNK_PREFIX.size:
                raise ProtocolError(ErrorCode.MALFORMED, "short CHUNK frame")
            mid, idx = CHUNK_PREFIX.unpack_from(body, 0)
            assert self._opener is not None
            self._inline_unacked_bytes += max(0, len(body) - CHUNK_PREFIX.size - self._opener.tag_bytes)
            return self._on_chunk(mid, idx, memoryview(body)[CHUNK_PREFIX.size:], inline=True)
        if ftype in (FrameType.HELLO, FrameType.AUTH):
            raise ProtocolError(ErrorCode.STATE, f"{ftype.name} after the handshake")
        assert self._opener is not None
        plain = self._opener.open_control(self._recv_seq, int(ftype), body)
        self._recv_seq += 1
        if ftype is FrameType.HEADER:
            return self._on_header(plain, now)
        if ftype is FrameType.DIGEST:
            return self._on_digest(plain)
        if ftype is FrameType.ACK:
            return self._on_ack(plain)
        if ftype is FrameType.REJECT:
            mid, err = control.decode_error(plain)
            self._cancel(mid if mid is not None else -1)
            self._settle_state()
            return [MessageRejected(mid if mid is not None else -1, err, False)]
        if ftype is FrameType.CREDIT:
            n = control.decode_credit(plain)
            self._credit = min(self._credit + n, 1 << 62)
            return [CreditGranted(n, self._credit)]
        _, err = control.decode_error(plain)  # CLOSE
        return self._remote_closed(err)

    def _on_handshake_frame(self, ftype: FrameType, body: bytes) -> list[Event]:
        if ftype is FrameType.HELLO:
            if self._transcript:
                raise ProtocolError(ErrorCode.STATE, "second HELLO")
            hello = decode_hello(body)
            if self.role is Role.RESPONDER:
                self._session_id = hello.session_id
                self._hello_i = body
                self._my_hello = self._make_hello()
                self._hello_r = self._my_hello.encode()
                self._out.append(encode_frame(FrameType.HELLO, self._hello_r))
            else:
                if self._hello_i is None:
                    raise ProtocolError(ErrorCode.STATE, "HELLO before start()")
                self._hello_r = body
            assert self._hello_i is not None and self._hello_r is not None
            self._transcript = binding.transcript_hash(self._hello_i, self._hello_r)
            mine = self._my_hello
            assert mine is not None
            pair = (hello, mine) if self.role is Role.RESPONDER else (mine, hello)
            agreement = negotiate(pair[0], pair[1], self.signature, self.role.value)
            self.agreement = agreement
            self._keys = self._eph.derive(hello.ephemeral_key, self.role is Role.INITIATOR,
                                          self._transcript)
            suite = CIPHERS[agreement.cipher]
            self._sealer = Sealer(suite, self._keys.send, agreement.session_id)
            self._opener = Opener(suite, self._keys.recv, agreement.session_id)
            self._credit = agreement.send_window_bytes
            pub, sig = binding.sign_transcript(self._identity, self.role.value.encode(), self._transcript)
            tok = (binding.token_proof(self.limits.shared_token, self.role.value.encode(), self._transcript)
                   if self.limits.shared_token else None)
            self._out.append(encode_frame(FrameType.AUTH, encode_auth(pub, sig, tok)))
            return []
        if ftype is FrameType.AUTH:
            if not self._transcript or self.agreement is None:
                raise ProtocolError(ErrorCode.STATE, "AUTH before HELLO")
            pub, sig, tok = decode_auth(body)
            peer_role = b"r" if self.role is Role.INITIATOR else b"i"
            binding.verify_transcript(pub, sig, peer_role, self._transcript, self.remote_peer_id)
            if self.limits.shared_token:
                want = binding.token_proof(self.limits.shared_token, peer_role, self._transcript)
                if tok is None or not _consteq(tok, want):
                    raise ProtocolError(ErrorCode.ACCESS_DENIED, "shared token missing or wrong")
            self._peer_authed = True
            self.state = State.READY
            self._decoder.max_body = max(self.agreement.max_metadata_bytes,
                                         40 * self.agreement.max_tensors_per_message,
                                         self.agreement.chunk_bytes + CHUNK_PREFIX.size) \
                + _CONTROL_SLACK
            self.agreement = _with_peer(self.agreement, self._peer)
            return [HandshakeComplete(self.agreement)]
        raise ProtocolError(ErrorCode.STATE, f"{ftype.name} during the handshake")

    def _on_header(self, plain: bytes, now: float) -> list[Event]:
        assert self.agreement is not None and self._opener is not None
        env = decode_envelope(plain, self.agreement.bounds(self.signature.num_layers))
        if env.session_id != self._session_id:
            raise ProtocolError(ErrorCode.MALFORMED, "header for another session")
        if env.message_id <= self._last_remote_mid:
            raise ProtocolError(ErrorCode.REPLAY, f"message id {env.message_id} not increasing")
        self._last_remote_mid = env.message_id
        try:
            if self._policy is not None:
                self._policy.charge(self._peer, env.payload_bytes, now)
            in_flight = sum(len(m.buffer) for m in self._incoming.values())
            if in_flight + env.payload_bytes > self.agreement.max_message_bytes:
                raise ProtocolError(ErrorCode.LIMIT, "too many payload bytes in flight")
        except ProtocolError as err:
            return self._reject(env.message_id, err)
        try:
            sink = self.sink_factory(env) if self.sink_factory is not None else None
        except Exception as exc:  # the application refused or failed: reject this message only
            return self._reject(env.message_id, ProtocolError(
                ErrorCode.LIMIT, f"receiver's sink failed: {exc}"[:200]))
        size = min(self.agreement.chunk_bytes, env.payload_bytes) if sink else env.payload_bytes
        buf = byte_view(self._buffer_factory(size))[:size]
        msg = IncomingMessage(env, buf, self._opener, self.agreement.chunk_bytes, now,
                              self.limits.hash_threads, sink)
        self._incoming[env.message_id] = msg
        self.state = State.STREAMING
        return [MessageStarted(env)]

    def _on_digest(self, plain: bytes) -> list[Event]:
        assert self.agreement is not None
        mid, sums = control.decode_digest(plain, self.agreement.max_tensors_per_message)
        msg = self._incoming.get(mid)
        if msg is None:
            if mid in self._dropped:
                return []  # the message was rejected already
            raise ProtocolError(ErrorCode.ORDER, f"DIGEST for unknown message {mid}")
        try:
            msg.set_expected(sums)
        except ProtocolError as err:
            del self._incoming[mid]
            msg.discard()
            return self._reject(mid, err)
        return self._finish(msg) if msg.ready else []

    def _on_chunk(self, mid: int, idx: int, sealed: bytes | bytearray | memoryview,
                  inline: bool) -> list[Event]:
        events: list[Event] = []
        msg = self._incoming.get(mid)
        if msg is None:
            if mid in self._dropped:
                events = []  # chunks of a message we already rejected: ignore
            else:
                raise ProtocolError(ErrorCode.ORDER, f"chunk for unknown message {mid}")
        else:
            try:
                msg.open_chunk(idx, sealed)
            except ProtocolError as err:
                del self._incoming[mid]
                msg.discard()
                events.extend(self._reject(mid, err))
            else:
                if msg.ready:
                    events.extend(self._finish(msg))
        if inline:
            self._grant_credit(force=not self._incoming)
        return events

    def _finish(self, msg: IncomingMessage) -> list[Event]:
        del self._incoming[msg.message_id]
        try:
            sums, views = msg.verify()
        except ProtocolError as err:
            msg.discard()
            return self._reject(msg.message_id, err)
        ack = control.Ack(msg.message_id, msg.nbytes, tuple(sums))
        self._send_control(FrameType.ACK, control.encode_ack(ack))
        self._settle_state()
        if msg.sink is not None:
            return [MessageReceived(msg.envelope, memoryview(b""), [], msg.sink)]
        return [MessageReceived(msg.envelope, msg.buffer, views)]

    def _on_ack(self, plain: bytes) -> list[Event]:
        assert self.agreement is not None
        ack = control.decode_ack(plain, self.agreement.max_tensors_per_message)
        msg = self._unacked.pop(ack.message_id, None)
        if msg is None:
            raise ProtocolError(ErrorCode.REPLAY, f"ack for unknown message {ack.message_id}")
        self._settle_state()
        sent = msg.digests
        if ack.checksums != sent or ack.payload_bytes != msg.envelope.payload_bytes:
            err = ProtocolError(ErrorCode.CHECKSUM, "acknowledged checksums differ from sent")
            return [MessageRejected(ack.message_id, err, True)]
        return [AckReceived(ack.message_id, ack.checksums)]

    # -- internals: helpers -------------------------------------------------------------------
    def _make_hello(self) -> Hello:
        return Hello.from_limits(self.limits, self._session_id, self.role.value, self.signature,
                                 bytes(self._eph.public))

    def _digest_frame(self, msg: OutgoingMessage, queue: bool = True) -> bytes:
        assert msg.digests is not None and not msg.digest_sent
        msg.digest_sent = True
        frame = self._seal_frame(FrameType.DIGEST, control.encode_digest(msg.message_id, msg.digests))
        if queue:
            self._out.append(frame)
        return frame

    def _header_frame(self, msg: OutgoingMessage) -> bytes:
        msg.header_sent = True
        return self._seal_frame(FrameType.HEADER, encode_envelope(msg.envelope))

    def _seal_frame(self, ftype: FrameType, plain: bytes) -> bytes:
        assert self._sealer is not None
        body = self._sealer.seal_control(self._send_seq, int(ftype), plain)
        self._send_seq += 1
        return encode_frame(ftype, body)

    def _send_control(self, ftype: FrameType, plain: bytes) -> None:
        self._out.append(self._seal_frame(ftype, plain))

    def _grant_credit(self, force: bool) -> None:
        assert self.agreement is not None
        if self._inline_unacked_bytes and (
                force or self._inline_unacked_bytes * 2 >= self.agreement.recv_window_bytes):
            self._send_control(FrameType.CREDIT, control.encode_credit(self._inline_unacked_bytes))
            self._inline_unacked_bytes = 0

    def _cancel(self, mid: int) -> None:
        msg = self._unacked.pop(mid, None)
        if msg is not None and msg in self._outbox:
            self._outbox.remove(msg)
        if msg is not None and msg in self._lane_msgs:
            self._lane_msgs.remove(msg)

    def _reject(self, mid: int, err: ProtocolError) -> list[Event]:
        err.__traceback__ = None
        self._dropped.append(mid)
        self._send_control(FrameType.REJECT, control.encode_error(err, mid))
        self._settle_state()
        return [MessageRejected(mid, err, True)]

    def _settle_state(self) -> None:
        if self.state is State.STREAMING and not (self._incoming or self._unacked or self._outbox):
            self.state = State.READY

    def _remote_closed(self, err: ProtocolError) -> list[Event]:
        clean = err.code is ErrorCode.CLOSED
        self._terminate(State.CLOSED if clean else State.ERROR)
        return [Closed(err.message, None if clean else err, False)]

    def _fail(self, err: ProtocolError) -> list[Event]:
        err.__traceback__ = None  # events outlive the call; don't pin its frames (and buffers)
        if self.state in (State.CLOSED, State.ERROR):
            return []
        body = control.encode_error(err)
        if self._sealer is not None and self.state is not State.HANDSHAKE:
            self._send_control(FrameType.CLOSE, body)
        else:
            self._out.append(encode_frame(FrameType.ABORT, body))
        self._terminate(State.ERROR)
        return [Closed(err.message, err, True)]

    def _terminate(self, state: State) -> None:
        self.state = state
        self._outbox.clear()
        self._lane_msgs.clear()
        for msg in self._incoming.values():
            msg.discard()
        self._incoming.clear()
        self._unacked.clear()
        self._eph.wipe()
        if self._keys is not None:
            self._keys.wipe()
        if self._acquired and self._policy is not None:
            self._policy.release(self._peer)
            self._acquired = False


def _consteq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _with_peer(agreement: Agreement, peer: str) -> Agreement:
    return dataclasses.replace(agreement, remote_peer_id=peer)
