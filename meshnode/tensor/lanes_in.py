"""The lane server: listeners for incoming data lanes, and the gate every lane socket passes.

Listeners: a TCP (bulk) listener on each IP the libp2p host listens on (or on
``transport.bulk_listen_host`` if set) — never wider than the host itself — and, with
``transport.shm_enabled``, an abstract-namespace Unix socket for same-host shm lanes.

The gate, for a socket that has proven nothing yet (anyone can connect):

* at most ``lane_preauth_max`` such sockets at once; one more evicts the *oldest* (an honest
  connector proves the key within a millisecond, so a flood of idle sockets cannot starve it);
* each must finish the key proof within ``lane_preauth_timeout_s``, on a non-blocking socket (no
  thread is held by a socket that has not proven the key);
* its session must exist and be open, the announced lane kind must match the listener, and the
  session must have room (``max_lanes_per_session``);
* ``accept()`` errors (EMFILE when descriptors run out...) are counted and the listener pauses
  ``lane_accept_backoff_s`` and carries on; they never take the node down.

Each refusal is logged with its reason and counted (``on_refuse``). An authenticated lane is handed
to its session's driver, which runs it in the session's own nursery.
"""

from __future__ import annotations

import ipaddress
import math
import secrets
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from meshnode.config import TransportSection
from meshnode.host import local_address, remote_address
from meshnode.logs import get_logger, kv
from meshnode.nat.punch import open_from, reusable
from meshnode.tcp_rto import cap_rto
from meshnode.tensor.lanes_out import LANE_THREADS, behind_nat
from tensor_rpc import UsageError
from tensor_rpc.lanectl import LaneOffer
from tensor_rpc.transport import (
    KIND_BULK,
    KIND_SHM,
    LaneAuthError,
    LaneReceiver,
    janitor,
    lane_key,
    tune,
)
from tensor_rpc.transport.auth import HELLO, MAC_BYTES, acceptor_reply, check_connector, parse_hello

if TYPE_CHECKING:
    from meshnode.tensor.driver import TensorSession

log = get_logger("meshnode.tensor.lanes")
Lookup = Callable[[bytes], "TensorSession | None"]


