"""Every state of a tensor session and every frame and call legal in it, in one table (h11 style).

``docs/PROTOCOL.md`` §9 prints the same table; ``tests/test_tensor_rpc_docs.py`` checks they agree.
A frame not listed for the current state ends the session with ``STATE`` naming both; a local call
not listed raises :class:`~tensor_rpc.errors.UsageError`. In CLOSED and ERROR all peer input is
ignored, and the calls that may race the end of a session (``close``, ``refuse``, ``send_failed``,
``receive_chunk``) are legal there and do nothing.

The handshake has two states so that the *initiator proves first*: the responder sends its AUTH
(identity signature and shared-token proof) only after it has verified the initiator's, so a peer
that guesses a weak shared token gets nothing to test its guesses against offline.

::

    initiator: HELLO --HELLO(r)/send AUTH(i)--> AUTH --AUTH(r)--> READY
    responder: HELLO --HELLO(i)/send HELLO(r)--> AUTH --AUTH(i)/send AUTH(r)--> READY
    READY <-> STREAMING (a message in flight either way) --CLOSE/ABORT/error--> CLOSED | ERROR
"""

from __future__ import annotations

import enum

from .framing import FrameType as F


class State(enum.Enum):
    HELLO = "HELLO"  # waiting for the peer's HELLO
    AUTH = "AUTH"  # HELLOs exchanged, keys derived, waiting for the peer's AUTH
    READY = "READY"  # authenticated, nothing in flight
    STREAMING = "STREAMING"  # at least one message in flight, either direction
    CLOSED = "CLOSED"  # clean end (CLOSE, or a clean ABORT during the handshake)
    ERROR = "ERROR"  # ended by an error, timeout or refusal


HANDSHAKE = frozenset({State.HELLO, State.AUTH})
OPEN = frozenset({State.READY, State.STREAMING})
TERMINAL = frozenset({State.CLOSED, State.ERROR})

_AFTER_HANDSHAKE = frozenset({F.HEADER, F.CHUNK, F.DIGEST, F.ACK, F.REJECT, F.CREDIT, F.CLOSE,
                              F.LANES, F.ABANDON, F.ABANDONED, F.ABORT})

#: (state) -> frame types the peer may send in it
FRAMES: dict[State, frozenset[F]] = {
    State.HELLO: frozenset({F.HELLO, F.ABORT}),
    State.AUTH: frozenset({F.AUTH, F.ABORT}),
    State.READY: _AFTER_HANDSHAKE,
    State.STREAMING: _AFTER_HANDSHAKE,
    State.CLOSED: frozenset(),
    State.ERROR: frozenset(),
}

#: (local call) -> states it is legal in
CALLS: dict[str, frozenset[State]] = {
    "start": frozenset({State.HELLO}),
    "send_message": OPEN,
    "send_failed": OPEN | TERMINAL,  # no-op once ended
    "offer_lanes": OPEN,
    "receive_chunk": OPEN | TERMINAL,  # no-op once ended
    "lane_secret": OPEN,
    "set_receive_buffer": OPEN,
    "close": HANDSHAKE | OPEN | TERMINAL,  # no-op once ended
    "refuse": HANDSHAKE | OPEN | TERMINAL,  # no-op once ended
}
