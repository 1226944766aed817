"""The tensor capability: who may have a session with us, how many, and where each one runs.

Composition of one network capability, rust-libp2p style: this *service* decides who and when
(admission, the session registry, open/accept, the node-wide receive budget and buffer pool, the
lane server); :mod:`meshnode.tensor.driver` runs one session over one stream; ``tensor_rpc`` says
what the bytes are. Every session task lives in this service's nursery.

Admission, checked before a session exists (each refusal is an ABORT naming the reason, logged and
counted): the node serves a model; for an incoming session, it serves the ``apply`` role (some
application will take and apply the state — a node that would only acknowledge and discard it
refuses at once); the allow/deny lists; ``limits.max_sessions`` in total and
``limits.max_sessions_per_peer`` per peer (a slot is freed only when the session's tasks ended and
its stream is closed); ``limits.max_unaccepted_sessions`` incoming sessions not yet taken by
:meth:`TensorService.accept`. Session ids are unique: a HELLO reusing a live id is refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from discovery.signature import ModelSignature
from meshnode.bus import EventBus
from meshnode.config import TransportSection
from meshnode.host import new_stream_or_relayed
from meshnode.logs import get_logger, kv
from meshnode.tensor.buffers import BufferPool
from meshnode.tensor.driver import SessionClosed, TensorSession
from meshnode.tensor.events import SessionEnded, SessionOpened
from meshnode.tensor.lanes_in import LaneServer
from tensor_rpc import (
    AccessPolicy,
    ErrorCode,
    Limits,
    ProtocolError,
    ReceiveBudget,
    Role,
    RuntimeTerms,
)
from tensor_rpc.lanectl import LaneOffer
from tensor_rpc.session import HeaderCheck, refusal
from tensor_rpc.transport import janitor, parse_peer_paths, path_order

TENSOR_PROTOCOL = "/latentlink/tensor/1.0.0"
APPLY_ROLE = "apply"
log = get_logger("meshnode.tensor")


class TensorService:
    """Accepts and opens tensor sessions for a node."""

    def __init__(self, host: IHost, key_pair: KeyPair, limits: Limits, transport: TransportSection,
                 *, bus: EventBus, listen_ips: list[str] | None = None,
                 on_refuse: Callable[[str], None] | None = None, tcp_rto_max_ms: int = 0) -> None:
        self.host, self.key_pair, self.limits, self.transport = host, key_pair, limits, transport
        self.bus = bus
        self.policy = AccessPolicy(limits)
        self.budget = ReceiveBudget(limits.inflight_bytes, limits.inflight_bytes_per_peer)
        self.buffers = BufferPool(transport.recv_pool_bytes)
        self.signature: ModelSignature | None = None
        self.terms: RuntimeTerms | None = None  # what the local runtime accepts (HELLO "runtime")
        self.header_check: HeaderCheck | None = None  # the application's "can I apply this?"
        self.accepting = False  # serves the "apply" role: incoming sessions have a consumer
        self._on_refuse = on_refuse or (lambda reason: None)
        self._peer_paths = parse_peer_paths(transport.peer_paths)
        self._registry: dict[bytes, TensorSession] = {}  # session id -> its session
        self._live: set[TensorSession] = set()
        self._unaccepted: set[TensorSession] = set()  # incoming, not yet taken by accept()
        self._ready: deque[TensorSession] = deque()  # incoming, handshake done, waiting for accept()
        self._ready_event = trio.Event()
        self._ended_unaccepted: set[TensorSession] = set()  # ended, verified messages queued
        self._nursery: trio.Nursery | None = None
        self.tcp_rto_max_ms = tcp_rto_max_ms  # (host.tcp_rto_max_ms) for the bulk lanes' sockets
        self.lanes = LaneServer(transport, listen_ips or [], self._lookup, self.refuse, tcp_rto_max_ms)

    # -- capability ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        removed = janitor()
        if removed:
            log.info("removed orphaned shm segments", extra=kv(count=len(removed)))
        async with trio.open_nursery() as n:
            self._nursery = n
            await n.start(self.lanes.run)
            self.host.set_stream_handler(TENSOR_PROTOCOL, self._handle_stream)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for ts in list(self._live):
                    await ts.close("node stopping")  # their drivers send CLOSE, then stop

    def refuse(self, reason: str) -> None:
        """Count one refusal (the caller logs it with the details)."""
        self._on_refuse(reason)

    def circuit_limit(self, peer: ID) -> tuple[int, int] | None:
        """The relay's ``(duration s, bytes per direction)`` for our relayed connection to
        ``peer``, if we know it; the node points this at its relay client."""
        return None

    def path_order(self, peer: str, override: str | None = None, nbytes: int | None = None) -> list[str]:
        t = self.transport
        return path_order(peer, t.path, self._peer_paths, override, t.shm_enabled, nbytes,
                          t.inline_max_bytes)

    def lane_offer(self, knocked: tuple[str, int] | None = None, knock: int | None = None) -> LaneOffer:
        return self.lanes.offer(knocked, knock)

    # -- registry (called by drivers) ----------------------------------------------------------
    def claim(self, sid: bytes, ts: TensorSession) -> bool:
        if sid in self._registry:
            self.refuse("session_id_collision")
            log.warning("tensor session refused: session id already in use",
                        extra=kv(peer=ts.peer_id, session=sid.hex()))
            return False
        self._registry[sid] = ts
        return True

    def forget(self, ts: TensorSession) -> None:
        """The session's tasks ended and its stream is closed: free everything it held — except
        a session nobody accepted yet that holds verified messages: it stays acceptable (the
        sender saw them acknowledged), keeping its peer's session slot and its budget, until the
        application accepts it and takes them."""
        if ts not in self._live:
            return
        self._live.discard(ts)
        sid = ts.session.session_id
        if self._registry.get(sid) is ts:
            del self._registry[sid]
        if ts in self._ready and ts.queued:
            self._ended_unaccepted.add(ts)  # slot released when accept() hands it over
        else:
            self.policy.release(str(ts.peer_id))
            if ts in self._unaccepted:
                self._unaccepted.discard(ts)
                if ts in self._ready:
                    self._ready.remove(ts)
        self.bus.publish(SessionEnded(ts.session_id, str(ts.peer_id), ts._close_reason,
                                      ts._close_error))

    def _lookup(self, sid: bytes) -> TensorSession | None:
        return self._registry.get(sid)

    # -- admission -----------------------------------------------------------------------------
    def _admit(self, peer: str, incoming: bool) -> ProtocolError | None:
        """Why a session with ``peer`` is refused (None: admitted, and its slot is taken)."""
        if self.signature is None:
            return ProtocolError(ErrorCode.UNSUPPORTED, "this node serves no model")
        if incoming and not self.accepting:
            return ProtocolError(ErrorCode.UNSUPPORTED, f"this node does not take state from "
                                 f"peers: it serves no {APPLY_ROLE!r} role")
        if len(self._live) >= self.limits.max_sessions:
            return ProtocolError(ErrorCode.LIMIT, f"node has {len(self._live)} sessions "
                                 "(limits.max_sessions)")
        if incoming and len(self._unaccepted) >= self.limits.max_unaccepted_sessions:
            return ProtocolError(ErrorCode.LIMIT, f"{len(self._unaccepted)} sessions wait to be "
                                 "accepted (limits.max_unaccepted_sessions)")
        try:
            self.policy.check_peer(peer)
            self.policy.acquire(peer)
        except ProtocolError as err:
            return err
        return None

    async def _handle_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        err = (ProtocolError(ErrorCode.CLOSED, "node stopping") if self._nursery is None
               else self._admit(str(peer), incoming=True))
        if err is not None:
            self.refuse(f"session_{err.code.value.lower()}")
            log.warning("tensor session refused", extra=kv(peer=peer, reason=err))
            with trio.move_on_after(self.transport.close_timeout_s):
                try:
                    await stream.write(refusal(err))
                    await stream.close()
                except Exception as exc:  # boundary: the peer may be gone already
                    log.debug("refusal not delivered", extra=kv(peer=peer, err=exc))
            return
        ts = TensorSession(self, Role.RESPONDER, peer, stream)
        self._live.add(ts)
        self._unaccepted.add(ts)
        # the handler must return promptly; the session runs in the service's nursery
        assert self._nursery is not None
        await self._nursery.start(ts.run)
        self._nursery.start_soon(self._announce, ts)

    async def _announce(self, ts: TensorSession) -> None:
        try:
            await ts.wait_ready(self.limits.handshake_timeout_s)
        except (SessionClosed, trio.TooSlowError) as exc:
            log.warning("incoming tensor session failed", extra=kv(peer=ts.peer_id, err=exc))
            return
        log.info("tensor session accepted", extra=kv(peer=ts.peer_id, session=ts.session_id))
        self.bus.publish(SessionOpened(ts.session_id, str(ts.peer_id), False,
                                       self.signature.compat_key if self.signature else ""))
        self._ready.append(ts)
        self._ready_event.set()

    async def open(self, peer: ID) -> TensorSession:
        """Open a session to ``peer`` (must be connected or dialable) and finish the handshake."""
        if self._nursery is None:
            raise RuntimeError("tensor service not running")
        err = self._admit(str(peer), incoming=False)
        if err is not None:
            raise err
        try:
            stream = await new_stream_or_relayed(self.host, peer, TENSOR_PROTOCOL,
                                                 self.limits.handshake_timeout_s)
        except BaseException:
            self.policy.release(str(peer))
            raise
        ts = TensorSession(self, Role.INITIATOR, peer, stream)
        self._live.add(ts)
        await self._nursery.start(ts.run)
        try:
            await ts.wait_ready(self.limits.handshake_timeout_s)
        except trio.TooSlowError:
            await ts.close("handshake timeout")
            raise SessionClosed("handshake timed out") from None
        self.bus.publish(SessionOpened(ts.session_id, str(peer), True, self.signature.compat_key
                                       if self.signature else ""))
        return ts

    async def accept(self, timeout_s: float | None = None) -> TensorSession:
        """Next session a peer opened to us (after a successful handshake)."""
        with trio.fail_after(float("inf") if timeout_s is None else timeout_s):
            while True:
                while self._ready:
                    ts = self._ready.popleft()
                    self._unaccepted.discard(ts)
                    if ts in self._ended_unaccepted:
                        self._ended_unaccepted.discard(ts)
                        self.policy.release(str(ts.peer_id))
                    return ts
                self._ready_event = trio.Event()
                await self._ready_event.wait()

    # -- introspection -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        peers: dict[str, dict[str, int]] = {}
        lanes: dict[str, int] = {}
        for ts in self._live:
            st = ts.session.state.value
            by_state[st] = by_state.get(st, 0) + 1
            p = peers.setdefault(str(ts.peer_id), {"sessions": 0, "inflight_bytes": 0})
            p["sessions"] += 1
            for k, v in ts.lanes.items():
                lanes[k] = lanes.get(k, 0) + v
        for peer, held in self.budget.by_peer().items():
            peers.setdefault(peer, {"sessions": 0, "inflight_bytes": 0})["inflight_bytes"] = held
        return {"sessions": len(self._live), "by_state": by_state,
                "unaccepted": len(self._unaccepted), "ended_unaccepted": len(self._ended_unaccepted), "lanes": lanes,
                "lane_preauth": self.lanes.preauth, "inflight_bytes": self.budget.used,
                "pool_idle_bytes": self.buffers.idle_bytes, "peers": peers}

    def sessions(self) -> list[dict[str, Any]]:
        return sorted((ts.status() for ts in self._live), key=lambda d: d["session_id"])
