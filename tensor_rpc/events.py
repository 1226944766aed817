"""Events a :class:`~tensor_rpc.session.Session` returns: the only way it talks to its owner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .envelope import Envelope, TensorSpec
from .errors import ProtocolError
from .handshake import Agreement
from .lanectl import LaneOffer


class Event:
    """Base class, so owners can ``match`` or ``isinstance`` on one type."""


@dataclass(frozen=True)
class HandshakeComplete(Event):
    agreement: Agreement


@dataclass(frozen=True)
class MessageStarted(Event):
    """A header arrived and passed validation; chunks may follow (the buffer is allocated when
    the first one arrives)."""

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
    charged: int = 0  # bytes still held in the receive budget: the owner releases them on hand-over


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
class MessageAbandoned(Event):
    """The peer confirmed that our message ``message_id`` (whose lane failed, see
    ``Session.send_failed``) was never delivered and never will be: it may be sent again."""

    message_id: int


@dataclass(frozen=True)
class LanesOffered(Event):
    """The peer told us where it accepts data lanes (replaces any earlier offer)."""

    offer: LaneOffer


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
