"""Peer exchange (``/latentlink/pex/1.0.0``): learn the mesh from the peers we already know.

A node given a single bootstrap peer must come to see the whole mesh. Each round we ask every
connected peer for the peers *it* is connected to (with their listen addresses) and dial some of
those we are not connected to. Replies are bounded in count and bytes; addresses that fail to
parse are skipped.

Every peer is a suspect, and a PEX reply is a list of dial targets a peer chose for us: a liar can
hand us thousands of unreachable addresses every second. So :class:`DialPolicy` (pure, time passed
in) decides who is dialled: at most ``dials_per_round`` per round, taken in turn from each
answering peer (one liar gets no more than its share), and a peer whose dial failed waits out a
backoff that doubles per consecutive failure. Each skipped dial is reported through
``on_refuse(reason)`` (``round_limit``, ``backoff``), as is a malformed reply (``bad_reply``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from discovery.streamio import FrameError, pack_frame, read_frame, unpack_bounded
from meshnode.logs import get_logger, kv

PEX_PROTOCOL = "/latentlink/pex/1.0.0"
MAX_REPLY_BYTES = 256 * 1024
MAX_REPLY_ENTRIES = 4096  # decoder bound per array; what we keep is cut to max_peers / 8 addrs
MAX_ADDRS_PER_PEER = 8
MAX_BACKOFF_FACTOR = 32  # a failing peer waits at most 32 x dial_backoff_s
MAX_TRACKED_FAILURES = 1024  # peers whose dial backoff we remember; the oldest are forgotten first
log = get_logger("meshnode.pex")

P = TypeVar("P", bound=Hashable)


@dataclass
class _Failure:
    count: int  # consecutive failed dials
    retry_at: float  # not dialled again before this (the caller's clock)


class DialPolicy(Generic[P]):
    """Who peer exchange dials now: a per-round budget and a per-peer backoff. No I/O, no clock.

    ``plan(offers, now)`` takes, per answering peer, the candidates it offered (in its order) and
    returns the peers to dial now and ``(peer, reason)`` for every other candidate. Candidates are
    interleaved across offers (first of each, then second of each, ...) so that a peer offering
    many bogus candidates takes at most its share of the ``dials_per_round`` budget. After a
    failed dial (``failed``) a peer waits ``backoff_s * 2**(n-1)`` (n consecutive failures, capped
    at ``MAX_BACKOFF_FACTOR`` x); ``succeeded`` forgets it. At most ``max_tracked`` failures are
    remembered: an entry is dropped once its backoff has been over for ``MAX_BACKOFF_FACTOR`` x
    ``backoff_s`` (its failures are no longer "consecutive"), and beyond the bound the entries
    whose backoff ends soonest go first, so forgetting costs as little waiting as possible.
    """

    def __init__(self, dials_per_round: int, backoff_s: float,
                 max_tracked: int = MAX_TRACKED_FAILURES) -> None:
        if dials_per_round < 0 or backoff_s < 0 or max_tracked < 1:
            raise ValueError("dials_per_round and backoff_s must be >= 0, max_tracked >= 1")
        self.dials_per_round, self.backoff_s, self.max_tracked = dials_per_round, backoff_s, max_tracked
        self._failures: dict[P, _Failure] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def in_backoff(self, peer: P, now: float) -> bool:
        f = self._failures.get(peer)
        return f is not None and now < f.retry_at

    def plan(self, offers: Sequence[Sequence[P]], now: float) -> tuple[list[P], list[tuple[P, str]]]:
        self._prune(now)
        dial: list[P] = []
        skipped: list[tuple[P, str]] = []
        seen: set[P] = set()
        for rank in range(max((len(o) for o in offers), default=0)):
            for offer in offers:
                if rank >= len(offer) or offer[rank] in seen:
                    continue
                peer = offer[rank]
                seen.add(peer)
                if self.in_backoff(peer, now):
                    skipped.append((peer, "backoff"))
                elif len(dial) < self.dials_per_round:
                    dial.append(peer)
                else:
                    skipped.append((peer, "round_limit"))
        return dial, skipped

    def failed(self, peer: P, now: float) -> None:
        f = self._failures.pop(peer, None)  # re-inserted: dict order = order of last failure
        count = 1 if f is None else f.count + 1
        factor = min(2 ** (count - 1), MAX_BACKOFF_FACTOR)
        self._failures[peer] = _Failure(count, now + self.backoff_s * factor)
        if len(self._failures) > self.max_tracked:
            self._prune(now)

    def succeeded(self, peer: P) -> None:
        self._failures.pop(peer, None)

    def _prune(self, now: float) -> None:
        forget_after = self.backoff_s * MAX_BACKOFF_FACTOR
        stale = [p for p, f in self._failures.items() if now - f.retry_at >= forget_after]
        for p in stale:
            del self._failures[p]
        excess = len(self._failures) - self.max_tracked
        if excess > 0:
            soonest = sorted(self._failures, key=lambda p: self._failures[p].retry_at)[:excess]
            for p in soonest:
                del self._failures[p]


class PeerExchange:
    """The PEX capability: answers ``/latentlink/pex/1.0.0`` and runs the dial rounds.

    ``max_peers``: most peers returned per exchange (and kept from one reply); 0 turns PEX off.
    ``dials_per_round`` / ``dial_backoff_s``: see :class:`DialPolicy`. Their defaults mirror
    ``host.pex_dials_per_round`` / ``host.pex_dial_backoff_s`` only so that older callers keep
    working; the node passes the configured values.
    """

    def __init__(self, host: IHost, max_peers: int, interval_s: float, dial_timeout_s: float,
                 on_dial: Callable[[bool], None] | None = None, *, dials_per_round: int = 8,
                 dial_backoff_s: float = 30.0,
                 on_refuse: Callable[[str], None] | None = None) -> None:
        self.host, self.max_peers, self.interval_s = host, max_peers, interval_s
        self.dial_timeout_s = dial_timeout_s
        self.on_dial = on_dial or (lambda ok: None)
        self.on_refuse = on_refuse or (lambda reason: None)
        self.policy: DialPolicy[ID] = DialPolicy(dials_per_round, dial_backoff_s)
        self.bytes_in = self.bytes_out = 0
        host.set_stream_handler(PEX_PROTOCOL, self._handle)

    def _known_peers(self, exclude: ID) -> list[list]:
        out = []
        me = self.host.get_id()
        for pid in self.host.get_connected_peers():
            if pid in (exclude, me):
                continue
            try:
                known = self.host.get_peerstore().addrs(pid)
            except Exception:  # no addresses recorded yet (identify still running)
                continue
            # direct addresses first; circuit addresses too: a NATed peer is reachable only there
            addrs = sorted((str(a) for a in known), key=lambda a: "/p2p-circuit" in a)
            if addrs:
                out.append([pid.to_base58(), addrs[:MAX_ADDRS_PER_PEER]])
        random.shuffle(out)
        return out[: self.max_peers]

    def _reply(self, peers: list[list]) -> bytes:
        """One frame the requester's reader accepts: entries are dropped until it fits."""
        while True:
            try:
                return pack_frame(peers, MAX_REPLY_BYTES)
            except ValueError:  # only with a huge host.max_peer_exchange
                peers = peers[: len(peers) // 2]

    async def _handle(self, stream) -> None:
        try:
            peer = stream.muxed_conn.peer_id
            reply = self._reply(self._known_peers(peer))
            await stream.write(reply)
            self.bytes_out += len(reply)
        except Exception as exc:  # the requester went away; it will ask again next round
            log.debug("pex reply failed", extra=kv(err=exc))
        finally:
            await stream.close()

    async def ask(self, peer: ID) -> list[PeerInfo]:
        """``peer``'s reply, bounded; raises FrameError on a malformed one, TooSlowError after
        ``dial_timeout_s`` (stream negotiation included)."""
        with trio.fail_after(self.dial_timeout_s):
            stream = await self.host.new_stream(peer, [PEX_PROTOCOL])
            try:
                body = await read_frame(stream, MAX_REPLY_BYTES)
                self.bytes_in += len(body) + 4
            finally:
                await stream.close()
        items = unpack_bounded(body, max_items=MAX_REPLY_ENTRIES, max_str=1024, max_bin=0, max_map=0)
        if not isinstance(items, list):
            raise FrameError("pex reply must be a list")
        infos = []
        for item in items[: self.max_peers]:
            try:
                pid = ID.from_base58(item[0])
                addrs = [multiaddr.Multiaddr(a) for a in item[1][:MAX_ADDRS_PER_PEER]]
                infos.append(PeerInfo(pid, addrs))
            except Exception:  # one bad entry (wrong shape, bad ID or address): skip it
                continue
        return infos

    def _refuse(self, reason: str, peer: ID) -> None:
        self.on_refuse(reason)
        log.debug("pex dial skipped", extra=kv(reason=reason, peer=peer))

    async def round(self) -> None:
        """Ask every connected peer, then start the dials the policy allows this round."""
        me = self.host.get_id()
        connected = set(self.host.get_connected_peers())
        offers: list[list[ID]] = []
        infos: dict[ID, PeerInfo] = {}
        for peer in list(connected):
            try:
                offer = [i for i in await self.ask(peer) if i.peer_id != me and i.peer_id not in connected]
            except FrameError as exc:
                self.on_refuse("bad_reply")
                log.info("pex reply refused", extra=kv(reason="bad_reply", peer=peer, err=exc))
                continue
            except Exception as exc:  # stream or timeout failure: this peer offers nothing now
                log.debug("pex ask failed", extra=kv(peer=peer, err=exc))
                continue
            for info in offer:
                infos.setdefault(info.peer_id, info)
            offers.append([i.peer_id for i in offer])
        dial, skipped = self.policy.plan(offers, trio.current_time())
        for pid, reason in skipped:
            self._refuse(reason, pid)
        async with trio.open_nursery() as n:
            for pid in dial:
                n.start_soon(self._dial, infos[pid])

    async def _dial(self, info: PeerInfo) -> None:
        try:
            with trio.fail_after(self.dial_timeout_s):
                await self.host.connect(info)
        except Exception as exc:  # unreachable, refused, timed out, or not who it claimed to be
            self.policy.failed(info.peer_id, trio.current_time())
            self.on_dial(False)
            log.debug("pex dial failed", extra=kv(peer=info.peer_id, err=exc))
            return
        self.policy.succeeded(info.peer_id)
        self.on_dial(True)
        log.debug("pex dialled", extra=kv(peer=info.peer_id))

    async def run(self) -> None:
        if self.max_peers == 0:  # PEX off: answer nobody's questions with peers, ask none
            return
        while True:
            await self.round()
            await trio.sleep(self.interval_s * random.uniform(0.8, 1.2))
