"""LatentLink tensor protocol: a sans-I/O core (bytes in, events out) for exchanging model state.

Read ``docs/PROTOCOL.md`` for the wire contract. The node drives a :class:`Session` per libp2p
stream; transports in ``tensor_rpc.transport`` carry sealed chunks on faster lanes.
"""

from .access import AccessPolicy, TokenBucket
from .aead import CIPHERS, Opener, Sealer
from .budget import ReceiveBudget
from .envelope import DTYPES, ApplyMode, Envelope, EnvelopeBounds, Kind, TensorSpec
from .errors import ErrorCode, ProtocolError, UsageError
from .events import (
    AckReceived,
    Closed,
    CreditGranted,
    Event,
    HandshakeComplete,
    LanesOffered,
    MessageAbandoned,
    MessageReceived,
    MessageRejected,
    MessageStarted,
)
from .handshake import SUPPORTED_VERSIONS, Agreement, Hello, RuntimeTerms
from .lanectl import LaneOffer
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
from .session import Role, Session
from .states import State
from .tensors import pack_tensors, tensor_source

__all__ = [
    "CIPHERS", "DTYPES", "SUPPORTED_VERSIONS", "AccessPolicy", "AckReceived", "Agreement",
    "ApplyMode", "ChunkSink", "Closed", "CreditGranted", "Envelope", "EnvelopeBounds", "ErrorCode", "Event",
    "GatherSource", "HandshakeComplete", "Hello", "IncomingMessage", "Kind", "LaneOffer",
    "LanesOffered", "Limits", "MessageAbandoned", "MessageReceived", "MessageRejected",
    "MessageStarted", "MemorySource", "Opener", "OutgoingMessage", "PayloadSource",
    "ProtocolError", "ReceiveBudget", "Role", "RuntimeTerms", "Sealer", "Session", "State",
    "TensorSpec", "TokenBucket", "UsageError", "checksum", "pack_tensors", "tensor_source",
]
