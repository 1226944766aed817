"""``meshnode`` command line: a thin layer over :mod:`meshnode.node` and the control API.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage (the message names the
key and the source that set it), or a model that is missing or unreadable (the message names the
path or package looked for: :class:`~meshnode.runtime.source.ModelNotFoundError`). The parser, with
each command's options, description and examples, is in :mod:`meshnode.cli_parser`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

from meshnode import cli_parser
from meshnode.cli_handoff import cmd_handoff
from meshnode.config import (
    Config,
    ConfigError,
    env_name,
    load_config,
)
from meshnode.config_doc import SECRET_KEYS, describe, render_toml
from meshnode.runtime.source import ModelNotFoundError, resolve_model_source

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _load(args: argparse.Namespace) -> Config:
    ov = list(args.overrides)
    if args.data_dir:
        ov.append(f"node.data_dir={args.data_dir}")
    if args.listen:
        ov.append("host.listen_addrs=" + ",".join(args.listen))
    if args.bootstrap:
        ov.append("host.bootstrap=" + ",".join(args.bootstrap))
    if args.control_port is not None:
        ov.append(f"control.port={args.control_port}")
    if args.log_level:
        ov.append(f"node.log_level={args.log_level}")
    if args.log_json:
        ov.append("node.log_json=true")
    if getattr(args, "model", None) and getattr(args, "fn", None) is cmd_handoff:
        ov.append(f"runtime.model={args.model}")
    return load_config(args.config, overrides=ov)


# -- commands -----------------------------------------------------------------------------------
def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.runtime.model:  # cheap (no torch import): refuse a missing model before the node starts
        resolve_model_source(cfg.runtime.model)
    import trio

    from meshnode.logs import setup_logging
    from meshnode.node import Node

    setup_logging(cfg.node.log_level, cfg.node.log_json)

    async def main() -> None:
        node = Node(cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                if args.print_addrs:
                    for a in node.addrs:
                        print(a, flush=True)
                async for _sig in signals:
                    node.stop()
                    break

    trio.run(main)
    return 0


def cmd_id(cfg: Config, args: argparse.Namespace) -> int:
    from meshnode.identity import load_or_create_identity, peer_id_of

    pid = peer_id_of(load_or_create_identity(cfg.key_path))
    running = _try_control(cfg, args, "/status")
    addrs = running["addrs"] if running else [f"{a}/p2p/{pid}" for a in cfg.host.listen_addrs]
    if args.json:
        print(json.dumps({"peer_id": str(pid), "addrs": addrs, "running": running is not None}))
    else:
        print(pid)
        for a in addrs:
            print(f"  {a}")
    return 0


def _show(cfg: Config, args: argparse.Namespace, path: str, render) -> int:
    """Fetch ``path`` from the running node; print JSON with ``--json``, else ``render`` it."""
    data = _control(cfg, args, path)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        render(data)
    return 0


def _render_status(st: dict) -> None:
    for k, v in st.items():
        if isinstance(v, list):
            print(f"{k}:")
            for item in v:
                print(f"  {item}")
        else:
            print(f"{k}: {v}")


def _render_peers(peers: list) -> None:
    if not peers:
        print("no connected peers")
    for p in peers:
        kinds = ",".join(p.get("connections", [])) or "-"
        print(p["peer_id"], f"[{kinds}]", " ".join(p["addrs"][:2]))


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    return _show(cfg, args, "/status", _render_status)


def cmd_peers(cfg: Config, args: argparse.Namespace) -> int:
    return _show(cfg, args, "/peers", _render_peers)


def cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    if args.list:
        for key, typ, default, doc in describe():
            print(f"{key:<36} {typ:<10} default={default!r:<28} env={env_name(key)}  {doc}")
        return 0
    if args.toml:
        print(render_toml(), end="")
        return 0
    import dataclasses

    out = dataclasses.asdict(cfg)
    for key in SECRET_KEYS:  # the effective config, minus secrets (a token is never printed)
        sec, name = key.split(".", 1)
        if out[sec][name]:
            out[sec][name] = "<redacted>"
    print(json.dumps(out, indent=2))
    return 0


# -- model state: signature, find, sessions, handoff -------------------------------------------
def _model_cache(cfg: Config) -> Any:
    from pathlib import Path

    return Path(cfg.runtime.cache_dir).expanduser() if cfg.runtime.cache_dir else cfg.data_dir / "models"


def _signature_of(cfg: Config, path: str) -> Any:
    """Load ``path`` the way a node does (same dtype, cache) and return its ``ModelSignature``.

    A missing or unreadable model raises ``ModelNotFoundError`` before torch is even imported."""
    resolve_model_source(path)
    from meshnode.runtime.loader import load_model

    if path == "smollm2" or path.endswith(".gguf"):
        print(f"loading {path} (the GGUF is converted once into {_model_cache(cfg)}, ~25 s)...",
              file=sys.stderr, flush=True)
    return load_model(path, dtype=cfg.runtime.dtype, num_threads=cfg.runtime.num_threads,
                      cache_dir=_model_cache(cfg)).signature


def cmd_signature(cfg: Config, args: argparse.Namespace) -> int:
    sig = _signature_of(cfg, args.path)
    if args.json:
        print(json.dumps({"compat_key": sig.compat_key, "signature": sig.to_dict()}, indent=2))
    else:
        print(json.dumps(sig.to_dict(), indent=2, sort_keys=True))
        print(f"compat_key: {sig.compat_key}")
    return 0


def cmd_find(cfg: Config, args: argparse.Namespace) -> int:
    key = args.key or _signature_of(cfg, args.model).compat_key
    found = _control(cfg, args, f"/find/{key}")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no peer serves {key}")
    for p in found:
        lat = f"{p['latency_ms']:.1f} ms" if p.get("latency_ms") is not None else "-"
        print(f"{p['peer_id']}  {p['reachability']:<8} {lat:>9}  {p.get('family', '')}  "
              f"{' '.join(p['addrs'][:1])}")
    return 0


def cmd_sessions(cfg: Config, args: argparse.Namespace) -> int:
    import time

    while True:
        rows = _control(cfg, args, "/sessions")
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            if args.watch:
                print("\x1b[2J\x1b[H", end="")
            print(f"{'session':<34} {'status':<10} {'peers':>5} {'msgs':>5} {'bytes':>9}  compat_key")
            for r in rows:
                print(f"{r['session_id']:<34} {r['status']:<10} {r['participants']:>5} {r['messages']:>5} "
                      f"{r['bytes']:>9}  {r['compat_key']}")
            if not rows:
                print("no sessions")
        if not args.watch:
            return 0
        time.sleep(1.0)


class ControlUnavailable(RuntimeError):
    pass


def _control_url(cfg: Config, args: argparse.Namespace) -> str:
    if getattr(args, "control_url", None):
        return args.control_url.rstrip("/")
    port_file = cfg.data_dir / "control.json"
    if port_file.exists():
        info = json.loads(port_file.read_text())
        return f"http://{info['host']}:{info['port']}"
    return f"http://{cfg.control.host}:{cfg.control.port}"


def _try_control(cfg: Config, args: argparse.Namespace, path: str) -> Any:
    try:
        return _control(cfg, args, path)
    except ControlUnavailable:
        return None


def _control(cfg: Config, args: argparse.Namespace, path: str) -> Any:
    url = _control_url(cfg, args) + path
    try:
        with urllib.request.urlopen(url, timeout=getattr(args, "timeout", 5.0)) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise ControlUnavailable(f"no node answering at {url} ({exc}); is `meshnode run` running "
                                 f"with the same --data-dir/--config?") from None


# -- entry point --------------------------------------------------------------------------------
COMMANDS = {"run": cmd_run, "id": cmd_id, "status": cmd_status, "peers": cmd_peers,
            "signature": cmd_signature, "find": cmd_find, "sessions": cmd_sessions,
            "handoff": cmd_handoff, "config": cmd_config}


def build_parser() -> argparse.ArgumentParser:
    return cli_parser.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = None if getattr(args, "no_config", False) else _load(args)
    except ConfigError as exc:
        print(f"meshnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return args.fn(cfg, args)
    except ModelNotFoundError as exc:
        print(f"meshnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ControlUnavailable as exc:
        print(f"meshnode: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        from meshnode.identity import IdentityError

        if isinstance(exc, IdentityError):
            print(f"meshnode: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        raise


if __name__ == "__main__":
    sys.exit(main())
