"""DCUtR (libp2p/specs ``relay/DCUtR.md``): upgrade a relayed connection to a direct one.

The spec's roles: A dialled B through a relay; B, the peer that *received* the relayed connection,
drives the upgrade —

1. *unilateral*: if A's known addresses include public TCP ones, B dials them (A may just be
   public, or behind a port forward) — "public ↔ private: direct, by dialling back";
2. otherwise, or if that fails, B opens ``/libp2p/dcutr`` over the relayed connection and, up to
   ``dcutr.attempts`` times on that one stream (a fresh one per round if A ended it, as go and
   js peers do): CONNECT (B's observed addresses) → CONNECT (A's),
   B measuring the round trip → SYNC. A dials as soon as SYNC arrives, B after half the round
   trip; both from their listen port, so the SYNs cross and both NATs let the other's through (a
   TCP simultaneous open);
3. after the last failed attempt B stops and keeps the relay: no punch traffic to that peer
   until the addresses it sends change (what it sent is remembered, ``dcutr.memory`` peers).

Roles on the merged socket, which both sides ``connect()``ed: A is the security initiator, B the
responder (rust-libp2p and go-libp2p do this; py-libp2p's ``dial_addr_as_responder`` assumes it).
Deciding by "who dialled" would make both initiators and the handshake fail.

A direct connection is preferred for new streams (py-libp2p's "best" connection choice); the
relayed one is closed ``dcutr.relay_grace_s`` later, once a ping over the direct one answers.
Each peer's path is an explicit state
(:data:`PENDING` → :data:`PUNCHING` → :data:`DIRECT` | :data:`RELAY_ONLY`) published as
:class:`PathChanged`; :meth:`HolePuncher.settled` lets a tensor session wait for a punch in
progress instead of moving a KV cache over the relay.

Every peer is a suspect: the responder runs only over relayed connections, one upgrade per peer
at a time, ``dcutr.max_concurrent`` in all, at most ``dcutr.attempts`` rounds, each message
bounded (4 KiB) and timed (``dcutr.exchange_timeout_s``); it dials at most
``dcutr.max_dial_addrs`` plain TCP addresses, public ones only unless ``nat.allow_private_addrs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from meshnode.bus import EventBus
from meshnode.config import DcutrSection
from meshnode.host import close_stream, is_relayed, ping_over
from meshnode.logs import err_text, get_logger, kv
from meshnode.nat import dcutr_pb as pb
from meshnode.nat.notify import OnPeerGone
from meshnode.nat.observed import Endpoint, PunchAddrs
from meshnode.nat.paths import DIRECT, PENDING, PUNCHING, RELAY_ONLY, PeerPaths, PunchMemory
from meshnode.nat.pbschema import StreamEnded
from meshnode.nat.punch import open_from
from meshnode.nat.relay_client import RelayedConnection

log = get_logger("meshnode.nat.dcutr")
RefuseCallback = Callable[[str], None]

class HolePuncher:
    def __init__(self, host: IHost, settings: DcutrSection, bus: EventBus, *,
                 allow_private: bool = False, on_refuse: RefuseCallback | None = None) -> None:
        self.host, self.s, self.bus = host, settings, bus
        self.allow_private = allow_private
        self._on_refuse: RefuseCallback = on_refuse or (lambda reason: None)
        self.paths = PeerPaths(settings.memory)
        self._active: set[ID] = set()
        self._gave_up = PunchMemory(settings.memory)
        self._slots = trio.CapacityLimiter(settings.max_concurrent)
        self.addrs = PunchAddrs(host, settings.exchange_timeout_s, settings.max_dial_addrs,
                                allow_private)
        self._nursery: trio.Nursery | None = None
        self.stats = {"direct_unilateral": 0, "direct_punch": 0, "relay_only": 0, "rounds": 0}

    # -- composition ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[HolePuncher] = trio.TASK_STATUS_IGNORED) -> None:
        events = self.bus.subscribe(RelayedConnection)
        if self.s.enabled:
            self.host.set_stream_handler(pb.PROTOCOL, self._on_stream)
        self.host.get_network().register_notifee(OnPeerGone(self._peer_gone, self._conn_gone))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            async for ev in events:
                assert isinstance(ev, RelayedConnection)
                if not self.s.enabled:
                    self._set(ev.peer, RELAY_ONLY)
                elif ev.inbound:
                    nursery.start_soon(self._upgrade, ev.peer, ev.relay)
                else:
                    self._expect(ev.peer)
                    nursery.start_soon(self.addrs.ours, ev.relay)  # ready before B's CONNECT

    # -- path state -------------------------------------------------------------------------------
    def path(self, peer: ID) -> str | None:
        return self.paths.get(peer)

    def _set(self, peer: ID, new: str, via: str = "", attempts: int = 0) -> None:
        change = self.paths.set(peer, new, trio.current_time(), via, attempts)
        if change is None:
            return
        self.bus.publish(change)
        log.info("peer path", extra=kv(peer=peer, path=new, was=change.old, via=via or None,
                                       attempts=attempts or None, elapsed_s=round(change.elapsed_s, 3)))

    def _expect(self, peer: ID) -> None:
        """We dialled ``peer`` through a relay: its side drives the upgrade; wait for it (unless
        a path is known already: a settled relay-only peer is not waited on again)."""
        if self.paths.get(peer) is not None or self._nursery is None:
            return
        self._set(peer, PENDING)
        self._nursery.start_soon(self._await_punch, peer)

    async def settled(self, peer: ID, timeout_s: float | None = None) -> str | None:
        """The path to ``peer`` once no upgrade is pending or running (at most ``timeout_s``,
        default ``dcutr.settle_timeout_s``); ``None`` if we know nothing of it."""
        conns = self.host.get_network().get_connections(peer)
        if self.s.enabled and conns and all(is_relayed(c) for c in conns):
            self._expect(peer)  # (the bus may not have told us of this connection yet)
        return await self.paths.wait_settled(
            peer, self.s.settle_timeout_s if timeout_s is None else timeout_s)

    def _peer_gone(self, peer: ID) -> None:
        self.paths.forget(peer)

    def _conn_gone(self, peer: ID) -> None:
        """A connection closed, others are left: if the direct one went, the relay is the path."""
        if self.paths.get(peer) == DIRECT and not self._has_direct(peer):
            self._set(peer, RELAY_ONLY)

    def _direct(self, peer: ID) -> list:
        return [c for c in self.host.get_network().get_connections(peer) if not is_relayed(c)]

    def _has_direct(self, peer: ID) -> bool:
        return bool(self._direct(peer))

    def _refuse(self, reason: str, peer: Any, why: Any) -> None:
        self._on_refuse(reason)
        log.warning("dcutr refused", extra=kv(reason=reason, peer=peer, why=err_text(why, 200)))

    # -- B: the peer that received the relayed connection -------------------------------------------
    async def _upgrade(self, peer: ID, relay: ID) -> None:
        if peer in self._active:
            return
        self._set(peer, PUNCHING)
        self._active.add(peer)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            self._active.discard(peer)
            self._refuse("dcutr_busy", peer, f"{self.s.max_concurrent} upgrades running")
            self._set(peer, RELAY_ONLY)
            return
        progress = [0]  # punch rounds so far, kept when the exchange breaks off
        try:
            path, via, rounds = await self._drive(peer, relay, progress)
        except Exception as exc:  # boundary: a failed upgrade leaves the relay in place
            log.info("upgrade failed; keeping the relay", extra=kv(peer=peer, err=exc))
            path, via, rounds = RELAY_ONLY, "", progress[0]
        finally:
            self._slots.release()
            self._active.discard(peer)
        self._finish(peer, path, via, rounds)

    async def _drive(self, peer: ID, relay: ID, progress: list[int]) -> tuple[str, str, int]:
        got: dict[str, Any] = {}

        async def fetch(key: str, fn: Any, arg: Any) -> None:
            got[key] = await fn(arg)

        async def open_stream(key: str) -> None:
            got[key] = await self.host.new_stream(peer, [pb.PROTOCOL])

        # three exchanges over the relay side by side (on a lossy path each costs retransmits);
        # the dcutr stream opened early also tells A at once that an upgrade is coming
        async with trio.open_nursery() as n:
            n.start_soon(fetch, "public", self.addrs.theirs, peer)
            n.start_soon(fetch, "ours", self.addrs.ours, relay)
            n.start_soon(open_stream, "stream")
        stream = got["stream"]
        if got["public"]:
            with trio.move_on_after(self.s.unilateral_timeout_s):
                if await self._dial_any(peer, got["public"], punch=False):
                    await close_stream(stream, True, 1.0)  # no CONNECT: A's side ends cleanly
                    return DIRECT, "unilateral", 0
        ours = got["ours"]
        clean = False
        theirs: list[Endpoint] = []
        try:
            for attempt in range(1, self.s.attempts + 1):
                with trio.fail_after(self.s.exchange_timeout_s):
                    try:
                        msg, rtt = await _connect(stream, ours)
                    except (StreamEnded, StreamError):
                        if attempt == 1:
                            raise
                        # the spec retries on the same stream; go and js peers end it after one
                        # round and expect a fresh one per attempt
                        await close_stream(stream, True, 1.0)
                        stream = await self.host.new_stream(peer, [pb.PROTOCOL])
                        msg, rtt = await _connect(stream, ours)
                theirs = pb.decode_addrs(msg.ObsAddrs, self.allow_private)[: self.s.max_dial_addrs]
                if not theirs:
                    log.info("peer named no address to punch", extra=kv(peer=peer))
                    break
                if attempt == 1 and self._gave_up.unchanged(peer, theirs):
                    log.info("punch not retried: the peer's addresses are unchanged",
                             extra=kv(peer=peer))
                    clean = True
                    return RELAY_ONLY, "", 0
                await stream.write(pb.message(pb.SYNC))
                self.stats["rounds"] += 1
                progress[0] = attempt
                await trio.sleep(rtt / 2)
                if await self._dial_any(peer, theirs, punch=True, initiator=False):
                    clean = True
                    return DIRECT, "punch", attempt
                log.info("punch attempt failed", extra=kv(peer=peer, attempt=attempt,
                                                          addrs=",".join(f"{h}:{p}" for h, p in theirs)))
            clean = True
        finally:
            await close_stream(stream, clean, 1.0)
        self._gave_up.failed(peer, theirs)
        return RELAY_ONLY, "", self.s.attempts if theirs else 0

    async def _await_punch(self, peer: ID) -> None:
        """A: we dialled through a relay; if the peer starts no upgrade soon, the relay it is."""
        await trio.sleep(self.s.await_punch_s)
        if self.paths.get(peer) == PENDING:
            self._set(peer, DIRECT if self._has_direct(peer) else RELAY_ONLY)

    # -- A: the peer that dialled through the relay ------------------------------------------------
    async def _on_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if not is_relayed(stream):
            self._refuse("dcutr_not_relayed", peer, "upgrade asked on a direct connection")
            await stream.reset()
            return
        if peer in self._active:
            self._refuse("dcutr_busy", peer, "an upgrade with this peer is running")
            await stream.reset()
            return
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            self._refuse("dcutr_busy", peer, f"{self.s.max_concurrent} upgrades running")
            await stream.reset()
            return
        self._active.add(peer)
        self._set(peer, PUNCHING)
        path, rounds, clean = RELAY_ONLY, 0, False
        try:
            ours = await self.addrs.ours(None)
            for attempt in range(1, self.s.attempts + 1):
                try:
                    with trio.fail_after(self._connect_wait(attempt)):
                        msg = await pb.read(stream, pb.CONNECT)
                except StreamEnded:  # the initiator is done (gave up, or nothing to dial)
                    clean = True
                    break
                theirs = pb.decode_addrs(msg.ObsAddrs, self.allow_private)[: self.s.max_dial_addrs]
                with trio.fail_after(self.s.exchange_timeout_s):
                    await stream.write(pb.message(pb.CONNECT, ours))
                    try:
                        await pb.read(stream, pb.SYNC)
                    except StreamEnded:  # it will not punch with these addresses again
                        clean = True
                        break
                rounds = attempt
                if theirs and await self._dial_any(peer, theirs, punch=True, initiator=True):
                    path, clean = DIRECT, True
                    break
            else:
                clean = True
        except trio.TooSlowError:
            self._refuse("dcutr_bad_exchange", peer, "the initiator went silent mid-exchange")
        except (pb.WireError, OSError) as exc:
            self._refuse("dcutr_bad_exchange", peer, exc)
        except Exception as exc:  # boundary: the relay stays whatever went wrong
            log.info("upgrade (responder) failed", extra=kv(peer=peer, err=exc))
        finally:
            self._slots.release()
            self._active.discard(peer)
            await close_stream(stream, clean, 1.0)
        self._finish(peer, path, "punch" if path == DIRECT else "", rounds)

    def _connect_wait(self, attempt: int) -> float:
        """How long A waits for B's CONNECT: before the first one B looks up addresses (each
        lookup bounded by the exchange timeout) and may try a unilateral dial; later ones follow
        a failed punch."""
        if attempt == 1:
            return 2 * self.s.exchange_timeout_s + self.s.unilateral_timeout_s
        return self.s.exchange_timeout_s + self.s.punch_timeout_s

    # -- shared -----------------------------------------------------------------------------------
    def _finish(self, peer: ID, path: str, via: str, rounds: int) -> None:
        if path == DIRECT or self._has_direct(peer):
            via = via or ("punch" if rounds else "unilateral")  # (the peer's dial may have won)
            self.stats[f"direct_{via}"] += 1
            self._set(peer, DIRECT, via, rounds)
            assert self._nursery is not None
            self._nursery.start_soon(self._close_relayed, peer)
        else:
            self.stats["relay_only"] += 1
            self._set(peer, RELAY_ONLY, "", rounds)

    async def _close_relayed(self, peer: ID) -> None:
        """The spec: migrate to the direct connection, close the relayed one after a grace period
        (streams already on it get that long to finish) — once a ping over the direct connection
        shows the peer holds it too. On a lossy path one side's upgrade of the punched connection
        can finish seconds before the other's, or the other's can fail and its reset get lost:
        closing the relay on the first side's word alone left the peer with no connection to us.
        If none of ``dcutr.relay_close_pings`` pings answers, both connections stay: the direct
        one may be dead, or only slow (closing it killed a session running on it, seen at 20 %
        loss). New streams still prefer the direct one; a tensor session that cannot open its
        stream there opens it on the relayed one (``host.new_stream_or_relayed``). The pings
        start at once; the grace still counts from now."""
        grace_ends = trio.current_time() + self.s.relay_grace_s
        for _ in range(self.s.relay_close_pings):
            direct = self._direct(peer)
            if not direct:  # it went (the peer closed it; _conn_gone updates the path)
                return
            if await ping_over(direct[0], self.s.exchange_timeout_s):
                break
        else:
            log.info("the direct connection answered no ping; the relayed one stays",
                     extra=kv(peer=peer, tries=self.s.relay_close_pings))
            return
        await trio.sleep_until(grace_ends)
        for conn in list(self.host.get_network().get_connections(peer)):
            if is_relayed(conn):
                try:
                    await conn.close()
                except Exception as exc:  # boundary: already gone
                    log.debug("closing the relayed connection", extra=kv(peer=peer, err=exc))
                log.info("relayed connection closed after the grace period", extra=kv(
                    peer=peer, grace_s=self.s.relay_grace_s))

    async def _dial_any(self, peer: ID, targets: list[Endpoint], *, punch: bool,
                        initiator: bool = True) -> bool:
        """Dial every target at once (from our listen port when punching); the first connection
        that upgrades to ``peer`` wins, the rest are cancelled."""
        won = False
        async with trio.open_nursery() as n:
            async def one(dst: Endpoint) -> None:
                nonlocal won
                if await self._dial_one(peer, dst, punch, initiator):
                    won = True
                    n.cancel_scope.cancel()
            for dst in targets:
                n.start_soon(one, dst)
        return won or self._has_direct(peer)

    async def _dial_one(self, peer: ID, dst: Endpoint, punch: bool, initiator: bool) -> bool:
        timeout = self.s.punch_timeout_s if punch else self.s.unilateral_timeout_s
        src = next((ep for ep in self.addrs.listen_endpoints()
                    if (":" in ep[0]) == (":" in dst[0])), None) if punch else None
        if punch and src is None:
            return False
        try:
            if src is not None:
                sock_stream = await open_from(src, dst, timeout)
            else:
                with trio.fail_after(timeout):
                    sock_stream = await trio.open_tcp_stream(*dst)
        except (OSError, trio.TooSlowError) as exc:
            log.debug("punch dial failed", extra=kv(peer=peer, dst=f"{dst[0]}:{dst[1]}", err=exc))
            return False
        raw = RawConnection(TrioTCPStream(sock_stream), initiator)
        proto = "ip6" if ":" in dst[0] else "ip4"
        maddr = multiaddr.Multiaddr(f"/{proto}/{dst[0]}/tcp/{dst[1]}")
        try:
            with trio.fail_after(timeout + self.s.exchange_timeout_s):
                if initiator:
                    await self.host.upgrade_outbound_connection(raw, peer)
                    return True
                muxed = await self.host.upgrade_inbound_connection(raw, maddr)
        except Exception as exc:  # the handshake failed: this attempt did not make it
            log.debug("punched socket did not upgrade", extra=kv(peer=peer, err=exc))
            await _close(raw)
            return False
        except BaseException:  # cancelled mid-handshake (another address won, or we stop):
            sock_stream.socket.close()  # synchronous, so it cannot be skipped; a reset (linger 0)
            raise
        if muxed.peer_id != peer:  # someone else answered at that address
            self._refuse("dcutr_wrong_peer", peer, f"{dst} is {muxed.peer_id}")
            await _close(muxed)
            return False
        return True

    def status(self) -> dict:
        return {"enabled": self.s.enabled,
                "paths": {str(p): s for p, s in self.paths.state.items()},
                "outcomes": dict(self.paths.outcomes), "remembered_failures": len(self._gave_up),
                **self.stats}


async def _connect(stream: Any, ours: list[multiaddr.Multiaddr]) -> tuple[Any, float]:
    """B's half of one CONNECT exchange: the peer's CONNECT and the round trip it took."""
    t0 = trio.current_time()
    await stream.write(pb.message(pb.CONNECT, ours))
    msg = await pb.read(stream, pb.CONNECT)
    return msg, trio.current_time() - t0


async def _close(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:  # boundary: already closed
        pass
