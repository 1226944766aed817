"""Tensor sessions over libp2p, with fast data lanes: drives the sans-I/O :class:`tensor_rpc.Session`.

Control (handshake, headers, acks, credits, close) always runs on one long-lived libp2p stream per
session. Payload chunks take the fastest path both peers can prove, shm > bulk > stream
(``transport.path`` / ``transport.peer_paths`` override):

* ``stream``: in-band CHUNK frames on that same stream (always works, relayed too).
* ``bulk``: a direct TCP connection to the receiver's lane listener; the connector proves the
  session key before any payload (``tensor_rpc.transport.auth``). Offers travel on a small
  lane-control stream (``LANE_PROTOCOL``) over the same authenticated libp2p connection.
* ``shm``: a Unix socket (abstract namespace) for notifications plus a ring segment the sender
  creates and the receiver proves it maps (nonce challenge); same hostname is not proof.

Lane sockets run in worker threads (blocking ``sendall``/``recv_into``); every chunk goes back to
the trio thread through ``Session.receive_chunk``, which decrypts into the message buffer and hashes.

Fallback without double delivery: if a lane fails mid-message, the sender asks the receiver (lane
control) to abandon that message id. The receiver answers ``delivered`` (it completed before the
failure: the sender just waits for the ACK) or ``dropped`` (the incomplete message is rejected and
can never be delivered: its id is poisoned). Only then does the sender resend under a new id on
the next path.
"""

from __future__ import annotations

import math
import mmap
import secrets
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from discovery.signature import ModelSignature
from discovery.streamio import FrameError, read_exactly
from meshnode.config import TransportSection
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
    MessageStarted,
    ProtocolError,
    Role,
    Session,
)
from tensor_rpc.envelope import Envelope, TensorSpec
from tensor_rpc.message import PayloadSource
from tensor_rpc.session import SinkFactory
from tensor_rpc.tensors import tensor_source
from tensor_rpc.transport import (
    KIND_BULK,
    KIND_SHM,
    LaneAuthError,
    LaneReceiver,
    LaneSender,
    janitor,
    lane_key,
    parse_peer_paths,
    path_order,
    tune,
)
from tensor_rpc.transport.auth import accept_handshake, connect_handshake, read_hello
from tensor_rpc.transport.lane import TAG_SLACK

TENSOR_PROTOCOL = "/latentlink/tensor/1.0.0"
LANE_PROTOCOL = "/latentlink/tensor-lane/1.0.0"
TICK_S = 0.5
_CTL_MAX = 64 * 1024
_LEN = struct.Struct(">I")
_POISON_INDEX = 0xFFFFFFFF
# Lane threads live as long as their lane: keep them off trio's default 40-thread limiter, and
# bound unauthenticated handshakes separately so a flood of idle connections cannot starve it.
LANE_THREADS = trio.CapacityLimiter(4096)
HANDSHAKE_THREADS = trio.CapacityLimiter(16)
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
    sink: Any = None  # set when the message streamed into a sink (see TensorSession.sink_factory)


@dataclass(frozen=True)
class Sent:
    message_id: int
    nbytes: int
    checksums: tuple[bytes, ...]
    path: str
    elapsed_s: float


class _Recorder:
    """Session buffer factory that keeps each allocation with ``slack`` bytes past its end, so a
    lane can receive a sealed chunk (ciphertext + tag) at its final offset and decrypt in place."""

    slack = TAG_SLACK

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.recent: deque[memoryview] = deque(maxlen=1024)

    def __call__(self, n: int) -> memoryview:
        full = self.pool(n + self.slack)
        self.recent.append(full)
        return full[:n]


