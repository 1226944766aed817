"""The node: the one place where every capability is composed, as one trio nursery tree.

Read top-down in :meth:`Node.run`: each capability (control API, DHT discovery, tensor sessions,
CRDT replication, the session log, metrics, bootstrap, peer exchange) has the same
``run(task_status=...)`` shape and starts with one line, in that order. Capabilities talk through
typed events on one :class:`~meshnode.bus.EventBus`, never through each other's private fields.
Stopping the node cancels the nursery; every ``finally`` runs, so temp files and streams are
cleaned on SIGINT/SIGTERM as well as on errors.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from crdt_state import CrdtLimits, CrdtService, UpdateStore
from discovery.dht import Discovery, DiscoverySettings, Provider
from discovery.signature import ModelSignature
from meshnode import control
from meshnode.bootstrap import Bootstrap
from meshnode.bus import EventBus
from meshnode.config import Config
from meshnode.host import build_host, close_listeners, is_relayed, listen_ips, listen_multiaddrs
from meshnode.identity import load_or_create_identity, peer_id_of
from meshnode.logs import get_logger, kv
from meshnode.metrics import NodeMetrics
from meshnode.model_host import ModelHost
from meshnode.nat.autonat import AutoNat
from meshnode.nat.dcutr import HolePuncher
from meshnode.nat.follow import dht_addrs_follow, dht_mode_follows
from meshnode.nat.relay_client import RelayClient
from meshnode.nat.relay_hop import RelayHop
from meshnode.peer_exchange import PeerExchange
from meshnode.session_log import SessionLog
from meshnode.tensor import APPLY_ROLE, TensorService, TensorSession
from tensor_rpc import Limits, RuntimeTerms

log = get_logger("meshnode.node")


def runtime_terms(lm: Any) -> RuntimeTerms:
    """What a loaded model's runtime accepts, for the handshake (``LoadedModel.accepts``)."""
    t = lm.accepts
    return RuntimeTerms(t.kv_dtype, t.threads, tuple(sorted(t.wire_dtypes)))


