"""What each agent does in each pattern (DESIGN.md §12: the shared context first, each agent's own
instruction after it; identity judged against the sender continuing itself).

Every agent's script runs in its node's process (:mod:`meshnode.agents.serve`) and reports by
``emit``: ``read`` (a context prefilled), ``handoff`` (from :class:`AgentHost`), ``applied``,
``continued`` (an agent's generated tokens: ``first_token_s`` from the state's arrival, the
logits digest, CPU), ``reference`` (what the sender gets continuing itself), ``turn`` (relay).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import trio

from meshnode.agents.context import Context
from meshnode.agents.host import AgentHost, cpu
from meshnode.agents.scenario import AgentSpec, Text
from meshnode.handoff import logits_digest
from meshnode.runtime import kv as rkv


def ids_of(lm: Any, t: Text) -> list[int]:
    if t.ids is not None:
        return list(t.ids)
    if t.text is None:
        return []
    if lm.tokenizer is None:
        raise ValueError("this model has no tokenizer: give token ids (*_ids keys) in the scenario")
    return list(lm.tokenizer.encode(t.text, add_special_tokens=False))


def text_of(lm: Any, ids: list[int]) -> str | None:
    return lm.tokenizer.decode(ids) if lm.tokenizer is not None else None


async def warm_up(host: AgentHost) -> None:
    """Before the run: agents that already hold the shared system prompt prefill it themselves."""
    sc = host.sc
    if not (sc.warm_system and sc.system.given):
        return
    ids = ids_of(host.lm, sc.system)
    for a in host.agents.values():
        if a.role in ("worker", "partner"):
            ctx = host.context(a.name, _ctx_name(sc.pattern))
            await host.compute(ctx.feed, host.lm, ids)


def _ctx_name(pattern: str) -> str:
    return "chat" if pattern == "relay" else "doc"


async def run_agent(host: AgentHost, agent: AgentSpec) -> None:
    sc = host.sc
    script = {("fanout", "reader"): _reader, ("warm", "reader"): _reader,
              ("fanout", "worker"): _worker, ("warm", "worker"): _worker,
              ("relay", "driver"): _driver, ("relay", "partner"): _partner}[(sc.pattern, agent.role)]
    await script(host, agent)
    host.emit({"event": "agent_done", "agent": agent.name})


async def _continue(host: AgentHost, agent: AgentSpec, state: rkv.State, instr: list[int],
                    t0: float, c0: float, extra: dict) -> dict:
    """Append ``instr`` on a fork and decode; times counted from ``t0`` (the state's arrival)."""
    lm, n = host.lm, host.sc.tokens

    def work() -> tuple[list[int], Any, float]:
        if instr:
            logits = rkv.forward_tokens(lm, state, instr)
            state.next_token, state.first_logits = int(logits.argmax()), logits
        first = time.monotonic()
        toks, logits = rkv.continue_greedy(lm, state, n)
        return toks, logits, first

    toks, logits, first = await host.compute(work)
    return {"agent": agent.name, "tokens": toks, "logits_blake3": logits_digest(logits),
            "text": text_of(lm, toks), "first_token_s": first - t0,
            "total_s": time.monotonic() - t0, "cpu_s": cpu() - c0,
            "prefilled": len(instr), **extra}


# -- fanout / warm: reader and workers ------------------------------------------------------------
async def _reader(host: AgentHost, agent: AgentSpec) -> None:
    sc, lm = host.sc, host.lm
    workers = [a for a in sc.agents if a.role == "worker" and a.node in sc.nodes]
    ctx = host.context(agent.name, "doc")
    rounds = sc.parts if sc.pattern == "warm" else sc.parts[:1]
    context_ids: list[int] = []
    for r, part in enumerate(rounds):
        chunks = ([ids_of(lm, sc.system)] if r == 0 and sc.system.given else []) + [ids_of(lm, part)]
        t0, c0 = time.monotonic(), cpu()
        for ids in chunks:  # the system prompt is its own chunk: workers holding it match its bits
            await host.compute(ctx.feed, lm, ids)
            context_ids += ids
        host.emit({"event": "read", "agent": agent.name, "round": r, "tokens": ctx.length,
                   "prefilled": sum(len(c) for c in chunks), "prefill_s": time.monotonic() - t0,
                   "cpu_s": cpu() - c0, "context_ids": context_ids,
                   "system_tokens": len(ids_of(lm, sc.system)) if sc.system.given else 0})
        await host.fan_out(agent.name, ctx, "doc", [w.name for w in workers], {"round": r})
        for w in workers:  # the reference: the reader continuing itself with w's instruction
            t0, c0 = time.monotonic(), cpu()
            instr = ids_of(lm, w.instruction(r))
            state = await host.compute(ctx.fork, lm)
            ref = await _continue(host, agent, state, instr, t0, c0, {"round": r, "for": w.name})
            host.emit({"event": "reference", **ref, "instruction_ids": instr})


async def _worker(host: AgentHost, agent: AgentSpec) -> None:
    sc, lm = host.sc, host.lm
    rounds = sc.rounds if sc.pattern == "warm" else 1
    for r in range(rounds):
        with trio.fail_after(sc.timeout_s):
            name, frm, info = await host.inbox[agent.name].recv.receive()
        t0 = time.monotonic() - info["apply_s"]  # the state's arrival
        c0 = cpu() - info["apply_cpu_s"]
        ctx = host.contexts[(agent.name, name)]
        state = await host.compute(ctx.fork, lm)
        instr = ids_of(lm, agent.instruction(r))
        out = await _continue(host, agent, state, instr, t0, c0, {"round": r, "from": frm,
                                                                  "received": info})
        host.emit({"event": "continued", **out, "instruction_ids": instr})
        if agent.poison and r + 1 < rounds:
            await host.compute(ctx.poison)
            await host.compute(ctx.hash_blocks, lm)
            host.emit({"event": "poisoned", "agent": agent.name, "context": name})


# -- relay: driver and partner ----------------------------------------------------------------------
async def _turn(host: AgentHost, agent: AgentSpec, ctx: Context, turn: int, t0: float, c0: float) -> None:
    """``tokens`` greedy steps on the conversation; after a handoff the first step only feeds the
    pending token (split off to time the first new token; the same computation as one call)."""
    lm, k = host.lm, host.sc.tokens
    if turn == 0:
        toks, logits = await host.compute(ctx.decode, lm, k)
        first = None
    else:
        head, head_rows = await host.compute(ctx.decode, lm, 2)
        first = time.monotonic() - t0
        rest, rest_rows = await host.compute(ctx.decode, lm, k - 1) if k > 2 else ([head[1]], head_rows[1:])
        toks = head[1:] + rest[1:]
        logits = torch.cat([head_rows[1:], rest_rows[1:]])
    host.emit({"event": "turn", "agent": agent.name, "turn": turn, "tokens": toks,
               "logits_blake3": logits_digest(logits), "first_token_s": first,
               "total_s": time.monotonic() - t0, "cpu_s": cpu() - c0, "length": ctx.length})


async def _driver(host: AgentHost, agent: AgentSpec) -> None:
    sc, lm = host.sc, host.lm
    partner = next(a for a in sc.agents if a.role == "partner")
    ctx = host.context(agent.name, "chat")
    prompt = ids_of(lm, sc.parts[0])
    t0, c0 = time.monotonic(), cpu()
    await host.compute(ctx.feed, lm, prompt)
    host.emit({"event": "read", "agent": agent.name, "round": 0, "tokens": ctx.length,
               "prefilled": len(prompt), "prefill_s": time.monotonic() - t0, "cpu_s": cpu() - c0,
               "context_ids": prompt, "system_tokens": 0})
    start = await host.compute(ctx.fork, lm)  # for the reference, computed at the end
    turn = 0
    for r in range(sc.rounds):
        await _turn(host, agent, ctx, turn, time.monotonic(), cpu())
        turn += 1
        await host.hand_over(agent.name, partner.name, ctx, "chat", {"round": r, "turn": turn})
        with trio.fail_after(sc.timeout_s):
            await host.inbox[agent.name].recv.receive()
        turn += 1
    ctx = host.contexts[(agent.name, "chat")]
    total = sc.tokens + (2 * sc.rounds - 1) * (sc.tokens - 1)
    toks, logits = await host.compute(rkv.continue_greedy, lm, start, total)
    k, segments = sc.tokens, []
    for t in range(2 * sc.rounds):  # turn t's new tokens in the one-process continuation
        a, b = (0, k) if t == 0 else (k + (t - 1) * (k - 1), k + t * (k - 1))
        segments.append({"turn": t, "tokens": toks[a:b], "logits_blake3": logits_digest(logits[a:b])})
    host.emit({"event": "reference", "agent": agent.name, "segments": segments,
               # the last token emitted is pending (not yet fed) in the state handed back
               "final_pending": ctx.state.next_token, "reference_pending": toks[-1]})


async def _partner(host: AgentHost, agent: AgentSpec) -> None:
    sc = host.sc
    driver = next(a for a in sc.agents if a.role == "driver")
    for r in range(sc.rounds):
        with trio.fail_after(sc.timeout_s):
            name, _frm, info = await host.inbox[agent.name].recv.receive()
        t0, c0 = time.monotonic() - info["apply_s"], cpu() - info["apply_cpu_s"]
        ctx = host.contexts[(agent.name, name)]
        await _turn(host, agent, ctx, 2 * r + 1, t0, c0)
        await host.hand_over(agent.name, driver.name, ctx, name, {"round": r, "turn": 2 * r + 2})
