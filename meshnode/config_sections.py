"""The configuration's sections: every key with its type, default, range and meaning.

Split from :mod:`meshnode.config` (which layers and validates the sources) so that each file has
one job; the field metadata written with :func:`_f` drives validation, ``meshnode config --list``
and ``configs/node.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Must match ``tensor_rpc.aead.CIPHERS`` (not imported here: config loads before libsodium).
CIPHER_NAMES = ("aegis128l", "aegis256", "xchacha20poly1305")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

def _f(default: Any, lo: float | None = None, hi: float | None = None,
       choices: tuple[str, ...] | None = None, doc: str = "") -> Any:
    """Declare a config field with its range/choices; the metadata drives validation and docs."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NodeSection:
    data_dir: str = _f("~/.local/share/latentlink", doc="state: identity, control port file, CRDT logs")
    key_path: str = _f("", doc="Ed25519 identity file; empty = <data_dir>/identity.key")
    log_level: str = _f("info", choices=("debug", "info", "warning", "error"))
    log_json: bool = _f(False, doc="one JSON object per log line")
    shutdown_timeout_s: float = _f(5.0, 0.1, 300.0, doc="grace period for clean shutdown")


@dataclass(frozen=True)
class HostSection:
    listen_addrs: list[str] = _f(["/ip4/0.0.0.0/tcp/4001"], doc="libp2p TCP multiaddrs to listen on")
    enable_quic: bool = _f(False, doc="QUIC transport (off by default)")
    bootstrap: list[str] = _f([], doc="multiaddrs with /p2p/<id> dialled at start")
    bootstrap_retries: int = _f(8, 0, 1000)
    bootstrap_backoff_s: float = _f(0.2, 0.0, 60.0, doc="first retry delay; doubles each try")
    bootstrap_backoff_max_s: float = _f(5.0, 0.0, 600.0)
    dial_timeout_s: float = _f(10.0, 0.1, 300.0)
    max_connections: int = _f(256, 1, 100000)
    max_connections_per_peer: int = _f(1, 1, 64, doc="1 avoids py-libp2p's 250 ms connect stall "
                                       "(a relayed connection next to a direct one is not counted)")
    tcp_rto_max_ms: int = _f(2000, 0, 120000, doc="largest TCP retransmission timeout on our "
                             "connections and data lanes, 1000-120000 ms (Linux 6.15+; 0 = the "
                             "kernel's 120 s): bounds the stalls a lossy path causes")
    peer_exchange_interval_s: float = _f(1.0, 0.05, 3600.0, doc="how often to learn/dial peers of peers")
    max_peer_exchange: int = _f(64, 0, 10000, doc="max peers returned per exchange")
    pex_dials_per_round: int = _f(8, 0, 10000, doc="most peer-exchange dials started per round")
    pex_dial_backoff_s: float = _f(30.0, 0.0, 86400.0, doc="a peer whose PEX dial failed is not "
                                   "dialled again before this (doubles per failure, up to 32x)")


@dataclass(frozen=True)
class ControlSection:
    enabled: bool = _f(True, doc="local HTTP/JSON control API + Prometheus metrics")
    host: str = _f("127.0.0.1", doc="bind address; must be loopback")
    port: int = _f(4080, 0, 65535, doc="0 = pick a free port (written to <data_dir>/control.json)")


@dataclass(frozen=True)
class ProtocolSection:
    max_message_bytes: int = _f(2 * GiB, 1, 64 * GiB, doc="largest tensor message accepted")
    max_metadata_bytes: int = _f(1 * MiB, 256, 64 * MiB, doc="largest msgpack header accepted")
    max_tensors_per_message: int = _f(4096, 1, 1 << 20)
    chunk_bytes: int = _f(4 * MiB, 4 * KiB, 256 * MiB, doc="AEAD chunk size on the wire")
    handshake_timeout_s: float = _f(20.0, 0.1, 600.0, doc="a session's handshake must finish within "
                                    "this long (a few messages each way; on a lossy path each "
                                    "can take seconds of TCP retransmission)")
    idle_timeout_s: float = _f(300.0, 1.0, 86400.0, doc="idle sessions expire")
    ciphers: list[str] = _f(["aegis128l", "aegis256", "xchacha20poly1305"], doc="preference order")
    residual_gain_max: float = _f(4.0, 0.0, 1e6, doc="highest RESIDUAL_PATCH gain negotiated")


