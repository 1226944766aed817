"""Synchronous facade: a :class:`~meshnode.node.Node` on its own trio thread.

Inference code is usually plain Python or asyncio, and py-libp2p cannot run inside an asyncio loop
(DESIGN.md §7 trap 6). ``SyncNode`` runs the node in ``trio.run`` on a background thread and turns
each call into ``trio.from_thread.run`` (~0.3 ms). From asyncio, call these methods through
``asyncio.to_thread(...)`` so the event loop is not blocked.

    with SyncNode(load_config(...)) as node:
        s = node.open_session(peer_id)
        s.send([("x", "float32", x.shape, x)], kind=Kind.HIDDEN_SLICE, layers=(3, 4), tokens=(0, 8))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import trio

from discovery.signature import ModelSignature
from meshnode.config import Config
from meshnode.node import Node
from meshnode.tensor import Received, Sent, TensorSession


class SyncSession:
    """Blocking wrapper over a :class:`TensorSession` owned by a :class:`SyncNode`."""

    def __init__(self, owner: SyncNode, session: TensorSession) -> None:
        self._owner, self.session = owner, session

    @property
    def session_id(self) -> str:
        return self.session.session_id

    def send(self, tensors: Sequence[tuple[str, str, Sequence[int], Any]], **kw: Any) -> Sent:
        return self._owner.call(lambda: self.session.send(tensors, **kw))

    def receive(self, timeout_s: float | None = None) -> Received:
        return self._owner.call(lambda: self.session.receive(timeout_s))

    def close(self) -> None:
        self._owner.call(lambda: self.session.close())


class SyncNode:
    """Start with ``with SyncNode(cfg) as node:`` or ``node.start()`` / ``node.stop()``."""

    def __init__(self, config: Config, signature: ModelSignature | None = None,
                 start_timeout_s: float = 60.0) -> None:
        self.config, self._signature, self._start_timeout_s = config, signature, start_timeout_s
        self.node: Node | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> SyncNode:
        self._thread = threading.Thread(target=self._main, name="latentlink-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            raise TimeoutError("node did not start in time")
        if self._error is not None:
            raise RuntimeError(f"node failed to start: {self._error}") from self._error
        return self

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # surfaced to the caller of start()/stop()
            self._error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        node = Node(self.config, self._signature)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            self.node = node
            self._ready.set()
            await self._stop.wait()
            node.stop()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._token is not None and self._stop is not None and self._thread is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout_s)

    def __enter__(self) -> SyncNode:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- calls -----------------------------------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``await fn()`` on the node's trio thread and return its result."""
        if self._token is None:
            raise RuntimeError("node not started")

        async def runner() -> Any:
            return await fn()

        return trio.from_thread.run(runner, trio_token=self._token)

    def _node(self) -> Node:
        if self.node is None:
            raise RuntimeError("node not started")
        return self.node

    @property
    def peer_id(self) -> str:
        return str(self._node().peer_id)

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self._node().addrs]

    def serve(self, signature: ModelSignature) -> None:
        trio.from_thread.run_sync(self._node().serve, signature, trio_token=self._token)

    def connect(self, addr: str) -> None:
        self.call(lambda: self._node().connect(addr))

    def advertise(self, signature: ModelSignature) -> None:
        self.call(lambda: self._node().advertise(signature))

    def find_compatible(self, signature_or_key: ModelSignature | str, limit: int = 20) -> list:
        return self.call(lambda: self._node().find_compatible(signature_or_key, limit))

    def open_session(self, peer: str) -> SyncSession:
        return SyncSession(self, self.call(lambda: self._node().open_session(peer)))

    def accept_session(self, timeout_s: float | None = None) -> SyncSession:
        return SyncSession(self, self.call(lambda: self._node().accept_session(timeout_s)))
