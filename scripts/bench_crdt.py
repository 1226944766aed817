#!/usr/bin/env python3
"""Benchmark CRDT session sync: time to converge after a partition heals, and bytes exchanged.

For each (nodes, entries) pair: start N in-process py-libp2p hosts (Noise, loopback TCP) with a
CrdtService each, create one session with all of them, split them into two halves, log ``entries``
tensor messages (half on each side, round-robin over the side's nodes), then heal and time until
every replica holds every entry with identical state. Bytes are CRDT protocol frames sent during
the heal (Noise/yamux overhead excluded). All nodes share one process and one trio loop, so on a
small machine the figures are CPU-bound: treat them as an upper bound for a real deployment.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crdt_state.limits import CrdtLimits  # noqa: E402
from crdt_state.service import CrdtService  # noqa: E402
from crdt_state.testing import start_services  # noqa: E402


def _converged(services: list[CrdtService], sid: str, entries: int) -> bool:
    if not all(sid in s.engine.replicas for s in services):
        return False
    reps = [s.engine.replicas[sid] for s in services]
    return (all(r.doc.message_count() == entries for r in reps)
            and all(r.vv() == reps[0].vv() for r in reps))


async def _wait(pred, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def run_case(nodes: int, entries: int, interval: float, timeout: float) -> dict:
    limits = CrdtLimits(anti_entropy_interval_s=interval, request_timeout_s=5.0)
    async with AsyncExitStack() as stack:
        hosts, services = await start_services(stack, nodes, limits)
        sid = f"bench-{nodes}-{entries}"
        services[0].create_session(sid, "compat", [s.peer_id for s in services])
        await _wait(lambda: _converged(services, sid, 0), timeout)

        half = nodes // 2
        left, right = services[:half], services[half:]
        for a in left:
            for b in right:
                await a.block(b.peer_id)
                await b.block(a.peer_id)
        t_fill = time.perf_counter()
        for i in range(entries):
            group = left if i % 2 == 0 else right
            svc = group[(i // 2) % len(group)]
            svc.log_message(sid, kind="KV_CACHE", receiver=services[(i + 1) % nodes].peer_id,
                            layers=(0, 29), tokens=(i, i + 16), nbytes=1 << 20,
                            checksums=[f"{i:064x}"], path="stream",
                            timings={"capture_ms": 1.0, "send_ms": 2.0})
            if i % 50 == 49:
                await trio.sleep(0)  # let pushes drain as a real node would
        n_left = (entries + 1) // 2
        await _wait(lambda: _converged(left, sid, n_left) and
                    _converged(right, sid, entries - n_left), timeout)
        fill_s = time.perf_counter() - t_fill

        sent0 = sum(s.stats.bytes_sent for s in services)
        t0 = time.perf_counter()
        for a in left:
            for b in right:
                a.unblock(b.peer_id)
                b.unblock(a.peer_id)
        await _wait(lambda: _converged(services, sid, entries), timeout)
        heal_s = time.perf_counter() - t0
        sent = sum(s.stats.bytes_sent for s in services) - sent0
        snaps = [s.get(sid) for s in services]
        assert all(x == snaps[0] for x in snaps), "replicas differ after convergence"
        doc_bytes = services[0].engine.replicas[sid].nbytes
        return {"nodes": nodes, "entries": entries, "converge_s": round(heal_s, 3),
                "heal_bytes": sent, "heal_bytes_per_entry_per_node": round(sent / entries / nodes, 1),
                "doc_update_bytes": doc_bytes, "fill_s": round(fill_s, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="3,10", help="comma-separated node counts (default 3,10)")
    ap.add_argument("--entries", default="1000,10000",
                    help="comma-separated log entry counts (default 1000,10000)")
    ap.add_argument("--interval", type=float, default=0.1,
                    help="crdt.anti_entropy_interval_s for the run (default 0.1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-phase timeout, seconds")
    ap.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # py-libp2p logs routine events at ERROR
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        for e in (int(x) for x in args.entries.split(",")):
            row = trio.run(run_case, n, e, args.interval, args.timeout)
            rows.append(row)
            print(f"  done nodes={n} entries={e}: {row['converge_s']} s", file=sys.stderr)
    hdr = f"{'nodes':>5} {'entries':>7} {'converge_s':>10} {'heal_MB':>8} {'B/entry/node':>12} " \
          f"{'doc_MB':>7} {'fill_s':>7}"
    print(hdr)
    for r in rows:
        print(f"{r['nodes']:>5} {r['entries']:>7} {r['converge_s']:>10.3f} "
              f"{r['heal_bytes'] / 1e6:>8.2f} {r['heal_bytes_per_entry_per_node']:>12.1f} "
              f"{r['doc_update_bytes'] / 1e6:>7.2f} {r['fill_s']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"anti_entropy_interval_s": args.interval,
                                               "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
