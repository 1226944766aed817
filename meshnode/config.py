"""Node configuration: one typed, frozen object built from layered sources.

Precedence (lowest to highest): built-in defaults < TOML file < ``MESHNODE_*`` environment < CLI
``--set section.key=value`` overrides. Every size, port, path, timeout and limit lives here so that
nothing is baked into the code (DESIGN.md invariant E).

Errors name the offending key *and* the source it came from, because an operator with three layers
of configuration needs to know which one to fix. The CLI turns :class:`ConfigError` into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

#: Must match ``tensor_rpc.aead.CIPHERS`` (not imported here: config loads before libsodium).
CIPHER_NAMES = ("aegis128l", "aegis256", "xchacha20poly1305")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ENV_PREFIX = "MESHNODE_"


class ConfigError(ValueError):
    """Invalid configuration: names the key (``section.key``) and the source it came from."""

    def __init__(self, key: str, source: str, message: str) -> None:
        self.key = key
        self.source = source
        super().__init__(f"config error: {key} (from {source}): {message}")


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
    max_connections_per_peer: int = _f(1, 1, 64, doc="1 avoids py-libp2p's 250 ms connect stall")
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
    handshake_timeout_s: float = _f(10.0, 0.1, 600.0)
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
    lane_preauth_timeout_s: float = _f(2.0, 0.05, 600.0, doc="a lane socket must prove the session "
                                       "key within this long")
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
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    host: HostSection = field(default_factory=HostSection)
    control: ControlSection = field(default_factory=ControlSection)
    protocol: ProtocolSection = field(default_factory=ProtocolSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    dht: DhtSection = field(default_factory=DhtSection)
    crdt: CrdtSection = field(default_factory=CrdtSection)
    transport: TransportSection = field(default_factory=TransportSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    nat: NatSection = field(default_factory=NatSection)
    relay: RelaySection = field(default_factory=RelaySection)

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.node.data_dir))

    @property
    def key_path(self) -> Path:
        if self.node.key_path:
            return Path(os.path.expanduser(self.node.key_path))
        return self.data_dir / "identity.key"


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(value: Any, typ: Any, key: str, source: str, from_text: bool) -> Any:
    """Convert/check one value. ``from_text`` = env/CLI strings that need parsing."""
    if get_origin(typ) is list:
        (inner,) = get_args(typ)
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, source, f"expected a list, got {type(value).__name__}")
        return [_coerce(v, inner, key, source, from_text) for v in value]
    if typ is bool:
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(key, source, f"expected a boolean, got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(key, source, f"expected a boolean, got {type(value).__name__}")
        return value
    if typ is int:
        if from_text and isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""), 0)
            except ValueError:
                raise ConfigError(key, source, f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, source, f"expected an integer, got {type(value).__name__}")
        return value
    if typ is float:
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(key, source, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, source, f"expected a number, got {type(value).__name__}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(key, source, f"expected a string, got {type(value).__name__}")
        return value
    raise ConfigError(key, source, f"unsupported type {typ}")  # pragma: no cover


def _check_range(f: dataclasses.Field, value: Any, key: str, source: str) -> None:
    lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(key, source, f"must be one of {', '.join(choices)}; got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(key, source, f"must be >= {lo}; got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(key, source, f"must be <= {hi}; got {value!r}")


class _Builder:
    """Accumulates validated values per section, remembering which source set each key."""

    def __init__(self) -> None:
        self.sections = _sections()
        self.values: dict[str, dict[str, Any]] = {name: {} for name in self.sections}
        self.origin: dict[str, str] = {}

    def fields(self, section: str) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.sections[section])}

    def set(self, dotted: str, value: Any, source: str, from_text: bool) -> None:
        if "." not in dotted:
            raise ConfigError(dotted, source, "expected section.key")
        section, key = dotted.split(".", 1)
        if section not in self.sections:
            raise ConfigError(dotted, source, f"unknown section {section!r}; known: {', '.join(self.sections)}")
        flds = self.fields(section)
        if key not in flds:
            raise ConfigError(dotted, source, f"unknown key; known in [{section}]: {', '.join(flds)}")
        hints = get_type_hints(self.sections[section])
        v = _coerce(value, hints[key], dotted, source, from_text)
        _check_range(flds[key], v, dotted, source)
        self.values[section][key] = v
        self.origin[dotted] = source

    def build(self) -> Config:
        parts = {name: cls(**self.values[name]) for name, cls in self.sections.items()}
        cfg = Config(**parts)
        _cross_checks(cfg, self.origin)
        return cfg


def _cross_checks(cfg: Config, origin: Mapping[str, str]) -> None:
    """Constraints that span several keys; still name a key and its source."""
    import ipaddress

    try:
        control_ip = ipaddress.ip_address(cfg.control.host)
    except ValueError:
        raise ConfigError("control.host", origin.get("control.host", "default"),
                          f"not an IP address: {cfg.control.host!r}") from None
    if not control_ip.is_loopback:
        raise ConfigError("control.host", origin.get("control.host", "default"),
                          "the control API must bind to a loopback address")
    for c in cfg.protocol.ciphers:
        if c not in CIPHER_NAMES:
            raise ConfigError("protocol.ciphers", origin.get("protocol.ciphers", "default"),
                              f"unknown cipher {c!r}; known: {', '.join(CIPHER_NAMES)}")
    if cfg.host.bootstrap_backoff_max_s < cfg.host.bootstrap_backoff_s:
        raise ConfigError("host.bootstrap_backoff_max_s", origin.get("host.bootstrap_backoff_max_s", "default"),
                          "must be >= host.bootstrap_backoff_s")
    if cfg.dht.refresh_interval_s >= cfg.dht.record_ttl_s:
        raise ConfigError("dht.refresh_interval_s", origin.get("dht.refresh_interval_s", "default"),
                          f"must be shorter than dht.record_ttl_s ({cfg.dht.record_ttl_s}) or records "
                          "expire between refreshes")
    import multiaddr

    from tensor_rpc.transport.paths import parse_peer_paths

    for key, addrs, need_peer in (("host.listen_addrs", cfg.host.listen_addrs, False),
                                  ("host.bootstrap", cfg.host.bootstrap, True)):
        for a in addrs:
            try:
                ma = multiaddr.Multiaddr(a)
            except Exception as exc:
                raise ConfigError(key, origin.get(key, "default"), f"bad multiaddr {a!r}: {exc}") from None
            if need_peer and "/p2p/" not in str(ma):
                raise ConfigError(key, origin.get(key, "default"),
                                  f"{a!r} lacks /p2p/<peer id>: a bootstrap peer must be identified")

    try:
        parse_peer_paths(cfg.transport.peer_paths)
    except ValueError as exc:
        raise ConfigError("transport.peer_paths", origin.get("transport.peer_paths", "default"),
                          str(exc)) from None
    if cfg.limits.inflight_bytes < cfg.limits.inflight_bytes_per_peer:
        raise ConfigError("limits.inflight_bytes", origin.get("limits.inflight_bytes", "default"),
                          "must be >= limits.inflight_bytes_per_peer")
    if not cfg.host.listen_addrs:
        raise ConfigError("host.listen_addrs", origin.get("host.listen_addrs", "default"),
                          "at least one listen address is required")


def env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config from all layers. ``overrides`` are ``section.key=value`` strings (CLI)."""
    b = _Builder()
    if path is not None:
        src = f"file {path}"
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", src, "file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", src, f"invalid TOML: {exc}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(section, src, "expected a [section] table")
            for key, value in table.items():
                b.set(f"{section}.{key}", value, src, from_text=False)

    env = os.environ if env is None else env
    known = {env_name(f"{s}.{f}"): f"{s}.{f}" for s in b.sections for f in b.fields(s)}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in known:
            raise ConfigError(name, "environment", "unknown MESHNODE_ variable")
        b.set(known[name], value, f"environment {name}", from_text=True)

    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "command line", "expected section.key=value")
        k, v = item.split("=", 1)
        b.set(k.strip(), v, "command line", from_text=True)
    return b.build()
