"""One node of a scenario: its node, its model, the contexts its agents hold, and the handoffs.

``meshnode agents serve`` runs this in each node process ``meshnode agents run`` starts. The node
advertises ``apply`` and ``agent.<name>`` for each agent it hosts (peers are found by compat key
and role through the DHT, never by address), serves ``/latentlink/prefix/1.0.0`` (which prefix
of a context each agent holds), and applies incoming state:

* the header is checked before the payload moves — the target agent is here, and a delta starts
  where the agent's context holds bit-identical blocks (its digest) — else the message is refused
  with the reason and the sender falls back to the full state;
* then the context is cut back to that point and the delta applied (or the full state injected),
  all in the model's thread, all checks first: nothing is half-applied; "applied" goes to the
  session's CRDT log only now.

Handing a context over (:meth:`AgentHost.hand_over`): ask the receiver's chain, ship only the
blocks after the common ones, wait for the receiver's outcome in the session's CRDT log. One
capture serves every receiver at the same cut (:meth:`AgentHost.fan_out`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID

from meshnode.agents.context import Context
from meshnode.agents.prefix import PrefixService
from meshnode.agents.scenario import Scenario
from meshnode.handoff import in_model_thread, received_to_runtime, runtime_meta, send_state
from meshnode.logs import get_logger, kv
from meshnode.node import Node, runtime_terms
from meshnode.runtime import kv as rkv
from meshnode.runtime.accept import specs_of
from meshnode.tensor import Received, SessionClosed, TensorSession
from tensor_rpc import ProtocolError
from tensor_rpc.envelope import Envelope

log = get_logger("meshnode.agents")
Emit = Callable[[dict[str, Any]], None]
ROLE_PREFIX = "agent."


def cpu() -> float:
    return time.process_time()


class Inbox:
    """What arrived for one agent: (context, sender agent) pairs, in order."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[tuple[str, str, dict]](64)


