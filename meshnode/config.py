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

from meshnode.config_sections import (  # noqa: F401 - re-exported: the sections live there
    CIPHER_NAMES,
    ControlSection,
    CrdtSection,
    DcutrSection,
    DhtSection,
    HostSection,
    LimitsSection,
    NatSection,
    NodeSection,
    ProtocolSection,
    RelaySection,
    RuntimeSection,
    TransportSection,
)

ENV_PREFIX = "MESHNODE_"


class ConfigError(ValueError):
    """Invalid configuration: names the key (``section.key``) and the source it came from."""

    def __init__(self, key: str, source: str, message: str) -> None:
        self.key = key
        self.source = source
        super().__init__(f"config error: {key} (from {source}): {message}")


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
    dcutr: DcutrSection = field(default_factory=DcutrSection)

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
    if 0 < cfg.host.tcp_rto_max_ms < 1000:
        raise ConfigError("host.tcp_rto_max_ms", origin.get("host.tcp_rto_max_ms", "default"),
                          "must be 0 (the kernel's default) or at least 1000 (the kernel's floor)")
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