async def _recv_exactly(sock: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = await sock.recv(n - len(buf))
        if not got:
            raise ConnectionError(f"lane closed after {len(buf)} of {n} bytes")
        buf += got
    return bytes(buf)


def bind_hosts(listen_ips: list[str], configured: str) -> list[str]:
    """IPs the bulk listener binds: the configured host, else the host's own listen IPs."""
    if configured:
        return [configured]
    return list(dict.fromkeys(listen_ips)) or ["127.0.0.1"]


class LaneServer:
    def __init__(self, settings: TransportSection, listen_ips: list[str], lookup: Lookup,
                 on_refuse: Callable[[str], None], tcp_rto_max_ms: int = 0) -> None:
        self.settings = settings
        self.tcp_rto_max_ms = tcp_rto_max_ms
        self.listen_ips = listen_ips
        self._lookup = lookup
        self._refuse = on_refuse
        self.bulk: list[tuple[str, int]] = []
        self.shm_name: str | None = None
        self._pending: dict[int, trio.CancelScope] = {}  # insertion order = arrival order
        self._next = 0
        self._knocks: set[tuple[str, int]] = set()  # knock dials in flight, by destination
        self._nursery: trio.Nursery | None = None

    @property
    def preauth(self) -> int:
        return len(self._pending)

    def offer(self, knocked: tuple[str, int] | None = None, knock: int | None = None) -> LaneOffer:
        return LaneOffer(tuple(self.bulk[:8]), self.shm_name, knocked, knock)

    def knock_for(self, stream: Any, port: int) -> tuple[str, int] | None:
        """Behind a NAT, let a bulk lane from the peer at the other end of ``stream`` in: the peer
        is dialling our first bulk port of its family from local ``port`` (it asked, ``knock``);
        we dial that port back, at the address we see the peer at, from that bulk port, in the
        background. The SYNs cross (each opened its own NAT for the other's), and the socket
        that connects is an incoming lane like any accepted one (same gate, same key proof).
        Answering the peer's SYN from the listener instead does not work: the router's
        connection tracking drops a SYN-ACK whose sequence is not that of the SYN it saw leave.
        Returns where we knock, or ``None``: not behind a NAT, no listener of that family, or
        knocks in flight already (to that peer, or ``lane_preauth_max`` in all)."""
        peer, local = remote_address(stream), local_address(stream)
        if peer is None or not behind_nat(local[0] if local else None, peer[0]):
            return None
        remote = (peer[0], port)
        src = next((ep for ep in self.bulk if (":" in ep[0]) == (":" in remote[0])), None)
        if src is None or self._nursery is None or remote in self._knocks:
            return None
        if len(self._knocks) >= self.settings.lane_preauth_max:
            self._refuse("lane_knocks_full")
            return None
        self._knocks.add(remote)
        self._nursery.start_soon(self._knock, src, remote)
        return remote

    async def _knock(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        try:
            stream = await open_from(src, dst, self.settings.lane_connect_timeout_s)
        except (OSError, trio.TooSlowError) as exc:
            log.info("lane knock unanswered", extra=kv(dst=f"{dst[0]}:{dst[1]}", err=exc or "timeout"))
            return
        finally:
            self._knocks.discard(dst)
        log.info("lane knock answered", extra=kv(dst=f"{dst[0]}:{dst[1]}"))
        await self._admit(stream.socket, dst, KIND_BULK)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        async with trio.open_nursery() as n:
            self._nursery = n
            for host in bind_hosts(self.listen_ips, s.bulk_listen_host):
                family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
                lsock = trio.socket.socket(family, socket.SOCK_STREAM)
                reusable(lsock)  # a lane from a NATed peer is dialled from this port (knock)
                await lsock.bind((host, s.bulk_port))
                lsock.listen(64)
                self.bulk.append((host, lsock.getsockname()[1]))
                log.info("bulk lane listening", extra=kv(host=host, port=self.bulk[-1][1]))
                n.start_soon(self._accept_loop, lsock, KIND_BULK)
            if s.shm_enabled:
                name = f"latentlink-lane-{secrets.token_hex(16)}"
                lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await lsock.bind("\0" + name)  # abstract namespace: nothing on disk to clean up
                lsock.listen(64)
                self.shm_name = name
                n.start_soon(self._accept_loop, lsock, KIND_SHM)
            task_status.started()

    async def _accept_loop(self, lsock: Any, kind: int) -> None:
        assert self._nursery is not None
        failures, logged_at = 0, -math.inf
        with lsock:
            while True:
                try:
                    tsock, addr = await lsock.accept()
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: pause, never die
                    self._refuse("lane_accept_error")
                    failures += 1
                    if trio.current_time() - logged_at >= 1.0:  # one line a second, with a count
                        logged_at = trio.current_time()
                        log.warning("lane accept failed; pausing", extra=kv(
                            err=exc, pause_s=self.settings.lane_accept_backoff_s, failures=failures))
                    await trio.sleep(self.settings.lane_accept_backoff_s)
                    continue
                self._nursery.start_soon(self._admit, tsock, addr or "unix", kind)

    async def _admit(self, tsock: Any, remote: Any, kind: int) -> None:
        """Gate one socket that has proven nothing yet (accepted, or connected by a knock)."""
        if len(self._pending) >= self.settings.lane_preauth_max:
            oldest = next(iter(self._pending))
            self._pending.pop(oldest).cancel()
            self._refuse("lane_preauth_full")
            log.warning("lane pre-auth full: dropped the oldest unauthenticated socket",
                        extra=kv(limit=self.settings.lane_preauth_max))
        self._next += 1
        scope = trio.CancelScope(deadline=trio.current_time() + self.settings.lane_preauth_timeout_s)
        self._pending[self._next] = scope
        await self._gate(self._next, scope, tsock, remote, kind)

    async def _gate(self, key: int, scope: trio.CancelScope, tsock: Any, remote: Any,
                    listener_kind: int) -> None:
        rx = ts = None
        reason = "timed out or evicted before proving the session key"
        with tsock:
            try:
                with scope:
                    ts, rx = await self._authenticate(tsock, listener_kind)
            except (LaneAuthError, OSError, ConnectionError, UsageError) as exc:
                reason = str(exc)
            finally:
                self._pending.pop(key, None)
            if rx is None or ts is None:
                self._refuse("lane_unauthenticated")
                log.warning("data lane connection dropped", extra=kv(remote=remote, reason=reason))
                janitor()
                return
            why = ts.incoming.add(rx)
            if why is not None:
                rx.close()
                self._refuse("lane_per_session")
                log.warning("data lane refused", extra=kv(peer=ts.peer_id, reason=why))
                return
            log.info("data lane accepted", extra=kv(peer=ts.peer_id, path=rx.path))

    async def _authenticate(self, tsock: Any, listener_kind: int) -> tuple[TensorSession, LaneReceiver]:
        kind, sid, nc = parse_hello(await _recv_exactly(tsock, HELLO.size))
        if kind != listener_kind:  # e.g. an shm hello over TCP: the socket decides, not the peer
            raise LaneAuthError(f"lane kind {kind} announced on the kind-{listener_kind} listener")
        ts = self._lookup(sid)
        if ts is None or ts.closed or ts.agreement is None:
            raise LaneAuthError("unknown session id")
        secret = lane_key(ts.session, sending=False)
        na, reply = acceptor_reply(secret, nc)
        await tsock.send(reply)
        check_connector(secret, nc, na, await _recv_exactly(tsock, MAC_BYTES))
        sock = socket.socket(fileno=tsock.detach())  # proven: now a blocking lane-thread socket
        try:
            sock.setblocking(True)
            tune(sock, self.settings.lane_socket_buffer_bytes)
            cap_rto(sock, self.tcp_rto_max_ms)
            rx = LaneReceiver(sock, kind, ts.agreement.chunk_bytes + ts.session.tag_bytes)
            if kind == KIND_SHM:
                sock.settimeout(self.settings.lane_preauth_timeout_s)
                await trio.to_thread.run_sync(rx.attach_shm, secret, abandon_on_cancel=True)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return ts, rx


async def feed_lane(ts: TensorSession, rx: LaneReceiver) -> None:
    """Feed one incoming lane into the session until it closes. The lane thread receives chunk
    k+1 into its other staging slot while this task opens chunk k (one channel, in order)."""
    token = trio.lowlevel.current_trio_token()
    chunks_in, chunks_out = trio.open_memory_channel[tuple](math.inf)  # bounded by lane slots

    def put(item: tuple) -> None:
        try:
            chunks_in.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            item[3]()  # consumer gone: free the slot so the lane thread can see it closed

    def submit(mid: int, idx: int, view: memoryview, done: Any) -> None:
        token.run_sync_soon(put, (mid, idx, view, done))

    async def consume() -> None:
        try:
            async for mid, idx, view, done in chunks_out:
                try:
                    await ts.incoming.chunk(mid, idx, view, rx.path)
                finally:
                    done()
                    view = None
        except ConnectionError as exc:
            log.warning("data lane stopped", extra=kv(peer=ts.peer_id, path=rx.path, err=exc))
            rx.close()

    try:
        async with trio.open_nursery() as n:
            n.start_soon(consume)
            try:
                await trio.to_thread.run_sync(rx.run, submit, abandon_on_cancel=True,
                                              limiter=LANE_THREADS)
            except (ConnectionError, OSError, LaneAuthError, trio.RunFinishedError,
                    struct.error) as exc:
                log.info("data lane ended", extra=kv(peer=ts.peer_id, path=rx.path, err=exc))
            finally:
                chunks_in.close()
    finally:
        rx.close()
        ts.incoming.ended(rx)
        janitor()


class IncomingLanes:
    """A session's incoming data lanes: adopted once through the gate, fed into its session."""

    def __init__(self, ts: TensorSession) -> None:
        self.ts = ts
        self.lanes: list[LaneReceiver] = []

    def add(self, rx: LaneReceiver) -> str | None:
        """Adopt an authenticated incoming lane; returns why not (or ``None``)."""
        ts = self.ts
        if ts.closed or ts._nursery is None:
            return "session closed"
        if len(self.lanes) >= ts._settings.max_lanes_per_session:
            return f"session already has {len(self.lanes)} lanes (transport.max_lanes_per_session)"
        self.lanes.append(rx)
        ts._nursery.start_soon(feed_lane, ts, rx)
        return None

    def ended(self, rx: LaneReceiver) -> None:
        if rx in self.lanes:
            self.lanes.remove(rx)

    async def chunk(self, mid: int, idx: int, view: memoryview, path: str) -> None:
        """One chunk from an incoming lane (``view`` is the lane's staging slot)."""
        ts = self.ts
        state = ts.session.incoming_state(mid)
        if state == "future":  # the header (on the stream) may trail the lane's first chunks
            ev = ts._header_events.get(mid) or ts._header_events.setdefault(mid, trio.Event())
            with trio.move_on_after(ts.session.limits.progress_timeout_s):
                await ev.wait()
            if ts.closed:
                return
            if ts.session.incoming_state(mid) == "future":
                raise ConnectionError(f"no header for lane message {mid}")
        if ts.closed:
            return
        if ts.session.incoming_state(mid) == "live":
            ts._mid_path[mid] = path
        ts._handle(ts.session.receive_chunk(mid, idx, view, trio.current_time()))

