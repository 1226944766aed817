"""``meshnode agents serve``: one node process of a scenario, driven by ``meshnode agents run``.

Events go to stdout, one JSON object per line; commands come on stdin, one per line:

* ``{"cmd": "go"}`` — run this node's agents' scripts (every node got its ``ready`` first);
* ``{"cmd": "baseline", "agent", "ids", "cached", "sent": [a, b]}`` — time the text baseline for
  ``agent``: the receiver holds the first ``cached`` ids already (0: the naive baseline) and
  prefills the rest, then decodes ``tokens``; ``sent`` is the slice of ``ids`` that would travel
  as text (its UTF-8 size is reported);
* ``{"cmd": "quit"}``.

The process ends on ``quit``, SIGINT/SIGTERM or when stdin closes, stopping its node cleanly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import trio

from meshnode.agents.host import AgentHost, cpu
from meshnode.agents.patterns import run_agent, text_of, warm_up
from meshnode.agents.scenario import Scenario
from meshnode.config import Config
from meshnode.handoff import logits_digest
from meshnode.logs import get_logger, kv
from meshnode.node import Node
from meshnode.runtime import kv as rkv

log = get_logger("meshnode.agents")
MAX_COMMAND_BYTES = 64 << 20  # a baseline command carries token ids


def emit(ev: dict[str, Any]) -> None:
    print(json.dumps(ev, default=str), flush=True)


def baseline(lm: Any, ids: list[int], cached: int, n: int) -> dict:
    """Text world: the receiver prefills what it lacks of ``ids`` (it holds ``cached`` of them,
    prefilled beforehand and not timed), then decodes ``n`` tokens."""
    state = rkv.State(rkv.new_cache(lm), 0, None)
    if cached:
        rkv.forward_tokens(lm, state, ids[:cached])
    t0, c0 = time.monotonic(), cpu()
    logits = rkv.forward_tokens(lm, state, ids[cached:])
    state.next_token, state.first_logits = int(logits.argmax()), logits
    first = time.monotonic()
    toks, rows = rkv.continue_greedy(lm, state, n)
    return {"tokens": toks, "logits_blake3": logits_digest(rows), "first_token_s": first - t0,
            "total_s": time.monotonic() - t0, "cpu_s": cpu() - c0, "prefilled": len(ids) - cached}


async def serve(sc: Scenario, node_name: str, cfg: Config) -> int:
    node = Node(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        emit({"event": "started", "node": node_name, "peer_id": str(node.peer_id),
              "addrs": [str(a) for a in node.addrs]})
        try:
            lm = await node.wait_model(sc.timeout_s)
        except (RuntimeError, trio.TooSlowError) as exc:
            emit({"event": "error", "node": node_name, "error": str(exc)})
            node.stop()
            return 1
        emit({"event": "model", "node": node_name, "signature": lm.signature.to_dict(),
              "compat_key": lm.signature.compat_key, "tokenizer": lm.tokenizer is not None})
        host = AgentHost(sc, node_name, node, lm, emit)
        host_scope = trio.CancelScope()

        async def run_host(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with host_scope:
                await host.run(task_status=task_status)
        await nursery.start(run_host)
        try:
            await warm_up(host)
        except ValueError as exc:  # e.g. text keys for a model without a tokenizer
            emit({"event": "error", "node": node_name, "error": str(exc)})
        emit({"event": "ready", "node": node_name, "agents": sorted(host.agents)})
        async with trio.open_nursery() as work:
            async for line in _lines(sys.stdin.fileno()):
                try:
                    cmd = json.loads(line)
                except ValueError:
                    continue
                if cmd.get("cmd") == "go":
                    for agent in host.agents.values():
                        work.start_soon(_guarded, host, agent)
                elif cmd.get("cmd") == "baseline":
                    work.start_soon(_baseline, host, cmd)
                elif cmd.get("cmd") == "quit":
                    work.cancel_scope.cancel()
                    break
        host_scope.cancel()  # the agents first, then the node, cleanly
        node.stop()
    return 0


async def _lines(fd: int) -> Any:
    """Lines from ``fd`` without a thread blocked in ``readline`` (which would keep the process
    alive after its node stopped, until stdin closes)."""
    stream = trio.lowlevel.FdStream(os.dup(fd))
    buf = b""
    async with stream:
        while True:
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_COMMAND_BYTES:
                    raise ValueError("command line too long")
            line, buf = buf.split(b"\n", 1)
            yield line.decode()


async def _guarded(host: AgentHost, agent: Any) -> None:
    try:
        await run_agent(host, agent)
    except trio.TooSlowError:
        host.emit({"event": "agent_failed", "agent": agent.name,
                   "error": f"timed out (scenario timeout_s = {host.sc.timeout_s})"})
    except Exception as exc:  # boundary: an agent that fails ends its own row, with the reason
        log.warning("agent failed", extra=kv(agent=agent.name, err=exc))
        host.emit({"event": "agent_failed", "agent": agent.name, "error": f"{type(exc).__name__}: {exc}"})


async def _baseline(host: AgentHost, cmd: dict) -> None:
    ids, cached = [int(x) for x in cmd["ids"]], int(cmd["cached"])
    a, b = cmd.get("sent", [cached, len(ids)])
    out = await host.compute(baseline, host.lm, ids, cached, host.sc.tokens)
    text = text_of(host.lm, ids[a:b])
    wire = len(text.encode()) if text is not None else 4 * (b - a)  # ids as int32 without a tokenizer
    host.emit({"event": "baseline", "agent": cmd["agent"], "label": cmd.get("label"),
               "round": cmd.get("round", 0), "wire_bytes": wire, **out})
