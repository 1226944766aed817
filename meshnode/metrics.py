"""Prometheus metrics, one registry per node (several nodes may share a process in tests/benches)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily

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

    def add_byte_source(self, protocol: str, fn: ByteSource) -> None:
        self._bytes.sources[protocol] = fn

    def render(self) -> bytes:
        return generate_latest(self.registry)
