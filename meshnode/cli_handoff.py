"""``meshnode handoff send|receive``: a node with a model loaded acts as KV sender or receiver.

The CLI layer over :mod:`meshnode.handoff` (one JSON object per event with ``--json``); exit code
0 when the job is done, 1 when the handoff failed (the error event names the code and fields), 2
when no model is given or it is missing/unreadable. Each role's options: :mod:`meshnode.cli_parser`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from meshnode.config import Config
from meshnode.runtime.source import resolve_model_source

EXIT_RUNTIME, EXIT_CONFIG = 1, 2  # the same codes as meshnode.cli


def _ids(lm: Any, text: str | None, ids: str | None, chat: bool) -> list[int] | None:
    if ids:
        return [int(x) for x in ids.split(",") if x.strip()]
    if text is None:
        return None
    if lm.tokenizer is None:
        raise SystemExit("meshnode: this model has no tokenizer; pass token ids")
    if chat and getattr(lm.tokenizer, "chat_template", None):
        out = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    return list(lm.tokenizer(text)["input_ids"])


def cmd_handoff(cfg: Config, args: argparse.Namespace) -> int:
    """Run a node with ``[runtime].model`` loaded and act as KV sender or receiver (meshnode.handoff).

    A missing or unreadable model raises ``ModelNotFoundError`` (exit 2) before the node starts."""
    if not cfg.runtime.model:
        print("meshnode: handoff needs a model (--model PATH or runtime.model)", file=sys.stderr)
        return EXIT_CONFIG
    resolve_model_source(cfg.runtime.model)
    import trio

    from meshnode import handoff
    from meshnode.logs import setup_logging
    from meshnode.node import Node
    from meshnode.tensor import SessionClosed
    from tensor_rpc import ProtocolError

    setup_logging(cfg.node.log_level, cfg.node.log_json)

    def emit(ev: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(ev, default=str), flush=True)
        else:
            print(ev.pop("event"), " ".join(f"{k}={v}" for k, v in ev.items()), flush=True)

    async def role(node: Node) -> None:
        lm = await node.wait_model()
        emit({"event": "model", "compat_key": lm.signature.compat_key, "family": lm.signature.family,
              "dtype": lm.dtype_name, "threads": lm.threads})
        if args.role == "receive":
            await handoff.serve_receiver(node, lm, args.tokens, emit, sessions=args.sessions)
            return
        prompt = _ids(lm, args.prompt, args.prompt_ids, args.chat)
        if not prompt:
            raise SystemExit("meshnode: handoff send needs --prompt or --prompt-ids")
        if args.peer and "/p2p/" in args.peer:
            await node.connect(args.peer)
            peer = args.peer.rsplit("/p2p/", 1)[1]
        else:
            peer = args.peer or await handoff.find_peer(node, lm, args.find_timeout, emit)
        turn2 = _ids(lm, args.turn2, args.turn2_ids, False)
        ts = await handoff.hand_off(node, lm, peer, prompt, args.tokens, emit, turn2_ids=turn2,
                                    path=args.path)
        if not args.wait:
            await ts.close("handoff done")

    failed: list[int] = []

    async def main() -> None:
        node = Node(cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            emit({"event": "started", "peer_id": str(node.peer_id), "addrs": [str(a) for a in node.addrs],
                  "control_port": node.control_port})
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as inner:
                    async def until_signal() -> None:
                        async for _sig in signals:
                            inner.cancel_scope.cancel()
                            return

                    inner.start_soon(until_signal)
                    try:
                        await role(node)
                        emit({"event": "done"})
                        if args.wait:
                            await trio.sleep_forever()
                    except (SessionClosed, ProtocolError, RuntimeError, trio.TooSlowError) as exc:
                        err = getattr(exc, "error", None) or exc
                        emit({"event": "error", "error": str(exc), "code": getattr(getattr(err, "code", None),
                                                                                  "value", None),
                              "fields": list(getattr(err, "fields", ()))})
                        failed.append(1)
                    inner.cancel_scope.cancel()
            node.stop()

    trio.run(main)
    return EXIT_RUNTIME if failed else 0


# -- control API client -------------------------------------------------------------------------
