"""Tensor sessions over libp2p: drives the sans-I/O :class:`tensor_rpc.Session` on one stream.

One long-lived stream per session (opening a stream costs ~5 ms of multistream-select); the reader
task feeds every byte to the session at once, so a slow consumer never stalls yamux into a reset
(DESIGN.md §7 trap 4) — received messages wait in a bounded queue instead. Every write goes through
one lock. The stream is the control path and the always-available data path; faster lanes (bulk
TCP, shared memory) plug in at :meth:`TensorSession.send` through ``path``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from discovery.signature import ModelSignature
from meshnode.logs import get_logger, kv
from tensor_rpc import (
    AccessPolicy,
    AckReceived,
    ApplyMode,
    Closed,
    ErrorCode,
    HandshakeComplete,
    Kind,
    Limits,
    MessageReceived,
    MessageRejected,
    ProtocolError,
    Role,
    Session,
    pack_tensors,
)
from tensor_rpc.envelope import Envelope, TensorSpec

TENSOR_PROTOCOL = "/latentlink/tensor/1.0.0"
READ_BYTES = 1 << 20
TICK_S = 0.5
INCOMING_QUEUE = 16
log = get_logger("meshnode.tensor")


class SessionClosed(ConnectionError):
    """The tensor session ended (cleanly or not) before the operation completed."""

    def __init__(self, reason: str, error: ProtocolError | None = None) -> None:
        super().__init__(reason)
        self.error = error


@dataclass(frozen=True)
class Received:
    """One verified message: its envelope and zero-copy views of its tensors."""

    peer_id: str
    header: Envelope
    buffer: memoryview
    tensors: list[tuple[TensorSpec, memoryview]]
    path: str
    elapsed_s: float


@dataclass(frozen=True)
class Sent:
    message_id: int
    nbytes: int
    checksums: tuple[bytes, ...]
    path: str
    elapsed_s: float


class TensorSession:
    """One end of a tensor session with a peer. Created by :class:`TensorService`."""

    def __init__(self, session: Session, stream: Any, peer_id: ID, on_event=None) -> None:
        self.session = session
        self.stream = stream
        self.peer_id = peer_id
        self._write_lock = trio.Lock()
        self._ready = trio.Event()
        self._closed = trio.Event()
        self._close_error: ProtocolError | None = None
        self._close_reason = ""
        self._acks: dict[int, tuple[trio.Event, list]] = {}
        self._in_send, self._in_recv = trio.open_memory_channel[Received](INCOMING_QUEUE)
        self._started: dict[int, float] = {}
        self._on_event = on_event or (lambda *a: None)
        self.agreement = None

    @property
    def session_id(self) -> str:
        return self.session.session_id.hex()

    # -- driving the session ---------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            self._handle(self.session.start(time.monotonic()))
            await self.flush()
            n.start_soon(self._ticker)
            task_status.started()
            try:
                await self._read_loop()
            finally:
                n.cancel_scope.cancel()
                self._mark_closed("stream ended", self._close_error)
                with trio.CancelScope(shield=True):
                    try:
                        await self.stream.close()
                    except Exception:
                        pass

    async def _read_loop(self) -> None:
        while not self._closed.is_set():
            try:
                data = await self.stream.read(READ_BYTES)
            except StreamEOF:
                data = b""
            except Exception as exc:  # reset / connection lost
                self._handle(self.session.receive_eof())
                self._mark_closed(f"stream error: {exc}", self._close_error)
                return
            if not data:
                self._handle(self.session.receive_eof())
                return
            self._handle(self.session.receive_data(data, time.monotonic()))
            await self.flush()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK_S)
            self._handle(self.session.tick(time.monotonic()))
            await self.flush()

    async def flush(self) -> None:
        frames = self.session.frames_to_send()
        if not frames:
            return
        async with self._write_lock:
            for f in frames:
                await self.stream.write(bytes(f) if isinstance(f, memoryview) else f)

    def _handle(self, events: list) -> None:
        now = time.monotonic()
        for ev in events:
            if isinstance(ev, HandshakeComplete):
                self.agreement = ev.agreement
                self._ready.set()
            elif isinstance(ev, MessageReceived):
                started = self._started.pop(ev.header.message_id, now)
                rec = Received(str(self.peer_id), ev.header, ev.buffer, ev.tensors, "stream", now - started)
                try:
                    self._in_send.send_nowait(rec)
                except trio.WouldBlock:
                    log.warning("receiver queue full; message dropped", extra=kv(peer=self.peer_id))
                self._on_event("received", self, rec)
            elif isinstance(ev, AckReceived):
                waiter = self._acks.get(ev.message_id)
                if waiter:
                    waiter[1].append(ev)
                    waiter[0].set()
            elif isinstance(ev, MessageRejected):
                waiter = self._acks.get(ev.message_id)
                if waiter:
                    waiter[1].append(ev)
                    waiter[0].set()
                self._on_event("rejected", self, ev)
                log.warning("tensor message rejected", extra=kv(peer=self.peer_id, mid=ev.message_id,
                                                                 local=ev.local, err=ev.error))
            elif isinstance(ev, Closed):
                self._mark_closed(ev.reason, ev.error)
            elif hasattr(ev, "header"):  # MessageStarted
                self._started[ev.header.message_id] = now

    def _mark_closed(self, reason: str, error: ProtocolError | None) -> None:
        if self._closed.is_set():
            return
        self._close_reason, self._close_error = reason, error
        self._closed.set()
        self._ready.set()
        for ev, _box in self._acks.values():
            ev.set()
        self._in_send.close()

    # -- public API ------------------------------------------------------------------------------
    async def wait_ready(self, timeout_s: float) -> None:
        with trio.fail_after(timeout_s):
            await self._ready.wait()
        if self._closed.is_set():
            raise SessionClosed(self._close_reason, self._close_error)

    async def send(self, tensors: Sequence[tuple[str, str, Sequence[int], Any]], *, kind: Kind,
                   layers: tuple[int, int], tokens: tuple[int, int], meta: dict | None = None,
                   apply: ApplyMode = ApplyMode.OVERWRITE, gain: float | None = None,
                   batch_slot: int = 0, timeout_s: float | None = None) -> Sent:
        """Send one message and wait for the receiver's acknowledgement (checksums verified)."""
        if self._closed.is_set():
            raise SessionClosed(self._close_reason, self._close_error)
        specs, payload = pack_tensors(tensors)
        t0 = time.monotonic()
        msg = self.session.send_message(kind=kind, layers=layers, tokens=tokens, tensors=specs,
                                        payload=payload, now=t0, batch_slot=batch_slot, apply=apply,
                                        gain=gain, meta=meta)
        done: tuple[trio.Event, list] = (trio.Event(), [])
        self._acks[msg.message_id] = done
        try:
            await self.flush()
            # Chunks beyond the peer's credit go out as CREDIT frames arrive (reader task flushes).
            with trio.fail_after(timeout_s or self.session.limits.transfer_timeout_s):
                await done[0].wait()
        finally:
            self._acks.pop(msg.message_id, None)
        if not done[1]:
            raise SessionClosed(self._close_reason or "session closed", self._close_error)
        ev = done[1][0]
        if isinstance(ev, MessageRejected):
            raise ev.error
        sent_sums = tuple(s.blake3 for s in msg.envelope.tensors)
        if tuple(ev.checksums) != sent_sums:  # the session checks this too; belt and braces
            raise ProtocolError(ErrorCode.CHECKSUM, "acknowledged checksums differ from sent")
        return Sent(msg.message_id, len(payload), sent_sums, "stream", time.monotonic() - t0)

    async def receive(self, timeout_s: float | None = None) -> Received:
        """Next verified message from the peer."""
        try:
            if timeout_s is None:
                return await self._in_recv.receive()
            with trio.fail_after(timeout_s):
                return await self._in_recv.receive()
        except trio.EndOfChannel:
            raise SessionClosed(self._close_reason or "session closed", self._close_error) from None

    async def close(self, reason: str = "done") -> None:
        self._handle(self.session.close(reason))
        try:
            await self.flush()
            await self.stream.close()
        except Exception:
            pass
        self._mark_closed(reason, None)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


