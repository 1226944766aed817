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
from .message import (
    ChunkSink,
    GatherSource,
    IncomingMessage,
    MemorySource,
    OutgoingMessage,
    PayloadSource,
    checksum,
)
from .session import Role, Session, State
from .tensors import pack_tensors, tensor_source

__all__ = [
    "CIPHERS", "DTYPES", "SUPPORTED_VERSIONS", "AccessPolicy", "AckReceived", "Agreement",
    "ApplyMode", "ChunkSink", "Closed", "CreditGranted", "Envelope", "EnvelopeBounds", "ErrorCode", "Event",
    "GatherSource", "HandshakeComplete", "Hello", "IncomingMessage", "Kind", "Limits", "MessageReceived",
    "MessageRejected", "MessageStarted", "MemorySource", "Opener", "OutgoingMessage",
    "PayloadSource", "ProtocolError", "Role",
    "Sealer", "Session", "State", "TensorSpec", "TokenBucket", "checksum", "pack_tensors",
    "tensor_source",
]
