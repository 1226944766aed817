"""What a tensor session hands the application: a verified message, a send receipt, the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensor_rpc import ProtocolError
from tensor_rpc.envelope import Envelope, TensorSpec


class SessionClosed(ConnectionError):
    """The tensor session ended (cleanly or not) before the operation completed."""

    def __init__(self, reason: str, error: ProtocolError | None = None) -> None:
        super().__init__(reason if error is None else f"{reason} ({error})")
        self.error = error


class CircuitLimitError(SessionClosed):
    """The message cannot cross the relay circuit that is the only path to the peer: it is
    larger than the relay's per-direction data limit. Raised before a byte is sent."""


@dataclass
class Received:
    """One verified message: its envelope and zero-copy views of its tensors.

    The views (and any tensor made from them) stay valid as long as they are referenced: the node
    reuses a message's memory only once nothing exports it any more, so verified bytes are never
    rewritten under the application. :meth:`release` drops this object's own views at once (the
    memory comes back as soon as the application's tensors over it are gone too)."""

    peer_id: str
    header: Envelope
    buffer: memoryview
    tensors: list[tuple[TensorSpec, memoryview]]
    path: str
    elapsed_s: float
    sink: Any = None  # set when the message streamed into a sink (see TensorSession.sink_factory)
    _release: Any = field(default=None, repr=False)

    @property
    def message_id(self) -> int:
        return self.header.message_id

    def release(self) -> None:
        owner, self._release = self._release, None
        views = [v for _, v in self.tensors] + [self.buffer]
        obj = self.buffer.obj
        self.tensors, self.buffer = [], memoryview(b"")
        for v in views:
            try:
                v.release()
            except BufferError:  # a tensor over this very view lives on: the pool sees it exported
                pass
        if owner is not None:
            owner(obj)  # pooled only if nothing exports it any more (meshnode.tensor.buffers)


@dataclass(frozen=True)
class Sent:
    message_id: int
    nbytes: int
    checksums: tuple[bytes, ...]
    path: str
    elapsed_s: float
