"""Circuit Relay v2, the client's side: hold reservations on relays while we are private, accept
circuits (``/libp2p/circuit/relay/0.2.0/stop``), dial peers through relays, advertise our
circuit addresses.

Worked around in py-libp2p 0.8.1 (DESIGN.md §11): its reservation worker never notices a dropped
relay connection and spins after a failed refresh — here each relay has one task that renews
before expiry (``relay.renew_before_s``), re-reserves as soon as the relay's connection drops, and
retries with doubling backoff (``relay.retry_backoff_s`` up to ``relay.retry_backoff_max_s``), so a
restarted relay has our reservation back within seconds. ``BasicHost.get_addrs()`` strips the
first ``/p2p`` and would advertise our peer ID at the relay's address: we add our circuit
addresses ourselves, exactly ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>``, and push
identify after each change. ``host.connect`` refuses circuit addresses: :meth:`install` wraps it
so every caller (DHT probes, peer exchange, the CLI) dials direct addresses first and circuits
after. A relayed connection's limits (the relay's ``Limit``) are kept per peer for the data plane.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from meshnode.bus import EventBus
from meshnode.config import RelaySection
from meshnode.host import close_stream, grow_yamux_window, is_relayed
from meshnode.logs import get_logger, kv
from meshnode.nat import relay_pb as pb
from meshnode.nat.notify import OnPeerGone
from meshnode.nat.reachability import PRIVATE, ReachabilityChanged

log = get_logger("meshnode.nat.relay_client")
RefuseCallback = Callable[[str], None]
CIRCUIT = "/p2p-circuit"


@dataclass(frozen=True)
class AddressesChanged:
    """Published on the bus when our circuit addresses change (the DHT re-announces us)."""

    addrs: tuple[str, ...]


@dataclass(frozen=True)
class RelayedConnection:
    """Published on the bus when a relayed connection opens. ``inbound``: ``peer`` reached us
    through ``relay`` (DCUtR's B, which drives the upgrade to a direct connection)."""

    peer: ID
    relay: ID
    inbound: bool


class RelayError(ConnectionError):
    """A relay refused (status named) or a circuit could not be set up."""


@dataclass
class Reservation:
    relay: ID
    expire: float
    addrs: list[multiaddr.Multiaddr]  # the relay's public addresses, each ending /p2p/<relay>
    limit: tuple[int, int]  # (duration s, data bytes per direction); 0 = none


def is_circuit(addr: multiaddr.Multiaddr) -> bool:
    return CIRCUIT in str(addr)


def split_circuit(addr: multiaddr.Multiaddr) -> tuple[ID, multiaddr.Multiaddr]:
    """``<relay transport addr>/p2p/<relay>/p2p-circuit[/p2p/<dest>]`` -> (relay ID, transport)."""
    relay_part = str(addr).split(CIRCUIT, 1)[0]
    if "/p2p/" not in relay_part:
        raise RelayError(f"circuit address without the relay's /p2p: {addr}")
    transport, rid = relay_part.rsplit("/p2p/", 1)
    return ID.from_base58(rid), multiaddr.Multiaddr(transport)


def _ip_of(addr: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return addr.value_for_protocol(proto)
        except Exception:  # multiaddr raises its own lookup error for an absent part
            continue
    return None


def worth_direct(addr: multiaddr.Multiaddr, own_ips: list[str]) -> bool:
    """Whether a peer that also offers circuit addresses is worth dialling directly at ``addr``:
    a public IP is; a private or loopback one only when one of our own IPs shares its network
    (the same host or LAN). Behind two NATs the peer's private address names someone else's LAN:
    the SYN would vanish and the relay would wait ``relay.direct_dial_timeout_s`` for nothing.
    Pure; a name (DNS) is always worth a try."""
    ip_text = _ip_of(addr)
    if ip_text is None:
        return True
    ip = ipaddress.ip_address(ip_text)
    if ip.is_global:
        return True
    for own in own_ips:
        mine = ipaddress.ip_address(own)
        if mine.is_unspecified:
            return True  # we listen everywhere: our own networks are unknown, so try
        if mine.version == ip.version and ip in ipaddress.ip_network(
                f"{own}/{16 if ip.version == 4 else 64}", strict=False):
            return True
    return False


class RelayClient:
    def __init__(self, host: IHost, settings: RelaySection, bus: EventBus,
                 on_refuse: RefuseCallback | None = None) -> None:
        self.host, self.s, self.bus = host, settings, bus
        self._on_refuse: RefuseCallback = on_refuse or (lambda reason: None)
        self.reservations: dict[ID, Reservation] = {}
        self.circuit_limits: dict[ID, tuple[int, int]] = {}  # peer -> limit of our circuit to it
        self._holding: set[ID] = set()
        self._failed: dict[ID, float] = {}  # relay -> trio time before which we do not retry it
        self._gone: dict[ID, trio.Event] = {}
        self._wanted = settings.client == "always"
        self._orig_connect = host.connect
        self._orig_get_addrs = host.get_addrs

    # -- composition ----------------------------------------------------------------------------
    def install(self) -> None:
        """Route ``host.connect`` through circuits when needed; add circuit addrs to ours."""
        self.host.connect = self.connect  # type: ignore[method-assign]
        self.host.get_addrs = self.get_addrs  # type: ignore[method-assign]

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        return [*self._orig_get_addrs(), *self.circuit_addrs()]

    def circuit_addrs(self) -> list[multiaddr.Multiaddr]:
        me = self.host.get_id().to_base58()
        out = []
        for r in self.reservations.values():
            out += [multiaddr.Multiaddr(f"{a}{CIRCUIT}/p2p/{me}") for a in r.addrs]
        return out

    async def run(self, *, task_status: trio.TaskStatus[RelayClient] = trio.TASK_STATUS_IGNORED) -> None:
        self.install()
        self.host.set_stream_handler(pb.STOP_PROTOCOL, self._on_stop)
        self.host.get_network().register_notifee(OnPeerGone(self._peer_gone))
        events = self.bus.subscribe(ReachabilityChanged)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow, events)
            task_status.started(self)
            while True:
                if self._wanted:
                    self._fill(nursery)
                await trio.sleep(self.s.scan_interval_s)

    async def _follow(self, events: Any) -> None:
        async for ev in events:
            if self.s.client == "auto":
                self._wanted = ev.new == PRIVATE
                log.info("relay reservations", extra=kv(wanted=self._wanted, reachability=ev.new))

    def _peer_gone(self, peer: ID) -> None:
        self.circuit_limits.pop(peer, None)
        ev = self._gone.get(peer)
        if ev is not None:
            ev.set()

    def _fill(self, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        candidates: list[tuple[ID, list[multiaddr.Multiaddr]]] = []
        for a in self.s.relays:
            rid, transport = split_circuit(multiaddr.Multiaddr(f"{a}{CIRCUIT}"))
            candidates.append((rid, [transport]))
        if not self.s.relays:  # relays found among our (bootstrap, DHT, PEX) connections
            for pid, conns in list(self.host.get_network().connections.items()):
                if conns and not all(is_relayed(c) for c in conns):
                    candidates.append((pid, self._known_addrs(pid)))
        for rid, addrs in candidates:
            if len(self._holding) >= self.s.max_relays:
                break
            if rid in self._holding or self._failed.get(rid, -1.0) > now:
                continue
            self._holding.add(rid)
            nursery.start_soon(self._hold, rid, addrs)

    def _known_addrs(self, pid: ID) -> list[multiaddr.Multiaddr]:
        try:
            return [a for a in self.host.get_peerstore().addrs(pid) if not is_circuit(a)]
        except Exception:  # peerstore raises when it knows no address
            return []

    # -- reservations ------------------------------------------------------------------------------
    async def _hold(self, relay: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        backoff = self.s.retry_backoff_s
        try:
            while self._wanted:
                gone = self._gone[relay] = trio.Event()
                try:
                    with trio.fail_after(self.s.connect_timeout_s):
                        if not self.host.get_network().get_connections(relay):
                            await self._orig_connect(PeerInfo(relay, addrs))
                        res = await self._reserve(relay)
                except RelayError as exc:  # the relay said no (or does not relay): try others
                    log.info("no reservation", extra=kv(relay=relay, why=exc))
                    self._failed[relay] = trio.current_time() + self.s.retry_backoff_max_s * 8
                    return
                except Exception as exc:  # unreachable right now (restarting?): retry soon
                    log.info("relay unreachable; retrying", extra=kv(relay=relay, err=exc,
                                                                     retry_s=backoff))
                    await self._drop(relay)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.s.retry_backoff_max_s)
                    continue
                backoff = self.s.retry_backoff_s
                addrs = list({str(a): a for a in [*addrs, *(split_circuit(
                    multiaddr.Multiaddr(f"{a}{CIRCUIT}"))[1] for a in res.addrs)]}.values())
                fresh = relay not in self.reservations
                self.reservations[relay] = res
                if fresh:
                    log.info("relay reservation held", extra=kv(
                        relay=relay, addrs=",".join(str(a) for a in self.circuit_addrs())))
                    await self._push_identify()
                ttl = res.expire - time.time()
                with trio.move_on_after(max(0.05, ttl - min(self.s.renew_before_s, ttl / 2))):
                    await gone.wait()
                if gone.is_set():
                    log.info("relay connection lost; re-reserving", extra=kv(relay=relay))
                    await self._drop(relay)
        finally:
            self._holding.discard(relay)
            await self._drop(relay)

    async def _drop(self, relay: ID) -> None:
        if self.reservations.pop(relay, None) is not None:
            await self._push_identify()

    async def _reserve(self, relay: ID) -> Reservation:
        try:
            stream = await self.host.new_stream(relay, [pb.HOP_PROTOCOL])
        except Exception as exc:  # connected, but it does not speak hop: not a relay
            raise RelayError(f"{relay} offers no relay service ({type(exc).__name__})") from None
        try:
            await stream.write(pb.encode(pb.hop(pb.HOP_RESERVE)))
            msg = await pb.read(stream, pb.HopMessage)
        finally:
            await close_stream(stream, True, 1.0)
        if msg.type != pb.HOP_STATUS or msg.status != pb.OK or not msg.HasField("reservation"):
            raise RelayError(f"relay {relay} refused the reservation: {pb.status_name(msg.status)}")
        rid = relay.to_base58()
        addrs = []
        for raw in msg.reservation.addrs[:16]:
            try:
                a = multiaddr.Multiaddr(bytes(raw))
            except Exception:  # a bad address is skipped, the reservation still holds
                continue
            if is_circuit(a) or not str(a).endswith(f"/p2p/{rid}"):
                a = multiaddr.Multiaddr(f"{str(a).split('/p2p/')[0]}/p2p/{rid}")
            addrs.append(a)
        return Reservation(relay, float(msg.reservation.expire), addrs,
                           (msg.limit.duration, msg.limit.data))

    async def _push_identify(self) -> None:
        self.bus.publish(AddressesChanged(tuple(str(a) for a in self.circuit_addrs())))
        try:
            with trio.move_on_after(self.s.connect_timeout_s):
                await push_identify_to_peers(self.host)
        except Exception as exc:  # best effort: peers also learn our addresses from the DHT
            log.debug("identify push failed", extra=kv(err=exc))

    # -- circuits ----------------------------------------------------------------------------------
    async def connect(self, info: PeerInfo) -> None:
        """``host.connect`` that also dials circuit addresses (direct ones first, those worth it)."""
        if self.host.get_network().get_connections(info.peer_id):
            return
        circuits = [a for a in info.addrs if is_circuit(a)]
        direct = [a for a in info.addrs if not is_circuit(a)]
        if circuits:
            own = [ip for a in self.host.get_transport_addrs() if (ip := _ip_of(a))]
            direct = [a for a in direct if worth_direct(a, own)]
        err: Exception | None = None
        if direct or not circuits:
            try:
                with trio.fail_after(self.s.direct_dial_timeout_s if circuits else float("inf")):
                    await self._orig_connect(PeerInfo(info.peer_id, direct))
                return
            except Exception as exc:
                if not circuits:
                    raise
                err = exc
        for a in circuits:
            try:
                await self.dial(a, info.peer_id)
                return
            except Exception as exc:  # the next relay may work
                err = exc
        assert err is not None
        raise err

    async def dial(self, addr: multiaddr.Multiaddr, peer: ID) -> None:
        """Open a relayed connection to ``peer`` through the relay named in ``addr``."""
        relay, transport = split_circuit(addr)
        with trio.fail_after(self.s.connect_timeout_s):
            if not self.host.get_network().get_connections(relay):
                await self._orig_connect(PeerInfo(relay, [transport]))
            stream = await self.host.new_stream(relay, [pb.HOP_PROTOCOL])
            try:
                await stream.write(pb.encode(pb.hop(pb.HOP_CONNECT, peer=peer.to_bytes())))
                msg = await pb.read(stream, pb.HopMessage)
            except BaseException:
                await close_stream(stream, False, 1.0)
                raise
        if msg.type != pb.HOP_STATUS or msg.status != pb.OK:
            await close_stream(stream, False, 1.0)
            raise RelayError(f"relay {relay} refused the circuit to {peer}: "
                             f"{pb.status_name(msg.status)}")
        limit = (msg.limit.duration, msg.limit.data) if msg.HasField("limit") else (0, 0)
        await grow_yamux_window(stream, self.s.window_bytes)
        ma = multiaddr.Multiaddr(f"/p2p/{relay}{CIRCUIT}/p2p/{peer}")
        raw = RawConnection(stream, True, ConnectionType.RELAYED, [ma])
        await self.host.upgrade_outbound_connection(raw, peer)
        self.circuit_limits[peer] = limit
        log.info("relayed connection open", extra=kv(peer=peer, relay=relay, limit=limit))
        self.bus.publish(RelayedConnection(peer, relay, inbound=False))

    async def _on_stop(self, stream: Any) -> None:
        relay = stream.muxed_conn.peer_id
        try:
            if relay not in self.reservations:
                self._refuse("relay_stop_unreserved", relay, "no reservation with this relay")
                await stream.write(pb.encode(pb.stop(pb.STOP_STATUS, status=pb.PERMISSION_DENIED)))
                await close_stream(stream, True, 1.0)
                return
            with trio.fail_after(self.s.connect_timeout_s):
                msg = await pb.read(stream, pb.StopMessage)
                if msg.type != pb.STOP_CONNECT or not msg.HasField("peer"):
                    raise pb.RelayWireError(f"stop message type {msg.type}")
                src = ID(msg.peer.id)
                await stream.write(pb.encode(pb.stop(pb.STOP_STATUS, status=pb.OK)))
            limit = (msg.limit.duration, msg.limit.data) if msg.HasField("limit") else (0, 0)
            await grow_yamux_window(stream, self.s.window_bytes)
            ma = multiaddr.Multiaddr(f"/p2p/{relay}{CIRCUIT}/p2p/{src}")
            raw = RawConnection(stream, False, ConnectionType.RELAYED, [ma])
            muxed = await self.host.upgrade_inbound_connection(raw, ma)
            if muxed.peer_id != src:  # the relay named someone the Noise handshake did not prove
                self._refuse("relay_peer_mismatch", relay, f"named {src}, proved {muxed.peer_id}")
                await muxed.close()
                return
            self.circuit_limits[src] = limit
            log.info("relayed connection accepted", extra=kv(peer=src, relay=relay, limit=limit))
            self.bus.publish(RelayedConnection(src, relay, inbound=True))
            await muxed.event_closed.wait()  # the stream is the connection: hold it while it lives
        except Exception as exc:  # boundary: a bad circuit never reaches the node
            self._refuse("relay_stop_failed", relay, exc)
            await close_stream(stream, False, 1.0)

    def _refuse(self, reason: str, peer: Any, why: Any) -> None:
        self._on_refuse(reason)
        log.warning("relay client refused", extra=kv(reason=reason, peer=peer, why=str(why)[:200]))

    def status(self) -> dict:
        return {"wanted": self._wanted,
                "reservations": {str(r.relay): {"expire": r.expire, "limit": list(r.limit)}
                                 for r in self.reservations.values()},
                "circuit_addrs": [str(a) for a in self.circuit_addrs()],
                "relayed_peers": {str(p): list(v) for p, v in self.circuit_limits.items()
                                  if any(is_relayed(c) for c in
                                         self.host.get_network().get_connections(p))}}
