"""The node: the one place where every capability is composed, as one trio nursery tree.

Read top-down in :meth:`Node.run`: identity → host → (peer exchange, bootstrap, metrics, control
API, and the services added by later modules) each as a task in the node's own nursery. Stopping
the node cancels that nursery; every ``finally`` below runs, so temp files and streams are cleaned
on SIGINT/SIGTERM as well as on errors.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from crdt_state import CrdtLimits, CrdtService, UpdateStore
from discovery.dht import Discovery, DiscoverySettings, Provider
from discovery.signature import ModelSignature
from meshnode import control
from meshnode.config import Config
from meshnode.host import build_host, listen_multiaddrs
from meshnode.identity import load_or_create_identity, peer_id_of
from meshnode.logs import get_logger, kv
from meshnode.metrics import NodeMetrics
from meshnode.peer_exchange import PeerExchange
from meshnode.tensor_service import Received, Sent, TensorService, TensorSession
from tensor_rpc import AccessPolicy, Limits

log = get_logger("meshnode.node")
OUTCOME_WAIT_S = 10.0  # how long a receiver waits for the sender's session document to replicate


class Node:
    """A LatentLink mesh node. Use ``async with open_node(config) as node:``."""

    def __init__(self, config: Config, signature: ModelSignature | None = None) -> None:
        """``signature``: the model this node serves (the runtime supplies it when it loads one)."""
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key_pair = load_or_create_identity(config.key_path)
        self.peer_id = peer_id_of(self.key_pair)
        self.host = build_host(config.host, self.key_pair)
        self.metrics = NodeMetrics()
        self.pex = PeerExchange(self.host, config.host.max_peer_exchange,
                                config.host.peer_exchange_interval_s, config.host.dial_timeout_s,
                                on_dial=self._count_dial)
        d = config.dht
        self.discovery: Discovery | None = None
        if d.enabled:
            self.discovery = Discovery(
                self.host, self.key_pair,
                DiscoverySettings(d.mode, d.record_ttl_s, d.refresh_interval_s, d.probe_timeout_s,
                                  d.max_record_bytes),
                on_op=lambda op, ok: self.metrics.dht_ops.labels(op=op, result="ok" if ok else "failed").inc())
        self.limits = Limits.from_config(config)
        self.tensors = TensorService(self.host, self.key_pair, self.limits, AccessPolicy(self.limits),
                                     signature, on_event=self._on_tensor_event,
                                     transport=config.transport)
        self.crdt_store = UpdateStore(config.data_dir / "crdt", CrdtLimits.from_config(config.crdt))
        self.crdt = CrdtService(self.host, self.key_pair, self.crdt_store,
                                CrdtLimits.from_config(config.crdt), config.host.dial_timeout_s)
        self.metrics.add_byte_source(
            "crdt", lambda: (self.crdt.stats.bytes_received, self.crdt.stats.bytes_sent))
        self.metrics.add_byte_source("pex", lambda: (self.pex.bytes_in, self.pex.bytes_out))
        self.control_port: int | None = None
        self.started_at = time.time()
        self._stop = trio.Event()
        self._ready = trio.Event()
        self.model: Any = None  # meshnode.runtime.loader.LoadedModel once [runtime].model is loaded
        self.model_error: str | None = None
        self._model_done = trio.Event()
        self._nursery: trio.Nursery | None = None

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
                await nursery.start(self.tensors.run)
                await self.crdt.start(nursery)
                if cfg.runtime.model:
                    nursery.start_soon(self._load_model)
                nursery.start_soon(self._bootstrap)
                nursery.start_soon(self.pex.run)
                log.info("node started", extra=kv(peer_id=self.peer_id, addrs=[str(a) for a in self.addrs]))
                self._ready.set()
                task_status.started(self)
                await self._stop.wait()
                log.info("node stopping", extra=kv(peer_id=self.peer_id))
                with trio.CancelScope(shield=True), trio.move_on_after(cfg.node.shutdown_timeout_s):
                    await self.crdt.stop()
                nursery.cancel_scope.cancel()
            with trio.move_on_after(cfg.node.shutdown_timeout_s) as scope:
                scope.shield = True
                await self._close_connections()
        self.crdt_store.close()
        log.info("node stopped", extra=kv(peer_id=self.peer_id))

    def stop(self) -> None:
        self._stop.set()

    async def _close_connections(self) -> None:
        network = self.host.get_network()
        for pid in list(self.host.get_connected_peers()):
            try:
                await network.close_peer(pid)
            except Exception as exc:
                log.debug("close_peer failed", extra=kv(peer=pid, err=exc))

    # -- mesh ------------------------------------------------------------------------------------
    async def _bootstrap(self) -> None:
        async with trio.open_nursery() as n:
            for addr in self.config.host.bootstrap:
                n.start_soon(self._dial_with_backoff, addr)

    async def _dial_with_backoff(self, addr: str) -> None:
        h = self.config.host
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            log.error("bad bootstrap address", extra=kv(addr=addr, err=exc))
            return
        if info.peer_id == self.peer_id:
            return
        delay = h.bootstrap_backoff_s
        for attempt in range(h.bootstrap_retries + 1):
            try:
                with trio.fail_after(h.dial_timeout_s):
                    await self.host.connect(info)
                self._count_dial(True)
                log.info("bootstrap peer connected", extra=kv(peer=info.peer_id, attempt=attempt))
                return
            except Exception as exc:
                self._count_dial(False)
                log.warning("bootstrap dial failed", extra=kv(addr=addr, attempt=attempt, err=exc))
                await trio.sleep(delay)
                delay = min(delay * 2, h.bootstrap_backoff_max_s)
        log.error("bootstrap peer unreachable", extra=kv(addr=addr, attempts=h.bootstrap_retries + 1))

    def _count_dial(self, ok: bool) -> None:
        self.metrics.dials.labels(result="ok" if ok else "failed").inc()

    async def connect(self, addr: str) -> None:
        """Dial a peer by full multiaddr (with ``/p2p/<id>``)."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        with trio.fail_after(self.config.host.dial_timeout_s):
            await self.host.connect(info)

    # -- discovery -------------------------------------------------------------------------------
    async def advertise(self, signature: ModelSignature) -> None:
        """Serve a model: publish it in the DHT (refreshed before the TTL, withdrawn at stop)."""
        if self.discovery is None:
            raise RuntimeError("DHT is disabled (dht.enabled = false)")
        await self.discovery.advertise(signature)

    async def find_compatible(self, signature_or_key: ModelSignature | str, limit: int = 20,
                              ) -> list[Provider]:
        """Peers serving a model with the same compat key, deduplicated, probed, nearest first."""
        if self.discovery is None:
            raise RuntimeError("DHT is disabled (dht.enabled = false)")
        key = signature_or_key if isinstance(signature_or_key, str) else signature_or_key.compat_key
        return await self.discovery.find(key, limit=limit)

    async def _find_route(self, tail: str) -> list[dict[str, Any]] | None:
        if not tail:
            return None
        found = await self.find_compatible(tail)
        return [{"peer_id": p.peer_id, "addrs": list(p.addrs), "reachability": p.reachability,
                 "latency_ms": p.latency_ms, "family": p.signature.family} for p in found]

    # -- tensor sessions -------------------------------------------------------------------------
    @property
    def signature(self) -> ModelSignature | None:
        return self.tensors.signature

    def serve(self, signature: ModelSignature) -> None:
        """Declare the model whose state this node exchanges (handshakes compare against it)."""
        self.tensors.signature = signature

    async def open_session(self, peer: str | ID) -> TensorSession:
        """Open an end-to-end encrypted tensor session (the handshake checks model signatures).

        The session is recorded in a replicated CRDT document shared with the peer.
        """
        pid = peer if isinstance(peer, ID) else ID.from_base58(str(peer))
        ts = await self.tensors.open(pid)
        assert self.signature is not None
        try:
            self.crdt.create_session(ts.session_id, self.signature.compat_key,
                                     {str(self.peer_id): "sender", str(pid): "receiver"})
        except Exception as exc:  # metadata must never block the data path
            log.warning("could not create session document", extra=kv(err=exc))
        return ts

    async def accept_session(self, timeout_s: float | None = None) -> TensorSession:
        """Wait for a peer to open a tensor session to us."""
        return await self.tensors.accept(timeout_s)

    def _on_tensor_event(self, what: str, ts: TensorSession, item: Any) -> None:
        m = self.metrics
        if what == "received" and isinstance(item, Received):
            m.transfers.labels(direction="in", path=item.path, result="ok").inc()
            m.transfer_bytes.labels(direction="in", path=item.path).inc(len(item.buffer))
            self._record_outcome(ts, str(item.header.message_id), "applied",
                                 "checksums verified and delivered", {"receive_s": item.elapsed_s})
        elif what == "rejected":
            m.transfers.labels(direction="in" if item.local else "out", path="any",
                               result="rejected").inc()
            if item.local:
                self._record_outcome(ts, str(item.message_id), "rejected", str(item.error), {})

    def record_sent(self, ts: TensorSession, sent: Sent, kind: str, layers: tuple[int, int],
                    tokens: tuple[int, int]) -> None:
        """Log a completed transfer (path, bytes, time, checksums) in the session's CRDT log."""
        self.metrics.transfers.labels(direction="out", path=sent.path, result="ok").inc()
        self.metrics.transfer_bytes.labels(direction="out", path=sent.path).inc(sent.nbytes)
        try:
            self.crdt.log_message(
                ts.session_id, kind=kind, receiver=str(ts.peer_id), message_id=str(sent.message_id),
                layers=layers, tokens=tokens, nbytes=sent.nbytes, checksums=[c.hex() for c in sent.checksums],
                path=sent.path, timings={"transfer_s": sent.elapsed_s})
        except Exception as exc:
            log.warning("could not log transfer", extra=kv(err=exc))

    def _record_outcome(self, ts: TensorSession, message_id: str, status: str, reason: str,
                        timings: dict[str, float]) -> None:
        """The receiver states, in the shared session log, what it accepted (or rejected) and why."""
        sid = ts.session_id
        if sid not in self.crdt.engine.replicas and self._nursery is not None:
            # The sender's session document may still be on its way: record once it arrives.
            self._nursery.start_soon(self._record_outcome_later, sid, message_id, status, reason, timings)
            return
        try:
            self.crdt.record_outcome(sid, message_id, status, reason, timings)
        except Exception as exc:  # metadata must never block the data path
            log.warning("could not record outcome", extra=kv(err=exc))

    async def _record_outcome_later(self, sid: str, message_id: str, status: str, reason: str,
                                    timings: dict[str, float]) -> None:
        with trio.move_on_after(OUTCOME_WAIT_S):
            while sid not in self.crdt.engine.replicas:
                await trio.sleep(0.05)
            try:
                self.crdt.record_outcome(sid, message_id, status, reason, timings)
            except Exception as exc:
                log.warning("could not record outcome", extra=kv(err=exc))
            return
        log.warning("session document never arrived; outcome not recorded",
                    extra=kv(session=sid, message=message_id, status=status))

    # -- model runtime ---------------------------------------------------------------------------
    async def _load_model(self) -> None:
        """Load ``[runtime].model`` in a worker thread (GGUF conversion takes ~25 s the first time),
        then serve its signature and advertise it in the DHT."""
        import functools

        # torch/transformers are imported only by nodes that serve a model
        from meshnode.runtime.loader import load_model

        rt = self.config.runtime
        cache = Path(os.path.expanduser(rt.cache_dir)) if rt.cache_dir else self.config.data_dir / "models"
        log.info("loading model", extra=kv(model=rt.model, dtype=rt.dtype, cache=str(cache)))
        t0 = time.monotonic()
        try:
            # abandon_on_cancel: a node told to stop mid-conversion exits now (the cache is
            # published by an atomic rename, so an abandoned conversion leaves no partial model)
            lm = await trio.to_thread.run_sync(functools.partial(
                load_model, rt.model, dtype=rt.dtype, num_threads=rt.num_threads, cache_dir=cache),
                abandon_on_cancel=True)
        except Exception as exc:
            self.model_error = f"{type(exc).__name__}: {exc}"
            log.error("model load failed", extra=kv(model=rt.model, err=exc))
            self._model_done.set()
            return
        self.model = lm
        self.serve(lm.signature)
        self._model_done.set()
        log.info("model loaded", extra=kv(model=rt.model, compat_key=lm.signature.compat_key,
                                          load_s=round(time.monotonic() - t0, 2)))
        if self.discovery is not None:
            try:
                await self.advertise(lm.signature)
            except Exception as exc:  # served already; the discovery refresh loop retries
                log.warning("advertise failed", extra=kv(err=exc))

    async def wait_model(self, timeout_s: float | None = None) -> Any:
        """The loaded model (``LoadedModel``) once ready; raises if loading failed or none is set."""
        if not self.config.runtime.model:
            raise RuntimeError("no model configured ([runtime].model)")
        with trio.fail_after(timeout_s) if timeout_s is not None else contextlib.nullcontext():
            await self._model_done.wait()
        if self.model is None:
            raise RuntimeError(f"model load failed: {self.model_error}")
        return self.model

    def _model_status(self) -> dict[str, Any] | None:
        if not self.config.runtime.model:
            return None
        sig = self.model.signature if self.model is not None else None
        return {"model": self.config.runtime.model,
                "state": "ready" if sig else ("failed" if self.model_error else "loading"),
                "error": self.model_error, "compat_key": sig.compat_key if sig else None,
                "family": sig.family if sig else None}

    # -- introspection ---------------------------------------------------------------------------
    @property
    def addrs(self) -> list[multiaddr.Multiaddr]:
        return self.host.get_addrs()

    def peers(self) -> list[dict[str, Any]]:
        return [{"peer_id": str(pid), "addrs": self.peer_addrs(pid)}
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
            "model": self._model_status(),
        }

    def _refresh_gauges(self) -> None:
        """Gauges are read only through ``/metrics``, so they are refreshed at scrape time."""
        self.metrics.connections.set(len(self.host.get_connected_peers()))
        self.metrics.streams.set(self._stream_count())

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
