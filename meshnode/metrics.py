"""Prometheus metrics, one registry per node (several nodes may share a process in tests/benches)."""

from __future__ import annotations

from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily

from meshnode.bus import EventBus
from meshnode.tensor.events import MessageDelivered, TransferFailed, TransferSent

# protocol name -> () -> (bytes_in, bytes_out), read at scrape time from the component that owns it
ByteSource = Callable[[], tuple[int, int]]


class _ProtocolBytes:
    """Byte totals per protocol, read from the components at scrape time (no double counting)."""

    def __init__(self) -> None:
        self.sources: dict[str, ByteSource] = {}

    def collect(self):
        fam = CounterMetricFamily("latentlink_protocol_bytes", "Bytes on LatentLink protocols",
                                  labels=["protocol", "direction"])
        for proto, fn in sorted(self.sources.items()):
            try:
                b_in, b_out = fn()
            except Exception:
                continue
            fam.add_metric([proto, "in"], b_in)
            fam.add_metric([proto, "out"], b_out)
        yield fam


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge("latentlink_connections", "Open libp2p connections", registry=r)
        self.streams = Gauge("latentlink_streams", "Open libp2p streams", registry=r)
        self._bytes = _ProtocolBytes()
        r.register(self._bytes)
        self.dials = Counter("latentlink_dials", "Outbound dials", ["result"], registry=r)
        self.dht_ops = Counter("latentlink_dht_operations", "DHT operations", ["op", "result"], registry=r)
        self.transfers = Counter("latentlink_transfers", "Tensor transfers", ["direction", "path", "result"], registry=r)
        self.transfer_bytes = Counter("latentlink_transfer_bytes", "Tensor payload bytes", ["direction", "path"], registry=r)
        # every refusal of something a peer asked for (memory, sessions, sockets, documents, dials)
        self.refusals = Counter("latentlink_refusals", "Peer requests refused, by component and reason",
                                ["component", "reason"], registry=r)

        self.tensor_sessions = Gauge("latentlink_tensor_sessions", "Tensor sessions by state",
                                     ["state"], registry=r)
        self.tensor_lanes = Gauge("latentlink_tensor_lanes", "Open data lanes by direction and path",
                                  ["lane"], registry=r)
        self.inflight = Gauge("latentlink_inflight_bytes", "Received payload bytes not yet taken "
                              "by the application, by peer", ["peer"], registry=r)
        self.lane_preauth = Gauge("latentlink_lane_preauth", "Lane sockets not yet authenticated",
                                  registry=r)

    async def run(self, bus: EventBus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Count transfers from the node's events (the tensor service publishes them)."""
        events = bus.subscribe(TransferSent, MessageDelivered, TransferFailed)
        task_status.started()
        async for ev in events:
            if isinstance(ev, TransferSent):
                self.transfers.labels(direction="out", path=ev.path, result="ok").inc()
                self.transfer_bytes.labels(direction="out", path=ev.path).inc(ev.nbytes)
            elif isinstance(ev, MessageDelivered):
                self.transfers.labels(direction="in", path=ev.path, result="ok").inc()
                self.transfer_bytes.labels(direction="in", path=ev.path).inc(ev.nbytes)
            elif isinstance(ev, TransferFailed):
                self.transfers.labels(direction="in" if ev.local else "out", path="any",
                                      result="rejected").inc()

    def set_tensor_status(self, status: dict) -> None:
        """Gauges from ``TensorService.status()`` (at scrape time)."""
        for g in (self.tensor_sessions, self.tensor_lanes, self.inflight):
            g.clear()
        for state, n in status["by_state"].items():
            self.tensor_sessions.labels(state=state).set(n)
        self.tensor_sessions.labels(state="UNACCEPTED").set(status["unaccepted"])
        for lane, n in status["lanes"].items():
            self.tensor_lanes.labels(lane=lane).set(n)
        for peer, st in status["peers"].items():
            self.inflight.labels(peer=peer).set(st["inflight_bytes"])
        self.lane_preauth.set(status["lane_preauth"])

    def refuser(self, component: str) -> Callable[[str], None]:
        """``on_refuse(reason)`` for one component: counts the refusal (the component logs it)."""
        return lambda reason: self.refusals.labels(component=component, reason=reason).inc()

    def add_byte_source(self, protocol: str, fn: ByteSource) -> None:
        self._bytes.sources[protocol] = fn

    def render(self) -> bytes:
        return generate_latest(self.registry)
