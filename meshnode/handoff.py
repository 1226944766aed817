"""KV handoff through the node: the glue between :mod:`meshnode.runtime` and tensor sessions.

The whole path, in the order it runs (DESIGN.md §4, §10)::

    sender:   kv.prefill_and_capture ─▶ send_state(ts, tensors, meta) ─▶ TensorSession.send
    receiver: TensorSession.receive ─▶ received_to_runtime(rec) ─▶ kv.inject / kv.apply_delta
              ─▶ kv.continue_greedy  (same tokens as the sender; fp32 logits bitwise equal)

Runtime ``meta`` (from ``kv.capture`` and the other capture functions) carries the semantics
(``kind``, ``apply``, ``layer_start/end``, ``token_start/end``, ``batch``, ``gain``); those go into the
envelope's own fields, the rest (``next_token``, ``cumulative_length``, ``dtype``, ``threads``) into its
bounded ``meta`` map. On receipt the envelope is the authority and the same dict is rebuilt from it.
Tensors never get copied here: ``tensor_bytes`` exposes their storage on the way out, and the
received buffer is viewed in place with ``torch.frombuffer`` on the way in.

Model compute runs in a worker thread (:func:`in_model_thread`) so the node keeps serving its
streams — a reader stalled > 5 s makes yamux reset the stream (DESIGN.md §7 trap 4).

:func:`serve_receiver` and :func:`hand_off` are the two roles that ``meshnode handoff``, the demo,
the tests and the benchmark drive.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import blake3
import torch
import trio

from meshnode.runtime.buffers import TensorSlice, dtype_name, tensor_bytes, tensors_from_buffer
from meshnode.tensor import APPLY_ROLE, Received, Sent, SessionClosed, TensorSession
from tensor_rpc import ApplyMode, Kind
from tensor_rpc.envelope import Envelope

if TYPE_CHECKING:
    from meshnode.node import Node
    from meshnode.runtime.loader import LoadedModel

#: runtime meta keys that travel as envelope fields rather than in the envelope's meta map
ENVELOPE_KEYS = ("kind", "apply", "gain", "layer_start", "layer_end", "token_start", "token_end", "batch")
T = TypeVar("T")
Emit = Callable[[dict[str, Any]], Any]


# -- the two conversions ---------------------------------------------------------------------------
async def send_state(ts: TensorSession, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                     path: str | None = None, timeout_s: float | None = None) -> Sent:
    """Send runtime ``tensors`` + ``meta`` as one message; returns once the peer acked the checksums.

    The node's session log records the transfer (path, bytes, time, checksums) in the session's
    CRDT log. ``path``: force a data path (``"stream"``, ``"bulk"``, ``"shm"``).
    """
    kind = Kind(meta["kind"])
    layers = (int(meta["layer_start"]), int(meta["layer_end"]))
    tokens = (int(meta["token_start"]), int(meta["token_end"]))
    items = [(name, dtype_name(t), tuple(t.shape), tensor_bytes(t)) for name, t in tensors.items()]
    extra = {k: v for k, v in meta.items() if k not in ENVELOPE_KEYS}
    kw: dict[str, Any] = {"path": path} if path is not None else {}
    sent = await ts.send(items, kind=kind, layers=layers, tokens=tokens, meta=extra,
                         apply=ApplyMode(meta.get("apply", "OVERWRITE")), gain=meta.get("gain"),
                         batch_slot=int(meta.get("batch", 0)), timeout_s=timeout_s, **kw)
    return sent


def runtime_meta(h: Envelope) -> dict[str, Any]:
    """The runtime meta dict of an envelope: its meta map plus the semantics from its fields."""
    meta = dict(h.meta)
    meta.update(kind=h.kind.value, apply=h.apply.value, layer_start=h.layers[0], layer_end=h.layers[1],
                token_start=h.tokens[0], token_end=h.tokens[1], batch=h.batch_slot)
    if h.gain is not None:
        meta["gain"] = h.gain
    return meta


def received_to_runtime(rec: Received) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Zero-copy tensors over the received buffer, and the runtime meta rebuilt from the envelope.

    The tensors view ``rec``'s memory, which stays the application's until ``rec.release()``:
    a cache built from them may live as long as it likes. Raises ``KVMismatch`` for tensors that
    do not fit their declared dtype/shape.
    """
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # read-only buffers are fine: the runtime never writes in place
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for spec, view in rec.tensors:
            sl = TensorSlice(spec.name, spec.dtype, tuple(spec.shape), 0, spec.byte_length)
            tensors.update(tensors_from_buffer(view, [sl]))
    return tensors, runtime_meta(rec.header)


