"""Live progress and the summary table of a scenario run, with ``rich``.

On a terminal: coloured progress lines and a table; otherwise (a pipe, a CI log) the same as
plain lines. ``--json`` prints only the report on stdout (progress still goes to stderr).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

IDENTITY = {"bitwise": "identical", "tokens": "same tokens, bits differ", "differs": "different tokens",
            True: "identical", False: "DIFFERENT"}


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


class Progress:
    def __init__(self, console: Console) -> None:
        self.c = console

    def __call__(self, ev: dict[str, Any]) -> None:
        kind, node = ev.get("event"), ev.get("_node", "")
        c = self.c
        if kind == "model":
            c.print(f"[dim]{node}[/] model loaded (compat key {ev['compat_key'][:12]}…)")
        elif kind == "ready":
            c.print(f"[dim]{node}[/] ready: {', '.join(ev['agents']) or 'no agents'}")
        elif kind == "read":
            c.print(f"[bold]{ev['agent']}[/] read {ev['prefilled']} tokens "
                    f"(context {ev['tokens']}) in {ev['prefill_s']:.2f} s")
        elif kind == "handoff":
            if "error" in ev:
                c.print(f"[red]{ev['from']} → {ev['to']}: {ev['error']}[/]")
            else:
                start = f", from token {ev['base_tokens']}" if ev.get("base_tokens") else ""
                fb = f" [yellow](fallback: {ev['fallback'][:80]})[/]" if ev.get("fallback") else ""
                c.print(f"{ev['from']} → [bold]{ev['to']}[/]: {_mb(ev['bytes'])} of KV over "
                        f"[cyan]{ev['path']}[/] in {ev['transfer_s']:.2f} s{start}, "
                        f"{ev['outcome']}{fb}")
        elif kind == "continued":
            text = (ev.get("text") or "").replace("\n", " ")[:70]
            c.print(f"[bold]{ev['agent']}[/] generated {len(ev['tokens'])} tokens, first after "
                    f"{ev['first_token_s']:.2f} s: [green]{text}[/]")
        elif kind == "turn":
            c.print(f"[bold]{ev['agent']}[/] turn {ev['turn']}: {len(ev['tokens'])} tokens")
        elif kind == "refused":
            c.print(f"[yellow]{ev['agent']} refused a handoff: {ev['reason']}[/]")
        elif kind == "poisoned":
            c.print(f"[yellow]{ev['agent']}: held prefix spoiled (bits changed) for the test[/]")
        elif kind == "baseline":
            c.print(f"[dim]{ev['agent']} {ev['label']}: first token after {ev['first_token_s']:.2f} s "
                    f"({ev['prefilled']} tokens prefilled)[/]")
        elif kind in ("agent_failed", "error"):
            c.print(f"[red]{ev.get('agent') or node}: {ev['error']}[/]")
        elif kind == "exited" and ev.get("code"):
            c.print(f"[red]node {node} exited with code {ev['code']}[/]")


def table(report: dict[str, Any]) -> Table:
    t = Table(title=f"{report['scenario']} ({report['pattern']}, {report['model']}, "
                    f"{report['context_tokens']} tokens of context)")
    for col in ("agent", "rnd", "variant", "1st token s", "total s", "wire",
                "prefilled", "CPU-s", "vs reference"):
        t.add_column(col, justify="right" if col not in ("agent", "variant", "vs reference") else "left",
                     no_wrap=True)
    for r in report["rows"]:
        t.add_row(r["agent"], str(r["round"]), r["variant"] + (f" ({r['path']})" if r.get("path") else ""),
                  _s(r["ttft_s"]), _s(r["total_s"]), _mb(r["wire_bytes"]), str(r["prefilled"]),
                  _s(r["cpu_s"]), IDENTITY[r["identical"]])
    return t


def totals(report: dict[str, Any]) -> Table:
    t = Table(title="all nodes together (the reader's own prefill and CPU included)")
    for col in ("variant", "tokens prefilled", "CPU-s", "on the wire"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v, tot in report["totals"].items():
        t.add_row(v, str(tot["prefilled_total"]), _s(tot["cpu_s_total"]), _mb(tot["wire_bytes_total"]))
    return t


def render(console: Console, report: dict[str, Any]) -> None:
    if report.get("error"):
        console.print(f"[red]{report['error']}[/]")
        return
    for key, text in report.get("texts", {}).items():
        if text:
            console.print(f"[bold]{key}[/]: {text.strip()}")
    console.print(table(report))
    console.print(totals(report))
    for agent, why in report.get("failed", {}).items():
        console.print(f"[red]{agent}: {why}[/]")
