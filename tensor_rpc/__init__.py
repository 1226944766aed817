"""LatentLink tensor protocol: a sans-I/O core (bytes in, events out) for exchanging model state.

Read ``docs/PROTOCOL.md`` for the wire contract. The node drives a :class:`Session` per libp2p
stream; transports in ``tensor_rpc.transport`` carry sealed chunks on faster lanes.
"""

from .access import AccessPolicy, TokenBucket
from .aead import CIPHERS, Opener, Sealer
from .envelope import DTYPES, ApplyMode, Envelope, EnvelopeBounds, Kind, TensorSpec
from .errors import ErrorCode, ProtocolError
from .events import (
    AckReceived,
    Closed,
    CreditGranted,
    Event,
    HandshakeComplete,
    MessageReceived,
    MessageRejected,
    MessageStarted,
)
from .handshake import SUPPORTED_VERSIONS, Agreement, Hello
from .limits import Limits
from .message import IncomingMessage, OutgoingMessage, checksum
from .session import Role, Session, State
from .tensors import pack_tensors

__all__ = [
    "CIPHERS", "DTYPES", "SUPPORTED_VERSIONS", "AccessPolicy", "AckReceived", "Agreement",
    "ApplyMode", "Closed", "CreditGranted", "Envelope", "EnvelopeBounds", "ErrorCode", "Event",
    "HandshakeComplete", "Hello", "IncomingMessage", "Kind", "Limits", "MessageReceived",
    "MessageRejected", "MessageStarted", "Opener", "OutgoingMessage", "ProtocolError", "Role",
    "Sealer", "Session", "State", "TensorSpec", "TokenBucket", "checksum", "pack_tensors",
]