# -- helpers ---------------------------------------------------------------------------------------
async def in_model_thread(lm: LoadedModel, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run model code in a worker thread with the model's torch thread count (needed for bitwise
    equality, DESIGN.md §10; OpenMP keeps that setting per OS thread)."""
    def call() -> T:
        torch.set_num_threads(lm.threads)
        return fn(*args, **kw)

    return await trio.to_thread.run_sync(call)


def logits_digest(logits: torch.Tensor) -> str:
    """BLAKE3 of the logits' raw bytes: equal digests = bitwise-equal logits."""
    return blake3.blake3(tensor_bytes(logits.contiguous())).hexdigest()


def decode(lm: LoadedModel, tokens: list[int]) -> str | None:
    return lm.tokenizer.decode(tokens) if lm.tokenizer is not None else None


def _fork(lm: LoadedModel, state: Any) -> Any:
    """A second decoding state sharing ``state``'s cache tensors (no copy: decoding only appends)."""
    from meshnode.runtime import kv

    tensors, meta = kv.capture(lm, state)
    return kv.inject(lm, tensors, meta)


# -- roles -----------------------------------------------------------------------------------------
def receive_kv(node: Node, lm: LoadedModel, n_tokens: int) -> None:
    """Make ``node`` a KV receiver for ``lm``: it serves the ``apply`` role (advertised in the DHT),
    declares its runtime terms in every handshake, and refuses, at the header and before the
    payload moves, any message this runtime could never apply (wrong dtype, shape, layer range,
    next token...) with a REJECT that names the reason."""
    from meshnode.node import runtime_terms
    from meshnode.runtime import kv

    def check(env: Envelope) -> None:
        kind = env.kind.value
        if kind not in (kv.KIND_FULL, kv.KIND_DELTA):
            raise kv.KVMismatch(f"this receiver applies {kv.KIND_FULL} and {kv.KIND_DELTA}, not {kind}")
        kv.check_header(lm, kind, env.tensors, runtime_meta(env), need_next_token=n_tokens > 0)

    node.serve(lm.signature, accept=True, terms=runtime_terms(lm), header_check=check)


async def serve_receiver(node: Node, lm: LoadedModel, n_tokens: int, emit: Emit,
                         sessions: int | None = None) -> None:
    """Accept sessions; apply every KV message and continue ``n_tokens`` greedy tokens from it.

    A KV_CACHE replaces the session's state, a KV_CACHE_DELTA extends it; each continuation runs on
    a fork, so the next delta still lands where the sender's cache ends. ``emit`` gets one dict
    per event. Every outcome — applied, or refused with the reason (nothing applied) — goes to the
    session's CRDT log after the runtime tried. Sessions are served side by side (a peer that
    holds its session open must not stall the others); the model runs one computation at a time.
    Returns once ``sessions`` sessions ended (``None``: forever).
    """
    receive_kv(node, lm, n_tokens)
    model = trio.Lock()
    async with trio.open_nursery() as n:
        accepted = 0
        while sessions is None or accepted < sessions:
            ts = await node.accept_session()
            accepted += 1
            emit({"event": "session", "session": ts.session_id, "peer": str(ts.peer_id)})
            n.start_soon(_receive_session, ts, lm, n_tokens, emit, model)


