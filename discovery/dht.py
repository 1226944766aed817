"""Advertise served models in the Kademlia DHT and find peers that serve a compatible one.

Per served model we publish a provider record under a CID derived from the compat key
(:func:`discovery.records.provider_key`), and we keep one signed :mod:`discovery.records` record
listing every model we serve. The signed record is served by the provider itself on
``/latentlink/record/1.0.0`` (a copy is also stored, best effort, on the peers that hold our
provider records). A lookup trusts only the signed record: a provider whose record does not verify,
does not list the key (or the role asked for), is expired or is a withdrawal tombstone is dropped,
and so is one that does not answer within ``probe_timeout_s`` — fetching the record from the
provider *is* the reachability probe, and its round trip is the latency we report. A provider that
stops therefore vanishes from lookups at once, and one that stops refreshing its record
(:meth:`Discovery.stop_refreshing`) when the record's TTL runs out.

Every peer is a suspect: a lookup fetches at most ``max_probes_per_lookup`` records, most promising
providers first (:func:`plan_probes`), and stops once it has ``limit`` good ones; our DHT server
stores values only in our own namespace (:mod:`discovery.strict_kad`). Each refusal is logged with
its reason and reported through ``on_refuse(reason)`` (the node counts them in /metrics).

Why the DHT plumbing is ours rather than py-libp2p's (0.8.1; DESIGN.md §7):

- The routing table is filled from nothing: not from bootstrap, not from identify, and py-libp2p's
  own refresh runs every 10 minutes. We add connected peers ourselves and run a self-lookup (the
  Kademlia join) with a growing period, so a node's table reaches beyond its bootstrap peer and the
  peers closest to it learn about it.
- ``provide`` sends ADD_PROVIDER to the closest peers *found at that moment*. A model advertised
  while the mesh is still forming lands on the wrong peers, and redoing a full network lookup often
  (what we used to do on every routing-table change) saturates a small machine. We re-announce on
  a backoff schedule, and in between tell only peers that newly entered the k closest we know.
- ``find_providers`` returns duplicates, returns *only* local records when it has any, and its
  GET_PROVIDERS round drops the addresses of the closer peers it learns, so the next round cannot
  dial them. Our lookup speaks GET_PROVIDERS itself, keeps those addresses, and stops when the
  ``LOOKUP_QUORUM`` closest peers it knows have all answered.
- A text key in a network lookup is refused by every server ("FIND_NODE key is not a valid
  PeerId"), so the signed-record copy is stored directly on known peers, never via ``put_value``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import trio
import varint
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import sort_peer_ids_by_distance, xor_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from discovery.records import (
    NAMESPACE,
    ModelRecord,
    RecordError,
    RecordValidator,
    make_record,
    normalize_roles,
    parse_record,
    provider_key_bytes,
    record_key,
)
from discovery.signature import ModelSignature
from discovery.streamio import FrameError, frame, is_relayed, read_frame
from discovery.strict_kad import StrictKadDHT

RECORD_PROTOCOL = "/latentlink/record/1.0.0"
K = 20  # Kademlia replication factor: provider records go to the K closest peers
ALPHA = 8  # queries in flight per lookup; also the fewest record probes kept in flight
LOOKUP_QUORUM = 8  # a lookup ends once this many of the closest known peers have answered
RPC_TIMEOUT_S = 5.0  # one DHT request/response; generous because 2-vCPU hosts run many nodes
LOOKUP_TIMEOUT_S = 15.0  # a whole lookup; what it found by then is returned
PROBE_CACHE_S = 5.0  # a verified record is reused this long while its provider stays connected
MAINTAIN_INTERVAL_S = 0.5  # how often connected peers are added to the table
WALK_FIRST_S, WALK_MAX_S = 1.0, 60.0  # self-lookup period: doubles from first to max
ANNOUNCE_FIRST_S = 2.0  # full re-announce period after advertise: doubles up to refresh_interval_s
PEERSTORE_ADDR_TTL_S = 3600
JITTER = 0.25  # +-25% on every period, so nodes started together do not re-announce in lockstep
STREAM_CLOSE_S = 1.0  # a probe stream closed while its lookup is cancelled gets this long
log = logging.getLogger("discovery.dht")


def _jitter(period: float) -> float:
    return period * random.uniform(1.0 - JITTER, 1.0 + JITTER)


@dataclass(frozen=True)
class Provider:
    """A peer that serves a compatible model, as seen by a lookup."""

    peer_id: str
    addrs: tuple[str, ...]
    reachability: str  # "direct" | "relayed": how the lookup's probe reached it
    latency_ms: float | None
    signature: ModelSignature
    roles: tuple[str, ...] = ()  # what its signed record says it serves besides the model


@dataclass(frozen=True)
class DiscoverySettings:
    """The ``[dht]`` config section as discovery needs it (defaults mirror meshnode.config)."""

    mode: str = "auto"
    record_ttl_s: float = 600.0
    refresh_interval_s: float = 300.0
    probe_timeout_s: float = 2.0
    max_record_bytes: int = 16 * 1024
    max_probes_per_lookup: int = 16
    max_stored_records: int = 1024


OpCallback = Callable[[str, bool], None]
RefuseCallback = Callable[[str], None]


def plan_probes(candidates: Iterable[ID], me: ID, connected: set[ID], cached: set[ID],
                max_probes: int) -> tuple[list[ID], list[ID]]:
    """Which providers a lookup probes, in order, and which it skips (beyond ``max_probes``).

    Pure (no I/O). Order: ourselves (no network), providers whose verified record is cached (no
    stream), then connected ones (no dial), then the rest by XOR distance to *our* ID. Distance to
    us rather than to the key spreads requesters over the providers of a popular model (each
    requester has its own nearest ones), and a peer that grinds IDs near the key cannot take every
    requester's probe slots at once. Ties break on the ID, so the plan is deterministic.
    """
    me_b = me.to_bytes()

    def rank(p: ID) -> tuple[bool, bool, bool, int, bytes]:
        b = p.to_bytes()
        return (p != me, p not in cached, p not in connected, xor_distance(me_b, b), b)

    ordered = sorted(set(candidates), key=rank)
    return ordered[:max_probes], ordered[max_probes:]


class Discovery:
    """DHT capability of a node. Run with ``await nursery.start(discovery.run)``."""

    def __init__(self, host: IHost, key_pair: KeyPair, settings: DiscoverySettings,
                 on_op: OpCallback | None = None, on_refuse: RefuseCallback | None = None) -> None:
        """``on_op(op, ok)`` reports each DHT operation; ``on_refuse(reason)`` each refusal of
        something a peer asked for or offered: ``unknown_namespace`` / ``invalid_record`` (a value
        PUT to our DHT server), ``invalid_record`` (a probed provider's record), ``probe_limit``
        (a lookup candidate beyond the bound). Refusals are also logged, with the peer where
        there is one (per probe at debug level: a lapsed provider is refused on every lookup)."""
        self.host, self.key_pair, self.s = host, key_pair, settings
        self.peer_id = host.get_id()
        self._on_op: OpCallback = on_op or (lambda op, ok: None)
        self._on_refuse: RefuseCallback = on_refuse or (lambda reason: None)
        # Reachability is decided by the NAT module; until it reports, a node on a reachable
        # address (loopback/LAN here) acts as a server.
        mode = DHTMode.CLIENT if settings.mode == "client" else DHTMode.SERVER
        self.dht = StrictKadDHT(host, mode, {NAMESPACE: RecordValidator(settings.max_record_bytes)},
                                self._on_refuse, settings.max_stored_records)
        self.served: dict[str, ModelSignature] = {}
        self.roles: tuple[str, ...] = ()
        self._seq = int(time.time() * 1000)
        self._record: bytes | None = None
        self._refreshing = True  # False after stop_refreshing(): our record is left to expire
        # compat key -> peer -> when we last sent it our provider record (trio clock).
        self._told: dict[str, dict[ID, float]] = {}
        self._announce_now = trio.Event()
        self._restart_backoff = False
        # peer -> (trio time fetched, verified record, latency ms): the last successful probe.
        self._probed: dict[ID, tuple[float, ModelRecord, float | None, bool]] = {}
        host.set_stream_handler(RECORD_PROTOCOL, self._serve_record)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dht):
            async with trio.open_nursery() as n:
                n.start_soon(self._maintain_routing)
                n.start_soon(self._announce_loop)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    n.cancel_scope.cancel()
                    with trio.move_on_after(2.0) as scope:
                        scope.shield = True
                        await self.withdraw()

    async def _add_connected_peers(self, known: set[ID]) -> bool:
        """Trap 7: connections never reach the routing table by themselves."""
        grew = False
        connected = set(self.host.get_connected_peers())
        for pid in connected - known:
            try:
                if await self.dht.add_peer(pid, skip_server_mode_check=True):
                    known.add(pid)
                    grew = True
            except Exception:
                pass
        known &= connected
        return grew

    async def _maintain_routing(self) -> None:
        """Keep the routing table filled: connected peers every tick, plus a self-lookup.

        The self-lookup is the Kademlia join: it walks toward our own ID, so we learn (and connect
        to) the peers closest to us, and they — seeing our queries — add us to their tables. Its
        period doubles, because a settled mesh needs it rarely; a big jump in table size (a
        partition healing, a burst of joins) resets it to the short period.
        """
        known: set[ID] = set()
        gap, next_walk, size_at_walk = WALK_FIRST_S, trio.current_time(), 0
        while True:
            if await self._add_connected_peers(known) and self.served:
                self._announce_now.set()
            size = self.dht.routing_table.size()
            if size >= 2 * size_at_walk + 4:
                gap, next_walk = WALK_FIRST_S, min(next_walk, trio.current_time() + WALK_FIRST_S)
            if trio.current_time() >= next_walk and size > 0:
                with trio.move_on_after(RPC_TIMEOUT_S * 2):
                    try:
                        await self.dht.peer_routing.find_closest_peers_network(self.peer_id.to_bytes())
                        self._on_op("walk", True)
                    except Exception:
                        self._on_op("walk", False)
                size_at_walk = self.dht.routing_table.size()
                next_walk = trio.current_time() + _jitter(gap)
                gap = min(gap * 2, WALK_MAX_S)
                if self.served:
                    self._announce_now.set()
            await trio.sleep(MAINTAIN_INTERVAL_S)

    async def _announce_loop(self) -> None:
        """Re-announce provider records: fully on a backoff schedule, incrementally in between.

        A full announce is a network lookup for the key's closest peers; its period starts at
        ``ANNOUNCE_FIRST_S`` after each advertise and doubles up to ``refresh_interval_s`` (so a
        record placed while the mesh was forming moves to the right peers within seconds, and a
        settled node costs one lookup per refresh). An incremental announce, when the routing table
        changed, tells only peers that entered the K closest we know and were not told yet.
        """
        gap = ANNOUNCE_FIRST_S
        next_full = math.inf
        while True:
            with trio.move_on_at(next_full):
                await self._announce_now.wait()
            self._announce_now = trio.Event()
            if not self.served or not self._refreshing:
                next_full = math.inf
                continue
            if self._restart_backoff:  # publish() just ran a full announce
                self._restart_backoff = False
                gap, next_full = ANNOUNCE_FIRST_S, trio.current_time() + _jitter(ANNOUNCE_FIRST_S)
                continue
            full = trio.current_time() >= next_full
            try:
                await self._announce(full=full)
            except Exception:
                pass
            if full:
                gap = min(gap * 2, self.s.refresh_interval_s)
                next_full = trio.current_time() + _jitter(gap)

    # -- advertise -------------------------------------------------------------------------------
    def _addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        return self._seq

    def _sign(self) -> bytes:
        self._record = make_record(self.key_pair, list(self.served.values()), self._addrs(),
                                   self._next_seq(), self.s.record_ttl_s, roles=self.roles)
        return self._record

    async def advertise(self, signature: ModelSignature) -> None:
        """Serve ``signature``: sign a new record and announce a provider record for its key."""
        self.served[signature.compat_key] = signature
        await self.publish()

    def set_server_mode(self, server: bool) -> bool:
        """Follow reachability (``dht.mode = "auto"`` only): a node others cannot dial answers no
        DHT queries (client mode), a public one serves them. Returns whether the mode changed.

        Done by hand, not with ``KadDHT.switch_mode``: py-libp2p 0.8.1 wipes the routing table on
        the switch to client mode, and a client still needs it for its own lookups."""
        new = DHTMode.SERVER if server else DHTMode.CLIENT
        if self.s.mode != "auto" or self.dht.mode == new:
            return False
        self.dht.mode = new
        if server:
            self.host.set_stream_handler(PROTOCOL_ID, self.dht.handle_stream)
        else:
            self.host.remove_stream_handler(PROTOCOL_ID)
        log.info("DHT mode follows reachability: %s", new.value)
        return True

    async def set_roles(self, roles: Sequence[str]) -> None:
        """Advertise the roles this node serves (e.g. ``["apply"]``); any short ASCII tokens.

        Bad roles raise :class:`~discovery.records.RecordError` (a ``ValueError``) before anything
        changes. If the set changed and we serve a model, the record is re-signed (probes fetch
        it from us) and the new copy pushed to the peers holding our provider records.
        """
        new = normalize_roles(roles)
        if new == self.roles:
            return
        self.roles = new
        if self.served:
            self._refreshing = True
            await self._push_record(self._sign())

    def stop_refreshing(self) -> None:
        """Let our advertisement lapse without a tombstone (draining; the TTL test).

        No more re-announces and no more lazy re-signing: the record we serve runs out at its TTL
        and lookups drop us from then on, while connections and sessions carry on. Unlike
        :meth:`withdraw` nothing is pushed, so a peer that already trusts our record may keep
        using it until it expires. :meth:`advertise`, :meth:`publish` and :meth:`set_roles` resume.
        """
        self._refreshing = False

    async def addresses_changed(self) -> None:
        """Our addresses changed (a relay reservation came or went): every peer holding our
        provider record gets the new one now, not at the next refresh."""
        self._told.clear()
        if self.served:
            await self.publish()

    async def publish(self) -> None:
        """Re-sign our record and announce every served key to its closest peers (full lookup)."""
        self._refreshing = True
        self._sign()
        await self._announce(full=True)
        self._restart_backoff = True  # re-announce soon, then ever more rarely (_announce_loop)
        self._announce_now.set()

    async def _announce(self, full: bool) -> None:
        """Send our provider record (and a copy of our signed record) for every served key.

        ``full`` finds the key's closest peers with a network lookup and re-tells the ones whose
        copy is older than ``refresh_interval_s``; otherwise only the local routing table is
        consulted and only never-told peers are contacted — cheap enough to run on every change.
        """
        for compat_key in list(self.served):
            await self._announce_key(compat_key, full)

    async def _announce_key(self, compat_key: str, full: bool) -> None:
        key = provider_key_bytes(compat_key)
        record = self._record
        self.dht.provider_store.add_provider(key, PeerInfo(self.peer_id, list(self.host.get_addrs())))
        told = self._told.setdefault(compat_key, {})
        closest = self.dht.routing_table.find_local_closest_peers(key, K)
        if full:  # the network's view, which may reach peers our table does not hold
            with trio.move_on_after(RPC_TIMEOUT_S * 3):
                found = await self.dht.peer_routing.find_closest_peers_network(key, K)
                closest = sort_peer_ids_by_distance(key, list({*closest, *found}))[:K]
        now = trio.current_time()
        stale = self.s.refresh_interval_s * 0.9
        due = [p for p in closest if p != self.peer_id
               and (p not in told or (full and now - told[p] > stale))]
        sent = 0

        async def tell(pid: ID) -> None:
            nonlocal sent
            with trio.move_on_after(RPC_TIMEOUT_S):
                if await self.dht.provider_store._send_add_provider(pid, key):
                    told[pid] = trio.current_time()
                    sent += 1
                    if full and record is not None:
                        await self._store_copy(pid, record)

        await _bounded_gather(tell, due, ALPHA)
        if due:
            self._on_op("provide", sent > 0)

    async def withdraw(self) -> None:
        """Serve a tombstone (newer record listing no models) and push it to the peers we told.

        There is no REMOVE_PROVIDER in Kademlia, so our provider records stay on other nodes; the
        tombstone (and, once we are gone, the failed probe) is what makes lookups drop us.
        """
        if not self.served:
            return
        self.served.clear()
        tombstone = self._sign()
        self.dht.value_store.put(record_key(self.peer_id).encode(), tombstone)
        await self._push_record(tombstone)
        self._told.clear()

    async def _push_record(self, record: bytes) -> None:
        """Store ``record`` at the peers we told about our provider records (best effort)."""
        peers = sorted({p for told in self._told.values() for p in told}, key=str)[:K]

        async def push(pid: ID) -> None:
            with trio.move_on_after(1.0):
                await self._store_copy(pid, record)

        await _bounded_gather(push, peers, ALPHA)

    async def _store_copy(self, pid: ID, record: bytes) -> bool:
        """PUT_VALUE our signed record at ``pid``. The libp2p record is built here: without one,
        py-libp2p's ``_store_at_peer`` sends whatever its local store holds under the key (after a
        withdrawal: the old tombstone) instead of ``record``."""
        key = record_key(self.peer_id).encode()
        put = make_signed_put_record(key, record, self.host.get_private_key())
        return await self.dht.value_store._store_at_peer(pid, key, record, record=put)

    async def _serve_record(self, stream) -> None:
        try:
            record = self._record
            if record is not None and self.served and self._refreshing:
                # Refresh the expiry lazily so a long-lived node never serves an expired record.
                try:
                    parse_record(record, self.s.max_record_bytes, now=time.time() + 1.0)
                except RecordError:
                    record = self._sign()
            await stream.write(frame(record or b""))
        except Exception:
            pass
        finally:
            await stream.close()

    # -- lookup ----------------------------------------------------------------------------------
    async def find(self, compat_key: str, limit: int = 20, include_self: bool = False,
                   role: str | None = None) -> list[Provider]:
        """Providers of ``compat_key`` whose signed record lists it (and ``role``, when given) and
        who answered the probe, nearest first.

        At most ``max_probes_per_lookup`` providers are probed, in :func:`plan_probes` order; the
        rest are skipped (each one reported as ``probe_limit``). Probes run in a window of
        ``max(limit, ALPHA)`` (a failed or unsuitable one makes room for the next), and the lookup
        stops as soon as ``limit`` good results are in — the fastest of the most promising.
        """
        if limit <= 0:
            return []
        candidates = await self._provider_ids(compat_key)
        if not include_self:
            candidates.pop(self.peer_id, None)
        self._prune_probed()
        connected = set(self.host.get_connected_peers())
        to_probe, skipped = plan_probes(candidates, self.peer_id, connected, set(self._probed),
                                        self.s.max_probes_per_lookup)
        if skipped:
            for _ in skipped:
                self._on_refuse("probe_limit")
            log.info("lookup probe limit reached", extra={"kv": {
                "reason": "probe_limit", "key": compat_key[:16], "probed": len(to_probe),
                "skipped": len(skipped)}})
        results: list[Provider] = []
        queue = iter(to_probe)

        async def prober(done: trio.CancelScope) -> None:
            for pid in queue:  # shared by every prober: each takes the next candidate
                got = await self._fetch_record(pid, candidates[pid])
                provider = _provider(pid, got, compat_key, role)
                if provider is not None:
                    results.append(provider)
                    if len(results) >= limit:
                        done.cancel()
                        return

        async with trio.open_nursery() as n:
            for _ in range(min(max(limit, ALPHA), len(to_probe))):
                n.start_soon(prober, n.cancel_scope)
        self._on_op("find", bool(results))
        results.sort(key=lambda p: (p.latency_ms is None, p.latency_ms or 0.0, p.peer_id))
        return results[:limit]

    def _prune_probed(self) -> None:
        """Forget cached probes older than ``PROBE_CACHE_S`` (they are never used again), so the
        cache holds at most the providers probed in the last few seconds."""
        now = trio.current_time()
        for pid in [p for p, (at, *_) in self._probed.items() if now - at >= PROBE_CACHE_S]:
            del self._probed[pid]

    async def _provider_ids(self, compat_key: str) -> dict[ID, list[Multiaddr]]:
        """Provider peer IDs (deduplicated) with the addresses the DHT gave for them.

        Iterative GET_PROVIDERS with a sliding window: seed with the closest peers in our table
        (or, while it is small, our connections), keep up to ALPHA requests in flight, learn
        closer peers *with their addresses*, and stop once the LOOKUP_QUORUM closest peers known
        have all answered or failed (a slow peer never holds back the others), or at
        ``LOOKUP_TIMEOUT_S``. Providers are the union of every answer and our own store.
        """
        key = provider_key_bytes(compat_key)
        found: dict[ID, list[Multiaddr]] = {
            p.peer_id: list(p.addrs) for p in self.dht.provider_store.get_providers(key)}
        if compat_key in self.served:
            found[self.peer_id] = []
        known = set(self.dht.routing_table.find_local_closest_peers(key, K))
        if len(known) < LOOKUP_QUORUM:
            known.update(self.host.get_connected_peers())
        known.discard(self.peer_id)
        asked: set[ID] = set()
        failed: set[ID] = set()
        done_send, done_recv = trio.open_memory_channel[None](math.inf)

        async def ask(pid: ID) -> None:
            try:
                with trio.move_on_after(RPC_TIMEOUT_S):
                    providers, closer = await self._get_providers_rpc(pid, key)
                    for p in providers:
                        if p.addrs or p.peer_id not in found:
                            found[p.peer_id] = list(p.addrs)
                    known.update(c.peer_id for c in closer if c.peer_id != self.peer_id)
                    return
                failed.add(pid)
            except Exception:
                failed.add(pid)
            finally:
                done_send.send_nowait(None)

        with trio.move_on_after(LOOKUP_TIMEOUT_S):
            async with trio.open_nursery() as n:
                in_flight = 0
                while True:
                    closest = sort_peer_ids_by_distance(key, list(known - failed))[:LOOKUP_QUORUM]
                    for pid in closest:
                        if in_flight < ALPHA and pid not in asked:
                            asked.add(pid)
                            in_flight += 1
                            n.start_soon(ask, pid)
                    if in_flight == 0:
                        break
                    await done_recv.receive()
                    in_flight -= 1
        self._on_op("get_providers", len(asked) > len(failed))
        return found

    async def _get_providers_rpc(self, pid: ID, key: bytes) -> tuple[list[PeerInfo], list[PeerInfo]]:
        """One GET_PROVIDERS exchange; closer peers' addresses go to the peerstore so later rounds
        (and the record probe) can dial them — py-libp2p's own helper drops them."""
        stream = await self.host.new_stream(pid, [PROTOCOL_ID])
        try:
            msg = Message()
            msg.type = Message.MessageType.GET_PROVIDERS
            msg.key = key
            body = msg.SerializeToString()
            await stream.write(varint.encode(len(body)) + body)
            resp = Message()
            resp.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE))
        finally:
            await stream.close()
        if resp.type != Message.MessageType.GET_PROVIDERS:
            return [], []
        providers = [info for p in resp.providerPeers if (info := _peer_info(p)) is not None]
        closer = [info for p in resp.closerPeers if (info := _peer_info(p)) is not None]
        store = self.host.get_peerstore()
        for info in closer:
            if info.addrs and info.peer_id != self.peer_id:
                store.add_addrs(info.peer_id, info.addrs, PEERSTORE_ADDR_TTL_S)
        return providers, closer

    async def _fetch_record(self, pid: ID, addrs: list) -> tuple[ModelRecord, float | None, bool] | None:
        """Fetch and verify ``pid``'s signed record from ``pid`` itself (dialling if needed).

        A successful probe is reused for ``PROBE_CACHE_S`` while the connection to ``pid`` stays
        up: a provider that dies drops that connection, so it still vanishes at once, and a busy
        lookup path does not open a stream per provider per lookup (~5 ms each, DESIGN.md §7.9).
        """
        if pid == self.peer_id:
            try:
                return (parse_record(self._record, self.s.max_record_bytes), None, False) \
                    if self._record else None
            except RecordError:  # our own record lapsed (stop_refreshing): we do not serve it
                return None
        cached = self._probed.get(pid)
        if cached is not None:
            at, rec, latency, relayed = cached
            if (trio.current_time() - at < PROBE_CACHE_S and rec.expires_at > time.time()
                    and pid in self.host.get_connected_peers()):
                return rec, latency, relayed
            del self._probed[pid]
        with trio.move_on_after(self.s.probe_timeout_s):
            try:
                if pid not in self.host.get_connected_peers():
                    if not addrs:
                        try:
                            addrs = self.host.get_peerstore().addrs(pid)
                        except Exception:
                            addrs = []
                    await self.host.connect(PeerInfo(pid, addrs))
                t = time.perf_counter()
                stream = await self.host.new_stream(pid, [RECORD_PROTOCOL])
                relayed = is_relayed(stream)  # how we actually reached it, not its address text
                try:
                    body = await read_frame(stream, self.s.max_record_bytes)
                finally:
                    await _close(stream)
                latency = (time.perf_counter() - t) * 1e3
                if not body:
                    return None
                rec = parse_record(body, self.s.max_record_bytes, key=record_key(pid))
                self._probed[pid] = (trio.current_time(), rec, latency, relayed)
                return rec, latency, relayed
            except (RecordError, FrameError) as exc:  # forged, expired, oversized, malformed
                self._on_op("record_rejected", False)
                self._on_refuse("invalid_record")
                log.debug("probed record refused", extra={"kv": {
                    "reason": "invalid_record", "peer": str(pid), "detail": str(exc)}})
            except Exception:  # dial or stream failure: the probe failed, the provider is dropped
                pass
        return None


