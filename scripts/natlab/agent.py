#!/usr/bin/env python3
"""One lab host's node for ``scripts/natlab/matrix``: a real node with a model, driven over stdin.

Runs inside a lab namespace. The model loads once; the node itself is started and stopped per
trial (same identity, fresh state: no connection, no punch memory, no CRDT session documents
left from the last trial), so trials are independent. (With its documents kept, a pair reaches
``crdt.max_documents_per_peer`` — 64 sessions one created with the other — and the receiver
refuses the sessions' logs from then on: documents never retire yet.)
Commands, one JSON object per stdin line; events, one JSON line on stdout:

  {"cmd": "start", "mode": "kv"}     -> {"event": "ready", "peer_id", "addrs"} (relay reservation
                                        held when relay.client = always); mode "kv" applies
                                        handoffs, "drain" takes any payload and drops it
  {"cmd": "stop"}                    -> {"event": "stopped"}
  {"cmd": "handoff", "peer", "addrs", "tokens", "prompt"}
                                     -> connect (direct addresses first, then circuits; up to 3
                                        dials), wait for the path to settle, hand the KV over (a
                                        session that broke off — lost stream, timeout — is
                                        opened once more),
                                        compare: "trial" (with the attempts it took)
  {"cmd": "blast", "peer", "addrs", "nbytes"}
                                     -> connect, then one payload of nbytes over the best path
  {"cmd": "quit"}

The receiving side's applied handoffs arrive as {"event": "applied", ...} (meshnode.handoff).
Every other option is a node setting: ``--set section.key=value``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import multiaddr  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402
from libp2p.host.exceptions import StreamFailure  # noqa: E402
from libp2p.network.exceptions import SwarmException  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.peer.peerinfo import PeerInfo  # noqa: E402

from meshnode import handoff  # noqa: E402
from meshnode.config import load_config  # noqa: E402
from meshnode.host import is_relayed  # noqa: E402
from meshnode.logs import setup_logging  # noqa: E402
from meshnode.node import Node  # noqa: E402
from meshnode.runtime.loader import load_model  # noqa: E402
from meshnode.tensor import SessionClosed  # noqa: E402
from tensor_rpc import Kind  # noqa: E402
from tensor_rpc.errors import ErrorCode, ProtocolError  # noqa: E402

CONNECT_ATTEMPTS = 3
TRIAL_DEADLINE_S = 100.0
HANDOFF_ATTEMPTS = 2


def emit(ev: dict[str, Any]) -> None:
    print(json.dumps(ev, default=str), flush=True)


def kinds(node: Node, peer: ID) -> list[str]:
    return ["relayed" if is_relayed(c) else "direct" for c in node.host.get_network().get_connections(peer)]


async def handoff_trial(node: Node, lm: Any, cmd: dict) -> None:
    peer = ID.from_base58(cmd["peer"])
    addrs = [multiaddr.Multiaddr(a) for a in cmd["addrs"]]
    out: dict[str, Any] = {"event": "trial", "connect_attempts": 0, "handoff_attempts": 0}
    t0 = trio.current_time()
    try:
        for attempt in range(1, CONNECT_ATTEMPTS + 1):  # an application retries a lossy dial
            out["connect_attempts"] = attempt
            try:
                node.host.get_network().unblock_peer(peer)  # a retry, not refused by the negative cache
                await node.host.connect(PeerInfo(peer, addrs))
                break
            except Exception:
                if attempt == CONNECT_ATTEMPTS:
                    raise
        out["connected_s"] = trio.current_time() - t0
        out["first"] = kinds(node, peer)
        out["path"] = await node.holepunch.settled(peer)
        out["settled_s"] = trio.current_time() - t0
        out["ended"] = kinds(node, peer)
        got: list[dict] = []
        for attempt in range(1, HANDOFF_ATTEMPTS + 1):  # and a session that broke off (lost stream, timeout)
            out["handoff_attempts"] = attempt
            try:
                ts = await handoff.hand_off(node, lm, str(peer), cmd["prompt"], cmd["tokens"],
                                            got.append)
                break
            except (SessionClosed, trio.TooSlowError, StreamFailure, SwarmException,
                    ProtocolError) as exc:
                transient = not isinstance(exc, ProtocolError) or exc.code is ErrorCode.TIMEOUT
                if attempt == HANDOFF_ATTEMPTS or not transient:
                    raise
                got.clear()
        out["sent"] = [e for e in got if e["event"] == "sent"]
        out["session_over"] = "relayed" if is_relayed(ts.stream) else "direct"
        out["final"] = kinds(node, peer)
        out["reference"] = next(e for e in got if e["event"] == "reference")
        with trio.move_on_after(10):
            await ts.close("trial done")
    except Exception as exc:  # a failed trial is a result, not a crash
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["outcome"] = node.holepunch.paths.outcomes.get(str(peer))
    emit(out)


async def blast(node: Node, cmd: dict) -> None:
    peer = ID.from_base58(cmd["peer"])
    data = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8)
    data = np.tile(data, cmd["nbytes"] >> 20)
    try:
        await node.host.connect(PeerInfo(peer, [multiaddr.Multiaddr(a) for a in cmd["addrs"]]))
        ts = await node.open_session(peer)  # (waits for the hole punch)
        sent = await ts.send([("blob", "uint8", data.shape, data)], kind=Kind.HIDDEN_SLICE,
                             layers=(0, 1), tokens=(0, 1), timeout_s=300)
        emit({"event": "blast", "path": sent.path, "nbytes": sent.nbytes, "elapsed_s": sent.elapsed_s,
              "mb_s": sent.nbytes / sent.elapsed_s / 1e6, "connection": kinds(node, peer)})
        with trio.move_on_after(10):
            await ts.close("blast done")
    except Exception as exc:  # reported, the agent carries on
        emit({"event": "blast", "error": f"{type(exc).__name__}: {exc}"})


async def drain_blasts(node: Node) -> None:
    """The receiving side of ``blast``: take each payload and drop it."""
    while True:
        ts = await node.accept_session()

        async def take(ts: Any = ts) -> None:
            try:
                while True:
                    (await ts.receive()).release()
            except Exception:  # the session ended
                return
        trio.lowlevel.spawn_system_task(take)


async def main(args: argparse.Namespace) -> None:
    lm = await trio.to_thread.run_sync(lambda: load_model(args.model, cache_dir=args.cache))
    cfg = load_config(None, overrides=[f"node.data_dir={args.data_dir}",
                                       f"host.listen_addrs={args.listen}", *args.set])
    stdin = trio.wrap_file(sys.stdin)
    emit({"event": "model", "compat_key": lm.signature.compat_key})
    node: Node | None = None
    async with trio.open_nursery() as nursery:
        async def run_node(mode: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            """The node, and its receiving side until the node stops (cleanly: ``stop``)."""
            nonlocal node
            shutil.rmtree(cfg.data_dir / "crdt", ignore_errors=True)  # (the docstring says why)
            n = Node(cfg)
            side = trio.CancelScope()

            async def node_task(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await n.run(task_status=task_status)
                side.cancel()

            async def receiving() -> None:
                with side:
                    if mode == "kv":
                        await handoff.serve_receiver(n, lm, args.tokens, emit)
                    else:
                        n.serve(lm.signature, accept=True)
                        await drain_blasts(n)

            async with trio.open_nursery() as inner:
                await inner.start(node_task)
                node = n
                inner.start_soon(receiving)
                task_status.started()
            node = None

        async for line in stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "start":
                await nursery.start(run_node, cmd.get("mode", "kv"))
                assert node is not None
                if cfg.relay.client == "always":
                    with trio.move_on_after(30):
                        while not node.relay_client.circuit_addrs():
                            await trio.sleep(0.02)
                emit({"event": "ready", "peer_id": str(node.peer_id),
                      "addrs": [str(a) for a in node.host.get_addrs()]})
            elif cmd["cmd"] == "stop":
                if node is not None:
                    node.stop()
                    while node is not None:
                        await trio.sleep(0.02)
                emit({"event": "stopped"})
            elif cmd["cmd"] == "handoff" and node is not None:
                with trio.move_on_after(TRIAL_DEADLINE_S) as scope:
                    await handoff_trial(node, lm, cmd)
                if scope.cancelled_caught:  # a trial is a result, never a hang
                    emit({"event": "trial", "error": f"no result within {TRIAL_DEADLINE_S:.0f} s"})
            elif cmd["cmd"] == "blast" and node is not None:
                await blast(node, cmd)
            elif cmd["cmd"] == "quit":
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (the matrix builds a tiny one)")
    p.add_argument("--cache", required=True, help="converted-model cache directory")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--listen", required=True, help="libp2p listen multiaddr (the lab address)")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--set", action="append", default=[], help="node setting section.key=value")
    a = p.parse_args()
    setup_logging(a.log_level, False)
    trio.run(main, a)