class Node:
    """A LatentLink mesh node. Use ``async with open_node(config) as node:``."""

    def __init__(self, config: Config, signature: ModelSignature | None = None) -> None:
        """``signature``: the model this node serves (the runtime supplies it when it loads one)."""
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key_pair = load_or_create_identity(config.key_path)
        self.peer_id = peer_id_of(self.key_pair)
        self.host = build_host(config.host, self.key_pair)
        self.bus = EventBus()
        self.metrics = NodeMetrics()
        h = config.host
        self.pex = PeerExchange(self.host, h.max_peer_exchange, h.peer_exchange_interval_s,
                                h.dial_timeout_s, on_dial=self._count_dial,
                                dials_per_round=h.pex_dials_per_round,
                                dial_backoff_s=h.pex_dial_backoff_s,
                                on_refuse=self.metrics.refuser("pex"))
        d = config.dht
        self.discovery: Discovery | None = None
        if d.enabled:
            self.discovery = Discovery(
                self.host, self.key_pair,
                DiscoverySettings(d.mode, d.record_ttl_s, d.refresh_interval_s, d.probe_timeout_s,
                                  d.max_record_bytes, max_probes_per_lookup=d.max_probes_per_lookup,
                                  max_stored_records=d.max_stored_records),
                on_op=lambda op, ok: self.metrics.dht_ops.labels(op=op, result="ok" if ok else "failed").inc(),
                on_refuse=self.metrics.refuser("dht"))
        n = config.nat
        self.autonat = (AutoNat(self.host, n, self.bus, on_refuse=self.metrics.refuser("autonat"))
                        if n.autonat_client or n.autonat_server else None)
        r = config.relay
        self.relay = (RelayHop(self.host, r, self.bus, on_refuse=self.metrics.refuser("relay"))
                      if r.hop != "never" else None)
        # always: dialing through relays needs no reservation (relay.client governs those)
        self.relay_client = RelayClient(self.host, r, self.bus, self.metrics.refuser("relay"))
        self.bootstrap = Bootstrap(self.host, config.host, self._count_dial)
        self.holepunch = HolePuncher(self.host, config.dcutr, self.bus,
                                     allow_private=n.allow_private_addrs,
                                     on_refuse=self.metrics.refuser("dcutr"))
        self.limits = Limits.from_config(config)
        self.tensors = TensorService(self.host, self.key_pair, self.limits, config.transport,
                                     bus=self.bus, listen_ips=listen_ips(config.host),
                                     on_refuse=self.metrics.refuser("tensor"),
                                     tcp_rto_max_ms=config.host.tcp_rto_max_ms)
        self.tensors.circuit_limit = self.relay_client.circuit_limits.get  # type: ignore[method-assign]
        crdt_limits = CrdtLimits.from_config(config.crdt)
        self.crdt_store = UpdateStore(config.data_dir / "crdt", crdt_limits)
        self.crdt = CrdtService(self.host, self.key_pair, self.crdt_store, crdt_limits,
                                config.host.dial_timeout_s, on_refuse=self.metrics.refuser("crdt"))
        self.session_log = SessionLog(self.crdt, self.bus, config.crdt.outcome_wait_s)
        self.metrics.add_byte_source(
            "crdt", lambda: (self.crdt.stats.bytes_received, self.crdt.stats.bytes_sent))
        self.metrics.add_byte_source("pex", lambda: (self.pex.bytes_in, self.pex.bytes_out))
        self.control_port: int | None = None
        self.started_at = time.time()
        self._stop = trio.Event()
        self.models = ModelHost(config, self._model_loaded)
        self._nursery: trio.Nursery | None = None
        self._extra_roles: tuple[str, ...] = ()
        if signature is not None:
            self.serve(signature)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        async with self.host.run(listen_addrs=listen_multiaddrs(cfg.host)):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if cfg.control.enabled:
                    server = control.ControlServer(cfg.control.host, cfg.control.port,
                                                   self._routes(), cfg.data_dir / "control.json")
                    self.control_port = await nursery.start(server.run)
                if self.discovery is not None:
                    await nursery.start(self.discovery.run)
                    if self.roles:
                        await self.discovery.set_roles(self.roles)
                    await nursery.start(dht_mode_follows, self.bus, self.discovery)
                    await nursery.start(dht_addrs_follow, self.bus, self.discovery)
                for nat in (self.holepunch, self.relay, self.relay_client, self.autonat):
                    # subscribers before publishers: the hole puncher follows relayed connections
                    if nat is not None:
                        await nursery.start(nat.run)
                await nursery.start(self.tensors.run)
                await nursery.start(self._run_crdt)
                await nursery.start(self.session_log.run)
                await nursery.start(self.metrics.run, self.bus)
                nursery.start_soon(self.models.run)
                await nursery.start(self.bootstrap.run)
                nursery.start_soon(self.pex.run)
                log.info("node started", extra=kv(peer_id=self.peer_id, addrs=[str(a) for a in self.addrs]))
                task_status.started(self)
                await self._stop.wait()
                log.info("node stopping", extra=kv(peer_id=self.peer_id))
                with trio.CancelScope(shield=True), trio.move_on_after(cfg.node.shutdown_timeout_s):
                    await self.crdt.stop()
                nursery.cancel_scope.cancel()
            with trio.move_on_after(cfg.node.shutdown_timeout_s) as scope:
                scope.shield = True
                await close_listeners(self.host)  # before the connections: no new ones come in
                await self._close_connections()
        self.crdt_store.close()
        log.info("node stopped", extra=kv(peer_id=self.peer_id))

    def stop(self) -> None:
        self._stop.set()

    async def _run_crdt(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:  # CRDT replication; stopped (flushed) in run()
            await self.crdt.start(n)
            task_status.started()
            await trio.sleep_forever()

    async def _close_connections(self) -> None:
        network = self.host.get_network()
        for pid in list(self.host.get_connected_peers()):
            try:
                await network.close_peer(pid)
            except Exception as exc:  # boundary: shutting down, a peer that is gone is fine
                log.debug("close_peer failed", extra=kv(peer=pid, err=exc))

    # -- mesh ------------------------------------------------------------------------------------
    def _count_dial(self, ok: bool) -> None:
        self.metrics.dials.labels(result="ok" if ok else "failed").inc()

    async def connect(self, addr: str) -> None:
        """Dial a peer by full multiaddr (with ``/p2p/<id>``). An explicit dial is not refused
        by py-libp2p's negative cache (a peer whose dial failed is otherwise refused at once for a
        while, so a caller's retry on a lossy path could never succeed)."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        unblock = getattr(self.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(info.peer_id)
        with trio.fail_after(self.config.host.dial_timeout_s):
            await self.host.connect(info)

    # -- discovery -------------------------------------------------------------------------------
    async def advertise(self, signature: ModelSignature) -> None:
        """Serve a model: publish it in the DHT (refreshed before the TTL, withdrawn at stop)."""
        if self.discovery is None:
            raise RuntimeError("DHT is disabled (dht.enabled = false)")
        await self.discovery.advertise(signature)

    async def find_compatible(self, signature_or_key: ModelSignature | str, limit: int = 20,
                              role: str | None = None) -> list[Provider]:
        """Peers serving a model with the same compat key (and ``role``, e.g. ``"apply"``: they
        take and apply state), deduplicated, probed, nearest first."""
        if self.discovery is None:
            raise RuntimeError("DHT is disabled (dht.enabled = false)")
        key = signature_or_key if isinstance(signature_or_key, str) else signature_or_key.compat_key
        return await self.discovery.find(key, limit=limit, role=role)

    async def _find_route(self, tail: str) -> list[dict[str, Any]] | None:
        if not tail:
            return None
        found = await self.find_compatible(tail)
        return [{"peer_id": p.peer_id, "addrs": list(p.addrs), "reachability": p.reachability,
                 "latency_ms": p.latency_ms, "family": p.signature.family, "roles": list(p.roles)}
                for p in found]

    # -- tensor sessions -------------------------------------------------------------------------
    @property
    def signature(self) -> ModelSignature | None:
        return self.tensors.signature

    @property
    def roles(self) -> tuple[str, ...]:
        """What our signed DHT record says we serve: ``apply`` while incoming sessions have a
        consumer, plus the application's own (``add_roles``, e.g. ``agent:<name>``)."""
        return ((APPLY_ROLE,) if self.tensors.accepting else ()) + self._extra_roles

    async def _publish_roles(self) -> None:
        """Publish the roles as they are when this runs (calls race in trio's random order: each
        reads the current set, so the last one to run publishes everything)."""
        if self.discovery is not None:
            await self.discovery.set_roles(self.roles)

    def add_roles(self, *roles: str) -> None:
        """Advertise more roles (peers find us by them: ``find_compatible(..., role=...)``)."""
        self._extra_roles = tuple(dict.fromkeys(self._extra_roles + roles))
        if self.discovery is not None and self._nursery is not None:
            self._nursery.start_soon(self._publish_roles)

    def serve(self, signature: ModelSignature, *, accept: bool = True,
              terms: RuntimeTerms | None = None, header_check: Any = None) -> None:
        """Declare the model whose state this node exchanges (handshakes compare against it).

        ``accept``: incoming sessions have a consumer (this application calls
        :meth:`accept_session` and applies what it receives): the node then advertises the
        ``apply`` role; without it, sessions peers open to us are refused at once, naming why.
        ``terms``: what the local runtime accepts (KV dtype, threads), declared in the handshake.
        ``header_check``: raise on a header this application could never apply (rejects that
        message before its payload moves).
        """
        t = self.tensors
        t.signature, t.accepting = signature, accept
        if terms is not None:
            t.terms = terms
        if header_check is not None:
            t.header_check = header_check
        if self.discovery is not None and self._nursery is not None:  # else run() publishes them
            self._nursery.start_soon(self._publish_roles)

    async def open_session(self, peer: str | ID) -> TensorSession:
        """Open an end-to-end encrypted tensor session (the handshake checks model signatures and
        runtime terms). The session is recorded in a replicated CRDT document shared with the peer."""
        pid = peer if isinstance(peer, ID) else ID.from_base58(str(peer))
        conns = self.host.get_network().get_connections(pid)
        if conns and all(is_relayed(c) for c in conns):  # a punch may be on its way: wait for it
            await self.holepunch.settled(pid)
        store = self.host.get_peerstore()
        if not self.host.get_network().get_connections(pid) and pid in store.peer_ids():
            # dial first, relay-aware (each dial bounded by its own timeout): the stream's own
            # dial would try the peer's direct addresses only, never its circuit addresses
            await self.host.connect(PeerInfo(pid, store.addrs(pid)))
        return await self.tensors.open(pid)

    async def accept_session(self, timeout_s: float | None = None) -> TensorSession:
        """Wait for a peer to open a tensor session to us (needs ``serve(..., accept=True)``)."""
        return await self.tensors.accept(timeout_s)

    # -- model runtime ---------------------------------------------------------------------------
    async def _model_loaded(self, lm: Any) -> None:
        """A node that loads a model serves its signature; it takes state from peers only once
        an application (``meshnode handoff receive``) calls serve(..., accept=True)."""
        self.serve(lm.signature, accept=self.tensors.accepting, terms=runtime_terms(lm))
        if self.discovery is not None:
            try:
                await self.advertise(lm.signature)
            except Exception as exc:  # served already; the discovery refresh loop retries
                log.warning("advertise failed", extra=kv(err=exc))

    @property
    def model(self) -> Any:
        """The loaded model (``LoadedModel``), or ``None``."""
        return self.models.model

    async def wait_model(self, timeout_s: float | None = None) -> Any:
        """The loaded model once ready; raises if loading failed or none is configured."""
        return await self.models.wait(timeout_s)

    # -- introspection ---------------------------------------------------------------------------
    @property
    def addrs(self) -> list[multiaddr.Multiaddr]:
        return self.host.get_addrs()

    def peers(self) -> list[dict[str, Any]]:
        """Connected peers, their known addresses, and each connection's kind (direct/relayed)."""
        net = self.host.get_network()
        return [{"peer_id": str(pid), "addrs": self.peer_addrs(pid),
                 "connections": ["relayed" if is_relayed(c) else "direct"
                                 for c in net.get_connections(pid)]}
                for pid in sorted(self.host.get_connected_peers(), key=str)]

    def peer_addrs(self, pid) -> list[str]:
        """Known addresses of a peer; empty (not an error) while identify has not filled them."""
        try:
            return [str(a) for a in self.host.get_peerstore().addrs(pid)]
        except Exception:
            return []

    def _stream_count(self) -> int:
        total = 0
        for conns in self.host.get_network().get_connections_map().values():
            for conn in conns:
                try:
                    total += len(conn.get_streams())
                except Exception:
                    pass
        return total

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": str(self.peer_id),
            "addrs": [str(a) for a in self.addrs],
            "connected_peers": len(self.host.get_connected_peers()),
            "streams": self._stream_count(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "control_port": self.control_port,
            "model": self.models.status(),
            "roles": list(self.roles),
            "tensor": self.tensors.status(),
            "reachability": self.autonat.status() if self.autonat is not None else None,
            "relay": self.relay.status() if self.relay is not None else None,
            "relay_client": self.relay_client.status(),
            "dcutr": self.holepunch.status(),
            "dht_mode": self.discovery.dht.mode.value.lower() if self.discovery is not None else None,
        }

    def _refresh_gauges(self) -> None:
        """Gauges are read only through ``/metrics``, so they are refreshed at scrape time."""
        self.metrics.connections.set(len(self.host.get_connected_peers()))
        self.metrics.streams.set(self._stream_count())
        self.metrics.set_tensor_status(self.tensors.status())

    def _sessions_route(self, tail: str) -> Any:
        if not tail:
            return self.crdt.list_sessions()
        try:
            return self.crdt.get(tail)
        except KeyError:
            return None

    def _routes(self) -> dict[str, control.Route]:
        def metrics_route(_tail: str) -> tuple[int, str, bytes]:
            self._refresh_gauges()
            return 200, "text/plain; version=0.0.4", self.metrics.render()

        return {
            "/status": control.json_route(lambda _t: self.status()),
            "/peers": control.json_route(lambda _t: self.peers()),
            "/metrics": metrics_route,
            "/find": control.async_json_route(self._find_route),
            "/sessions": control.json_route(self._sessions_route),
            "/tensor": control.json_route(lambda _t: self.tensors.sessions()),
            "/models": control.json_route(lambda _t: sorted(self.discovery.served) if self.discovery else []),
        }


@asynccontextmanager
async def open_node(config: Config) -> AsyncIterator[Node]:
    """Start a node in its own nursery; stop it (cleanly) when the block exits."""
    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop()