@dataclass(frozen=True)
class LimitsSection:
    allowlist: list[str] = _f([], doc="peer IDs allowed to open sessions; empty = everyone")
    denylist: list[str] = _f([], doc="peer IDs always refused")
    shared_token: str = _f("", doc="optional token a peer must present at handshake")
    messages_per_s: float = _f(200.0, 0.001, 1e9, doc="incoming tensor messages per second per peer")
    bytes_per_s: float = _f(float(4 * GiB), 1.0, 1e15, doc="incoming payload bytes per second per peer")
    max_sessions_per_peer: int = _f(8, 1, 10000, doc="live tensor sessions per peer (a slot is freed "
                                    "once the session's tasks ended and its stream is closed)")
    max_sessions: int = _f(256, 1, 1000000, doc="live tensor sessions in total")
    max_unaccepted_sessions: int = _f(16, 1, 100000, doc="incoming sessions waiting for the "
                                      "application to accept them; more are refused at once")
    inflight_bytes: int = _f(4 * GiB, 1 * MiB, 1 << 50, doc="payload bytes received and not yet "
                             "taken by the application, all peers together")
    inflight_bytes_per_peer: int = _f(2 * GiB, 1 * MiB, 1 << 50, doc="the same, per peer; a message "
                                      "larger than this is received only into a sink (bounded memory)")
    messages_in_flight: int = _f(8, 1, 4096, doc="incomplete incoming messages per session")


@dataclass(frozen=True)
class DhtSection:
    enabled: bool = _f(True)
    mode: str = _f("auto", choices=("auto", "server", "client"))
    record_ttl_s: float = _f(600.0, 1.0, 7 * 86400.0, doc="provider/signature record lifetime")
    refresh_interval_s: float = _f(300.0, 0.5, 86400.0, doc="re-advertise before TTL expires")
    probe_timeout_s: float = _f(2.0, 0.05, 120.0, doc="unreachable providers are filtered after this")
    max_record_bytes: int = _f(16 * KiB, 256, 1 * MiB)
    max_probes_per_lookup: int = _f(16, 1, 10000, doc="providers whose record a lookup fetches")
    max_stored_records: int = _f(1024, 1, 1000000, doc="signed records other peers may store on "
                                 "this node (DHT value store); more new keys are refused")


@dataclass(frozen=True)
class CrdtSection:
    max_update_bytes: int = _f(1 * MiB, 64, 1 * GiB)
    max_document_bytes: int = _f(64 * MiB, 1 * KiB, 16 * GiB)
    fsync: str = _f("batch", choices=("always", "batch", "never"))
    anti_entropy_interval_s: float = _f(5.0, 0.05, 86400.0)
    outcome_wait_s: float = _f(10.0, 0.1, 3600.0, doc="a receiver's outcome waits this long for the "
                               "sender's session document to replicate before it is dropped")
    max_links_per_peer: int = _f(2, 1, 64, doc="CRDT streams kept per peer (ours + theirs)")
    max_links: int = _f(256, 1, 100000, doc="CRDT streams in total")
    max_documents_per_peer: int = _f(64, 1, 1000000, doc="session documents another peer may "
                                     "create with us as a participant")
    updates_per_peer_per_s: float = _f(500.0, 0.001, 1e9, doc="CRDT records accepted per second "
                                       "per peer (burst = one second's worth)")


