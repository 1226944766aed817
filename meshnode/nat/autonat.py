"""AutoNAT v2 (libp2p/specs ``autonat/autonat-v2.md``): learn, per address, whether peers on the
public internet can dial us — and answer the same question for others.

Why not py-libp2p's AutoNAT: 0.8.1 ships v1 only, whose dial-back reuses the existing connection
(a closed port reads PUBLIC) and which counts unreachable servers as PRIVATE votes (DESIGN.md §11).
Here the server dials back from a *separate host* (its own peer ID, no listener, a fresh ephemeral
port: never the connection the request came on, never our listen port, so no accidental hole
punch) and must deliver the request's 64-bit nonce on ``/libp2p/autonat/2/dial-back``. The client
counts an address reachable only when that nonce arrived on a connection other than the request's.
:mod:`meshnode.nat.reachability` turns results into the node's state.

Every peer is a suspect. Server: one request per peer at a time and per ``per_peer_interval_s``,
at most ``max_concurrent_dial_backs`` dials at once, requests bounded (8 KiB, 16 addresses), the
dial-back bounded by ``dial_back_timeout_s``; we dial only ``/ip4/<ip>/tcp/<port>`` addresses
whose IP is the one the request came from (no amplification: we never dial a third party, so we
never ask for dial data), never private or loopback IPs unless ``allow_private_addrs``. Client:
dial data is sent only up to ``max_dial_data_bytes``; a dial-back with a nonce we did not issue is
refused. Each refusal is logged with its reason and counted (``on_refuse``).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from meshnode.bus import EventBus
from meshnode.config import NatSection
from meshnode.host import build_host_for_dialing, close_stream, local_address, remote_ip
from meshnode.logs import get_logger, kv
from meshnode.nat import autonat_pb as pb
from meshnode.nat.observed import observed_ip
from meshnode.nat.pbschema import StreamEnded
from meshnode.nat.reachability import UNKNOWN, Reachability

log = get_logger("meshnode.nat.autonat")
RefuseCallback = Callable[[str], None]
MAX_TRACKED_PEERS = 4096  # server: per-peer last-request times kept (oldest forgotten first)


def dialable(addr: multiaddr.Multiaddr, allow_private: bool) -> tuple[str, int] | None:
    """``(ip, port)`` if ``addr`` is exactly ``/ip4/<ip>/tcp/<port>`` with a public IP (or any IP
    but the unspecified one when ``allow_private``); ``None`` otherwise."""
    protos = [p.name for p in addr.protocols()]
    if protos != ["ip4", "tcp"]:
        return None
    ip = ipaddress.ip_address(addr.value_for_protocol("ip4"))
    if ip.is_unspecified or ip.is_multicast or (not allow_private and not ip.is_global):
        return None
    return str(ip), int(addr.value_for_protocol("tcp"))


@dataclass
class _Pending:
    """A request of ours waiting for its dial-back."""

    request_conn: Any
    arrived: trio.Event = field(default_factory=trio.Event)


class AutoNat:
    """The capability: ``await nursery.start(autonat.run)``; state in :attr:`reachability`."""

    def __init__(self, host: IHost, settings: NatSection, bus: EventBus,
                 on_refuse: RefuseCallback | None = None) -> None:
        self.host, self.s, self.bus = host, settings, bus
        self._on_refuse: RefuseCallback = on_refuse or (lambda reason: None)
        self.reachability = Reachability(settings.confirmations, settings.evidence_ttl_s)
        self._pending: dict[int, _Pending] = {}
        self._asked: dict[ID, float] = {}  # client: server -> when we last asked it
        self._last_request: OrderedDict[ID, float] = OrderedDict()  # server: peer -> last request
        self._serving: set[ID] = set()
        self._dial_slots = trio.CapacityLimiter(settings.max_concurrent_dial_backs)
        self._dialer: IHost | None = None
        self.results: list[dict] = []  # the last results, newest last (bounded), for /status

    @property
    def state(self) -> str:
        return self.reachability.state

    # -- lifecycle ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[AutoNat] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(pb.DIAL_BACK_PROTOCOL, self._on_dial_back)
        async with trio.open_nursery() as nursery:
            if self.s.autonat_server:
                await nursery.start(self._run_dialer)
                self.host.set_stream_handler(pb.DIAL_REQUEST_PROTOCOL, self._serve)
            if self.s.autonat_client:
                nursery.start_soon(self._probe_loop)
            task_status.started(self)

    async def _run_dialer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dialer = build_host_for_dialing(create_new_key_pair(), self.s.dial_back_timeout_s)
        async with dialer.run(listen_addrs=[]):
            self._dialer = dialer
            task_status.started()
            await trio.sleep_forever()

    # -- client --------------------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        while True:
            servers = self._pick_servers()
            if servers:
                async with trio.open_nursery() as n:
                    for server in servers:
                        n.start_soon(self._ask_safely, server)
            change = self.reachability.update(trio.current_time())
            if change is not None:
                self._publish(change)
            # while unknown, look again soon (a new connection may be a server); once decided,
            # recheck rarely: the answer changes only when the network does
            await trio.sleep(self.s.probe_interval_s if self.state == UNKNOWN
                             else self.s.recheck_interval_s)

    def _pick_servers(self) -> list[ID]:
        now = trio.current_time()
        peers = [p for p in list(self.host.get_network().connections)
                 if now - self._asked.get(p, -1e18) >= self.s.server_retry_s]
        for p in peers[: self.s.servers_per_round]:
            self._asked[p] = now
        if len(self._asked) > MAX_TRACKED_PEERS:
            for p in sorted(self._asked, key=self._asked.__getitem__)[: len(self._asked) // 2]:
                del self._asked[p]
        return peers[: self.s.servers_per_round]

    async def _ask_safely(self, server: ID) -> None:
        try:
            with trio.fail_after(self.s.request_timeout_s):
                await self.check(server)
        except Exception as exc:  # boundary: a server that fails gives no evidence
            log.debug("autonat request failed", extra=kv(server=server, err=exc))

    async def _candidates(self, server: ID, request_stream: Any) -> list[multiaddr.Multiaddr]:
        """Our addresses worth testing with ``server``, best first: concrete listen addresses, the
        listen port on the IP of our end of this connection (for wildcard listeners), and the
        listen port on the IP the server observes us at (identify): the NAT's public side."""
        ports, out = [], []
        local = local_address(request_stream)
        for a in self.host.get_transport_addrs():
            try:
                ip, port = a.value_for_protocol("ip4"), int(a.value_for_protocol("tcp"))
            except Exception:  # multiaddr raises its own lookup error for an absent part
                continue
            ports.append(port)
            if ip == "0.0.0.0" and local:
                ip = local[0]
            out.append(multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}"))
        observed = await observed_ip(self.host, server)
        if observed:
            out += [multiaddr.Multiaddr(f"/ip4/{observed}/tcp/{p}") for p in ports]
        seen, result = set(), []
        for a in out:
            if str(a) not in seen and dialable(a, self.s.allow_private_addrs):
                seen.add(str(a))
                result.append(a)
        return result[: pb.MAX_ADDRS]

    async def check(self, server: ID) -> dict | None:
        """Ask ``server`` to dial one of our addresses back; the result as reported to the state
        machine (``None``: the server gave no evidence)."""
        stream = await self.host.new_stream(server, [pb.DIAL_REQUEST_PROTOCOL])
        nonce = secrets.randbits(64)
        pending = _Pending(stream.muxed_conn)
        self._pending[nonce] = pending
        clean = False
        try:
            addrs = await self._candidates(server, stream)
            if not addrs:
                log.debug("autonat: no public address to test", extra=kv(server=server))
                return None
            await stream.write(pb.encode(pb.dial_request([a.to_bytes() for a in addrs], nonce)))
            while True:
                msg = await pb.read(stream, pb.Message)
                kind = msg.WhichOneof("msg")
                if kind == "dialDataRequest":
                    await self._pay(stream, msg.dialDataRequest, len(addrs))
                    continue
                if kind != "dialResponse":
                    self._refuse("autonat_unexpected_message", server, kind)
                    return None
                clean = True
                return self._judge(server, msg.dialResponse, addrs, pending)
        finally:
            self._pending.pop(nonce, None)
            await close_stream(stream, clean, 1.0)

    async def _pay(self, stream: Any, req: Any, n_addrs: int) -> None:
        if req.addrIdx >= n_addrs or req.numBytes > self.s.max_dial_data_bytes:
            raise pb.AutonatError(f"dial data request for {req.numBytes} bytes refused "
                                  f"(limit nat.max_dial_data_bytes = {self.s.max_dial_data_bytes})")
        chunk = pb.encode(pb.dial_data_response(bytes(pb.DIAL_DATA_CHUNK)))
        for _ in range(-(-req.numBytes // pb.DIAL_DATA_CHUNK)):
            await stream.write(chunk)

    def _judge(self, server: ID, resp: Any, addrs: list[multiaddr.Multiaddr],
               pending: _Pending) -> dict | None:
        now = trio.current_time()
        if resp.status == pb.E_DIAL_REFUSED:
            return self._record(server, "", "refused", now)
        if resp.status != pb.RESPONSE_OK or resp.addrIdx >= len(addrs):
            return None  # rejected (rate limit), internal error, unknown status: no evidence
        addr = str(addrs[resp.addrIdx])
        if resp.dialStatus == pb.E_DIAL_ERROR:
            return self._record(server, addr, "unreachable", now)
        if resp.dialStatus == pb.DIAL_OK:
            if not pending.arrived.is_set():
                self._refuse("autonat_unproven", server, "dial OK claimed but our nonce never arrived")
                return None
            return self._record(server, addr, "reachable", now)
        return None  # E_DIAL_BACK_ERROR or unknown: no evidence

    def _record(self, server: ID, addr: str, outcome: str, now: float) -> dict:
        result = {"server": str(server), "addr": addr, "outcome": outcome}
        self.results = [*self.results[-31:], result]
        log.info("reachability result", extra=kv(**result))
        change = self.reachability.report(str(server), addr, outcome, now)
        if change is not None:
            self._publish(change)
        return result

    def _publish(self, change: Any) -> None:
        log.info("reachability changed", extra=kv(old=change.old, new=change.new,
                                                  addrs=",".join(change.public_addrs)))
        self.bus.publish(change)

    async def _on_dial_back(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(self.s.dial_back_timeout_s):
                msg = await pb.read(stream, pb.DialBack)
                pending = self._pending.get(msg.nonce)
                if pending is None:
                    self._refuse("autonat_unknown_nonce", peer, "dial-back with a nonce we did not issue")
                    await stream.reset()
                    return
                if stream.muxed_conn is pending.request_conn:
                    self._refuse("autonat_same_connection", peer, "dial-back on the request's connection")
                    await stream.reset()
                    return
                pending.arrived.set()
                resp = pb.DialBackResponse()
                resp.status = pb.DIAL_BACK_OK
                await stream.write(pb.encode(resp))
            await close_stream(stream, True, 1.0)
        except Exception as exc:  # boundary: a bad dial-back never reaches the node
            self._refuse("autonat_bad_dial_back", peer, exc)
            await stream.reset()

    # -- server --------------------------------------------------------------------------------------
    async def _serve(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        clean = False
        try:
            with trio.fail_after(self.s.request_timeout_s):
                clean = await self._serve_one(stream, peer)
        except StreamEnded:  # the client closed before asking (it had no address to test)
            log.debug("autonat request stream closed unused", extra=kv(peer=peer))
        except Exception as exc:  # boundary: a hostile client never reaches the node
            self._refuse("autonat_bad_request", peer, exc)
        finally:
            await close_stream(stream, clean, 1.0)

    async def _serve_one(self, stream: Any, peer: ID) -> bool:
        msg = await pb.read(stream, pb.Message)
        if msg.WhichOneof("msg") != "dialRequest":
            raise pb.AutonatError(f"expected dialRequest, got {msg.WhichOneof('msg')}")
        req = msg.dialRequest
        now = trio.current_time()
        reason = self._admit(peer, now, len(req.addrs))
        if reason:
            self._refuse(reason, peer, "request rejected")
            await stream.write(pb.encode(pb.dial_response(pb.E_REQUEST_REJECTED)))
            return True
        self._serving.add(peer)
        try:
            observed = remote_ip(stream)
            choice = self._select(req.addrs, observed)
            if choice is None:
                await stream.write(pb.encode(pb.dial_response(pb.E_DIAL_REFUSED)))
                return True
            idx, addr = choice
            status = await self._dial_back(peer, addr, req.nonce)
            await stream.write(pb.encode(pb.dial_response(pb.RESPONSE_OK, idx, status)))
            return True
        finally:
            self._serving.discard(peer)

    def _admit(self, peer: ID, now: float, n_addrs: int) -> str | None:
        if n_addrs > pb.MAX_ADDRS:
            return "autonat_too_many_addrs"
        if peer in self._serving:
            return "autonat_concurrent"
        last = self._last_request.get(peer)
        if last is not None and now - last < self.s.per_peer_interval_s:
            return "autonat_rate"
        if self._dial_slots.available_tokens == 0:
            return "autonat_busy"
        self._last_request.pop(peer, None)
        self._last_request[peer] = now
        while len(self._last_request) > MAX_TRACKED_PEERS:
            self._last_request.popitem(last=False)
        return None

    def _select(self, raw: Any, observed: str | None) -> tuple[int, multiaddr.Multiaddr] | None:
        """The first address we are willing to dial: ip4/tcp, public (unless allowed), and on the
        IP the request came from (so we never need the spec's dial-data exchange)."""
        for i, b in enumerate(raw):
            try:
                addr = multiaddr.Multiaddr(bytes(b))
            except Exception:  # a malformed address is skipped like an unsupported one
                continue
            hit = dialable(addr, self.s.allow_private_addrs)
            if hit and observed and hit[0] == observed:
                return i, addr
        return None

    async def _dial_back(self, peer: ID, addr: multiaddr.Multiaddr, nonce: int) -> int:
        dialer = self._dialer
        assert dialer is not None
        async with self._dial_slots:
            store = dialer.get_peerstore()
            if peer in dialer.get_network().connections:  # never reuse: a dial-back is a fresh dial
                await dialer.disconnect(peer)
            store.clear_addrs(peer)
            try:
                try:
                    with trio.fail_after(self.s.dial_back_timeout_s):
                        await dialer.connect(PeerInfo(peer, [addr]))
                except Exception as exc:  # closed port, NAT, firewall: the answer, not an error
                    log.debug("dial-back failed", extra=kv(peer=peer, addr=addr, err=exc))
                    return pb.E_DIAL_ERROR
                try:
                    with trio.fail_after(self.s.dial_back_timeout_s):
                        s = await dialer.new_stream(peer, [pb.DIAL_BACK_PROTOCOL])
                        back = pb.DialBack()
                        back.nonce = nonce
                        await s.write(pb.encode(back))
                        resp = await pb.read(s, pb.DialBackResponse)
                        await close_stream(s, True, 1.0)
                    return pb.DIAL_OK if resp.status == pb.DIAL_BACK_OK else pb.E_DIAL_BACK_ERROR
                except Exception as exc:
                    log.debug("dial-back stream failed", extra=kv(peer=peer, err=exc))
                    return pb.E_DIAL_BACK_ERROR
            finally:
                with trio.move_on_after(1.0):
                    await dialer.disconnect(peer)
                store.clear_addrs(peer)

    def _refuse(self, reason: str, peer: Any, why: Any) -> None:
        self._on_refuse(reason)
        log.warning("autonat refused", extra=kv(reason=reason, peer=peer, why=str(why)[:200]))

    def status(self) -> dict:
        return {"state": self.state, "public_addrs": list(self.reachability.public_addrs),
                "servers_heard": self.reachability.servers_heard(), "recent": self.results[-8:]}
