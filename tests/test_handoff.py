"""KV handoff end to end THROUGH THE NODE: two ``meshnode handoff`` processes on 127.0.0.1.

Each process is a real node (libp2p, Noise, tensor session, CRDT log) that loads its model from
``[runtime].model`` itself. The sender prefills, hands over the KV of all prompt tokens plus its next
token (DESIGN.md §10), then continues itself with ``generate()``; the receiver injects and continues
32 greedy tokens. Pins invariant C across processes (same tokens, fp32 logits bitwise equal — compared
as BLAKE3 digests of the logits), a turn-2 KV_CACHE_DELTA equal to a full snapshot, and invariant A:
a receiver whose weights differ is refused at the handshake, naming ``weights_digest``, never fed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshnode.runtime.loader import TinySpec, load_model
from tests.helpers.handoff_peer import HandoffProc
from tests.helpers.nodeproc import wait_until
from tests.helpers.runtime_models import TINY_MODELS, TINY_PROMPT, TINY_TURN2

N = 32
IDS = ",".join


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model cache (SmolLM2 dequantized once); LATENTLINK_TEST_CACHE reuses one across runs."""
    env = os.environ.get("LATENTLINK_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("handoff-cache")


def tiny_dir(family: str, cache: Path, seed: int = 0) -> str:
    """A tiny seeded model saved as an HF dir, so both nodes run the real loading path."""
    spec = TINY_MODELS[family]
    return str(load_model(TinySpec(spec["type"], spec["config"], seed=seed), cache_dir=cache).source)


def check_turns(tx: HandoffProc, rx: HandoffProc, turn2: bool) -> None:
    refs = {e["turn"]: e for e in tx.of("reference")}
    applied = rx.of("applied")
    sent = tx.of("sent")
    assert [a["kind"] for a in applied] == [s["kind"] for s in sent] == (
        ["KV_CACHE", "KV_CACHE_DELTA", "KV_CACHE"] if turn2 else ["KV_CACHE"])
    for a, s in zip(applied, sent, strict=True):
        assert a["bytes"] == s["bytes"] > 0 and a["path"] == s["path"]
    first = applied[0]
    assert len(first["tokens"]) == N
    assert first["tokens"] == refs[1]["tokens"]  # same tokens as the sender continuing itself
    assert first["logits_blake3"] == refs[1]["logits_blake3"]  # fp32 logits bitwise equal
    if turn2:
        delta, full = applied[1], applied[2]
        assert delta["tokens"] == full["tokens"] == refs[2]["tokens"]
        assert delta["logits_blake3"] == full["logits_blake3"] == refs[2]["logits_blake3"]


def test_smollm2_handoff_through_nodes(tmp_path: Path, cache: Path) -> None:
    rx = HandoffProc("receive", tmp_path / "rx", "smollm2", cache, dht=False, args=["--tokens", str(N)])
    tx = None
    try:
        rx.next("model", 240)  # first run converts the GGUF into `cache` (~25 s); tx then reuses it
        tx = HandoffProc("send", tmp_path / "tx", "smollm2", cache, dht=False, args=[
            "--peer", rx.addr, "--tokens", str(N), "--prompt", "The capital of France is",
            "--turn2", " Paris. The capital of Italy is"])
        assert tx.next("model", 120)["compat_key"] == rx.of("model")[0]["compat_key"]
        tx.next("done", 180)
        for _ in range(3):
            rx.next("applied", 120)
        check_turns(tx, rx, turn2=True)
        assert "Paris" in rx.of("applied")[0]["text"]
        assert tx.wait(30) == 0  # closes the session and stops its node cleanly
        # every transfer is in the session's CRDT log (path, bytes, checksums), replicated to rx
        sid = tx.of("session")[0]["session"]
        doc = wait_until(lambda: (d := rx.control(f"/sessions/{sid}")) and len(d["messages"]) == 3
                         and all(m["outcome"] for m in d["messages"]) and d,
                         20, 0.2, "the session log (and the receiver's outcomes) to settle")
        # "applied" is the receiver's own verdict, written after its runtime injected the state
        assert {(m["outcome"]["status"], m["outcome"]["by"]) for m in doc["messages"]} == {
            ("applied", rx.peer_id)}
        assert sorted(m["nbytes"] for m in doc["messages"]) == sorted(s["bytes"] for s in tx.of("sent"))
        assert {m["path"] for m in doc["messages"]} == {s["path"] for s in tx.of("sent")}
    finally:
        codes = [p.terminate() for p in (tx, rx) if p is not None]
    assert codes == [0] * len(codes)


def test_tiny_llama_found_in_dht_and_different_weights_refused(tmp_path: Path, cache: Path) -> None:
    good, bad = tiny_dir("llama", cache), tiny_dir("llama", cache, seed=1)
    rx = HandoffProc("receive", tmp_path / "rx", good, cache, args=["--tokens", str(N)])
    rx_bad = HandoffProc("receive", tmp_path / "rx-bad", bad, cache, bootstrap=[rx.addr])
    procs = [rx, rx_bad]
    try:
        rx.next("model", 60)
        rx_bad.next("model", 60)
        # no --peer: the sender finds a compatible receiver through the DHT (the bad one is not one)
        tx = HandoffProc("send", tmp_path / "tx", good, cache, bootstrap=[rx.addr, rx_bad.addr], args=[
            "--tokens", str(N), "--prompt-ids", IDS(map(str, TINY_PROMPT)),
            "--turn2-ids", IDS(map(str, TINY_TURN2)), "--path", "stream"])
        procs.append(tx)
        # the same model pointed straight at the different-weights receiver
        tx_bad = HandoffProc("send", tmp_path / "tx-bad", good, cache, dht=False, args=[
            "--peer", rx_bad.addr, "--prompt-ids", IDS(map(str, TINY_PROMPT))])
        procs.append(tx_bad)
        found = tx.next("found", 60)
        assert [p["peer_id"] for p in found["providers"]] == [rx.peer_id]
        tx.next("done", 60)
        for _ in range(3):
            rx.next("applied", 60)
        check_turns(tx, rx, turn2=True)
        assert {e["path"] for e in tx.of("sent")} == {"stream"}  # the libp2p stream (the smollm2 test: auto)
        err = tx_bad.next("error", 60)
        assert err["code"] == "INCOMPATIBLE_MODEL" and err["fields"] == ["weights_digest"], err
        assert tx_bad.wait(30) == 1 and not tx_bad.of("sent")
        assert tx.wait(30) == 0
    finally:
        codes = [p.terminate() for p in procs]
    rx_bad.drain()
    assert [e["event"] for e in rx_bad.events] == ["started", "model"], rx_bad.events  # never fed
    assert "INCOMPATIBLE_MODEL" in rx_bad.stderr()
    assert codes[:2] == [0, 0]


def test_tiny_gemma3_sliding_window_handoff(tmp_path: Path, cache: Path) -> None:
    """Hybrid cache (sliding + full layers, window < prompt): cumulative_length crosses the wire."""
    model = tiny_dir("gemma3", cache)
    rx = HandoffProc("receive", tmp_path / "rx", model, cache, dht=False, args=["--tokens", str(N)])
    procs = [rx]
    try:
        tx = HandoffProc("send", tmp_path / "tx", model, cache, dht=False, args=[
            "--peer", rx.addr, "--tokens", str(N), "--prompt-ids", IDS(map(str, TINY_PROMPT)),
            "--turn2-ids", IDS(map(str, TINY_TURN2))])
        procs.append(tx)
        tx.next("done", 60)
        for _ in range(3):
            rx.next("applied", 60)
        check_turns(tx, rx, turn2=True)
        assert tx.wait(30) == 0
    finally:
        codes = [p.terminate() for p in procs]
    assert codes == [0, 0]