@dataclass(frozen=True)
class TransportSection:
    path: str = _f("auto", choices=("auto", "shm", "bulk", "stream"), doc="force a data path")
    bulk_listen_host: str = _f("", doc="bulk lane bind address; empty = the IPs of host.listen_addrs")
    bulk_port: int = _f(0, 0, 65535, doc="0 = ephemeral")
    shm_enabled: bool = _f(True)
    shm_ring_bytes: int = _f(64 * MiB, 1 * MiB, 16 * GiB)
    recv_window_bytes: int = _f(64 * MiB, 64 * KiB, 16 * GiB, doc="credits granted to a sender")
    transfer_timeout_s: float = _f(120.0, 0.1, 86400.0, doc="a sent message not acknowledged by "
                                   "then is reported failed")
    progress_timeout_s: float = _f(30.0, 0.1, 86400.0, doc="an incoming message with no new chunk "
                                   "(or DIGEST) for this long is rejected and its memory freed")
    peer_paths: list[str] = _f([], doc="per-peer path override, '<peer id>=auto|shm|bulk|stream'")
    lane_connect_timeout_s: float = _f(5.0, 0.05, 600.0, doc="bulk/shm lane connect + key proof")
    lane_socket_buffer_bytes: int = _f(4 * MiB, 64 * KiB, 1 * GiB, doc="SO_SNDBUF/SO_RCVBUF of lanes")
    lane_retry_s: float = _f(30.0, 0.0, 86400.0, doc="a lane that failed is tried again after this long")
    max_lanes_per_session: int = _f(4, 1, 64, doc="incoming data lanes (one thread each) per session")
    lane_preauth_max: int = _f(64, 1, 100000, doc="lane sockets not yet authenticated, at once; the "
                               "oldest is dropped when one more arrives")
    lane_preauth_timeout_s: float = _f(10.0, 0.05, 600.0, doc="a lane socket must prove the session "
                                       "key within this long (the dialler counts its lane open "
                                       "once it has sent the proof: too short a limit on a lossy "
                                       "path drops lanes their sender then writes into)")
    lane_accept_backoff_s: float = _f(0.1, 0.0, 60.0, doc="pause after a failed accept (e.g. EMFILE) "
                                      "before accepting again")
    close_timeout_s: float = _f(1.0, 0.01, 60.0, doc="how long an ending session may take to deliver "
                                "its CLOSE/ABORT before its stream is reset")
    inline_max_bytes: int = _f(256 * KiB, 0, 1 * GiB, doc="under path=auto, payloads up to this size "
                               "go on the libp2p stream (lower latency than a lane for small messages)")
    stream_read_bytes: int = _f(8 * MiB, 64 * KiB, 256 * MiB, doc="libp2p stream read size")
    stream_window_bytes: int = _f(16 * MiB, 256 * KiB, 16 * MiB, doc="yamux receive window granted at once")
    recv_pool_bytes: int = _f(2 * GiB, 0, 64 * GiB, doc="receive memory kept for reuse (idle, or lent and reused once nothing exports it)")
    receive_queue_messages: int = _f(64, 1, 1 << 20, doc="verified messages waiting for the application "
                                     "before the session is closed as overloaded (none is dropped)")


@dataclass(frozen=True)
class RuntimeSection:
    model: str = _f("", doc="HF directory, .gguf file, or 'smollm2' (the PyPI-shipped model)")
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    num_threads: int = _f(1, 1, 1024, doc="torch threads; must match on both sides for bitwise equality")
    cache_dir: str = _f("", doc="converted-model cache (GGUF -> safetensors); empty = <data_dir>/models")


@dataclass(frozen=True)
class NatSection:
    autonat_client: bool = _f(True, doc="ask connected peers to dial us back (AutoNAT v2) to learn "
                              "whether we are reachable")
    autonat_server: bool = _f(True, doc="answer other peers' AutoNAT v2 dial-back requests")
    confirmations: int = _f(2, 1, 100, doc="distinct servers that must agree before we call "
                            "ourselves public (a dial-back proved) or private")
    probe_interval_s: float = _f(2.0, 0.05, 3600.0, doc="while reachability is unknown, ask again "
                                 "this often")
    recheck_interval_s: float = _f(300.0, 0.1, 86400.0, doc="once known, recheck this often")
    evidence_ttl_s: float = _f(1800.0, 1.0, 7 * 86400.0, doc="a server's answer counts this long")
    servers_per_round: int = _f(3, 1, 64, doc="servers asked at once")
    server_retry_s: float = _f(60.0, 0.0, 86400.0, doc="the same server is asked at most this often")
    request_timeout_s: float = _f(20.0, 0.1, 600.0, doc="a whole request, either side")
    dial_back_timeout_s: float = _f(5.0, 0.1, 120.0, doc="server: connecting back and the "
                                    "dial-back exchange, each")
    max_concurrent_dial_backs: int = _f(8, 1, 10000, doc="server: dial-backs at once")
    per_peer_interval_s: float = _f(5.0, 0.0, 86400.0, doc="server: one request per peer this often")
    max_dial_data_bytes: int = _f(100_000, 0, 10_000_000, doc="client: most bytes we send when a "
                                  "server asks for dial data (spec: servers ask 30k-100k)")
    allow_private_addrs: bool = _f(False, doc="test and dial private/loopback IPs too (labs only; "
                                   "the spec says never)")