class AgentHost:
    def __init__(self, scenario: Scenario, node_name: str, node: Node, lm: Any, emit: Emit) -> None:
        self.sc, self.node_name, self.node, self.lm, self.emit = scenario, node_name, node, lm, emit
        self.agents = {a.name: a for a in scenario.on_node(node_name)}
        self.contexts: dict[tuple[str, str], Context] = {}
        self.inbox = {name: Inbox() for name in self.agents}
        self.model = trio.Lock()  # one computation at a time on this node's model
        self.prefix = PrefixService(node.host, self._lookup, min(30.0, scenario.timeout_s),
                                    node.metrics.refuser("agents"))
        self._peers: dict[str, ID] = {}
        self._unfound: dict[str, str] = {}
        self._sessions: dict[str, TensorSession] = {}
        self._session_lock = trio.Lock()

    def _lookup(self, key: str) -> Context | None:
        agent, _, ctx = key.partition("/")
        return self.contexts.get((agent, ctx))

    def context(self, agent: str, ctx: str) -> Context:
        return self.contexts.setdefault((agent, ctx), Context.empty(self.lm, self.sc.block_tokens))

    async def compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self.model:
            return await in_model_thread(self.lm, fn, *args)

    # -- composition ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[AgentHost] = trio.TASK_STATUS_IGNORED) -> None:
        self.node.serve(self.lm.signature, accept=True, terms=runtime_terms(self.lm),
                        header_check=self._check_header)
        self.node.add_roles(*(ROLE_PREFIX + a for a in self.agents))
        async with trio.open_nursery() as n:
            await n.start(self.prefix.run)
            n.start_soon(self._accept_loop, n)
            task_status.started(self)
            await trio.sleep_forever()

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        while True:
            ts = await self.node.accept_session()
            nursery.start_soon(self._serve_session, ts)

    # -- receiving -------------------------------------------------------------------------------
    def _check_header(self, env: Envelope) -> None:
        """Refuse, before the payload moves, what could never land here."""
        meta = runtime_meta(env)
        to, ctx = meta.get("to"), meta.get("context")
        if to not in self.agents or not isinstance(ctx, str):
            raise rkv.KVMismatch(f"no agent {to!r} on node {self.node_name}")
        base = int(meta.get("base_tokens", 0))
        held = self.contexts.get((to, ctx))
        if base and (why := (held.base_matches(base, str(meta.get("base_digest", "")))
                             if held is not None else "this agent holds no such context")):
            raise rkv.KVMismatch(why)
        rkv.check_header(self.lm, meta["kind"], env.tensors, meta, need_next_token=True)

    async def _serve_session(self, ts: TensorSession) -> None:
        while True:
            try:
                rec = await ts.receive()
            except SessionClosed:
                return
            await self._apply(ts, rec)

    async def _apply(self, ts: TensorSession, rec: Received) -> None:
        t0, c0 = time.monotonic(), cpu()
        tensors, meta = received_to_runtime(rec)
        to, name = str(meta["to"]), str(meta["context"])
        base = int(meta.get("base_tokens", 0))

        def apply() -> Context:
            """All checks first; then the held context changes, or (on a failure past the
            checks) is forgotten, so the next handoff sends it whole — never half-applied."""
            held = self.contexts.get((to, name))
            if base == 0:  # a new context: the held one is untouched until it is replaced
                ctx = Context(rkv.inject(self.lm, tensors, meta), self.sc.block_tokens)
                ctx.adopt(self.lm, meta)
                return ctx
            if held is None or (why := held.base_matches(base, str(meta.get("base_digest")))):
                raise rkv.KVMismatch(why or "context gone")
            rkv.check_header(self.lm, rkv.KIND_DELTA, specs_of(tensors), meta, cache_length=base)
            try:
                held.crop(base)
                rkv.apply_delta(self.lm, held.state, tensors, meta)
                held.adopt(self.lm, meta)
            except BaseException:
                self.contexts.pop((to, name), None)
                raise
            return held

        try:
            ctx = await self.compute(apply)
        except Exception as exc:  # nothing applied: the sender is told and sends it whole
            why = str(exc) if isinstance(exc, rkv.KVMismatch) else f"{type(exc).__name__}: {exc}"
            ts.report_refused(rec, why)
            self.emit({"event": "refused", "agent": to, "context": name, "reason": why})
            return
        self.contexts[(to, name)] = ctx
        apply_s = time.monotonic() - t0
        ts.report_applied(rec, {"receive_s": rec.elapsed_s, "apply_s": apply_s})
        info = {"from": meta.get("from"), "bytes": rec.header.payload_bytes, "path": rec.path,
                "base_tokens": base, "tokens": ctx.length, "receive_s": rec.elapsed_s,
                "apply_s": apply_s, "apply_cpu_s": cpu() - c0, "round": meta.get("round", 0)}
        self.emit({"event": "applied", "agent": to, "context": name, **info})
        await self.inbox[to].send.send((name, str(meta.get("from")), info))

    # -- sending ----------------------------------------------------------------------------------
    async def peer_of(self, agent: str) -> ID:
        """The node hosting ``agent``: a DHT lookup by our compat key and its role."""
        if agent in self._peers:
            return self._peers[agent]
        if agent in self._unfound:
            raise LookupError(self._unfound[agent])
        with trio.move_on_after(self.sc.timeout_s):
            while True:
                found = await self.node.find_compatible(self.lm.signature, role=ROLE_PREFIX + agent)
                if found:
                    self._peers[agent] = ID.from_base58(found[0].peer_id)
                    return self._peers[agent]
                await trio.sleep(0.2)
        self._unfound[agent] = f"no node serving agent {agent!r} found in the DHT " \
                               f"within {self.sc.timeout_s:.0f} s"
        raise LookupError(self._unfound[agent])

    async def session(self, peer: ID) -> TensorSession:
        async with self._session_lock:
            ts = self._sessions.get(str(peer))
            if ts is None or ts.closed:
                ts = self._sessions[str(peer)] = await self.node.open_session(peer)
            return ts

    async def cut_for(self, ctx: Context, agent: str, name: str) -> int:
        """Where the handoff to ``agent`` may start: after the blocks it holds as we do."""
        try:
            _, held, chain = await self.prefix.ask(await self.peer_of(agent), f"{agent}/{name}",
                                                   ctx.block)
        except Exception as exc:  # boundary: no answer means nothing held — send it whole
            log.info("prefix query failed; sending the full state", extra=kv(agent=agent, err=exc))
            return 0
        start = min(ctx.common_tokens(chain), held // ctx.block * ctx.block)
        return min(start, (ctx.length - 1) // ctx.block * ctx.block)  # ship at least one token

    async def fan_out(self, frm: str, ctx: Context, name: str, targets: list[str],
                      extra: dict | None = None) -> dict[str, dict]:
        """Hand ``ctx`` to every agent in ``targets`` at once: one capture per distinct cut
        (usually one, shared), N transfers in parallel, each target on its own (one that cannot
        be reached fails its own row and holds up no other). Returns each target's result."""
        captures: dict[int, tuple] = {}
        locks: dict[int, trio.Lock] = {}
        results: dict[str, dict] = {}

        async def one(agent: str) -> None:
            start = await self.cut_for(ctx, agent, name)
            async with locks.setdefault(start, trio.Lock()):
                if start not in captures:
                    captures[start] = await self.compute(self._capture, ctx, start)
            results[agent] = await self._deliver(frm, agent, name, ctx, start, captures[start],
                                                 extra or {})

        async with trio.open_nursery() as n:
            for a in targets:
                n.start_soon(one, a)
        self.emit({"event": "fanout", "from": frm, "targets": len(targets), "captures": len(captures)})
        return results

    async def hand_over(self, frm: str, to: str, ctx: Context, name: str,
                        extra: dict | None = None) -> dict:
        return (await self.fan_out(frm, ctx, name, [to], extra))[to]

    def _capture(self, ctx: Context, start: int) -> tuple[dict, dict]:
        tensors, meta = rkv.capture(self.lm, ctx.state, tokens=(start, ctx.length))
        meta.update(ctx.proof_meta(start))
        return tensors, meta

    async def _deliver(self, frm: str, to: str, name: str, ctx: Context, start: int,
                       captured: tuple[dict, dict], extra: dict) -> dict:
        t0, c0 = time.monotonic(), cpu()
        out: dict[str, Any] = {"from": frm, "to": to, "context": name, "round": extra.get("round", 0),
                               "turn": extra.get("turn")}
        try:
            with trio.fail_after(self.sc.timeout_s):
                ts = await self.session(await self.peer_of(to))
                for attempt in (start, 0):  # a refused cut: the full state, never a wrong one
                    tensors, meta = captured if attempt == start else \
                        await self.compute(self._capture, ctx, 0)
                    meta = {**meta, **extra, "to": to, "from": frm, "context": name}
                    try:
                        sent = await send_state(ts, tensors, meta)
                        out["sent_s"] = time.monotonic() - t0  # acknowledged: verified there
                    except ProtocolError as exc:
                        if attempt == 0:
                            raise
                        out["fallback"] = str(exc)
                        continue
                    outcome = await self._outcome(ts, sent.message_id)
                    if outcome is not None and outcome.status != "applied" and attempt:
                        out["fallback"] = outcome.reason
                        continue
                    out.update(bytes=sent.nbytes, path=sent.path, base_tokens=attempt,
                               tokens=ctx.length, transfer_s=time.monotonic() - t0,
                               send_cpu_s=cpu() - c0, session=ts.session_id,
                               outcome=outcome.status if outcome else "unknown")
                    break
        except Exception as exc:  # boundary: this target's row fails alone (TooSlowError too)
            out["error"] = f"{type(exc).__name__}: {exc}"
        self.emit({"event": "handoff", **out})
        return out

    async def _outcome(self, ts: TensorSession, message_id: int) -> Any:
        """The receiver's outcome for our message, once its replica wrote it to the session's
        CRDT log and the log replicated here (woken by change notifications)."""
        crdt, key = self.node.crdt, (str(message_id), str(self.node.peer_id))
        changes = crdt.subscribe(ts.session_id)
        try:
            with trio.move_on_after(self.sc.timeout_s):
                while True:
                    try:
                        got = crdt.doc(ts.session_id).outcomes().get(key)
                    except KeyError:  # the document has not replicated yet
                        got = None
                    if got is not None:
                        return got
                    await changes.receive()
        finally:
            changes.close()
        return None