class TensorService:
    """Accepts and opens tensor sessions for a node; all session tasks live in its nursery."""

    def __init__(self, host: IHost, key_pair: KeyPair, limits: Limits, policy: AccessPolicy,
                 signature: ModelSignature | None = None, on_event=None) -> None:
        self.host, self.key_pair, self.limits, self.policy = host, key_pair, limits, policy
        self.signature = signature
        self.sessions: dict[str, TensorSession] = {}
        self._on_event = on_event
        self._nursery: trio.Nursery | None = None
        self._accepted_send, self._accepted_recv = trio.open_memory_channel[TensorSession](64)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            self._nursery = n
            self.host.set_stream_handler(TENSOR_PROTOCOL, self._handle_stream)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                for s in list(self.sessions.values()):
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await s.close("node stopping")

    def _session(self, role: Role, peer: ID) -> Session:
        if self.signature is None:
            raise ProtocolError(ErrorCode.INCOMPATIBLE_MODEL, "this node serves no model")
        return Session(role, self.limits, self.signature, self.key_pair, peer, policy=self.policy)

    async def _track(self, ts: TensorSession, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await ts.run(task_status=task_status)
        finally:
            self.sessions.pop(ts.session_id, None)

    async def _handle_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if self.signature is None or self._nursery is None:
            log.info("tensor session refused: no model served", extra=kv(peer=peer))
            await stream.reset()
            return
        ts = TensorSession(self._session(Role.RESPONDER, peer), stream, peer, self._on_event)
        # The handler must return promptly; the session runs in the service's nursery.
        await self._nursery.start(self._track, ts)
        self._nursery.start_soon(self._announce, ts)

    async def _announce(self, ts: TensorSession) -> None:
        try:
            await ts.wait_ready(self.limits.handshake_timeout_s)
        except (SessionClosed, trio.TooSlowError) as exc:
            log.warning("incoming tensor session failed", extra=kv(peer=ts.peer_id, err=exc,
                                                                    detail=ts._close_error))
            return
        self.sessions[ts.session_id] = ts
        log.info("tensor session accepted", extra=kv(peer=ts.peer_id, session=ts.session_id))
        await self._accepted_send.send(ts)

    async def open(self, peer: ID) -> TensorSession:
        """Open a session to ``peer`` (must be connected or dialable) and finish the handshake."""
        if self._nursery is None:
            raise RuntimeError("tensor service not running")
        session = self._session(Role.INITIATOR, peer)
        stream = await self.host.new_stream(peer, [TENSOR_PROTOCOL])
        ts = TensorSession(session, stream, peer, self._on_event)
        await self._nursery.start(self._track, ts)
        try:
            await ts.wait_ready(self.limits.handshake_timeout_s)
        except trio.TooSlowError:
            await ts.close("handshake timeout")
            raise SessionClosed("handshake timed out") from None
        self.sessions[ts.session_id] = ts
        return ts

    async def accept(self, timeout_s: float | None = None) -> TensorSession:
        """Next session a peer opened to us (after a successful handshake)."""
        if timeout_s is None:
            return await self._accepted_recv.receive()
        with trio.fail_after(timeout_s):
            return await self._accepted_recv.receive()
