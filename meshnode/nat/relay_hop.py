"""Circuit Relay v2, the relay's side (``/libp2p/circuit/relay/0.2.0/hop``): reservations and
circuits between two peers that cannot dial each other, with the spec's limits from config.

What py-libp2p 0.8.1's relay gets wrong and this one does not (DESIGN.md §11): a reservation is
freed the moment its peer disconnects (the spec: "if the peer disconnects, the reservation is no
longer valid"), not at TTL; the data limit counts each direction on its own; a circuit is cut at
its duration whether or not it is idle; every limit is read from ``[relay]``.

Serving follows reachability (``relay.hop = "auto"``): a relay must be publicly dialable, so the
hop protocol is offered only while AutoNAT says we are public (``"always"`` for labs and fixed
relays, ``"never"`` to turn it off). Every refusal is answered with the spec's status, logged with
its reason and counted (``on_refuse``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from meshnode.bus import EventBus
from meshnode.config import RelaySection
from meshnode.host import close_stream, grow_yamux_window, open_stream_on
from meshnode.logs import get_logger, kv
from meshnode.nat import relay_pb as pb
from meshnode.nat.notify import OnPeerGone
from meshnode.nat.reachability import PUBLIC, ReachabilityChanged

log = get_logger("meshnode.nat.relay")
RefuseCallback = Callable[[str], None]


@dataclass
class Circuit:
    src: ID
    dst: ID
    started: float
    bytes_up: int = 0  # src -> dst
    bytes_down: int = 0  # dst -> src
    ended: str = ""


class RelayHop:
    """The capability: ``await nursery.start(relay.run)``."""

    def __init__(self, host: IHost, settings: RelaySection, bus: EventBus,
                 on_refuse: RefuseCallback | None = None) -> None:
        self.host, self.s, self.bus = host, settings, bus
        self._on_refuse: RefuseCallback = on_refuse or (lambda reason: None)
        self.reservations: dict[ID, float] = {}  # peer -> expiry (unix time)
        self._reserved_on: dict[ID, Any] = {}  # peer -> the muxed connection it reserved over
        self.circuits: list[Circuit] = []
        self.serving = False
        self.stats = {"reservations_made": 0, "circuits_made": 0}

    @property
    def limit(self) -> tuple[int, int]:
        return int(self.s.circuit_duration_s), int(self.s.circuit_bytes)

    async def run(self, *, task_status: trio.TaskStatus[RelayHop] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.get_network().register_notifee(OnPeerGone(self.peer_gone))
        events = self.bus.subscribe(ReachabilityChanged)
        self._set_serving(self.s.hop == "always")
        task_status.started(self)
        async for ev in events:
            assert isinstance(ev, ReachabilityChanged)
            if self.s.hop == "auto":
                self._set_serving(ev.new == PUBLIC)

    def _set_serving(self, on: bool) -> None:
        if on == self.serving:
            return
        self.serving = on
        if on:
            self.host.set_stream_handler(pb.HOP_PROTOCOL, self._serve)
        else:
            self.host.remove_stream_handler(pb.HOP_PROTOCOL)
            self.reservations.clear()
            self._reserved_on.clear()
        log.info("relay hop service", extra=kv(serving=on, mode=self.s.hop))

    def peer_gone(self, peer: ID) -> None:
        self._reserved_on.pop(peer, None)
        if self.reservations.pop(peer, None) is not None:
            log.info("reservation freed: peer disconnected", extra=kv(peer=peer))

    def _live_reservation(self, peer: ID) -> bool:
        exp = self.reservations.get(peer)
        if exp is None:
            return False
        if exp < time.time() or not self.host.get_network().get_connections(peer):
            del self.reservations[peer]
            return False
        return True

    # -- hop ----------------------------------------------------------------------------------------
    async def _serve(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(self.s.connect_timeout_s):
                msg = await pb.read(stream, pb.HopMessage)
        except Exception as exc:  # boundary: a malformed request costs the peer its stream only
            self._refuse("relay_malformed", peer, exc)
            await self._answer(stream, pb.MALFORMED_MESSAGE)
            return
        if msg.type == pb.HOP_RESERVE:
            await self._reserve(stream, peer)
        elif msg.type == pb.HOP_CONNECT and msg.HasField("peer"):
            await self._connect(stream, peer, msg.peer.id)
        else:
            self._refuse("relay_unexpected", peer, f"hop message type {msg.type}")
            await self._answer(stream, pb.UNEXPECTED_MESSAGE)

    async def _answer(self, stream: Any, status: int, clean: bool = False) -> None:
        try:
            with trio.move_on_after(self.s.connect_timeout_s):
                await stream.write(pb.encode(pb.hop(pb.HOP_STATUS, status=status)))
        except Exception as exc:  # the peer is gone: nothing to tell it
            log.debug("relay answer failed", extra=kv(err=exc))
        await close_stream(stream, clean, 1.0)

    async def _reserve(self, stream: Any, peer: ID) -> None:
        now = time.time()
        renewing = self._live_reservation(peer)
        if not renewing:
            for p in [p for p, exp in self.reservations.items() if exp < now]:
                del self.reservations[p]
            if len(self.reservations) >= self.s.max_reservations:
                self._refuse("relay_reservations_full", peer, f"limit {self.s.max_reservations}")
                await self._answer(stream, pb.RESERVATION_REFUSED)
                return
        expire = int(now + self.s.reservation_ttl_s)
        self.reservations[peer] = expire
        self._reserved_on[peer] = stream.muxed_conn
        self.stats["reservations_made"] += 1
        addrs = [a.to_bytes() for a in self.host.get_addrs()]
        await stream.write(pb.encode(pb.hop(pb.HOP_STATUS, status=pb.OK, limit=self.limit,
                                            expire=expire, addrs=addrs)))
        await close_stream(stream, True, 1.0)
        log.info("reservation accepted", extra=kv(peer=peer, renew=renewing, expire=expire))

    async def _connect(self, stream: Any, src: ID, dst_raw: bytes) -> None:
        try:
            dst = ID(dst_raw)
        except Exception:
            self._refuse("relay_malformed", src, "bad target peer id")
            await self._answer(stream, pb.MALFORMED_MESSAGE)
            return
        if not self._live_reservation(dst):
            self._refuse("relay_no_reservation", src, f"no reservation for {dst}")
            await self._answer(stream, pb.NO_RESERVATION)
            return
        live = [c for c in self.circuits if not c.ended]
        if len(live) >= self.s.max_circuits or \
                sum(1 for c in live if src in (c.src, c.dst)) >= self.s.max_circuits_per_peer or \
                sum(1 for c in live if dst in (c.src, c.dst)) >= self.s.max_circuits_per_peer:
            self._refuse("relay_circuits_full", src, f"limits {self.s.max_circuits} total, "
                         f"{self.s.max_circuits_per_peer} per peer")
            await self._answer(stream, pb.RESOURCE_LIMIT_EXCEEDED)
            return
        try:
            with trio.fail_after(self.s.connect_timeout_s):
                out = await self._open_stop(dst)
                await out.write(pb.encode(pb.stop(pb.STOP_CONNECT, peer=src.to_bytes(),
                                                  limit=self.limit)))
                resp = await pb.read(out, pb.StopMessage)
        except Exception as exc:
            self._refuse("relay_target_failed", src, exc)
            await self._answer(stream, pb.CONNECTION_FAILED)
            return
        if resp.type != pb.STOP_STATUS or resp.status != pb.OK:
            self._refuse("relay_target_refused", src, pb.status_name(resp.status))
            await self._answer(stream, pb.CONNECTION_FAILED)
            await close_stream(out, False, 1.0)
            return
        await stream.write(pb.encode(pb.hop(pb.HOP_STATUS, status=pb.OK, limit=self.limit)))
        circuit = Circuit(src, dst, time.time())
        self.circuits.append(circuit)
        self.stats["circuits_made"] += 1
        log.info("circuit open", extra=kv(src=src, dst=dst))
        try:
            await self._splice(stream, out, circuit)
        finally:
            self.circuits = [c for c in self.circuits if c is not circuit]
            log.info("circuit closed", extra=kv(src=src, dst=dst, why=circuit.ended,
                                                up=circuit.bytes_up, down=circuit.bytes_down))

    async def _open_stop(self, dst: ID) -> Any:
        """A STOP stream to ``dst`` over the connection it reserved on (its newest word that it is
        there), else over whichever connection the host picks.

        A peer that restarted, or moved networks, leaves its old connection behind at the relay
        until TCP notices it is gone — on a lossy path its reset may never arrive, and a stale
        connection can live for many minutes. py-libp2p's choice of connection (more streams
        first) often fell on that stale one: every circuit to the peer timed out, although it
        had just reserved over a fresh connection (seen in the NAT matrix at 20 % loss).
        """
        muxed = self._reserved_on.get(dst)
        conn = next((c for c in self.host.get_network().get_connections(dst)
                     if getattr(c, "muxed_conn", None) is muxed), None)
        if conn is None:
            return await self.host.new_stream(dst, [pb.STOP_PROTOCOL])
        return await open_stream_on(conn, pb.STOP_PROTOCOL, self.s.connect_timeout_s)

    async def _splice(self, a: Any, b: Any, circuit: Circuit) -> None:
        """Copy both directions until either side ends or a limit is reached; then reset both."""
        for s in (a, b):
            await grow_yamux_window(s, self.s.window_bytes)
        duration, data = self.limit

        async def pump(src: Any, dst: Any, up: bool, cancel: trio.CancelScope) -> None:
            try:
                while True:
                    try:
                        chunk = await src.read(self.s.window_bytes)
                    except StreamEOF:
                        chunk = b""
                    if not chunk:  # half-close: pass the FIN on, keep the other direction
                        circuit.ended = circuit.ended or "closed"
                        await dst.close()
                        return
                    total = (circuit.bytes_up if up else circuit.bytes_down) + len(chunk)
                    if data and total > data:
                        circuit.ended = "data_limit"
                        self._refuse("relay_data_limit", circuit.src,
                                     f"{data} bytes per direction (relay.circuit_bytes)")
                        break
                    if up:
                        circuit.bytes_up = total
                    else:
                        circuit.bytes_down = total
                    await dst.write(chunk)
            except Exception as exc:  # either side reset: the circuit is over
                circuit.ended = circuit.ended or f"error: {type(exc).__name__}"
            cancel.cancel()

        with trio.move_on_after(duration or float("inf")) as timer:
            async with trio.open_nursery() as n:
                n.start_soon(pump, a, b, True, n.cancel_scope)
                n.start_soon(pump, b, a, False, n.cancel_scope)
        if timer.cancelled_caught:
            circuit.ended = "duration_limit"
            self._refuse("relay_duration_limit", circuit.src,
                         f"{duration} s (relay.circuit_duration_s)")
        clean = circuit.ended == "closed"
        for s in (a, b):
            with trio.CancelScope(shield=True):
                await close_stream(s, clean, 1.0)

    def _refuse(self, reason: str, peer: Any, why: Any) -> None:
        self._on_refuse(reason)
        log.warning("relay refused", extra=kv(reason=reason, peer=peer, why=str(why)[:200]))

    def status(self) -> dict:
        return {"serving": self.serving, "reservations": len(self.reservations),
                "circuits": [{"src": str(c.src), "dst": str(c.dst), "up": c.bytes_up,
                              "down": c.bytes_down} for c in self.circuits], **self.stats}
