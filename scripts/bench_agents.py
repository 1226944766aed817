#!/usr/bin/env python3
"""Break-even sweep: when does handing the KV cache over beat sending the text?

For each document length L (tokens) and worker count N, a *read once, continue many* run
(``meshnode agents run``'s machinery: N+1 node processes on 127.0.0.1, the DHT, a real model):
the reader prefills L tokens of the shipped document and hands its KV cache to N workers at once;
each worker appends a short question and answers it; each worker then times the naive text
baseline (prefill all L tokens) and the honest one (reuse its own cache of the shared system
prompt, prefill the rest) on the same ids. Printed and written (JSON, and a PNG with ``--png``):
time to first token at the workers (mean over workers) per variant, bytes on the wire, tokens
prefilled in total, and the break-even length per N — the smallest L from which the KV handoff's
first token comes sooner than each baseline's.

    .venv/bin/python scripts/bench_agents.py --json bench-results/agents.json --png bench-results/agents.png
    .venv/bin/python scripts/bench_agents.py --lengths 64,512,2048 --workers 1,2 --model smollm2

The naive column is the ceiling measured in the same run: the receiver's bare prefill of the L
tokens (plus its question and first decode step) — the work a KV handoff replaces by its
transfer and inject.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshnode.agents import runner  # noqa: E402
from meshnode.agents.scenario import load  # noqa: E402

DOC = ROOT / "configs" / "scenarios" / "texts" / "lighthouse.md"
SYSTEM = "You read the document below and answer the question that follows it, briefly.\n\n"
QUESTIONS = ["What is the character of a light?", "Why is the lens kept clean?",
             "What did keepers do at sunset?", "Why do lighthouses still matter?"]


def document_ids(model: str, cache: Path, n: int) -> list[int]:
    """``n`` token ids of the shipped document (repeated if it is shorter)."""
    from meshnode.runtime.loader import load_model
    lm = load_model(model, cache_dir=cache)
    ids = lm.tokenizer.encode(DOC.read_text(), add_special_tokens=False)
    out = []
    while len(out) < n:
        out += ids
    return out[:n]


def scenario(path: Path, model: str, doc: list[int], workers: int, tokens: int) -> Path:
    lines = [f'name = "sweep-{len(doc)}-{workers}"', 'pattern = "fanout"', f'model = "{model}"',
             f"tokens = {tokens}", "block_tokens = 16", "timeout_s = 900", "warm_system = true",
             f"system = {json.dumps(SYSTEM)}", f"document_ids = {doc}",
             *(f"[nodes.n{i}]" for i in range(workers + 1)),
             '[[agents]]', 'name = "reader"', 'node = "n0"', 'role = "reader"']
    for i in range(workers):
        q = json.dumps(f"\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:")
        lines += ['[[agents]]', f'name = "w{i + 1}"', f'node = "n{i + 1}"', 'role = "worker"',
                  f"instruction = {q}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def summarize(report: dict) -> dict:
    out = {}
    for v in ("kv", "text naive", "text honest"):
        rows = [r for r in report["rows"] if r["variant"] == v and r["ttft_s"] is not None]
        if rows:
            out[v] = {"ttft_s": sum(r["ttft_s"] for r in rows) / len(rows),
                      "wire_bytes": sum(r["wire_bytes"] for r in rows),
                      "prefilled_total": report["totals"][v]["prefilled_total"],
                      "cpu_s_total": report["totals"][v]["cpu_s_total"],
                      "identical": all(r["identical"] in (True, "bitwise") for r in rows)}
    return out


def break_even(points: list[dict], workers: int, baseline: str) -> int | None:
    mine = sorted((p for p in points if p["workers"] == workers and baseline in p["variants"]
                   and "kv" in p["variants"]), key=lambda p: p["tokens"])
    for i, p in enumerate(mine):
        if all(q["variants"]["kv"]["ttft_s"] < q["variants"][baseline]["ttft_s"] for q in mine[i:]):
            return p["tokens"]
    return None


def plot(points: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"kv": "-o", "text naive": "--s", "text honest": ":^"}
    for n in sorted({p["workers"] for p in points}):
        for v, style in styles.items():
            xs = [p["tokens"] for p in points if p["workers"] == n and v in p["variants"]]
            ys = [p["variants"][v]["ttft_s"] for p in points if p["workers"] == n and v in p["variants"]]
            if xs:
                ax.plot(xs, ys, style, label=f"{v}, N={n}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("shared context (tokens)")
    ax.set_ylabel("worker's time to first token (s)")
    ax.set_title("KV handoff vs text: time to first token at the workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="64,128,256,512,1024,2048,4096", help="document tokens")
    p.add_argument("--workers", default="1,2,3,4", help="workers per run")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=16, help="tokens each worker generates")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "LATENTLINK_CACHE_DIR", Path.home() / ".cache" / "latentlink")) / "models")
    p.add_argument("--json", help="write every point here")
    p.add_argument("--png", help="plot time to first token against context length here")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.workers.split(",")]
    ids = document_ids(args.model, args.cache, max(lengths))
    points = []
    print(f"{'tokens':>7} {'N':>2} | {'kv s':>7} {'naive s':>8} {'honest s':>9} | kv MB | "
          f"prefilled kv/naive/honest | identical", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-agents-") as tmp:
        for n in counts:
            for length in lengths:
                sc = load(scenario(Path(tmp) / f"s-{length}-{n}.toml", args.model, ids[:length],
                                   n, args.tokens))
                t0 = time.monotonic()
                code, report = runner.run(sc, lambda ev: None,
                                          extra_sets=[f"runtime.cache_dir={args.cache}"])
                point = {"tokens": length, "workers": n, "code": code, "wall_s": time.monotonic() - t0,
                         "variants": summarize(report) if "rows" in report else {},
                         "error": report.get("error") or report.get("failed") or None}
                points.append(point)
                v = point["variants"]
                f = {k: f"{x['ttft_s']:.3f}" for k, x in v.items()}
                print(f"{length:>7} {n:>2} | {f.get('kv', '-'):>7} {f.get('text naive', '-'):>8} "
                      f"{f.get('text honest', '-'):>9} | {v.get('kv', {}).get('wire_bytes', 0) / 1e6:5.1f} | "
                      f"{'/'.join(str(x.get('prefilled_total', '-')) for x in v.values())} | "
                      f"{v.get('kv', {}).get('identical')}{'  ' + str(point['error'])[:80] if point['error'] else ''}",
                      flush=True)
    even = {n: {b: break_even(points, n, b) for b in ("text naive", "text honest")} for n in counts}
    for n, b in even.items():
        print(f"break-even N={n}: KV first token sooner than naive text from {b['text naive']} tokens, "
              f"than honest text from {b['text honest']} tokens")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"points": points, "break_even": even, "args": vars(args)},
                                              indent=1, default=str))
    if args.png:
        plot(points, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
