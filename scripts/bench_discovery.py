#!/usr/bin/env python3
"""Discovery benchmark: lookup latency and time to advertise, on a loopback mesh of N nodes.

For each size, N nodes run in ``scripts/cluster.py`` processes (10 or 20 per process) on the same
sparse random bootstrap topology as tests/test_discovery.py, with peer exchange off so the DHT does
all the routing, serving 3 models round robin. Once every sampled node finds exactly the providers
of its model ("settled"), we measure:

- **cold lookup**: ``find_compatible`` on a node that has not probed the providers in the last
  ``PROBE_CACHE_S`` — iterative GET_PROVIDERS plus one record fetch (probe) per provider;
- **warm lookup**: the same node again at once (probe results reused while connected);
- **time to advertise**: a new single-node process advertises a model nobody else serves; the time
  from its ``advertise`` call to the first lookup by another node that returns it.

Latency is the control API round trip (``GET /find/<key>``), so it includes ~1 ms of HTTP.
Lookups run one at a time: this measures latency, not throughput. Figures from a 2-vCPU machine
running every node are an upper bound on what one node per host would see.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discovery.dht import PROBE_CACHE_S  # noqa: E402
from tests.helpers.cluster import ClusterProc  # noqa: E402
from tests.helpers.sigs import fake_signature  # noqa: E402

MODELS = [0, 1, 2]
SETS = ["dht.refresh_interval_s=60", "dht.probe_timeout_s=3", "host.max_peer_exchange=0",
        "host.peer_exchange_interval_s=60"]


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no samples."""
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def find(node: dict, key: str) -> tuple[set[str], float]:
    t = time.perf_counter()
    got = {p["peer_id"] for p in ClusterProc.get(node, f"/find/{key}", timeout=60)}
    return got, (time.perf_counter() - t) * 1e3


def start_mesh(root: Path, n: int, per_proc: int, seed: int) -> list[ClusterProc]:
    procs: list[ClusterProc] = []
    for k in range(math.ceil(n / per_proc)):
        seeds = [x["addr"] for p in procs for x in p.nodes][::3]
        size = min(per_proc, n - k * per_proc)
        procs.append(ClusterProc(root / f"p{k}", size, MODELS, bootstrap=seeds, sets=SETS, seed=seed + k))
    return procs


def bench_size(n: int, args: argparse.Namespace, root: Path) -> dict:
    per_proc = args.per_proc or (10 if n <= 30 else 20)
    rng = random.Random(args.seed)
    t0 = time.time()
    procs = start_mesh(root / f"n{n}", n, per_proc, args.seed)
    try:
        nodes = [x for p in procs for x in p.nodes]
        started_s = time.time() - t0
        keys = {m: fake_signature(m).compat_key for m in MODELS}
        want = {m: {x["peer_id"] for x in nodes if x["model"] == m} for m in MODELS}

        def exact(node: dict) -> bool:
            return find(node, keys[node["model"]])[0] == want[node["model"]] - {node["peer_id"]}

        # Settled: a sample of nodes each finds exactly its providers (and no others).
        sample = rng.sample(nodes, min(len(nodes), args.settle_sample))
        pending = list(sample)
        t_settle = time.time()
        while pending and time.time() - t_settle < args.settle_timeout:
            pending = [x for x in pending if not exact(x)]
            if pending:
                time.sleep(1.0)
        settled_s = time.time() - t_settle
        settled = not pending

        # Cold lookups: each node at most once per round, rounds PROBE_CACHE_S apart.
        time.sleep(PROBE_CACHE_S + 1)
        cold: list[float] = []
        warm: list[float] = []
        n_exact = n_total = 0
        order = rng.sample(nodes, len(nodes))
        while len(cold) < args.lookups:
            round_start = time.time()
            for x in order[: args.lookups - len(cold)]:
                key, expect = keys[x["model"]], want[x["model"]] - {x["peer_id"]}
                got, ms = find(x, key)
                cold.append(ms)
                got2, ms2 = find(x, key)
                warm.append(ms2)
                n_exact += (got == expect) + (got2 == expect)
                n_total += 2
            if len(cold) < args.lookups:
                time.sleep(max(0.0, PROBE_CACHE_S + 1 - (time.time() - round_start)))

        # Time to advertise: a new node serving a model nobody else serves.
        adv: list[float] = []
        for i in range(args.adverts):
            model = 100 + i
            key = fake_signature(model).compat_key
            boot = [rng.choice(nodes)["addr"]]
            newcomer = ClusterProc(root / f"n{n}-adv{i}", 1, [model], bootstrap=boot, sets=SETS, seed=1000 + i)
            try:
                target = newcomer.nodes[0]
                t_adv = target["advertised_at"]
                askers = rng.sample(nodes, 3)
                found_at = None
                j = 0
                while time.time() - t_adv < args.advert_timeout:
                    if target["peer_id"] in find(askers[j % 3], key)[0]:
                        found_at = time.time()
                        break
                    j += 1
                adv.append((found_at - t_adv) if found_at else math.nan)
            finally:
                newcomer.stop()
        codes = [p.stop() for p in procs]
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return {
        "nodes": n, "procs": len(procs), "started_s": round(started_s, 1), "settled": settled,
        "settle_s": round(settled_s, 1), "lookups": len(cold) + len(warm),
        "exact_ratio": round(n_exact / max(1, n_total), 3),
        "cold_ms": {"p50": pct(cold, 50), "p99": pct(cold, 99), "samples": [round(x, 1) for x in cold]},
        "warm_ms": {"p50": pct(warm, 50), "p99": pct(warm, 99), "samples": [round(x, 1) for x in warm]},
        "advertise_s": {"p50": pct([a for a in adv if a == a], 50), "max": max(adv, default=math.nan),
                        "samples": [round(a, 3) for a in adv]},
        "exit_codes": codes,
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'nodes':>5} {'procs':>5} {'settle_s':>8} {'exact':>6} {'cold p50':>9} {'cold p99':>9} "
            f"{'warm p50':>9} {'warm p99':>9} {'adv p50 s':>9} {'adv max s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        settle = f"{r['settle_s']:.0f}" + ("" if r["settled"] else "!")
        print(f"{r['nodes']:>5} {r['procs']:>5} {settle:>8} {r['exact_ratio']:>6.2f} "
              f"{r['cold_ms']['p50']:>7.0f}ms {r['cold_ms']['p99']:>7.0f}ms "
              f"{r['warm_ms']['p50']:>7.0f}ms {r['warm_ms']['p99']:>7.0f}ms "
              f"{r['advertise_s']['p50']:>9.2f} {r['advertise_s']['max']:>9.2f}")
    print("settle '!' = did not settle within --settle-timeout; exact = share of lookups that returned"
          " exactly the model's providers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 100], help="mesh sizes to run")
    ap.add_argument("--per-proc", type=int, default=0, help="nodes per process (default 10, or 20 above 30)")
    ap.add_argument("--lookups", type=int, default=30, help="cold lookups per size (as many warm ones)")
    ap.add_argument("--adverts", type=int, default=3, help="time-to-advertise samples per size")
    ap.add_argument("--settle-sample", type=int, default=10, help="nodes that must find exactly before measuring")
    ap.add_argument("--settle-timeout", type=float, default=240.0)
    ap.add_argument("--advert-timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write all figures and samples here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_discovery_"))
    rows = []
    try:
        for n in args.sizes:
            print(f"# {n} nodes ...", file=sys.stderr, flush=True)
            rows.append(bench_size(n, args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"sizes": rows, "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))


if __name__ == "__main__":
    main()
