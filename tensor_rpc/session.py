"""The sans-I/O session: bytes in, events out, time passed in. No sockets, no clocks, no threads.

The owner feeds received control-stream bytes to :meth:`Session.receive_data` and chunks that came
over a data lane to :meth:`Session.receive_chunk`, writes :meth:`Session.frames_to_send`, calls
:meth:`Session.tick` at :meth:`Session.next_deadline`, and reacts to the returned events. Facts from
outside enter through named methods, never through made-up frames: :meth:`send_failed` (our lane
died mid-message), :meth:`offer_lanes` (where we accept lanes), :meth:`refuse` (the node will not
serve this session). Which frame and which call is legal in which state is one table,
:mod:`tensor_rpc.states`.

Error policy: a problem scoped to one message (a dtype or kind not negotiated, the receiving
runtime refusing the header, a rate or memory limit, a tampered chunk, a checksum, a stalled
transfer) rejects that message (``MessageRejected`` + a REJECT frame) and the session lives on;
anything that breaks the control conversation (framing, a sealed control frame that fails
authentication, a malformed header, a handshake failure) ends it (``Closed`` + CLOSE/ABORT).
Local misuse raises :class:`~tensor_rpc.errors.UsageError` and sends nothing.

Memory: a header reserves nothing. An incoming message gets its buffer when its first chunk
arrives, and every chunk is charged to the node's :class:`~tensor_rpc.budget.ReceiveBudget`
before it is opened. Lanes hand chunks in from their own staging slots; only this object writes
into a message's buffer, and never again once the message is delivered (invariant C).
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from discovery.signature import ModelSignature

from . import binding, control, lanectl
from .access import AccessPolicy
from .aead import CIPHERS, Opener, Sealer
from .budget import ReceiveBudget
from .envelope import (
    ApplyMode,
    Envelope,
    EnvelopeBounds,
    Kind,
    TensorSpec,
    decode_envelope,
    encode_envelope,
    validate_specs,
)
from .errors import ErrorCode, ProtocolError, UsageError
from .events import (
    AckReceived,
    Closed,
    CreditGranted,
    Event,
    HandshakeComplete,
    LanesOffered,
    MessageAbandoned,
    MessageReceived,
    MessageRejected,
    MessageStarted,
)
from .framing import HEADER, HEADER_BYTES, FrameDecoder, FrameType, encode_frame
from .handshake import (
    SESSION_ID_BYTES,
    Agreement,
    Hello,
    RuntimeTerms,
    decode_auth,
    decode_hello,
    encode_auth,
    negotiate,
)
from .keys import EphemeralKey, SessionKeys
from .lanectl import LaneOffer
from .limits import MAX_HANDSHAKE_FRAME, Limits
from .message import ChunkSink, IncomingMessage, MemorySource, OutgoingMessage, PayloadSource
from .states import CALLS, FRAMES, HANDSHAKE, OPEN, TERMINAL, State
from .tensors import byte_view

CHUNK_PREFIX = struct.Struct(">QI")  # message id, chunk index (in-band CHUNK frame body prefix)
_CONTROL_SLACK = 64 * 1024
_MAX_DROPPED = 1024  # rejected/abandoned ids whose late chunks are ignored rather than an error
_SEALED = frozenset({FrameType.HEADER, FrameType.ACK, FrameType.REJECT, FrameType.CREDIT,
                     FrameType.CLOSE, FrameType.DIGEST, FrameType.LANES, FrameType.ABANDON,
                     FrameType.ABANDONED})


class Role(enum.Enum):
    INITIATOR = "i"
    RESPONDER = "r"


BufferFactory = Callable[[int], Any]
#: Decides, per incoming header, whether the message streams into a sink (bounded memory) instead
#: of one payload-sized buffer; ``None`` = buffer. Raising rejects the message.
SinkFactory = Callable[[Envelope], "ChunkSink | None"]
#: The receiving application's check of a header before any payload moves (e.g. the runtime's
#: "can I apply this?"): raise ``ProtocolError`` or ``ValueError`` to reject the message.
HeaderCheck = Callable[[Envelope], None]


def fresh_buffer(n: int) -> bytearray | mmap.mmap:
    """Receive memory that is committed only as chunks are written into it: a ``bytearray``
    zero-fills (commits) all ``n`` bytes at once, an anonymous mapping commits page by page."""
    if n < 1 << 20:
        return bytearray(n)
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class Session:
    """One end of one tensor session with one authenticated peer."""

    def __init__(self, role: Role, limits: Limits, signature: ModelSignature, identity: Any,
                 remote_peer_id: Any, *, policy: AccessPolicy | None = None,
                 budget: ReceiveBudget | None = None, terms: RuntimeTerms | None = None,
                 buffer_factory: BufferFactory = fresh_buffer,
                 sink_factory: SinkFactory | None = None, header_check: HeaderCheck | None = None,
                 claim_session_id: Callable[[bytes], bool] | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        if not isinstance(role, Role):
            raise UsageError(ErrorCode.STATE, f"role must be a Role, not {role!r}")
        self.role = role
        self.limits = limits
        self.signature = signature
        self.remote_peer_id = remote_peer_id
        self.state = State.HELLO
        self.agreement: Agreement | None = None
        self.peer_offer: LaneOffer | None = None  # where the peer accepts our data lanes
        self.buffer_factory = buffer_factory
        self.sink_factory = sink_factory
        self.header_check = header_check
        self._peer = str(remote_peer_id)
        self._identity = identity
        self._policy = policy
        self._budget = budget
        self._terms = terms
        self._claim = claim_session_id or (lambda sid: True)
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
        self._abandoning: set[int] = set()  # our lane messages we asked the peer to drop
        self._incoming: dict[int, IncomingMessage] = {}
        self._dropped: deque[int] = deque(maxlen=_MAX_DROPPED)
        self._credit = 0
        self._inline_unacked_bytes = 0  # in-band chunk bytes received but not yet credited back
        self._session_id = b""
        self._handlers: dict[FrameType, Callable[[bytes, float], list[Event]]] = {
            FrameType.HELLO: self._on_hello, FrameType.AUTH: self._on_auth,
            FrameType.HEADER: self._on_header, FrameType.DIGEST: self._on_digest,
            FrameType.ACK: self._on_ack, FrameType.REJECT: self._on_reject,
            FrameType.CREDIT: self._on_credit, FrameType.CLOSE: self._on_close,
            FrameType.LANES: self._on_lanes, FrameType.ABANDON: self._on_abandon,
            FrameType.ABANDONED: self._on_abandoned,
        }

    # -- public: lifecycle --------------------------------------------------------------------
    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def tag_bytes(self) -> int:
        """AEAD tag length of this session's chunks (a sealed chunk = plaintext + this)."""
        assert self._sealer is not None
        return self._sealer.tag_bytes

    def lane_secret(self, sending: bool) -> bytes:
        """The directional chunk key a data lane proves knowledge of (``transport.auth``)."""
        self._need("lane_secret")
        assert self._keys is not None
        key = bytes(self._keys.send if sending else self._keys.recv)
        if not any(key):
            raise UsageError(ErrorCode.STATE, "session keys wiped")
        return key

    def start(self, now: float) -> list[Event]:
        """Check access, start the handshake clock; the initiator queues its HELLO."""
        self._need("start")
        if self._started_at is not None:
            raise UsageError(ErrorCode.STATE, "start() called twice")
        self._started_at = self._last_activity = now
        try:
            if self._policy is not None:
                self._policy.check_peer(self._peer)
            if self.role is Role.INITIATOR:
                for _ in range(8):  # a collision is astronomically unlikely: then someone forged it
                    self._session_id = self._rng(SESSION_ID_BYTES)
                    if self._claim(self._session_id):
                        break
                else:
                    raise ProtocolError(ErrorCode.STATE, "no free session id")
                self._my_hello = self._make_hello()
                self._hello_i = self._my_hello.encode()
                self._out.append(encode_frame(FrameType.HELLO, self._hello_i))
        except ProtocolError as err:
            return self._fail(err)
        return []

    def refuse(self, err: ProtocolError) -> list[Event]:
        """The node will not serve this session (a limit, no role to serve it...): tell the peer
        why (ABORT during the handshake, CLOSE after) and end it."""
        if self.state in TERMINAL:
            return []
        self._need("refuse")
        return self._fail(err)

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed bytes from the control stream; returns what happened."""
        if self.state in TERMINAL:
            return []
        self._need_started("receive_data")
        events: list[Event] = []
        try:
            self._decoder.feed(data)
            while self.state not in TERMINAL:
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
        if self.state in TERMINAL:
            return []
        self._need_started("receive_eof")
        if self._decoder.buffered:
            err = ProtocolError(ErrorCode.MALFORMED, "stream ended inside a frame")
        else:
            err = ProtocolError(ErrorCode.CLOSED, "stream ended without CLOSE")
        self._terminate(State.ERROR)
        return [Closed(err.message, err, False)]

    def receive_chunk(self, message_id: int, index: int, sealed: bytes | bytearray | memoryview,
                      now: float) -> list[Event]:
        """One sealed chunk that came over a data lane (bulk TCP, shm). ``sealed`` is the lane's
        own staging memory: it is decrypted from there into the message buffer, and may be reused
        by the lane as soon as this returns. Only for a message whose header arrived
        (:meth:`incoming_state` is not ``"future"``): a chunk for an unknown message is ORDER."""
        if self.state in TERMINAL:
            return []
        self._need("receive_chunk")
        try:
            self._last_activity = now
            return self._on_chunk(message_id, index, sealed, now, inline=False)
        except ProtocolError as err:
            return self._fail(err)

    def incoming_state(self, message_id: int) -> str:
        """``"future"`` (no header yet), ``"live"`` (receiving) or ``"done"`` (delivered, rejected
        or abandoned). A chunk for a "done" message is ignored if it was rejected or abandoned
        recently (the sender may not know yet), and ends the session with ORDER otherwise."""
        if message_id in self._incoming:
            return "live"
        return "future" if message_id > self._last_remote_mid else "done"

    def tick(self, now: float) -> list[Event]:
        """Enforce the handshake, idle, progress and acknowledgement timeouts."""
        lim = self.limits
        if self.state in HANDSHAKE and self._started_at is not None:
            if now - self._started_at >= lim.handshake_timeout_s:
                return self._fail(ProtocolError(ErrorCode.TIMEOUT, "handshake timed out"))
            return []
        if self.state not in OPEN:
            return []
        if now - self._last_activity >= lim.idle_timeout_s:
            return self._fail(ProtocolError(ErrorCode.TIMEOUT, "session idle"))
        events: list[Event] = []
        for msg in list(self._incoming.values()):
            if now - msg.progress_at >= lim.progress_timeout_s:
                err = ProtocolError(ErrorCode.TIMEOUT, f"no progress for {lim.progress_timeout_s} s "
                                    f"at chunk {msg.next_chunk} of {msg.n_chunks}")
                events.extend(self._reject(msg, err))
        for out in list(self._unacked.values()):
            if out.message_id not in self._abandoning and now - out.sent_at >= lim.transfer_timeout_s:
                if not out.header_sent:  # the peer never heard of it: nothing to undo
                    self._cancel(out.message_id)
                    events.append(MessageAbandoned(out.message_id))
                    continue
                # not a local verdict: the peer's clock restarts with every chunk, so it may still
                # answer. Ask it to drop the message; its ordered ACK/REJECT/ABANDONED is the one
                # verdict (MessageAbandoned if it never delivered it).
                self._abandon(out)
        self._settle_state()
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (``None``: nothing can time out)."""
        lim = self.limits
        if self.state in HANDSHAKE:
            return None if self._started_at is None else self._started_at + lim.handshake_timeout_s
        if self.state not in OPEN:
            return None
        times = [self._last_activity + lim.idle_timeout_s]
        times += [m.progress_at + lim.progress_timeout_s for m in self._incoming.values()]
        times += [m.sent_at + lim.transfer_timeout_s for m in self._unacked.values()
                  if m.message_id not in self._abandoning]
        return min(times)

    def close(self, reason: str = "closed") -> list[Event]:
        """Clean local close: tells the peer, wipes keys."""
        if self.state in TERMINAL:
            return []
        err = ProtocolError(ErrorCode.CLOSED, reason)
        self._send_error(err)
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
        while self._outbox and budget > 0 and self.state in OPEN:
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

    @property
    def incoming_count(self) -> int:
        return len(self._incoming)

    @property
    def outgoing_count(self) -> int:
        return len(self._unacked)

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
        self._need("send_message")
        if not inline and self._outbox:
            raise UsageError(ErrorCode.STATE, "inline messages pending; wait before a lane send")
        assert self.agreement is not None and self._sealer is not None
        source = payload if hasattr(payload, "chunk") else MemorySource(byte_view(payload))
        bounds = self.agreement.bounds(self.signature.num_layers)
        specs = [TensorSpec(t.name, t.dtype, tuple(t.shape), t.byte_length) for t in tensors]
        try:  # the same rules the peer applies: fail here, not there
            validate_specs(specs, bounds)
            if sum(s.byte_length for s in specs) != source.nbytes:
                raise ProtocolError(ErrorCode.LIMIT, "tensor byte lengths do not add up to the payload")
            env = Envelope(self._session_id, self._next_mid, kind, tuple(layers), tuple(tokens),
                           batch_slot, apply, tuple(specs), gain, dict(meta or {}))
            body = encode_envelope(env)
            decode_envelope(body, bounds)
        except ProtocolError as err:
            raise UsageError(err.code, err.message) from None
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

    def send_failed(self, message_id: int) -> None:
        """Our lane failed while carrying ``message_id``: ask the peer to drop it. The answer is an
        event: ``AckReceived`` (it had arrived whole), ``MessageRejected``, or
        ``MessageAbandoned`` (never delivered: safe to send again, under a new id)."""
        if self.state in TERMINAL:
            return
        self._need("send_failed")
        msg = self._unacked.get(message_id)
        if msg is None or msg.inline or message_id in self._abandoning:
            raise UsageError(ErrorCode.STATE, f"message {message_id} is not a pending lane message")
        self._abandon(msg)

    def _abandon(self, msg: OutgoingMessage) -> None:
        """Stop sending ``msg`` (no more chunks, no DIGEST) and ask the peer to drop it."""
        if msg in self._lane_msgs:
            self._lane_msgs.remove(msg)
        if msg in self._outbox:
            self._outbox.remove(msg)
        self._abandoning.add(msg.message_id)
        self._send_control(FrameType.ABANDON, lanectl.encode_mid(msg.message_id))

    def offer_lanes(self, offer: LaneOffer) -> None:
        """Tell the peer where it may open data lanes to us (sent now; replaces older offers)."""
        self._need("offer_lanes")
        self._send_control(FrameType.LANES, lanectl.encode_lanes(offer))

    def set_receive_buffer(self, message_id: int, buffer: Any) -> None:
        """Use ``buffer`` (e.g. a pinned pool) for a started message, before its first chunk."""
        self._need("set_receive_buffer")
        msg = self._incoming.get(message_id)
        if msg is None:
            raise UsageError(ErrorCode.STATE, f"message {message_id} is not receiving")
        msg.set_buffer(buffer)

    # -- internals: frames --------------------------------------------------------------------
    def _need(self, call: str) -> None:
        if self.state not in CALLS[call]:
            raise UsageError(ErrorCode.STATE, f"{call}() is not valid in state {self.state.value}")

    def _need_started(self, call: str) -> None:
        # peer input before start() would skip the access check and the handshake clock
        if self._started_at is None:
            raise UsageError(ErrorCode.STATE, f"{call}() before start()")

    def _on_frame(self, ftype: FrameType, body: bytes, now: float) -> list[Event]:
        if ftype not in FRAMES[self.state]:
            raise ProtocolError(ErrorCode.STATE, f"{ftype.name} frame in state {self.state.value}")
        if ftype is FrameType.ABORT:
            _, err = control.decode_error(body)
            return self._remote_closed(err)
        if ftype is FrameType.CHUNK:
            if len(body) < CHUNK_PREFIX.size:
                raise ProtocolError(ErrorCode.MALFORMED, "short CHUNK frame")
            mid, idx = CHUNK_PREFIX.unpack_from(body, 0)
            self._inline_unacked_bytes += max(0, len(body) - CHUNK_PREFIX.size - self.tag_bytes)
            return self._on_chunk(mid, idx, memoryview(body)[CHUNK_PREFIX.size:], now, inline=True)
        if ftype in _SEALED:
            assert self._opener is not None
            body = self._opener.open_control(self._recv_seq, int(ftype), body)
            self._recv_seq += 1
        return self._handlers[ftype](body, now)

    def _on_hello(self, body: bytes, now: float) -> list[Event]:
        hello = decode_hello(body)
        if self.role is Role.RESPONDER:
            if not self._claim(hello.session_id):
                raise ProtocolError(ErrorCode.STATE, "session id already in use")
            self._session_id = hello.session_id
            self._hello_i = body
            self._my_hello = self._make_hello()
            self._hello_r = self._my_hello.encode()
            self._out.append(encode_frame(FrameType.HELLO, self._hello_r))
        else:
            self._hello_r = body
        assert self._hello_i is not None and self._hello_r is not None and self._my_hello
        self._transcript = binding.transcript_hash(self._hello_i, self._hello_r)
        pair = (hello, self._my_hello) if self.role is Role.RESPONDER else (self._my_hello, hello)
        self.agreement = negotiate(pair[0], pair[1], self.signature, self.role.value)
        self._keys = self._eph.derive(hello.ephemeral_key, self.role is Role.INITIATOR,
                                      self._transcript)
        suite = CIPHERS[self.agreement.cipher]
        self._sealer = Sealer(suite, self._keys.send, self.agreement.session_id)
        self._opener = Opener(suite, self._keys.recv, self.agreement.session_id)
        self._credit = self.agreement.send_window_bytes
        if self.role is Role.INITIATOR:  # the initiator proves first (see tensor_rpc.states)
            self._send_auth()
        self.state = State.AUTH
        return []

    def _on_auth(self, body: bytes, now: float) -> list[Event]:
        assert self.agreement is not None
        pub, sig, tok = decode_auth(body)
        peer_role = b"r" if self.role is Role.INITIATOR else b"i"
        binding.verify_transcript(pub, sig, peer_role, self._transcript, self.remote_peer_id)
        if self.limits.shared_token:
            want = binding.token_proof(self.limits.shared_token, peer_role, self._transcript)
            if tok is None or not hmac.compare_digest(tok, want):
                raise ProtocolError(ErrorCode.ACCESS_DENIED, "shared token missing or wrong")
        if self.role is Role.RESPONDER:  # only now, with the initiator proven, do we prove
            self._send_auth()
        self.state = State.READY
        ag = self.agreement
        self._decoder.max_body = max(ag.max_metadata_bytes, 40 * ag.max_tensors_per_message,
                                     ag.chunk_bytes + CHUNK_PREFIX.size) + _CONTROL_SLACK
        self.agreement = dataclasses.replace(ag, remote_peer_id=self._peer)
        return [HandshakeComplete(self.agreement)]

    def _send_auth(self) -> None:
        pub, sig = binding.sign_transcript(self._identity, self.role.value.encode(), self._transcript)
        tok = (binding.token_proof(self.limits.shared_token, self.role.value.encode(),
                                   self._transcript)
               if self.limits.shared_token else None)
        self._out.append(encode_frame(FrameType.AUTH, encode_auth(pub, sig, tok)))

    def _on_header(self, plain: bytes, now: float) -> list[Event]:
        assert self.agreement is not None and self._opener is not None
        ag = self.agreement
        # structure against the hard bounds (a malformed header ends the session) ...
        structural = EnvelopeBounds(ag.max_message_bytes, ag.max_metadata_bytes,
                                    ag.max_tensors_per_message, ag.residual_gain_max,
                                    num_layers=self.signature.num_layers)
        env = decode_envelope(plain, structural)
        if env.session_id != self._session_id:
            raise ProtocolError(ErrorCode.MALFORMED, "header for another session")
        if env.message_id <= self._last_remote_mid:
            raise ProtocolError(ErrorCode.REPLAY, f"message id {env.message_id} not increasing")
        self._last_remote_mid = env.message_id
        # ... then what this receiver accepts: refusals reject this message only
        try:
            self._admit(env, now)
            sink = self.sink_factory(env) if self.sink_factory is not None else None
        except ProtocolError as err:
            return self._refuse_message(env.message_id, err)
        except Exception as exc:  # the application's hook refused or failed: this message only
            return self._refuse_message(env.message_id, ProtocolError(
                ErrorCode.UNSUPPORTED, f"receiver refused the message: {exc}"[:300]))
        msg = IncomingMessage(env, self._opener, ag.chunk_bytes, now, self.limits.hash_threads,
                              sink, self.buffer_factory)
        self._incoming[env.message_id] = msg
        self.state = State.STREAMING
        return [MessageStarted(env)]

    def _admit(self, env: Envelope, now: float) -> None:
        ag = self.agreement
        assert ag is not None
        if env.kind.value not in ag.kinds:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"kind {env.kind.value} not negotiated")
        for t in env.tensors:
            if t.dtype not in ag.dtypes:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"dtype {t.dtype} of tensor {t.name!r} "
                                    f"not negotiated (this receiver accepts {sorted(ag.dtypes)})")
        if len(self._incoming) >= self.limits.messages_in_flight:
            raise ProtocolError(ErrorCode.LIMIT, f"{len(self._incoming)} incoming messages already "
                                "in flight (limits.messages_in_flight)")
        if self._policy is not None:
            self._policy.charge(self._peer, env.payload_bytes, now)
        if self.header_check is not None:
            self.header_check(env)

    def _on_digest(self, plain: bytes, now: float) -> list[Event]:
        assert self.agreement is not None
        mid, sums = control.decode_digest(plain, self.agreement.max_tensors_per_message)
        msg = self._incoming.get(mid)
        if msg is None:
            self._late(mid, "DIGEST")
            return []
        msg.progress_at = now
        try:
            msg.set_expected(sums)
        except ProtocolError as err:
            return self._reject(msg, err)
        return self._finish(msg) if msg.ready else []

    def _on_chunk(self, mid: int, idx: int, sealed: bytes | bytearray | memoryview, now: float,
                  inline: bool) -> list[Event]:
        events: list[Event] = []
        msg = self._incoming.get(mid)
        if msg is None:
            self._late(mid, "chunk")
        else:
            msg.progress_at = now
            try:
                self._open(msg, idx, sealed)
            except ProtocolError as err:
                events.extend(self._reject(msg, err))
            else:
                if msg.ready:
                    events.extend(self._finish(msg))
        if inline:
            self._grant_credit(force=not self._incoming)
        return events

    def _late(self, mid: int, what: str) -> None:
        """Input for a message that is not receiving. Rejected or abandoned recently: the sender
        may not know yet, ignore it. Anything else (no header yet, or delivered: an honest sender
        never sends more after the last chunk) is a protocol error: a delivered message's memory
        is never written again."""
        if mid in self._dropped:
            return
        state = "unknown" if mid > self._last_remote_mid else "finished"
        raise ProtocolError(ErrorCode.ORDER, f"{what} for {state} message {mid}")

    def _open(self, msg: IncomingMessage, idx: int, sealed: bytes | bytearray | memoryview) -> None:
        """Charge the chunk to the receive budget, then decrypt it into the message's memory.

        A buffered message is charged up to the end of this chunk, plus — if the budget allows —
        one chunk more: memory the owner may commit ahead of the data, off the event loop
        (``IncomingMessage.commit_ahead``), so opening the next chunk does not page-fault. What
        is committed never exceeds what is charged."""
        if idx != msg.next_chunk or idx >= msg.n_chunks:
            raise ProtocolError(ErrorCode.ORDER, f"chunk {idx} arrived, expected {msg.next_chunk}")
        n = msg.chunk_size(idx)
        if msg.sink is not None:  # one staging chunk, reused: nothing to commit ahead
            if self._budget is not None:
                self._budget.reserve(self._peer, n)
            try:
                msg.open_chunk(idx, sealed)
            finally:
                if self._budget is not None:  # the sink holds it now, not us
                    self._budget.release(self._peer, n)
            return
        end = idx * msg.chunk_bytes + n
        ahead = min(msg.nbytes, end + msg.chunk_bytes)
        if self._budget is None:
            msg.charged = max(msg.charged, ahead)
        else:
            if end > msg.charged:
                self._budget.reserve(self._peer, end - msg.charged)
                msg.charged = end
            if ahead > msg.charged:
                try:
                    self._budget.reserve(self._peer, ahead - msg.charged)
                    msg.charged = ahead
                except ProtocolError:  # no room to look ahead: the next chunk faults its pages
                    pass
        msg.open_chunk(idx, sealed, commit_upto=msg.charged)

    def _finish(self, msg: IncomingMessage) -> list[Event]:
        del self._incoming[msg.message_id]
        try:
            sums, views = msg.verify()
        except ProtocolError as err:
            self._incoming[msg.message_id] = msg  # _reject removes it and frees its budget
            return self._reject(msg, err)
        ack = control.Ack(msg.message_id, msg.nbytes, tuple(sums))
        self._send_control(FrameType.ACK, control.encode_ack(ack))
        self._settle_state()
        if msg.sink is not None:
            return [MessageReceived(msg.envelope, memoryview(b""), [], msg.sink, msg.charged)]
        assert msg.buffer is not None
        return [MessageReceived(msg.envelope, msg.buffer, views, None, msg.charged)]

    def _on_ack(self, plain: bytes, now: float) -> list[Event]:
        assert self.agreement is not None
        ack = control.decode_ack(plain, self.agreement.max_tensors_per_message)
        msg = self._unacked.get(ack.message_id)
        if msg is None:
            raise ProtocolError(ErrorCode.REPLAY, f"ack for unknown message {ack.message_id}")
        self._cancel(ack.message_id)
        self._settle_state()
        sent = msg.digests
        if ack.checksums != sent or ack.payload_bytes != msg.envelope.payload_bytes:
            err = ProtocolError(ErrorCode.CHECKSUM, "acknowledged checksums differ from sent")
            return [MessageRejected(ack.message_id, err, True)]
        return [AckReceived(ack.message_id, ack.checksums)]

    def _on_reject(self, plain: bytes, now: float) -> list[Event]:
        mid, err = control.decode_error(plain)
        self._cancel(mid if mid is not None else -1)
        self._settle_state()
        return [MessageRejected(mid if mid is not None else -1, err, False)]

    def _on_credit(self, plain: bytes, now: float) -> list[Event]:
        n = control.decode_credit(plain)
        self._credit = min(self._credit + n, 1 << 62)
        return [CreditGranted(n, self._credit)]

    def _on_close(self, plain: bytes, now: float) -> list[Event]:
        _, err = control.decode_error(plain)
        return self._remote_closed(err)

    def _on_lanes(self, plain: bytes, now: float) -> list[Event]:
        self.peer_offer = lanectl.decode_lanes(plain)
        return [LanesOffered(self.peer_offer)]

    def _on_abandon(self, plain: bytes, now: float) -> list[Event]:
        mid = lanectl.decode_mid(plain)
        if mid > self._last_remote_mid:
            raise ProtocolError(ErrorCode.ORDER, f"ABANDON of unknown message {mid}")
        events: list[Event] = []
        msg = self._incoming.get(mid)
        if msg is not None:  # still incomplete: drop it; a finished one was ACKed/REJECTed before
            err = ProtocolError(ErrorCode.ORDER, "abandoned by the sender (its data lane failed)")
            events = self._drop(msg, err)
        self._send_control(FrameType.ABANDONED, lanectl.encode_mid(mid))
        return events

    def _on_abandoned(self, plain: bytes, now: float) -> list[Event]:
        mid = lanectl.decode_mid(plain)
        if mid not in self._abandoning:
            raise ProtocolError(ErrorCode.STATE, f"ABANDONED for message {mid} we did not abandon")
        self._abandoning.discard(mid)
        if mid not in self._unacked:
            return []  # its ACK or REJECT came first: that was the verdict
        self._cancel(mid)
        self._settle_state()
        return [MessageAbandoned(mid)]

    # -- internals: helpers -------------------------------------------------------------------
    def _make_hello(self) -> Hello:
        return Hello.from_limits(self.limits, self._session_id, self.role.value, self.signature,
                                 bytes(self._eph.public), self._terms)

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

    def _send_error(self, err: ProtocolError) -> None:
        body = control.encode_error(err)
        if self._sealer is not None and self.state in OPEN:
            self._send_control(FrameType.CLOSE, body)
        else:
            self._out.append(encode_frame(FrameType.ABORT, body))

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

    def _drop(self, msg: IncomingMessage, err: ProtocolError) -> list[Event]:
        """Forget an incoming message and free what it held (no frame sent)."""
        err.__traceback__ = None
        self._incoming.pop(msg.message_id, None)
        self._dropped.append(msg.message_id)
        msg.discard()
        if self._budget is not None and msg.charged:
            self._budget.release(self._peer, msg.charged)
            msg.charged = 0
        msg.buffer = None
        self._settle_state()
        return [MessageRejected(msg.message_id, err, True)]

    def _reject(self, msg: IncomingMessage, err: ProtocolError) -> list[Event]:
        events = self._drop(msg, err)
        self._send_control(FrameType.REJECT, control.encode_error(err, msg.message_id))
        return events

    def _refuse_message(self, mid: int, err: ProtocolError) -> list[Event]:
        """Reject a message at its header (it never started: nothing to free)."""
        err.__traceback__ = None
        self._dropped.append(mid)
        self._send_control(FrameType.REJECT, control.encode_error(err, mid))
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
        if self.state in TERMINAL:
            return []
        self._send_error(err)
        self._terminate(State.ERROR)
        return [Closed(err.message, err, True)]

    def _terminate(self, state: State) -> None:
        self.state = state
        self._outbox.clear()
        self._lane_msgs.clear()
        for msg in list(self._incoming.values()):
            self._drop(msg, ProtocolError(ErrorCode.CLOSED, "session ended"))
        self.state = state  # _drop's settle does not touch terminal states; be explicit anyway
        self._incoming.clear()
        self._unacked.clear()
        self._abandoning.clear()
        self._eph.wipe()
        if self._keys is not None:
            self._keys.wipe()


def refusal(err: ProtocolError) -> bytes:
    """The bytes that refuse a session before one exists (an ABORT naming ``err``): for a node
    that will not serve a peer at all (no model, no role to serve it, a limit reached)."""
    return encode_frame(FrameType.ABORT, control.encode_error(err))
