"""``meshnode`` command line: a thin layer over :mod:`meshnode.node` and the control API.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage (the message names the
key and the source that set it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

from meshnode.config import Config, ConfigError, describe, env_name, load_config

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (defaults < --config file < MESHNODE_* env < flags)")
    g.add_argument("--config", "-c", metavar="FILE", help="TOML config file (see configs/node.toml)")
    g.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set protocol.chunk_bytes=1048576 (repeatable)")
    g.add_argument("--data-dir", help="shortcut for --set node.data_dir=...")
    g.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="shortcut for host.listen_addrs (repeatable)")
    g.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="shortcut for host.bootstrap (repeatable)")
    g.add_argument("--control-port", type=int, help="shortcut for --set control.port=...")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")


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
    return load_config(args.config, overrides=ov)


# -- commands -----------------------------------------------------------------------------------
def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
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


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    st = _control(cfg, args, "/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for k, v in st.items():
        if isinstance(v, list):
            print(f"{k}:")
            for item in v:
                print(f"  {item}")
        else:
            print(f"{k}: {v}")
    return 0


def cmd_peers(cfg: Config, args: argparse.Namespace) -> int:
    peers = _control(cfg, args, "/peers")
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if not peers:
        print("no connected peers")
    for p in peers:
        print(p["peer_id"], " ".join(p["addrs"][:2]))
    return 0


def cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    if args.list:
        for key, typ, default, doc in describe():
            print(f"{key:<36} {typ:<10} default={default!r:<28} env={env_name(key)}  {doc}")
        return 0
    import dataclasses

    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    return 0


# -- control API client -------------------------------------------------------------------------
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
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshnode",
        description="LatentLink mesh node: hand LLM internal state (KV cache) between peers "
                    "running the same model, over libp2p.",
        epilog="Every setting: `meshnode config --list`. Docs: README.md, docs/PROTOCOL.md.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a node until SIGINT/SIGTERM")
    _config_args(r)
    r.add_argument("--print-addrs", action="store_true", help="print listen multiaddrs to stdout once up")
    r.set_defaults(fn=cmd_run)

    for name, fn, helptext in (("id", cmd_id, "print this node's peer ID and addresses"),
                               ("status", cmd_status, "status of the running node (control API)"),
                               ("peers", cmd_peers, "peers the running node is connected to")):
        c = sub.add_parser(name, help=helptext)
        _config_args(c)
        c.add_argument("--control-url", help="control API base URL (default: from data dir/config)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(fn=fn)

    c = sub.add_parser("config", help="print the effective configuration")
    _config_args(c)
    c.add_argument("--list", action="store_true", help="list every key with type, default and env name")
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        print(f"meshnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return args.fn(cfg, args)
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
