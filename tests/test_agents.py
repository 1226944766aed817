"""Multi-agent scenarios end to end: real node processes (one per scenario node) on 127.0.0.1 that
find each other through the DHT, a tiny seeded model, ``meshnode agents run --json``. Each pattern
runs and is identical to its reference; every handoff is in the CRDT log of both its ends; the warm
worker is sent only what it lacks (bytes asserted) and a spoiled prefix gets the full state; a
mismatched model fails at once naming the fields; an agent on an unknown node fails alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from meshnode.runtime.loader import TinySpec, load_model
from tests.helpers.nodeproc import ROOT, clean_env, meshnode_cmd
from tests.helpers.runtime_models import TINY_MODELS

SYSTEM = [1, 5, 6, 7, 8, 9]
DOC = list(range(10, 91))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str, Path]:
    cache = tmp_path_factory.mktemp("agents-cache")
    s = TINY_MODELS["llama"]
    a = load_model(TinySpec(s["type"], s["config"], seed=0), cache_dir=cache)
    b = load_model(TinySpec(s["type"], s["config"], seed=1), cache_dir=cache)
    return str(a.source), str(b.source), cache


def _kv_bytes_per_token() -> int:
    c = TINY_MODELS["llama"]["config"]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * 4


LOGITS_BYTES = TINY_MODELS["llama"]["config"]["vocab_size"] * 4


def _write(tmp_path: Path, name: str, head: str, nodes: int | dict[str, str | None],
           agents: list[dict]) -> Path:
    """A scenario file: its top-level keys, its nodes (a count: n0.., or name -> own model or
    None), its agents."""
    spec = {f"n{i}": None for i in range(nodes)} if isinstance(nodes, int) else nodes
    lines = [f'name = "{name}"', head.strip()]
    for n, m in spec.items():
        lines += [f"[nodes.{n}]"] + ([f"model = {json.dumps(m)}"] if m else [])
    for a in agents:
        lines.append("[[agents]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in a.items()]
    p = tmp_path / f"{name}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _agent(name: str, node: str, role: str, **kw) -> dict:
    return {"name": name, "node": node, "role": role, **kw}


def _run(scenario: Path, cache: Path, expect: int = 0) -> tuple[dict, str]:
    proc = subprocess.run([*meshnode_cmd(), "agents", "run", str(scenario), "--json",
                           "--set", f"runtime.cache_dir={cache}"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=clean_env())
    assert proc.returncode == expect, proc.stderr[-4000:]
    return (json.loads(proc.stdout) if proc.stdout.strip() else {}), proc.stderr


def _peer_ids(report: dict) -> dict[str, str]:
    return {e["_node"]: e["peer_id"] for e in report["events"] if e.get("event") == "started"}


def _check_crdt(report: dict) -> int:
    """Every handoff is in the session log of both its ends, with the receiver's "applied"."""
    nodes = {e["agent"]: e["_node"] for e in report["events"] if e.get("event") == "agent_done"}
    peer = _peer_ids(report)
    handoffs = [e for e in report["events"] if e.get("event") == "handoff"]
    assert handoffs
    for h in handoffs:
        for end in (nodes[h["from"]], nodes[h["to"]]):
            doc = report["crdt"][end][h["session"]]
            got = [m for m in doc["messages"] if m["sender"] == peer[nodes[h["from"]]]
                   and m["receiver"] == peer[nodes[h["to"]]] and m["nbytes"] == h["bytes"]]
            assert got and got[-1]["outcome"]["status"] == "applied"
            assert got[-1]["outcome"]["by"] == peer[nodes[h["to"]]]
    return len(handoffs)


def test_read_once_continue_many(tmp_path, models):
    model, _, cache = models
    sc = _write(tmp_path, "fanout", f"""
pattern = "fanout"
model = "{model}"
tokens = 8
block_tokens = 4
timeout_s = 120
system_ids = {SYSTEM}
warm_system = true
document_ids = {DOC}
""", 3, [_agent("reader", "n0", "reader"), _agent("w1", "n1", "worker", instruction_ids=[100, 101, 102]),
         _agent("w2", "n2", "worker", instruction_ids=[110, 111, 112, 113])])
    report, _ = _run(sc, cache)
    kv = [r for r in report["rows"] if r["variant"] == "kv"]
    assert sorted(r["agent"] for r in kv) == ["w1", "w2"] and all(r["identical"] for r in kv)
    assert {r["variant"] for r in report["rows"]} == {"kv", "text naive", "text honest"}
    fan = next(e for e in report["events"] if e.get("event") == "fanout")
    assert (fan["targets"], fan["captures"]) == (2, 1)  # one capture for both workers
    # the workers held the system prompt: only what follows its last whole block travels
    start = len(SYSTEM) // 4 * 4
    for h in (e for e in report["events"] if e.get("event") == "handoff"):
        assert h["base_tokens"] == start
        assert h["bytes"] == (len(SYSTEM) + len(DOC) - start) * _kv_bytes_per_token() + LOGITS_BYTES
    assert _check_crdt(report) == 2