def _provider(pid: ID, got: tuple[ModelRecord, float | None, bool] | None, compat_key: str,
              role: str | None) -> Provider | None:
    """The lookup result for a probed provider, or None if its record does not qualify."""
    if got is None:
        return None
    rec, latency, relayed = got
    if not rec.serves(compat_key) or (role is not None and role not in rec.roles):
        return None
    sig = next(m for m in rec.models if m.compat_key == compat_key)
    return Provider(str(pid), rec.addrs, "relayed" if relayed else "direct", latency, sig, rec.roles)


async def _close(stream) -> None:
    """Close a probe stream even while the lookup is being cancelled (a probe over its timeout,
    or one still running when ``limit`` results are in), so no half-open stream is left behind."""
    with trio.CancelScope(shield=True), trio.move_on_after(STREAM_CLOSE_S):
        try:
            await stream.close()
        except Exception:  # the connection is gone: nothing left to close
            pass


def _peer_info(p: Message.Peer) -> PeerInfo | None:
    try:
        addrs = []
        for raw in p.addrs:
            try:
                addrs.append(Multiaddr(raw))
            except Exception:
                pass
        return PeerInfo(ID(p.id), addrs)
    except Exception:
        return None


async def _bounded_gather(fn: Callable[[ID], object], items: list[ID], limit: int) -> None:
    """Run ``fn`` over ``items`` with at most ``limit`` in flight; all finish before we return."""
    sem = trio.Semaphore(limit)

    async def one(item: ID) -> None:
        async with sem:
            await fn(item)

    async with trio.open_nursery() as n:
        for item in items:
            n.start_soon(one, item)