class BufferPool:
    """Receive buffers: prefaulted anonymous memory, reused once the application drops every view.

    Fresh memory costs a page fault per 4 KiB (~1 GB/s here); ``MAP_POPULATE`` halves that and reuse
    removes it. A pooled mapping is reused only when nothing but the pool references it (every
    memoryview over it holds a reference). Idle pooled memory is bounded by ``max_bytes``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._maps: list[mmap.mmap] = []

    def __call__(self, n: int) -> memoryview:
        if n < 1 << 20:
            return memoryview(bytearray(n))
        best = None
        for m in self._maps:
            if len(m) >= n and sys.getrefcount(m) <= 3 and (best is None or len(m) < len(best)):
                best = m  # 3 = the pool list + loop variable + getrefcount's argument
        if best is not None:
            return memoryview(best)[:n]
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        if n <= self.max_bytes:
            while self._maps and sum(len(x) for x in self._maps) + n > self.max_bytes:
                idle = [x for x in self._maps if sys.getrefcount(x) <= 3]
                if not idle:
                    break
                self._maps.remove(idle[0])
            if sum(len(x) for x in self._maps) + n <= self.max_bytes:
                self._maps.append(m)
        return memoryview(m)


async def _grow_yamux_window(stream: Any, target: int) -> None:
    """Grant the peer our whole yamux receive window up front.

    py-libp2p 0.8.1 starts streams at 256 KiB and, when a writer's window hits zero, polls for the
    update with 10 ms sleeps: ~26 MB/s until autotuning catches up. Best effort: other muxers skip.
    """
    try:
        grow = target - stream.target_recv_window
        if grow <= 0:
            return
        stream.target_recv_window = target
        stream.recv_window += grow
        await stream.send_window_update(grow)
    except AttributeError:
        return


async def _read_exact(stream: Any, n: int) -> bytes:
    try:
        return await read_exactly(stream, n)
    except FrameError as exc:  # callers treat a short lane-control read as a lost connection
        raise ConnectionError(f"lane-control stream closed: {exc}") from None


async def _read_msg(stream: Any) -> dict:
    (n,) = _LEN.unpack(await _read_exact(stream, _LEN.size))
    if n > _CTL_MAX:
        raise ConnectionError("lane-control message too large")
    obj = msgpack.unpackb(await _read_exact(stream, n), raw=False, strict_map_key=True,
                          max_bin_len=_CTL_MAX, max_str_len=_CTL_MAX, max_array_len=64, max_map_len=64)
    if not isinstance(obj, dict):
        raise ConnectionError("lane-control message is not a map")
    return obj


async def _write_msg(stream: Any, obj: dict) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > _CTL_MAX:  # the peer would drop the stream: fail here, naming the cause
        raise ValueError(f"lane-control message of {len(body)} bytes exceeds {_CTL_MAX}")
    await stream.write(_LEN.pack(len(body)) + body)


class TensorSession:
    """One end of a tensor session with a peer. Created by :class:`TensorService`."""

    def __init__(self, session: Session, stream: Any, peer_id: ID, on_event=None,
                 service: TensorService | None = None) -> None:
        self.session = session
        self.stream = stream
        self.peer_id = peer_id
        self._service = service
        self._settings = service.transport if service else TransportSection()
        self._write_lock = trio.Lock()
        # the reader never writes itself (it only kicks the writer task): a peer that stops
        # reading can then never stop us from reading, so two sessions streaming at each other
        # cannot deadlock on full yamux windows
        self._kick_send, self._kick_recv = trio.open_memory_channel[None](1)
        self._send_lock = trio.Lock()
        self._ready = trio.Event()
        self._closed = trio.Event()
        self._close_error: ProtocolError | None = None
        self._close_reason = ""
        self._acks: dict[int, tuple[trio.Event, list]] = {}
        # Unbounded channel, bounded by policy: a verified, acknowledged message is never dropped;
        # a peer that outruns the application gets its session closed instead (see _handle).
        self._in_send, self._in_recv = trio.open_memory_channel[Received](math.inf)
        self._started: dict[int, float] = {}
        self._on_event = on_event or (lambda *a: None)
        self.agreement = None
        # receiver-side lane bookkeeping
        self._live: set[int] = set()  # incoming messages started and not finished
        self._last_started = 0
        self._header_events: dict[int, trio.Event] = {}
        self._mid_path: dict[int, str] = {}
        self._delivered: deque[int] = deque(maxlen=4096)
        self._abandoned: set[int] = set()
        self._rx_lanes: list[LaneReceiver] = []
        self._recorder: _Recorder | None = None
        self._bufs: dict[int, memoryview] = {}  # incoming mid -> its buffer incl. tag slack
        # sender-side lanes
        self._tx_lanes: dict[str, LaneSender] = {}
        self._tx_failed: dict[str, float] = {}  # path -> when it failed (retried after lane_retry_s)
        self._ctl: Any = None
        self._ctl_lock = trio.Lock()

    @property
    def session_id(self) -> str:
        return self.session.session_id.hex()

    # -- driving the session ---------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            await _grow_yamux_window(self.stream, self._settings.stream_window_bytes)
            self._handle(self.session.start(time.monotonic()))
            await self.flush()
            n.start_soon(self._ticker)
            n.start_soon(self._writer)
            task_status.started()
            try:
                await self._read_loop()
            finally:
                n.cancel_scope.cancel()
                self._mark_closed("stream ended", self._close_error)
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(TICK_S):  # the last words: ABORT/CLOSE with the reason
                        try:
                            await self.flush()
                        except Exception:
                            pass
                    try:
                        await self.stream.close()
                    except Exception:
                        pass

    async def _read_loop(self) -> None:
        read_bytes = self._settings.stream_read_bytes
        while not self._closed.is_set():
            try:
                data = await self.stream.read(read_bytes)
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
            self._kick()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK_S)
            self._handle(self.session.tick(time.monotonic()))
            self._kick()

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
            except Exception as exc:  # reset / connection lost while writing
                self._handle(self.session.receive_eof())
                self._mark_closed(f"stream write failed: {exc}", self._close_error)
                return

    async def flush(self) -> None:
        """Write what the session has to send. Frames are taken under the write lock (sealed
        control frames carry sequence numbers: they must go out in the order they were made) and
        at most about one chunk at a time, so each CHUNK frame is written and handed back for
        reuse before the next one is sealed: bounded memory, no fresh multi-MiB buffer per chunk."""
        budget = self._chunk_budget()
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

    def _chunk_budget(self) -> int:
        ag = self.session.agreement
        return (ag.chunk_bytes if ag is not None else 0) + 64 * 1024

    def _handle(self, events: list) -> None:
        now = time.monotonic()
        poison: list[int] = []
        for ev in events:
            if isinstance(ev, HandshakeComplete):
                self.agreement = ev.agreement
                self._ready.set()
            elif isinstance(ev, MessageStarted):
                mid = ev.header.message_id
                self._started[mid] = now
                self._live.add(mid)
                self._last_started = max(self._last_started, mid)
                self._header_event(mid).set()
                rec = self._recorder
                if rec is not None and rec.recent:
                    full = rec.recent.popleft()
                    if len(full) >= ev.header.payload_bytes + rec.slack:
                        self._bufs[mid] = full
                if mid in self._abandoned:
                    poison.append(mid)
            elif isinstance(ev, MessageReceived):
                mid = ev.header.message_id
                started = self._started.pop(mid, now)
                self._finish_incoming(mid)
                self._delivered.append(mid)
                path = self._mid_path.pop(mid, "stream")
                rec = Received(str(self.peer_id), ev.header, ev.buffer, ev.tensors, path,
                               now - started, ev.sink)
                try:
                    self._in_send.send_nowait(rec)
                except trio.ClosedResourceError:  # same event batch as an overload close
                    log.error("message verified after the session closed; not delivered",
                              extra=kv(peer=self.peer_id, mid=mid))
                    continue
                self._on_event("received", self, rec)
                queued = self._in_recv.statistics().current_buffer_used
                if queued > self._settings.receive_queue_messages:
                    log.error("receiver overloaded: closing session (queued messages kept)",
                              extra=kv(peer=self.peer_id, queued=queued,
                                       limit=self._settings.receive_queue_messages))
                    self._handle(self.session.close("receiver overloaded"))
            elif isinstance(ev, AckReceived):
                waiter = self._acks.get(ev.message_id)
                if waiter:
                    waiter[1].append(ev)
                    waiter[0].set()
            elif isinstance(ev, MessageRejected):
                if ev.local:
                    self._finish_incoming(ev.message_id)
                    self._started.pop(ev.message_id, None)
                    self._mid_path.pop(ev.message_id, None)
                waiter = self._acks.get(ev.message_id)
                if waiter:
                    waiter[1].append(ev)
                    waiter[0].set()
                self._on_event("rejected", self, ev)
                log.warning("tensor message rejected", extra=kv(peer=self.peer_id, mid=ev.message_id,
                                                                 local=ev.local, err=ev.error))
            elif isinstance(ev, Closed):
                self._mark_closed(ev.reason, ev.error)
        for mid in poison:
            self._poison(mid)

    def _finish_incoming(self, mid: int) -> None:
        self._live.discard(mid)
        self._bufs.pop(mid, None)
        ev = self._header_events.pop(mid, None)
        if ev is not None:
            ev.set()

    def _header_event(self, mid: int) -> trio.Event:
        ev = self._header_events.get(mid)
        if ev is None:
            ev = self._header_events[mid] = trio.Event()
        return ev

    def _mark_closed(self, reason: str, error: ProtocolError | None) -> None:
        if self._closed.is_set():
            return
        self._close_reason, self._close_error = reason, error
        self._closed.set()
        self._ready.set()
        for ev, _box in self._acks.values():
            ev.set()
        for ev in self._header_events.values():
            ev.set()
        self._in_send.close()
        for rx in self._rx_lanes:
            rx.close()
        for tx in self._tx_lanes.values():
            tx.close()
        self._tx_lanes.clear()

    # -- receiver side of lanes ------------------------------------------------------------------
    async def run_lane(self, rx: LaneReceiver) -> None:
        """Feed one authenticated incoming lane into the session until it closes.

        The lane thread receives chunk k+1 while this task decrypts and hashes chunk k; chunks stay
        in order (one channel, one consumer)."""
        token = trio.lowlevel.current_trio_token()
        self._rx_lanes.append(rx)
        chunks_in, chunks_out = trio.open_memory_channel[tuple](float("inf"))  # bounded by lane slots

        def submit(mid: int, idx: int, view: memoryview, done) -> None:
            token.run_sync_soon(chunks_in.send_nowait, (mid, idx, view, done))

        def dest(mid: int) -> memoryview | None:
            return trio.from_thread.run(self._lane_dest, mid, trio_token=token)

        async def consume() -> None:
            try:
                async for mid, idx, view, done in chunks_out:
                    try:
                        await self._lane_chunk(mid, idx, view, rx.path)
                    finally:
                        done()
                        view = None  # don't pin the message buffer: the pool reuses it
            except (ConnectionError, ProtocolError) as exc:
                log.warning("data lane stopped", extra=kv(peer=self.peer_id, path=rx.path, err=exc))
                rx.close()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(consume)
                try:
                    await trio.to_thread.run_sync(rx.run, submit, dest, abandon_on_cancel=True,
                                                  limiter=LANE_THREADS)
                except (ConnectionError, OSError, LaneAuthError, trio.RunFinishedError,
                        struct.error) as exc:
                    log.info("data lane ended", extra=kv(peer=self.peer_id, path=rx.path, err=exc))
                finally:
                    chunks_in.close()
        finally:
            rx.close()
            if rx in self._rx_lanes:
                self._rx_lanes.remove(rx)

    async def _lane_dest(self, mid: int) -> memoryview | None:
        """The buffer (with tag slack) of incoming message ``mid``, once its header is here."""
        if mid > self._last_started and not self._closed.is_set():
            ev = self._header_event(mid)
            with trio.move_on_after(self.session.limits.transfer_timeout_s):
                await ev.wait()
            if mid > self._last_started:
                raise ConnectionError(f"no header for lane message {mid}")
        if mid in self._abandoned or mid not in self._live:
            return None
        return self._bufs.get(mid)

    async def _lane_chunk(self, mid: int, idx: int, view: memoryview, path: str) -> None:
        if mid in self._abandoned or self._closed.is_set():
            return
        if mid > self._last_started:  # the header (on the stream) may trail the lane's chunks
            ev = self._header_event(mid)
            with trio.move_on_after(self.session.limits.transfer_timeout_s):
                await ev.wait()
            if mid > self._last_started:
                raise ConnectionError(f"no header for lane message {mid}")
        if mid not in self._live or mid in self._abandoned:
            return  # finished or rejected already: later chunks are ignored
        self._mid_path[mid] = path
        self._handle(self.session.receive_chunk(mid, idx, view, time.monotonic()))
        self._kick()

    def _poison(self, mid: int) -> None:
        if mid in self._live:  # a wrong chunk index is a message-scoped ORDER reject
            self._handle(self.session.receive_chunk(mid, _POISON_INDEX, b"", time.monotonic()))

    async def abandon(self, mid: int) -> str:
        """The sender gave up on ``mid`` (lane failure): drop it unless already delivered."""
        if mid in self._delivered:
            return "delivered"
        self._abandoned.add(mid)
        self._poison(mid)
        self._kick()
        return "dropped"

    # -- sender side of lanes --------------------------------------------------------------------
    async def _ctl_call(self, req: dict) -> dict:
        assert self._service is not None
        async with self._ctl_lock:
            if self._ctl is None:
                self._ctl = await self._service.host.new_stream(self.peer_id, [LANE_PROTOCOL])
                await _write_msg(self._ctl, {"op": "hello", "sid": self.session.session_id})
                if not (await _read_msg(self._ctl)).get("ok"):
                    raise ConnectionError("peer does not know this session")
            await _write_msg(self._ctl, req)
            return await _read_msg(self._ctl)

    async def _sender_lane(self, path: str) -> LaneSender | None:
        lane = self._tx_lanes.get(path)
        failed = self._tx_failed.get(path)
        if lane is not None or self._service is None:
            return lane
        if failed is not None and time.monotonic() - failed < self._settings.lane_retry_s:
            return None
        s = self._settings
        try:
            with trio.fail_after(s.lane_connect_timeout_s * 2):
                offer = await self._ctl_call({"op": "offer"})
                key = lane_key(self.session, sending=True)
                assert self.agreement is not None
                max_sealed = self.agreement.chunk_bytes + self.session._sealer.tag_bytes
                sid = self.session.session_id
                if path == "bulk":
                    port = offer.get("bulk_port")
                    if not port:
                        raise ConnectionError("peer offers no bulk lane")
                    hosts = [h for h in [self._remote_ip()] + list(offer.get("bulk_hosts") or []) if h]
                    lane = await trio.to_thread.run_sync(_connect_bulk, hosts, int(port), sid, key,
                                                         max_sealed, s)
                else:
                    name = offer.get("shm")
                    if not name:
                        raise ConnectionError("peer offers no shm lane")
                    lane = await trio.to_thread.run_sync(_connect_shm, str(name), sid, key,
                                                         max_sealed, s)
        except Exception as exc:
            self._tx_failed[path] = time.monotonic()
            log.info("data lane unavailable; trying the next path",
                     extra=kv(peer=self.peer_id, path=path, err=exc))
            return None
        self._tx_lanes[path] = lane
        log.info("data lane open", extra=kv(peer=self.peer_id, path=path))
        return lane

    def _remote_ip(self) -> str | None:
        try:
            addr = self.stream.get_remote_address()
            return addr[0] if addr else None
        except Exception:
            return None

    def _drop_lane(self, path: str) -> None:
        lane = self._tx_lanes.pop(path, None)
        if lane is not None:
            lane.close()
        self._tx_failed[path] = time.monotonic()

    # -- public API ------------------------------------------------------------------------------
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
        if self._closed.is_set():
            raise SessionClosed(self._close_reason, self._close_error)
        t0 = time.monotonic()
        async with self._send_lock:
            assert self._service is not None or path in (None, "stream")
            order = (self._service.path_order(str(self.peer_id), path, payload.nbytes)
                     if self._service else ["stream"])
            for p in order:
                lane = None
                if p != "stream":
                    lane = await self._sender_lane(p)
                    if lane is None:
                        continue
                    await self.flush()  # clears finished inline messages from the outbox
                sent = await self._send_once(specs, payload, lane, p, kind=kind, layers=layers,
                                             tokens=tokens, meta=meta, apply=apply, gain=gain,
                                             batch_slot=batch_slot, timeout_s=timeout_s)
                if sent is not None:
                    return Sent(sent[0], payload.nbytes, sent[1], p, time.monotonic() - t0)
            raise SessionClosed("no data path left", None)

    async def _send_once(self, specs, payload, lane: LaneSender | None, path: str, *, kind, layers,
                         tokens, meta, apply, gain, batch_slot, timeout_s):
        msg = self.session.send_message(kind=kind, layers=layers, tokens=tokens, tensors=specs,
                                        payload=payload, now=time.monotonic(), batch_slot=batch_slot,
                                        apply=apply, gain=gain, meta=meta, inline=lane is None)
        done: tuple[trio.Event, list] = (trio.Event(), [])
        self._acks[msg.message_id] = done
        try:
            await self.flush()
            if lane is not None:
                try:
                    await trio.to_thread.run_sync(lane.send_message, msg, abandon_on_cancel=True,
                                                  limiter=LANE_THREADS)
                except BaseException as exc:
                    self._drop_lane(path)
                    if self._closed.is_set():
                        raise SessionClosed(self._close_reason, self._close_error) from exc
                    if not isinstance(exc, (OSError, ConnectionError, ProtocolError)):
                        raise
                    log.warning("data lane failed mid-transfer; falling back",
                                extra=kv(peer=self.peer_id, path=path, mid=msg.message_id, err=exc))
                    try:
                        with trio.fail_after(self._settings.lane_connect_timeout_s * 2):
                            state = (await self._ctl_call({"op": "abandon", "mid": msg.message_id}))["state"]
                    except Exception as exc2:  # cannot know whether it landed: never risk a double
                        raise SessionClosed(f"lane failed and abandon unconfirmed: {exc2}") from exc
                    if state != "delivered":
                        return None  # dropped on the receiver: resend on the next path
                await self.flush()  # the DIGEST, now that the lane sealed (and hashed) every chunk
            # Chunks beyond the peer's credit go out as CREDIT frames arrive (the writer task flushes).
            with trio.fail_after(timeout_s or self.session.limits.transfer_timeout_s):
                await done[0].wait()
        finally:
            self._acks.pop(msg.message_id, None)
        if not done[1]:
            raise SessionClosed(self._close_reason or "session closed", self._close_error)
        ev = done[1][0]
        if isinstance(ev, MessageRejected):
            raise ev.error
        sent_sums = msg.digests
        if sent_sums is None or tuple(ev.checksums) != sent_sums:  # the session checks this too; belt and braces
            raise ProtocolError(ErrorCode.CHECKSUM, "acknowledged checksums differ from sent")
        return msg.message_id, sent_sums

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
            if self._ctl is not None:
                await self._ctl.close()
        except Exception:
            pass
        self._mark_closed(reason, None)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


def _connect_bulk(hosts: list[str], port: int, sid: bytes, key: bytes, max_sealed: int,
                  s: TransportSection) -> LaneSender:
    last: Exception = ConnectionError("no address to try")
    for host in dict.fromkeys(hosts):
        try:
            sock = socket.create_connection((host, port), timeout=s.lane_connect_timeout_s)
        except OSError as exc:
            last = exc
            continue
        try:
            tune(sock, s.lane_socket_buffer_bytes)
            connect_handshake(sock, KIND_BULK, sid, key)
            sock.settimeout(None)
            return LaneSender(sock, KIND_BULK, max_sealed)
        except BaseException:
            sock.close()
            raise
    raise last


def _connect_shm(name: str, sid: bytes, key: bytes, max_sealed: int, s: TransportSection) -> LaneSender:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(s.lane_connect_timeout_s)
        sock.connect("\0" + name)
        tune(sock, s.lane_socket_buffer_bytes)
        connect_handshake(sock, KIND_SHM, sid, key)
        lane = LaneSender.open_shm(sock, key, s.shm_ring_bytes, max_sealed)
        sock.settimeout(None)
        return lane
    except BaseException:
        sock.close()
        raise


class TensorService:
    """Accepts and opens tensor sessions for a node; all session tasks live in its nursery."""

    def __init__(self, host: IHost, key_pair: KeyPair, limits: Limits, policy: AccessPolicy,
                 signature: ModelSignature | None = None, on_event=None, transport: TransportSection | None = None) -> None:
        self.host, self.key_pair, self.limits, self.policy = host, key_pair, limits, policy
        self.signature = signature
        self.transport = transport if transport is not None else TransportSection()
        self._peer_paths = parse_peer_paths(self.transport.peer_paths)
        self.sessions: dict[str, TensorSession] = {}
        self._on_event = on_event
        self._nursery: trio.Nursery | None = None
        self._accepted_send, self._accepted_recv = trio.open_memory_channel[TensorSession](64)
        self.bulk_port: int | None = None
        self._bulk_family = socket.AF_INET
        self.shm_name: str | None = None
        self._buffers = BufferPool(self.transport.recv_pool_bytes)

    def path_order(self, peer: str, override: str | None = None, nbytes: int | None = None) -> list[str]:
        return path_order(peer, self.transport.path, self._peer_paths, override,
                          self.transport.shm_enabled, nbytes, self.transport.inline_max_bytes)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        removed = janitor()
        if removed:
            log.info("removed orphaned shm segments", extra=kv(count=len(removed)))
        async with trio.open_nursery() as n:
            self._nursery = n
            await n.start(self._serve_bulk)
            if self.transport.shm_enabled:
                await n.start(self._serve_shm)
            self.host.set_stream_handler(TENSOR_PROTOCOL, self._handle_stream)
            self.host.set_stream_handler(LANE_PROTOCOL, self._handle_lane_ctl)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                for s in list(self.sessions.values()):
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await s.close("node stopping")

    # -- lane listeners --------------------------------------------------------------------------
    async def _serve_bulk(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        t = self.transport
        family = socket.AF_INET6 if ":" in t.bulk_listen_host else socket.AF_INET
        lsock = trio.socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await lsock.bind((t.bulk_listen_host, t.bulk_port))
        lsock.listen(64)
        self.bulk_port = lsock.getsockname()[1]
        self._bulk_family = family
        log.info("bulk lane listening", extra=kv(host=t.bulk_listen_host, port=self.bulk_port))
        task_status.started()
        await self._accept_loop(lsock, KIND_BULK)

    async def _serve_shm(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        name = f"latentlink-lane-{secrets.token_hex(16)}"
        lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await lsock.bind("\0" + name)  # abstract namespace: nothing on disk to clean up
        lsock.listen(64)
        self.shm_name = name
        task_status.started()
        await self._accept_loop(lsock, KIND_SHM)

    async def _accept_loop(self, lsock: Any, kind: int) -> None:
        with lsock:
            while True:
                tsock, addr = await lsock.accept()
                assert self._nursery is not None
                self._nursery.start_soon(self._lane_conn, tsock, addr, kind)

    async def _lane_conn(self, tsock: Any, addr: Any, listener_kind: int) -> None:
        sock = socket.socket(fileno=tsock.detach())
        sock.setblocking(True)
        sock.settimeout(self.transport.lane_connect_timeout_s)
        remote = addr if addr else "unix"
        try:
            kind, sid, nc = await trio.to_thread.run_sync(read_hello, sock, limiter=HANDSHAKE_THREADS)
            if kind != listener_kind:  # e.g. an shm hello over TCP: the socket decides, not the peer
                raise LaneAuthError(f"lane kind {kind} announced on the kind-{listener_kind} listener")
            ts = self.sessions.get(sid.hex())
            if ts is None or ts.closed or ts.agreement is None:
                raise LaneAuthError("unknown session id")
            key = lane_key(ts.session, sending=False)
            await trio.to_thread.run_sync(accept_handshake, sock, nc, key, limiter=HANDSHAKE_THREADS)
            tune(sock, self.transport.lane_socket_buffer_bytes)
            max_sealed = ts.agreement.chunk_bytes + ts.session._opener.tag_bytes
            rx = LaneReceiver(sock, kind, max_sealed, ts.agreement.chunk_bytes)
            if kind == KIND_SHM:
                await trio.to_thread.run_sync(rx.attach_shm, key, limiter=HANDSHAKE_THREADS)
            sock.settimeout(None)
        except (LaneAuthError, OSError, ConnectionError, struct.error, ValueError, ProtocolError) as exc:
            log.warning("data lane connection dropped: session key not proven",
                        extra=kv(remote=remote, err=exc))
            sock.close()
            janitor()
            return
        log.info("data lane accepted", extra=kv(peer=ts.peer_id, path=rx.path))
        try:
            await ts.run_lane(rx)
        finally:
            janitor()

    async def _handle_lane_ctl(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            hello = await _read_msg(stream)
            sid = hello.get("sid")
            ts = None
            with trio.move_on_after(self.limits.handshake_timeout_s):
                while isinstance(sid, bytes):  # our side may finish the handshake a moment later
                    ts = self.sessions.get(sid.hex())
                    if ts is not None:
                        break
                    await trio.sleep(0.005)
            if ts is None or str(ts.peer_id) != str(peer):
                await _write_msg(stream, {"ok": False})
                return
            await _write_msg(stream, {"ok": True})
            while not ts.closed:
                req = await _read_msg(stream)
                op = req.get("op")
                if op == "offer":
                    await _write_msg(stream, self._offer())
                elif op == "abandon" and isinstance(req.get("mid"), int):
                    await _write_msg(stream, {"state": await ts.abandon(req["mid"])})
                else:
                    await _write_msg(stream, {"error": "unknown op"})
        except (ConnectionError, ValueError, msgpack.ExtraData, Exception) as exc:
            log.debug("lane-control stream ended", extra=kv(peer=peer, err=exc))
        finally:
            try:
                await stream.close()
            except Exception:
                pass

    def _offer(self) -> dict:
        hosts = []
        if self.transport.bulk_listen_host not in ("0.0.0.0", "::"):
            hosts.append(self.transport.bulk_listen_host)
        # an IPv6 listener (bound to '::' or an IPv6 host) is offered on IPv6 addresses too
        protos = ("ip4", "ip6") if self._bulk_family == socket.AF_INET6 else ("ip4",)
        for a in self.host.get_addrs():
            for proto in protos:
                try:
                    hosts.append(a.value_for_protocol(proto))
                except Exception:
                    pass
        return {"bulk_port": self.bulk_port, "bulk_hosts": hosts[:8],
                "shm": self.shm_name if self.transport.shm_enabled else None}

    # -- sessions --------------------------------------------------------------------------------
    def _new(self, role: Role, peer: ID, stream: Any) -> TensorSession:
        if self.signature is None:
            raise ProtocolError(ErrorCode.INCOMPATIBLE_MODEL, "this node serves no model")
        rec = _Recorder(self._buffers)
        session = Session(role, self.limits, self.signature, self.key_pair, peer, policy=self.policy,
                          buffer_factory=rec)
        ts = TensorSession(session, stream, peer, self._on_event, self)
        ts._recorder = rec
        return ts

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
        ts = self._new(Role.RESPONDER, peer, stream)
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
        if self.signature is None:
            raise ProtocolError(ErrorCode.INCOMPATIBLE_MODEL, "this node serves no model")
        stream = await self.host.new_stream(peer, [TENSOR_PROTOCOL])
        ts = self._new(Role.INITIATOR, peer, stream)
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