async def _receive_session(ts: TensorSession, lm: LoadedModel, n_tokens: int, emit: Emit,
                           model: trio.Lock) -> None:
    from meshnode.runtime import accept, kv

    base = None
    max_pos = accept.layout(lm).max_positions
    while True:
        try:
            rec = await ts.receive()
        except SessionClosed:
            return
        kind = rec.header.kind.value
        t0 = time.monotonic()
        try:
            tensors, meta = received_to_runtime(rec)
            async with model:
                if kind == kv.KIND_FULL:
                    base = await in_model_thread(lm, kv.inject, lm, tensors, meta)
                elif kind == kv.KIND_DELTA and base is not None:
                    await in_model_thread(lm, kv.apply_delta, lm, base, tensors, meta)
                else:
                    raise kv.KVMismatch(f"cannot apply {kind} here (no snapshot to extend)")
        except kv.KVMismatch as exc:  # verified bytes that do not fit this state: nothing applied
            ts.report_refused(rec, str(exc))
            emit({"event": "refused", "message_id": rec.message_id, "kind": kind, "reason": str(exc)})
            continue
        ready = time.monotonic()
        ts.report_applied(rec, {"receive_s": rec.elapsed_s, "inject_s": ready - t0})
        out = {"event": "applied", "session": ts.session_id, "message_id": rec.message_id,
               "kind": kind, "tokens_range": [meta["token_start"], meta["token_end"]],
               "bytes": rec.header.payload_bytes, "path": rec.path, "receive_s": rec.elapsed_s,
               "inject_s": ready - t0, "ready_at": ready}
        n = n_tokens if max_pos is None else min(n_tokens, max_pos - base.length + 1)
        if n > 0 and base.next_token is not None:
            async with model:
                work = await in_model_thread(lm, _fork, lm, base)
                toks, logits = await in_model_thread(lm, kv.continue_greedy, lm, work, n)
            out.update(tokens=toks, logits_blake3=logits_digest(logits), text=decode(lm, toks),
                       decode_s=time.monotonic() - ready)
        emit(out)


async def hand_off(node: Node, lm: LoadedModel, peer: str, prompt_ids: list[int], n_tokens: int,
                   emit: Emit, *, turn2_ids: list[int] | None = None, path: str | None = None,
                   reference: bool = True) -> TensorSession:
    """Sender: prefill ``prompt_ids``, hand the KV (prompt + next token) to ``peer``, then continue
    itself (``generate()``) for comparison. With ``turn2_ids``: feed them, send the turn as a
    KV_CACHE_DELTA, then the same state as a full snapshot, and continue from it.

    Returns the (still open) session; the caller closes it.
    """
    from meshnode.runtime import kv

    t0 = time.monotonic()
    ts = await node.open_session(peer)
    emit({"event": "session", "session": ts.session_id, "peer": str(ts.peer_id),
          "open_s": time.monotonic() - t0})
    t0 = time.monotonic()
    tensors, meta, state = await in_model_thread(lm, kv.prefill_and_capture, lm, prompt_ids)
    await _send(node, ts, tensors, meta, emit, path, capture_s=time.monotonic() - t0)
    if reference:
        toks, logits = await in_model_thread(lm, kv.generate_reference, lm, prompt_ids, n_tokens)
        emit({"event": "reference", "turn": 1, "tokens": toks, "logits_blake3": logits_digest(logits),
              "text": decode(lm, toks)})
    if turn2_ids:
        t0 = time.monotonic()
        delta, dmeta = await in_model_thread(lm, kv.append_turn, lm, state, list(turn2_ids))
        await _send(node, ts, delta, dmeta, emit, path, capture_s=time.monotonic() - t0)
        full, fmeta = await in_model_thread(lm, kv.capture, lm, state)
        await _send(node, ts, full, fmeta, emit, path, capture_s=0.0)
        if reference:
            toks, logits = await in_model_thread(lm, kv.continue_greedy, lm, state, n_tokens)
            emit({"event": "reference", "turn": 2, "tokens": toks, "logits_blake3": logits_digest(logits),
                  "text": decode(lm, toks)})
    return ts


async def _send(node: Node, ts: TensorSession, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                emit: Emit, path: str | None, capture_s: float) -> Sent:
    sent = await send_state(ts, tensors, meta, path=path)
    emit({"event": "sent", "session": ts.session_id, "message_id": sent.message_id, "kind": meta["kind"],
          "tokens_range": [meta["token_start"], meta["token_end"]], "bytes": sent.nbytes, "path": sent.path,
          "capture_s": capture_s, "transfer_s": sent.elapsed_s, "tensors": len(tensors)})
    return sent


async def find_peer(node: Node, lm: LoadedModel, timeout_s: float, emit: Emit | None = None) -> str:
    """Peer ID of the nearest node that serves a model compatible with ``lm`` *and* the ``apply``
    role (it will inject the state, not just acknowledge it); DHT lookup, retried."""
    with trio.fail_after(timeout_s):
        while True:
            found = await node.find_compatible(lm.signature, role=APPLY_ROLE)
            if found:
                if emit is not None:
                    emit({"event": "found", "compat_key": lm.signature.compat_key,
                          "providers": [{"peer_id": p.peer_id, "reachability": p.reachability,
                                         "latency_ms": p.latency_ms} for p in found]})
                return found[0].peer_id
            await trio.sleep(0.3)
