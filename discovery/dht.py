"""Advertise served models in the Kademlia DHT and find peers that serve a compatible one.

Per served model we publish a provider record under a CID derived from the compat key
(:func:`discovery.records.provider_key`), and we keep one signed :mod:`discovery.records` record
listing every model we serve. The signed record is served by the provider itself on
``/latentlink/record/1.0.0`` (and also put in the DHT, best effort). A lookup trusts only the signed
record: a provider whose record does not verify, does not list the key, is expired or is a
withdrawal tombstone is dropped, and so is one that does not answer within ``probe_timeout_s``
— fetching the record from the provider *is* the reachability probe, and its round trip is the
latency we report. A provider that stops therefore vanishes from lookups at once, and at the
latest when its record's TTL runs out.

py-libp2p traps handled here (DESIGN.md §7): the routing table is not filled from bootstrap or
identify, so connected peers are added explicitly; ``find_providers`` returns duplicates and, when
it holds any record locally, *only* local ones — we union local records with the answers of the
closest peers ourselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from discovery.streamio import frame, read_frame

from discovery.records import (
    NAMESPACE,
    ModelRecord,
    RecordError,
    RecordValidator,
    make_record,
    parse_record,
    provider_key,
    provider_key_bytes,
    record_key,
)
from discovery.signature import ModelSignature

ROUTING_FILL_INTERVAL_S = 0.5
LOOKUP_FANOUT = 8
LOOKUP_ROUNDS = 4
RECORD_PROTOCOL = "/latentlink/record/1.0.0"
REPUBLISH_MIN_GAP_S = 1.0


@dataclass(frozen=True)
class Provider:
    """A peer that serves a compatible model, as seen by a lookup."""

    peer_id: str
    addrs: tuple[str, ...]
    reachability: str  # "direct" | "relayed"
    latency_ms: float | None
    signature: ModelSignature


@dataclass(frozen=True)
class DiscoverySettings:
    mode: str = "auto"
    record_ttl_s: float = 600.0
    refresh_interval_s: float = 300.0
    probe_timeout_s: float = 2.0
    max_record_bytes: int = 16 * 1024


class Discovery:
    """DHT capability of a node. Run with ``await nursery.start(discovery.run)``."""

    def __init__(self, host: IHost, key_pair: KeyPair, settings: DiscoverySettings,
                 on_op=None) -> None:
        self.host, self.key_pair, self.s = host, key_pair, settings
        self.peer_id = host.get_id()
        # Reachability is decided by the NAT module; until it reports, a node on a reachable
        # address (loopback/LAN here) acts as a server.
        mode = DHTMode.CLIENT if settings.mode == "client" else DHTMode.SERVER
        self.dht = KadDHT(host, mode)
        self.dht.register_validator(NAMESPACE, RecordValidator(settings.max_record_bytes))
        self.served: dict[str, ModelSignature] = {}
        self._seq = int(time.time() * 1000)
        self._on_op = on_op or (lambda op, ok: None)
        self._routing_grew = trio.Event()
        self._record: bytes | None = None
        host.set_stream_handler(RECORD_PROTOCOL, self._serve_record)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dht):
            async with trio.open_nursery() as n:
                n.start_soon(self._fill_routing_table)
                n.start_soon(self._refresh_loop)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    n.cancel_scope.cancel()
                    with trio.move_on_after(2.0) as scope:
                        scope.shield = True
                        await self.withdraw()

    async def _fill_routing_table(self) -> None:
        known: set[ID] = set()
        while True:
            grew = False
            for pid in self.host.get_connected_peers():
                if pid not in known:
                    try:
                        if await self.dht.add_peer(pid, skip_server_mode_check=True):
                            known.add(pid)
                            grew = True
                    except Exception:
                        pass
            known &= set(self.host.get_connected_peers())
            if grew:
                self._routing_grew.set()
            await trio.sleep(ROUTING_FILL_INTERVAL_S)

    async def _refresh_loop(self) -> None:
        """Re-publish before the TTL runs out, and soon after the routing table grows (so a model
        advertised while we knew few peers reaches the nodes closest to its key)."""
        last = trio.current_time()
        while True:
            with trio.move_on_after(self.s.refresh_interval_s):
                await self._routing_grew.wait()
                await trio.sleep(max(0.0, REPUBLISH_MIN_GAP_S - (trio.current_time() - last)))
            self._routing_grew = trio.Event()
            if self.served:
                try:
                    await self.publish()
                except Exception:
                    pass
                last = trio.current_time()

    # -- advertise -------------------------------------------------------------------------------
    def _addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        return self._seq

    async def advertise(self, signature: ModelSignature) -> None:
        """Serve ``signature``: publish the signed record and a provider record for its key."""
        self.served[signature.compat_key] = signature
        await self.publish()

    async def publish(self) -> None:
        record = make_record(self.key_pair, list(self.served.values()), self._addrs(),
                             self._next_seq(), self.s.record_ttl_s)
        self._record = record
        try:
            await self._put(record)
        except Exception:
            pass  # the DHT copy is best effort; lookups fetch the record from us
        for key in list(self.served):
            try:
                ok = await self.dht.provide(provider_key(key))
                self._on_op("provide", bool(ok))
            except Exception:
                self._on_op("provide", False)

    async def withdraw(self) -> None:
        """Publish a tombstone (newer record listing no models) so lookups drop us at once."""
        if not self.served:
            return
        self.served.clear()
        self._record = make_record(self.key_pair, [], self._addrs(), self._next_seq(), self.s.record_ttl_s)
        await self._put(self._record)

    async def _serve_record(self, stream) -> None:
        try:
            record = self._record
            if record is not None and self.served:
                # Refresh the expiry lazily so a long-lived node never serves an expired record.
                try:
                    parse_record(record, self.s.max_record_bytes, now=time.time() + 1.0)
                except RecordError:
                    record = self._record = make_record(
                        self.key_pair, list(self.served.values()), self._addrs(),
                        self._next_seq(), self.s.record_ttl_s)
            await stream.write(frame(record or b""))
        except Exception:
            pass
        finally:
            await stream.close()

    async def _put(self, record: bytes) -> None:
        try:
            await self.dht.put_value(record_key(self.peer_id), record)
            self._on_op("put", True)
        except Exception:
            self._on_op("put", False)
            raise

    # -- lookup ----------------------------------------------------------------------------------
    async def find(self, compat_key: str, limit: int = 20, include_self: bool = False) -> list[Provider]:
        pkey = provider_key(compat_key)
        candidates = await self._provider_ids(pkey, compat_key)
        if not include_self:
            candidates.pop(self.peer_id, None)
        results: list[Provider] = []

        async def check(pid: ID) -> None:
            got = await self._fetch_record(pid, candidates[pid])
            if got is None:
                return
            rec, latency = got
            if not rec.serves(compat_key):
                return
            sig = next(m for m in rec.models if m.compat_key == compat_key)
            addrs = rec.addrs
            relayed = bool(addrs) and all("/p2p-circuit" in a for a in addrs)
            results.append(Provider(str(pid), addrs, "relayed" if relayed else "direct", latency, sig))

        async with trio.open_nursery() as n:
            for pid in candidates:
                n.start_soon(check, pid)
        self._on_op("find", bool(results))
        results.sort(key=lambda p: (p.latency_ms is None, p.latency_ms or 0.0, p.peer_id))
        return results[:limit]

    async def _provider_ids(self, pkey: str, compat_key: str) -> dict[ID, list]:
        """Provider peer IDs (deduplicated) with the addresses the DHT returned for them."""
        store = self.dht.provider_store
        key = provider_key_bytes(compat_key)
        found: dict[ID, list] = {p.peer_id: list(p.addrs) for p in store.get_providers(key)}
        if any(provider_key(k) == pkey for k in self.served):
            found[self.peer_id] = []
        # Iterative Kademlia GET_PROVIDERS seeded from our routing table: ask the closest peers we
        # know, then the closer peers they name, for at most LOOKUP_ROUNDS rounds.
        local = self.dht.routing_table.find_local_closest_peers(key, LOOKUP_FANOUT) or \
            list(self.host.get_connected_peers())
        asked: set[ID] = {self.peer_id}
        frontier = sort_peer_ids_by_distance(key, [p for p in local if p not in asked])[:LOOKUP_FANOUT]
        for _ in range(LOOKUP_ROUNDS):
            if not frontier:
                break
            closer: set[ID] = set()

            async def ask(pid: ID) -> None:
                with trio.move_on_after(self.s.probe_timeout_s):
                    try:
                        providers, nearer = await store._get_providers_from_peer_with_closers(pid, key)
                        for p in providers:
                            if p.addrs or p.peer_id not in found:
                                found[p.peer_id] = list(p.addrs)
                        closer.update(nearer)
                    except Exception:
                        pass

            asked.update(frontier)
            async with trio.open_nursery() as n:
                for pid in frontier:
                    n.start_soon(ask, pid)
            best_asked = sort_peer_ids_by_distance(key, list(asked - {self.peer_id}))[:LOOKUP_FANOUT]
            candidates = sort_peer_ids_by_distance(key, [p for p in closer if p not in asked])
            # Continue only with peers closer than the farthest of the best peers asked so far.
            frontier = [p for p in candidates[:LOOKUP_FANOUT]
                        if not best_asked or sort_peer_ids_by_distance(key, [p, best_asked[-1]])[0] == p]
        return found

    async def _fetch_record(self, pid: ID, addrs: list) -> tuple[ModelRecord, float | None] | None:
        """Fetch and verify ``pid``'s signed record from ``pid`` itself (dialling if needed)."""
        if pid == self.peer_id:
            return (parse_record(self._record, self.s.max_record_bytes), None) if self._record else None
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
                try:
                    body = await read_frame(stream, self.s.max_record_bytes)
                finally:
                    await stream.close()
                latency = (time.perf_counter() - t) * 1e3
                if not body:
                    return None
                rec = parse_record(body, self.s.max_record_bytes, key=record_key(pid))
                return rec, latency
            except RecordError:
                self._on_op("record_rejected", False)
            except Exception:
                pass
        return None
