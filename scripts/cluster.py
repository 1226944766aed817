#!/usr/bin/env python3
"""Run several mesh nodes in one process (for tests and the discovery benchmark).

Prints one JSON line per node (peer_id, addr, control_url, data_dir) once all are up, then runs until
SIGINT/SIGTERM. Node i bootstraps to one random address among ``--bootstrap`` and the nodes started
before it in this process (a random sparse topology), and advertises ``--models[i % len]``, a
test signature index (see tests/helpers/sigs.py) — no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from meshnode.config import load_config  # noqa: E402
from meshnode.logs import setup_logging  # noqa: E402
from meshnode.node import Node  # noqa: E402
from tests.helpers.sigs import fake_signature  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    pool = list(args.bootstrap)
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        for i in range(args.nodes):
            boot = [rng.choice(pool)] if pool else []
            ov = [f"node.data_dir={args.data_dir}/n{i}", "host.listen_addrs=/ip4/127.0.0.1/tcp/0",
                  "control.port=0", f"control.enabled={'true' if args.control else 'false'}",
                  "host.bootstrap=" + ",".join(boot), *args.set]
            node = Node(load_config(args.config, overrides=ov))
            await nursery.start(node.run)
            nodes.append(node)
            pool.append(str(node.addrs[0]))
        advertised_at = time.time()  # wall clock, for the time-to-advertise benchmark
        for i, node in enumerate(nodes):
            if args.models:
                nursery.start_soon(node.advertise, fake_signature(args.models[i % len(args.models)]))
        for i, node in enumerate(nodes):
            print(json.dumps({"peer_id": str(node.peer_id), "addr": str(node.addrs[0]),
                              "control_url": f"http://127.0.0.1:{node.control_port}",
                              "model": args.models[i % len(args.models)] if args.models else None,
                              "advertised_at": advertised_at if args.models else None}),
                  flush=True)
        print("READY", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for _ in sigs:
                break
        for node in nodes:
            node.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--bootstrap", action="append", default=[], help="multiaddr(s) of existing nodes")
    ap.add_argument("--models", type=int, nargs="*", default=[], help="signature indices to serve, round robin")
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", action="append", default=[], help="section.key=value for every node")
    ap.add_argument("--control", action="store_true", help="give every node a control API")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-level", default="error")
    a = ap.parse_args()
    setup_logging(a.log_level)
    trio.run(main, a)
