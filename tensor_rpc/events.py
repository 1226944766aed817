"""Events a :class:`~tensor_rpc.session.Session` returns: the only way it talks to its owner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .envelope import Envelope, TensorSpec
from .errors import ProtocolError
from .handshake import Agreement


class Event:
    """Base class, so owners can ``match`` or ``isinstance`` on one type."""


@dataclass(frozen=True)
class HandshakeComplete(Event):
    agreement: Agreement


@dataclass(frozen=True)
class MessageStarted(Event):
    """A header arrived and passed validation; its buffer is allocated, chunks may follow."""

    header: Envelope


@dataclass(frozen=True)
class MessageReceived(Event):
    """Every chunk decrypted and every tensor verified; ``tensors`` are views into ``buffer``.

    A message that streamed into a sink has an empty ``buffer`` and ``tensors``; ``sink`` holds
    its (now verified) bytes."""

    header: Envelope
    buffer: memoryview
    tensors: list[tuple[TensorSpec, memoryview]]
    sink: Any = None


@dataclass(frozen=True)
class AckReceived(Event):
    message_id: int
    checksums: tuple[bytes, ...]


@dataclass(frozen=True)
class MessageRejected(Event):
    """Nothing of this message was (or will be) delivered. ``local`` = we rejected it."""

    message_id: int
    error: ProtocolError
    local: bool


@dataclass(frozen=True)
class CreditGranted(Event):
    nbytes: int
    available: int


@dataclass(frozen=True)
class Closed(Event):
    """Terminal. ``error`` is None for a clean close; ``local`` tells who ended the session."""

    reason: str
    error: ProtocolError | None
    local: bool
