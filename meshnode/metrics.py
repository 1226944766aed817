"""Prometheus metrics, one registry per node (several nodes may share a process in tests/benches)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge("latentlink_connections", "Open libp2p connections", registry=r)
        self.streams = Gauge("latentlink_streams", "Open libp2p streams", registry=r)
        self.bytes_in = Counter("latentlink_bytes_in", "Bytes received on LatentLink protocols", ["protocol"], registry=r)
        self.bytes_out = Counter("latentlink_bytes_out", "Bytes sent on LatentLink protocols", ["protocol"], registry=r)
        self.dials = Counter("latentlink_dials", "Outbound dials", ["result"], registry=r)
        self.dht_ops = Counter("latentlink_dht_operations", "DHT operations", ["op", "result"], registry=r)
        self.transfers = Counter("latentlink_transfers", "Tensor transfers", ["direction", "path", "result"], registry=r)
        self.transfer_bytes = Counter("latentlink_transfer_bytes", "Tensor payload bytes", ["direction", "path"], registry=r)
        self.crdt_updates = Counter("latentlink_crdt_updates", "CRDT updates", ["result"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
