#!/usr/bin/env python3
"""`make demo`: start a local mesh of node processes on 127.0.0.1 and show it converge.

(The KV-cache handoff is added to this demo once the runtime and tensor service are composed into
the node; until then it demonstrates the mesh, the control API and clean shutdown.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.nodeproc import NodeProc, wait_until  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=3, help="mesh size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="latentlink-demo-") as d:
        print(f"starting {args.nodes} nodes under {d} ...")
        first = NodeProc(Path(d) / "n0")
        nodes = [first] + [NodeProc(Path(d) / f"n{i}", bootstrap=[first.addr]) for i in range(1, args.nodes)]
        try:
            for n in nodes:
                print(f"  node {n.peer_id}  {n.addr}")
            t = time.time()
            ids = {n.peer_id for n in nodes}
            wait_until(lambda: all({p["peer_id"] for p in n.get("/peers")} >= ids - {n.peer_id}
                                   for n in nodes), 30, 0.1, "mesh")
            print(f"mesh formed in {time.time() - t:.2f}s: every node sees {args.nodes - 1} peers")
        finally:
            codes = [n.terminate() for n in nodes]
        print("nodes stopped cleanly" if codes == [0] * len(nodes) else f"exit codes {codes}")
        return 0 if codes == [0] * len(nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
