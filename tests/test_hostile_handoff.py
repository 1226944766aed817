"""A compatible but malicious peer cannot crash ``meshnode handoff receive`` or change what it decodes.

The victim is a real ``meshnode handoff receive`` process with a tiny seeded model. The attacker
(tests/helpers/attacker.py) loads the same model in this test, so the handshake matches in every
field (signature and runtime terms), captures a real KV cache and bends one thing per message: a
tensor in a dtype the runtime does not run, or a ``next_token`` that is no token. Each message must
be refused by a REJECT that names the reason — at its header, before the payload moves — the
process must stay up, and the next honest handoff must decode exactly what the sender decodes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import trio

from meshnode.handoff import ENVELOPE_KEYS
from meshnode.node import runtime_terms
from meshnode.runtime import kv
from meshnode.runtime.buffers import tensor_bytes
from meshnode.runtime.dtypes import dtype_name
from meshnode.runtime.loader import TinySpec, load_model
from tensor_rpc import AckReceived, ApplyMode, Kind, MessageRejected
from tensor_rpc.tensors import tensor_source
from tests.helpers.attacker import RawSession, attacker
from tests.helpers.handoff_peer import HandoffProc
from tests.helpers.runtime_models import TINY_MODELS, TINY_PROMPT

N = 8
MARGIN = 128 * 1024 * 1024  # the messages are a few hundred KiB; this is interpreter and libp2p


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out
BAD_DTYPES = ["float64", "int8", "int16", "bool", "bfloat16", "uint8"]
BAD_TOKENS = ["7", math.nan, -1, 256, 3.0, True, 2**64 - 1]  # the tiny vocab is 256


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hostile-handoff-cache")
    spec = TINY_MODELS["llama"]
    lm = load_model(TinySpec(spec["type"], spec["config"], seed=0), cache_dir=cache)
    return lm, cache


def _message(lm, tensors, meta) -> dict:
    items = [(name, dtype_name(t), tuple(t.shape), tensor_bytes(t)) for name, t in tensors.items()]
    specs, payload = tensor_source(items)
    return dict(kind=Kind(meta["kind"]), layers=(meta["layer_start"], meta["layer_end"]),
                tokens=(meta["token_start"], meta["token_end"]), tensors=specs, payload=payload,
                apply=ApplyMode(meta["apply"]), meta={k: v for k, v in meta.items()
                                                      if k not in ENVELOPE_KEYS})


async def _send(raw: RawSession, msg: dict) -> AckReceived | MessageRejected:
    out = raw.session.send_message(now=trio.current_time(), **msg)
    done = [None]

    def verdict(evs) -> bool:
        for e in evs:
            if isinstance(e, (AckReceived, MessageRejected)) and e.message_id == out.message_id:
                done[0] = e
                return True
        return False

    assert await raw.pump_until(verdict, 30)
    return done[0]


async def test_malformed_kv_is_rejected_and_the_receiver_lives_on(model, tmp_path: Path) -> None:
    lm, cache = model
    src = str(lm.source)
    rx = HandoffProc("receive", tmp_path / "rx", src, cache, dht=False, args=["--tokens", str(N)])
    procs = [rx]
    try:
        await trio.to_thread.run_sync(rx.next, "model", 60)
        Path(f"/proc/{rx.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status(rx.proc.pid)
        tensors, meta, _ = kv.prefill_and_capture(lm, TINY_PROMPT)
        async with attacker(tmp_path) as atk:
            peer = await atk.connect(rx.addr)
            raw = await atk.session(peer, lm.signature, terms=runtime_terms(lm))
            assert raw.closed_error() is None, raw.closed_error()
            raw.widen_dtypes()  # so our own session seals what the receiver said it will not take
            for dt in BAD_DTYPES:
                bad = dict(tensors, **{"L0.k": tensors["L0.k"].to(getattr(torch, dt)).contiguous()})
                verdict = await _send(raw, _message(lm, bad, meta))
                assert isinstance(verdict, MessageRejected), dt
                assert dt in verdict.error.message, verdict.error
            for tok in BAD_TOKENS:
                verdict = await _send(raw, _message(lm, tensors, dict(meta, next_token=tok)))
                assert isinstance(verdict, MessageRejected), tok
                assert "next_token" in verdict.error.message, verdict.error
            assert rx.proc.poll() is None  # alive
            grown = _status(rx.proc.pid)["VmHWM"] - base["VmRSS"]
            print(f"\n[hostile] malformed-but-compatible KV x{len(BAD_DTYPES) + len(BAD_TOKENS)} "
                  f"against handoff receive: peak RSS +{max(grown, 0) >> 20} MiB (bound "
                  f"{MARGIN >> 20} MiB); every one REJECTed naming its reason")
            assert grown < MARGIN
            good = await _send(raw, _message(lm, tensors, meta))
            assert isinstance(good, AckReceived)  # the session itself still works
        applied = await trio.to_thread.run_sync(rx.next, "applied", 60)
        assert applied["tokens_range"] == [0, len(TINY_PROMPT)]
        # an honest sender now: the receiver decodes exactly what the sender does
        tx = HandoffProc("send", tmp_path / "tx", src, cache, dht=False, args=[
            "--peer", rx.addr, "--tokens", str(N), "--prompt-ids", ",".join(map(str, TINY_PROMPT))])
        procs.append(tx)
        ref = await trio.to_thread.run_sync(tx.next, "reference", 60)
        honest = await trio.to_thread.run_sync(rx.next, "applied", 60)
        assert honest["tokens"] == ref["tokens"] and honest["logits_blake3"] == ref["logits_blake3"]
        assert applied["tokens"] == ref["tokens"]  # the attacker's one good message was exact too
        assert await trio.to_thread.run_sync(tx.wait, 30) == 0
    finally:
        codes = [p.terminate() for p in procs]
    assert codes[0] == 0
    assert "tensor message rejected" in rx.stderr()  # each refusal logged with its reason
