"""The node's tensor capability: sessions over libp2p streams plus bulk TCP and shm data lanes.

``service`` (admission, registry, open/accept) · ``driver`` (one session over one stream) ·
``lanes_in`` (listeners and the pre-auth gate) · ``lanes_out`` (our lanes to a peer) ·
``buffers`` (receive memory) · ``events`` (what it publishes on the node's bus).
"""

from meshnode.tensor.driver import Received, Sent, SessionClosed, TensorSession
from meshnode.tensor.received import CircuitLimitError
from meshnode.tensor.service import APPLY_ROLE, TENSOR_PROTOCOL, TensorService

__all__ = ["APPLY_ROLE", "CircuitLimitError", "TENSOR_PROTOCOL", "Received", "SessionClosed", "Sent", "TensorService",
           "TensorSession"]