@dataclass(frozen=True)
class RelaySection:
    hop: str = _f("auto", choices=("auto", "always", "never"), doc="serve Circuit Relay v2 hops: "
                  "auto = while AutoNAT says we are public")
    client: str = _f("auto", choices=("auto", "always", "never"), doc="hold relay reservations: "
                     "auto = while AutoNAT says we are private")
    relays: list[str] = _f([], doc="relay multiaddrs with /p2p/<id>; empty = try connected peers")
    max_relays: int = _f(2, 1, 64, doc="client: reservations held at once")
    max_reservations: int = _f(128, 0, 1000000, doc="relay: reservations held for peers")
    reservation_ttl_s: float = _f(3600.0, 1.0, 86400.0, doc="relay: a reservation's lifetime "
                                  "(freed at once when its peer disconnects)")
    max_circuits: int = _f(16, 0, 1000000, doc="relay: open circuits in total")
    max_circuits_per_peer: int = _f(4, 0, 10000, doc="relay: open circuits per peer (either end)")
    circuit_duration_s: float = _f(600.0, 0.0, 86400.0, doc="relay: a circuit is cut after this, "
                                   "idle or not (0 = no limit; go/rust use 120)")
    circuit_bytes: int = _f(256 * MiB, 0, 1 << 50, doc="relay: bytes per direction per circuit "
                            "(0 = no limit; go/rust use 128 KiB, too small for a KV cache)")
    window_bytes: int = _f(1 * MiB, 64 * KiB, 256 * MiB, doc="yamux window on relayed streams "
                           "(the relay holds at most this per direction per circuit)")
    connect_timeout_s: float = _f(10.0, 0.1, 300.0, doc="reserve, circuit set-up, stop exchange")
    direct_dial_timeout_s: float = _f(3.0, 0.1, 300.0, doc="a peer with circuit addresses is "
                                      "dialled directly for this long first")
    renew_before_s: float = _f(60.0, 0.1, 86400.0, doc="client: renew this long before expiry "
                               "(at most half the reservation's lifetime)")
    retry_backoff_s: float = _f(0.5, 0.01, 600.0, doc="client: first retry after a relay is lost")
    retry_backoff_max_s: float = _f(4.0, 0.01, 3600.0, doc="client: retries double up to this")
    scan_interval_s: float = _f(2.0, 0.05, 3600.0, doc="client: how often to look for relays")


@dataclass(frozen=True)
class DcutrSection:
    enabled: bool = _f(True, doc="upgrade relayed connections to direct ones (DCUtR: TCP hole "
                       "punching coordinated over the relay)")
    attempts: int = _f(3, 1, 10, doc="punch attempts per relayed connection, each with its own "
                       "CONNECT/SYNC (the spec: 3); then the relay is kept")
    punch_timeout_s: float = _f(5.0, 0.1, 60.0, doc="one simultaneous-open attempt (covers the SYN "
                                "retransmissions at 1 s and 3 s: a lossy path needs them)")
    unilateral_timeout_s: float = _f(2.0, 0.1, 60.0, doc="first, dial a relayed peer's public "
                                     "addresses directly for this long")
    exchange_timeout_s: float = _f(10.0, 0.1, 120.0, doc="each CONNECT/SYNC message on the dcutr "
                                   "stream (over a lossy relayed path one message can take seconds)")
    await_punch_s: float = _f(8.0, 0.1, 120.0, doc="after dialling a peer through a relay, how long "
                              "we wait for it to start the upgrade")
    settle_timeout_s: float = _f(20.0, 0.0, 600.0, doc="a tensor session to a peer being punched "
                                 "waits this long for a direct path before using the relay")
    relay_grace_s: float = _f(5.0, 0.0, 3600.0, doc="the relayed connection is closed this long "
                              "after a direct one exists (once a ping over it proves the peer "
                              "holds it too)")
    relay_close_pings: int = _f(3, 1, 100, doc="pings over the direct connection, each within "
                                "exchange_timeout_s, before the relayed one is closed; none "
                                "answered: the relayed connection stays")
    max_concurrent: int = _f(8, 1, 4096, doc="upgrades running at once (either role); more are "
                             "refused")
    max_dial_addrs: int = _f(4, 1, 16, doc="addresses we dial from one CONNECT")
    memory: int = _f(4096, 16, 1_000_000, doc="peers whose failed upgrade we remember (not retried "
                     "until their addresses change)")

