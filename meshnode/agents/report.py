"""What a scenario run measured, side by side: the KV handoff and the two text baselines.

Per receiver and handoff, three rows: ``kv`` (the state handed over), ``text naive`` (the receiver
is sent the text and prefills all of it) and ``text honest`` (it reuses its own prefix cache and
prefills only what is new to it). Columns: time to first token at the receiver (kv: the sender's
transfer until acknowledged + the receiver applying the state and computing its first new token;
text: the receiver's prefill and first token, the text's transfer being negligible), total time,
bytes on the wire, tokens prefilled and CPU-seconds on the receiving node, and whether the
continuation is identical to the reference — the sender continuing itself. The text rows' identity
is reported, not required: a prefill-shaped computation may differ bit for bit from a
decode-built cache (DESIGN.md §12). Totals add the reader's (or driver's) own prefill and CPU.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from meshnode.agents.scenario import Scenario

VARIANTS = ("kv", "text naive", "text honest")


def _of(events: list[dict], kind: str, **match: Any) -> list[dict]:
    return [e for e in events if e.get("event") == kind and all(e.get(k) == v for k, v in match.items())]


def _first(events: list[dict], kind: str, **match: Any) -> dict | None:
    got = _of(events, kind, **match)
    return got[0] if got else None


# -- which text baselines to time -----------------------------------------------------------------
def baseline_jobs(sc: Scenario, events: list[dict], failed: dict[str, str]) -> list[dict]:
    jobs = []
    if sc.pattern == "relay":
        driver = next(a for a in sc.agents if a.role == "driver")
        partner = next(a for a in sc.agents if a.role == "partner")
        read = _first(events, "read", agent=driver.name)
        turns = {e["turn"]: e["tokens"] for e in _of(events, "turn")}
        if read is None:
            return []
        prompt = read["context_ids"]
        for t in sorted(turns):
            if t == 0 or any(u not in turns for u in range(t)):
                continue
            who = partner if t % 2 else driver
            ids = prompt + [x for u in range(t) for x in turns[u]]
            cached = len(prompt + [x for u in range(t - 1) for x in turns[u]]) - 1 if t >= 2 else 0
            for label, c in (("text naive", 0), ("text honest", cached)):
                jobs.append({"agent": who.name, "label": label, "round": t, "ids": ids,
                             "cached": c, "sent": [c, len(ids)]})
        return jobs
    reads = {e["round"]: e for e in _of(events, "read")}
    for cont in _of(events, "continued"):
        r, read = cont["round"], reads.get(cont["round"])
        if read is None:
            continue
        ctx = read["context_ids"]
        system = read["system_tokens"] if sc.warm_system else 0
        held = len(reads[r - 1]["context_ids"]) if r > 0 and (r - 1) in reads else system
        ids = ctx + cont["instruction_ids"]
        for label, c in (("text naive", 0), ("text honest", held)):
            jobs.append({"agent": cont["agent"], "label": label, "round": r, "ids": ids,
                         "cached": c, "sent": [c, len(ctx)]})
    return jobs


# -- the rows ----------------------------------------------------------------------------------------
def _same(a: dict | None, b: dict | None) -> bool:
    """The KV rule: the same tokens from bitwise-equal logits."""
    return bool(a and b) and a["tokens"] == b["tokens"] and a.get("logits_blake3") == b.get("logits_blake3")


def _text_identity(a: dict, b: dict | None) -> str:
    """Text rows: ``bitwise`` / ``tokens`` (same tokens, other bits) / ``differs``."""
    if not b:
        return "differs"
    n = len(b["tokens"])
    if a["tokens"][:n] != b["tokens"]:
        return "differs"
    return "bitwise" if len(a["tokens"]) == n and a.get("logits_blake3") == b.get("logits_blake3") \
        else "tokens"


def build(sc: Scenario, events: list[dict], baselines: list[dict], failed: dict[str, str]) -> dict:
    rows: list[dict] = []
    if sc.pattern == "relay":
        ref = _first(events, "reference")
        segs = {s["turn"]: s for s in (ref or {}).get("segments", [])}
        for turn in _of(events, "turn"):
            t = turn["turn"]
            if t == 0:
                continue
            hand = _first(events, "handoff", turn=t) or {}
            rows.append(_kv_row(turn["agent"], t, hand, turn, _same(turn, segs.get(t))))
            for b in _of(baselines, "baseline", agent=turn["agent"], round=t):
                rows.append(_text_row(b, _text_identity(b, segs.get(t))))
    else:
        for cont in _of(events, "continued"):
            a, r = cont["agent"], cont["round"]
            hand = _first(events, "handoff", to=a, round=r) or {}
            ref = _first(events, "reference", round=r, **{"for": a})
            rows.append(_kv_row(a, r, hand, cont, _same(cont, ref)))
            for b in _of(baselines, "baseline", agent=a, round=r):
                rows.append(_text_row(b, _text_identity(b, ref)))
    lead = [e for e in _of(events, "read")]
    lead_prefill = sum(e["prefilled"] for e in lead)
    lead_cpu = sum(e["cpu_s"] for e in lead) + sum(e.get("send_cpu_s", 0) for e in _of(events, "handoff"))
    totals = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        totals[v] = {"prefilled_total": lead_prefill + sum(r["prefilled"] for r in mine),
                     "cpu_s_total": (lead_cpu if v == "kv" else sum(e["cpu_s"] for e in lead))
                     + sum(r["cpu_s"] for r in mine),
                     "wire_bytes_total": sum(r["wire_bytes"] for r in mine)}
    return {"scenario": sc.name, "pattern": sc.pattern, "model": sc.model,
            "context_tokens": max((e["tokens"] for e in lead), default=0),
            "lead_prefilled": lead_prefill, "lead_cpu_s": lead_cpu, "rows": rows, "totals": totals,
            "failed": dict(failed), "texts": {e["agent"] + f"#{e['round']}": e.get("text")
                                              for e in _of(events, "continued")},
            "events": [e for e in events if e.get("event") not in ("read",)]}


def _kv_row(agent: str, r: int, hand: dict, got: dict, identical: bool) -> dict:
    sent = hand.get("sent_s", 0.0)
    first = got.get("first_token_s")
    return {"agent": agent, "round": r, "variant": "kv",
            "ttft_s": None if first is None else sent + first, "total_s": sent + got["total_s"],
            "wire_bytes": hand.get("bytes", 0), "prefilled": got.get("prefilled", 0),
            "cpu_s": got["cpu_s"], "identical": identical, "path": hand.get("path"),
            "base_tokens": hand.get("base_tokens"), "error": hand.get("error")}


def _text_row(b: dict, identical: str) -> dict:
    return {"agent": b["agent"], "round": b["round"], "variant": b["label"],
            "ttft_s": b["first_token_s"], "total_s": b["total_s"], "wire_bytes": b["wire_bytes"],
            "prefilled": b["prefilled"], "cpu_s": b["cpu_s"], "identical": identical}


def crdt_logs(root: Path, procs: dict) -> dict:
    """Each node's view of the replicated session logs: per session, its messages and outcomes."""
    out = {}
    for node in procs:
        try:
            port = json.loads((root / node / "control.json").read_text())["port"]
            url = f"http://127.0.0.1:{port}/sessions"
            with urllib.request.urlopen(url, timeout=5) as r:
                sessions = json.loads(r.read())
            docs = {}
            for s in sessions:
                with urllib.request.urlopen(f"{url}/{s['session_id']}", timeout=5) as r:
                    docs[s["session_id"]] = json.loads(r.read())
            out[node] = docs
        except (OSError, ValueError, KeyError) as exc:  # reported, not fatal: the run is done
            out[node] = {"error": str(exc)}
    return out