def test_relay_of_thought(tmp_path, models):
    model, _, cache = models
    sc = _write(tmp_path, "relay", f"""
pattern = "relay"
model = "{model}"
tokens = 5
rounds = 2
block_tokens = 4
timeout_s = 120
prompt_ids = {DOC[:21]}
""", 2, [_agent("driver", "n0", "driver"), _agent("partner", "n1", "partner")])
    report, _ = _run(sc, cache)
    kv = [r for r in report["rows"] if r["variant"] == "kv"]
    assert [r["round"] for r in kv] == [1, 2, 3] and all(r["identical"] for r in kv)
    ref = next(e for e in report["events"] if e.get("event") == "reference")
    assert ref["final_pending"] == ref["reference_pending"]
    hands = [e for e in report["events"] if e.get("event") == "handoff"]
    assert [(h["from"], h["to"]) for h in hands] == [("driver", "partner"), ("partner", "driver")] * 2
    assert hands[0]["base_tokens"] == 0 and all(h["base_tokens"] > 0 for h in hands[1:])  # deltas
    assert all(h["bytes"] < hands[0]["bytes"] for h in hands[1:])
    assert _check_crdt(report) == 4


def test_warm_worker_gets_only_the_suffix_and_a_spoiled_prefix_the_full_state(tmp_path, models):
    model, _, cache = models
    part1, part2 = DOC[:51], DOC[51:]
    sc = _write(tmp_path, "warm", f"""
pattern = "warm"
model = "{model}"
tokens = 6
block_tokens = 4
timeout_s = 120
document_parts = [{part1}, {part2}]
""", 3, [_agent("reader", "n0", "reader"),
         _agent("keeper", "n1", "worker", instructions=[[100, 101], [102, 103, 104]]),
         _agent("spoiled", "n2", "worker", instructions=[[100, 101], [102, 103, 104]], poison=True)])
    report, _ = _run(sc, cache)
    assert all(r["identical"] for r in report["rows"] if r["variant"] == "kv")
    hands = {(e["to"], e["round"]): e for e in report["events"] if e.get("event") == "handoff"}
    n, per = len(part1) + len(part2), _kv_bytes_per_token()
    held = len(part1) // 4 * 4
    assert hands[("keeper", 1)]["base_tokens"] == held
    assert hands[("keeper", 1)]["bytes"] == (n - held) * per + LOGITS_BYTES  # only the suffix
    # same tokens, other bits: its chain differs from the first block on, so it gets everything
    assert any(e.get("event") == "poisoned" for e in report["events"])
    assert hands[("spoiled", 1)]["base_tokens"] == 0
    assert hands[("spoiled", 1)]["bytes"] == n * per + LOGITS_BYTES
    assert _check_crdt(report) == 4


def test_a_node_with_another_model_fails_at_once_naming_the_fields(tmp_path, models):
    model, other, cache = models
    sc = _write(tmp_path, "mismatch", f"""
pattern = "fanout"
model = "{model}"
document_ids = {DOC}
""", {"n0": None, "n1": other}, [_agent("reader", "n0", "reader"),
                                 _agent("w1", "n1", "worker", instruction_ids=[100])])
    report, stderr = _run(sc, cache, expect=2)
    assert "w1 on node n1 run a different model" in report["error"]
    assert "mismatched signature fields: weights_digest" in report["error"]
    assert "mismatched signature fields" in stderr


def test_an_agent_on_an_unknown_node_fails_alone(tmp_path, models):
    model, _, cache = models
    sc = _write(tmp_path, "unknown", f"""
pattern = "fanout"
model = "{model}"
tokens = 4
timeout_s = 60
document_ids = {DOC}
""", 2, [_agent("reader", "n0", "reader"), _agent("w1", "n1", "worker", instruction_ids=[100]),
         _agent("lost", "n9", "worker", instruction_ids=[100])])
    report, _ = _run(sc, cache, expect=1)
    assert report["failed"]["lost"].startswith("unknown node 'n9'")
    kv = [r for r in report["rows"] if r["variant"] == "kv"]
    assert [(r["agent"], r["identical"]) for r in kv] == [("w1", True)]
