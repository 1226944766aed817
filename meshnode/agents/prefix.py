"""``/latentlink/prefix/1.0.0``: ask a peer which prefix of a context it holds, as a digest chain.

A sender about to hand over a context asks the receiver first; the receiver answers with its
chain (:mod:`meshnode.agents.context`), the sender ships only the blocks after the common ones.
The answer is a claim, not a promise: the shipped delta names the digest it starts from, and the
receiver checks that digest against its own bits before applying anything (a mismatch is refused
at the header and the sender sends the full state instead — never a wrong one).

Wire (one request, one answer, each ``u32 big-endian length || msgpack``, ``discovery/streamio.py``):
request ``{"context": str ≤ 128, "block": uint}``; answer ``{"block": uint, "length": uint,
"chain": [bin(32) …]}`` with at most ``MAX_BLOCKS`` entries (empty when the context is not held or
its block size differs). Bounded both ways: request ≤ 1 KiB, answer ≤ 40 + 35 × ``MAX_BLOCKS``
bytes, each side within ``timeout_s``; a malformed request closes the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID

from discovery.streamio import FrameError, pack_frame, read_frame, unpack_bounded
from meshnode.host import close_stream, new_stream_or_relayed
from meshnode.logs import get_logger, kv

PROTOCOL = "/latentlink/prefix/1.0.0"
MAX_BLOCKS = 16384
MAX_REQUEST = 1024
MAX_ANSWER = 40 + 35 * MAX_BLOCKS
log = get_logger("meshnode.agents")
Chain = tuple[int, int, list[bytes]]  # block, length, digests


def answer(ctx: Any, block: int) -> dict:
    if ctx is None or ctx.block != block:
        return {"block": block, "length": 0, "chain": []}
    return {"block": block, "length": ctx.length, "chain": list(ctx.digests[:MAX_BLOCKS])}


def parse_answer(body: bytes, block: int) -> Chain:
    d = unpack_bounded(body, max_items=MAX_BLOCKS, max_str=64, max_bin=32, max_bytes=MAX_ANSWER)
    if not isinstance(d, dict) or d.get("block") != block or not isinstance(d.get("length"), int):
        raise FrameError("prefix answer malformed")
    chain = d.get("chain")
    if not isinstance(chain, list) or not all(isinstance(x, bytes) and len(x) == 32 for x in chain):
        raise FrameError("prefix answer chain malformed")
    return block, d["length"], chain


class PrefixService:
    """Serves our contexts' chains (``lookup(name)`` → a Context or ``None``) and asks peers."""

    def __init__(self, host: Any, lookup: Callable[[str], Any], timeout_s: float,
                 on_refuse: Callable[[str], None]) -> None:
        self.host, self._lookup, self.timeout_s, self._refuse = host, lookup, timeout_s, on_refuse

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(PROTOCOL, self._serve)
        task_status.started()
        await trio.sleep_forever()

    async def _serve(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        clean = False
        try:
            with trio.fail_after(self.timeout_s):
                req = unpack_bounded(await read_frame(stream, MAX_REQUEST), max_items=4, max_str=128,
                                     max_bin=0, max_bytes=MAX_REQUEST)
                if not isinstance(req, dict) or not isinstance(req.get("context"), str) or \
                        not isinstance(req.get("block"), int) or not 0 < req["block"] <= 1 << 20:
                    raise FrameError("prefix request malformed")
                await stream.write(pack_frame(answer(self._lookup(req["context"]), req["block"])))
                clean = True
        except (FrameError, trio.TooSlowError) as exc:
            self._refuse("prefix_bad_request")
            log.warning("prefix request refused", extra=kv(peer=peer, why=str(exc)[:200]))
        except Exception as exc:  # boundary: the peer went away mid-answer
            log.debug("prefix answer failed", extra=kv(peer=peer, err=exc))
        finally:
            await close_stream(stream, clean, 1.0)

    async def ask(self, peer: ID, context: str, block: int) -> Chain:
        """The chain ``peer`` holds for ``context`` (empty when none); raises on failure."""
        stream = await new_stream_or_relayed(self.host, peer, PROTOCOL, self.timeout_s)
        try:
            with trio.fail_after(self.timeout_s):
                await stream.write(pack_frame({"context": context, "block": block}))
                return parse_answer(await read_frame(stream, MAX_ANSWER), block)
        finally:
            await close_stream(stream, True, 1.0)
