"""One tensor session over one libp2p stream: the driver of a sans-I/O :class:`tensor_rpc.Session`.

Three tasks in the session's own nursery (rust-libp2p's "handler" for one stream):

* the **reader** feeds stream bytes to the session; it never writes, it only kicks the writer, so
  two peers streaming at each other cannot deadlock on full yamux windows;
* the **writer** flushes whatever the session has to send, one chunk frame at a time;
* the **ticker** sleeps until ``Session.next_deadline()`` and then calls ``tick`` — no polling.

Incoming data lanes (handed over by the lane server once authenticated) run in the same nursery,
so when the session ends — closed, timed out, refused, or the peer went silent — every task is
cancelled, every lane socket closed and the stream reset; then the node frees the session's slot.
Lane chunks reach the session from the lane's own staging slots; only the session writes into a
message's memory (see ``tensor_rpc.session``).

Sending (path choice, lanes, exactly-once fallback) is :mod:`meshnode.tensor.sender`; feeding an
incoming lane is :func:`meshnode.tensor.lanes_in.feed_lane`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from meshnode.host import close_stream, grow_yamux_window, remote_ip
from meshnode.logs import get_logger, kv
from meshnode.tensor.events import (
    MessageApplied,
    MessageDelivered,
    MessageRefused,
    TransferFailed,
)
from meshnode.tensor.lanes_in import IncomingLanes
from meshnode.tensor.received import Received, Sent, SessionClosed
from meshnode.tensor.sender import Sender
from tensor_rpc import (
    AckReceived,
    ApplyMode,
    Closed,
    HandshakeComplete,
    Kind,
    LanesOffered,
    MessageAbandoned,
    MessageReceived,
    MessageRejected,
    MessageStarted,
    ProtocolError,
    Role,
    Session,
)
from tensor_rpc.envelope import TensorSpec
from tensor_rpc.message import PayloadSource
from tensor_rpc.session import SinkFactory
from tensor_rpc.tensors import tensor_source

if TYPE_CHECKING:
    from meshnode.tensor.service import TensorService

log = get_logger("meshnode.tensor")


class TensorSession:
    """One end of a tensor session with a peer. Made by :class:`TensorService` (open/accept)."""

    def __init__(self, service: TensorService, role: Role, peer_id: ID, stream: Any) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.initiator = role is Role.INITIATOR
        self._service = service
        self._settings = service.transport
        self.session = Session(
            role, service.limits, service.signature, service.key_pair, peer_id,
            policy=service.policy, budget=service.budget, terms=service.terms,
            buffer_factory=service.buffers, header_check=service.header_check,
            claim_session_id=lambda sid: service.claim(sid, self))
        self.agreement = None
        self._write_lock = trio.Lock()
        self._kick_send, self._kick_recv = trio.open_memory_channel[None](1)
        self._ready = trio.Event()
        self._closed = trio.Event()
        self._close_error: ProtocolError | None = None
        self._close_reason = ""
        self._clean = False
        self._header_events: dict[int, trio.Event] = {}
        self._started: dict[int, float] = {}
        self._mid_path: dict[int, str] = {}
        # verified messages for the application: unbounded channel, bounded by policy (a peer
        # that outruns the application gets its session closed, never an acked message dropped)
        self._in_send, self._in_recv = trio.open_memory_channel[Received](math.inf)
        self._queued_charge: dict[int, int] = {}  # mid -> budget bytes held until handed over
        self.incoming = IncomingLanes(self)
        self._sender = Sender(self)
        self._nursery: trio.Nursery | None = None
        self._tick_scope: trio.CancelScope | None = None

    # -- identity and state --------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.session.session_id.hex()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def lanes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rx in self.incoming.lanes:
            out[f"in_{rx.path}"] = out.get(f"in_{rx.path}", 0) + 1
        for path in self._sender.lanes.open_paths():
            out[f"out_{path}"] = out.get(f"out_{path}", 0) + 1
        return out

    def status(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "peer": str(self.peer_id),
                "state": self.session.state.value, "initiator": self.initiator,
                "incoming": self.session.incoming_count, "outgoing": self.session.outgoing_count,
                "queued": self.queued, "lanes": self.lanes}

    # -- driving the session -------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self._settings
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                await grow_yamux_window(self.stream, s.stream_window_bytes)
                self._handle(self.session.start(trio.current_time()))
                n.start_soon(self._writer)
                n.start_soon(self._ticker)
                n.start_soon(self._reader)
                task_status.started()
                await self._closed.wait()
                with trio.move_on_after(s.close_timeout_s):  # last words: CLOSE/ABORT + reason
                    await self.flush()
                n.cancel_scope.cancel()
        except Exception as exc:  # boundary: a fault in one session must not take the node down
            log.error("tensor session failed", exc_info=exc,
                      extra=kv(peer=self.peer_id, session=self.session_id))
            self._handle(self.session.close("internal error"))
        finally:
            self._mark_closed("session stopped", self._close_error)
            for rx in list(self.incoming.lanes):
                rx.close()
            with trio.CancelScope(shield=True):
                await close_stream(self.stream, self._clean, s.close_timeout_s)
            self._service.forget(self)

    async def _reader(self) -> None:
        read_bytes = self._settings.stream_read_bytes
        while True:
            try:
                data = await self.stream.read(read_bytes)
            except StreamEOF:
                data = b""
            except Exception as exc:  # boundary: reset / connection lost (py-libp2p raises many types)
                self._handle(self.session.receive_eof())
                self._mark_closed(f"stream error: {exc}", self._close_error)
                return
            if not data:
                self._handle(self.session.receive_eof())
                return
            self._handle(self.session.receive_data(data, trio.current_time()))

    async def _ticker(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._tick_scope = scope
                self._set_deadline()
                await trio.sleep_forever()
            self._handle(self.session.tick(trio.current_time()))

    def _set_deadline(self) -> None:
        if self._tick_scope is not None:
            d = self.session.next_deadline()
            self._tick_scope.deadline = math.inf if d is None else d

    def _kick(self) -> None:
        """Ask the writer task to flush (non-blocking; one pending kick covers everything)."""
        try:
            self._kick_send.send_nowait(None)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass

    async def _writer(self) -> None:
        async for _ in self._kick_recv:
            try:
                await self.flush()
            except Exception as exc:  # boundary: reset / connection lost while writing
                self._handle(self.session.receive_eof())
                self._mark_closed(f"stream write failed: {exc}", self._close_error)
                return

    async def flush(self) -> None:
        """Write what the session has to send. Frames are taken under the write lock (sealed
        control frames carry sequence numbers: they must go out in the order they were made) and
        at most about one chunk at a time, so each CHUNK frame is written and handed back for
        reuse before the next one is sealed: bounded memory, no fresh multi-MiB buffer per chunk."""
        ag = self.session.agreement
        budget = (ag.chunk_bytes if ag is not None else 0) + 64 * 1024
        async with self._write_lock:
            while True:
                frames = self.session.frames_to_send(budget)
                if not frames:
                    return
                small: list[bytes | bytearray] = []
                for f in frames:  # coalesce control frames; big CHUNK frames go out as they are
                    if len(f) < 64 * 1024:
                        small.append(f)
                        continue
                    if small:
                        await self.stream.write(b"".join(small))
                        small = []
                    await self.stream.write(f)  # py-libp2p copies what it sends before returning
                    self.session.release_frame(f)
                if small:
                    await self.stream.write(b"".join(small))

    # -- what the session said -----------------------------------------------------------------
    def _handle(self, events: list) -> None:
        now = trio.current_time()
        for ev in events:
            if isinstance(ev, HandshakeComplete):
                self.agreement = ev.agreement
                self.session.offer_lanes(self._service.lane_offer())
                self._ready.set()
            elif isinstance(ev, LanesOffered):
                self._sender.offered(ev.offer)
            elif isinstance(ev, MessageStarted):
                mid = ev.header.message_id
                self._started[mid] = now
                self._wake_header(mid)
            elif isinstance(ev, MessageReceived):
                self._deliver(ev, now)
            elif isinstance(ev, (AckReceived, MessageAbandoned)):
                self._sender.resolve(ev.message_id, ev)
            elif isinstance(ev, MessageRejected):
                self._rejected(ev)
            elif isinstance(ev, Closed):
                self._clean = ev.error is None
                self._mark_closed(ev.reason, ev.error)
        self._kick()
        self._set_deadline()

    def _deliver(self, ev: MessageReceived, now: float) -> None:
        mid = ev.header.message_id
        started = self._started.pop(mid, now)
        path = self._mid_path.pop(mid, "stream")
        rec = Received(str(self.peer_id), ev.header, ev.buffer, ev.tensors, path, now - started,
                       ev.sink, self._service.buffers.release)
        try:
            self._in_send.send_nowait(rec)
        except trio.ClosedResourceError:  # same event batch as an overload close
            self._service.budget.release(str(self.peer_id), ev.charged)
            log.error("message verified after the session closed; not delivered",
                      extra=kv(peer=self.peer_id, mid=mid))
            return
        self._queued_charge[mid] = ev.charged
        self._service.bus.publish(MessageDelivered(self.session_id, str(self.peer_id), mid,
                                                   ev.header.payload_bytes, path, now - started))
        queued = self._in_recv.statistics().current_buffer_used
        if queued > self._settings.receive_queue_messages:
            log.error("receiver overloaded: closing session (queued messages kept)",
                      extra=kv(peer=self.peer_id, queued=queued,
                               limit=self._settings.receive_queue_messages))
            self._service.refuse("receive_queue")
            self._handle(self.session.close("receiver overloaded"))

    def _rejected(self, ev: MessageRejected) -> None:
        mid = ev.message_id
        if ev.local:
            self._started.pop(mid, None)
            self._mid_path.pop(mid, None)
            self._wake_header(mid)
            self._service.refuse(f"message_{ev.error.code.value.lower()}")
        else:
            self._sender.resolve(mid, ev)
        self._service.bus.publish(TransferFailed(self.session_id, str(self.peer_id), mid,
                                                 ev.error, ev.local))
        log.warning("tensor message rejected", extra=kv(peer=self.peer_id, mid=mid, local=ev.local,
                                                         err=ev.error))

    def _wake_header(self, mid: int) -> None:
        ev = self._header_events.pop(mid, None)
        if ev is not None:
            ev.set()

    def _mark_closed(self, reason: str, error: ProtocolError | None) -> None:
        if self._closed.is_set():
            return
        self._close_reason, self._close_error = reason, error
        self._closed.set()
        self._ready.set()
        self._sender.close()
        for ev in self._header_events.values():
            ev.set()
        self._header_events.clear()
        self._in_send.close()
        for rx in self.incoming.lanes:
            rx.close()
        if error is not None:
            log.info("tensor session ended", extra=kv(peer=self.peer_id, session=self.session_id,
                                                     reason=reason, err=error))

    @property
    def queued(self) -> int:
        """Verified messages waiting for the application."""
        return self._in_recv.statistics().current_buffer_used

    # -- public API ----------------------------------------------------------------------------
    async def wait_ready(self, timeout_s: float) -> None:
        with trio.fail_after(timeout_s):
            await self._ready.wait()
        if self._closed.is_set():
            raise SessionClosed(self._close_reason, self._close_error)

    @property
    def sink_factory(self) -> SinkFactory | None:
        """Per incoming header, a :class:`~tensor_rpc.message.ChunkSink` to stream the message into
        (bounded memory: one chunk of staging) instead of one payload-sized buffer, or ``None``."""
        return self.session.sink_factory

    @sink_factory.setter
    def sink_factory(self, factory: SinkFactory | None) -> None:
        self.session.sink_factory = factory

    async def send(self, tensors: Sequence[tuple[str, str, Sequence[int], Any]], *, kind: Kind,
                   layers: tuple[int, int], tokens: tuple[int, int], meta: dict | None = None,
                   apply: ApplyMode = ApplyMode.OVERWRITE, gain: float | None = None,
                   batch_slot: int = 0, timeout_s: float | None = None,
                   path: str | None = None) -> Sent:
        """Send one message and wait for the receiver's acknowledgement (checksums verified).

        ``tensors`` are ``(name, dtype, shape, buffer)``; their bytes are sealed straight from the
        buffers (no packing copy). ``path`` (``auto|shm|bulk|stream``) overrides the configured path
        for this transfer; a failing fast path falls back to the next slower one. ``Sent.path``
        says which one carried it.
        """
        specs, payload = tensor_source(tensors)
        return await self.send_from(specs, payload, kind=kind, layers=layers, tokens=tokens,
                                    meta=meta, apply=apply, gain=gain, batch_slot=batch_slot,
                                    timeout_s=timeout_s, path=path)

    async def send_from(self, specs: Sequence[TensorSpec], payload: PayloadSource, *, kind: Kind,
                        layers: tuple[int, int], tokens: tuple[int, int], meta: dict | None = None,
                        apply: ApplyMode = ApplyMode.OVERWRITE, gain: float | None = None,
                        batch_slot: int = 0, timeout_s: float | None = None,
                        path: str | None = None) -> Sent:
        """Like :meth:`send`, with the payload produced chunk by chunk by ``payload`` (a
        :class:`~tensor_rpc.message.PayloadSource`): sender memory stays bounded by one chunk per
        path whatever the payload size."""
        return await self._sender.send(specs, payload, kind=kind, layers=layers, tokens=tokens,
                                       meta=meta, apply=apply, gain=gain, batch_slot=batch_slot,
                                       timeout_s=timeout_s, path=path)

    def closed_error(self) -> SessionClosed:
        return SessionClosed(self._close_reason or "session closed", self._close_error)

    async def receive(self, timeout_s: float | None = None) -> Received:
        """Next verified message from the peer. From here on its memory is the application's; the
        node reuses it only once nothing (no view, array or tensor) exports it any more."""
        try:
            with trio.fail_after(math.inf if timeout_s is None else timeout_s):
                rec = await self._in_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self.closed_error() from None
        self._service.budget.release(str(self.peer_id), self._queued_charge.pop(rec.message_id, 0))
        return rec

    def report_applied(self, rec: Received, timings: dict[str, float] | None = None) -> None:
        """The application applied ``rec`` to its state: recorded as ``applied`` in the session log."""
        self._service.bus.publish(MessageApplied(self.session_id, str(self.peer_id),
                                                 rec.message_id, dict(timings or {})))

    def report_refused(self, rec: Received, reason: str) -> None:
        """The application could not apply ``rec`` (nothing of it applied): logged as ``refused``."""
        log.warning("received state refused by the application",
                    extra=kv(peer=self.peer_id, mid=rec.message_id, reason=reason))
        self._service.bus.publish(MessageRefused(self.session_id, str(self.peer_id),
                                                 rec.message_id, reason))

    async def close(self, reason: str = "done") -> None:
        """Close cleanly (CLOSE to the peer); returns once the close is queued."""
        if not self._closed.is_set():
            self._handle(self.session.close(reason))

    def _remote_ip(self) -> str | None:
        return remote_ip(self.stream)

