"""Session metadata as signed, replicated pycrdt documents (protocol ``/latentlink/crdt/1.0.0``).

Modules, one job each: ``schema`` (typed document), ``wire`` (frames), ``signing`` (Ed25519),
``yupdate`` (strict decoder of pycrdt updates), ``ownership`` (who may write which key),
``replica`` (admission rules), ``ratelimit`` / ``inflight`` (per-peer budgets, bounded pull
table), ``sync`` (sans-I/O engine), ``store`` (on-disk log), ``refusals`` (count and log what is
refused), ``service`` (libp2p adapter). The node imports only what is re-exported here.
"""

from crdt_state.limits import CrdtLimits
from crdt_state.schema import LineageEdge, Outcome, Participant, SessionDoc, TensorMessage
from crdt_state.service import PROTOCOL_ID, CrdtService, SessionChange
from crdt_state.store import UpdateStore
from crdt_state.wire import SyncProtocolError

__all__ = [
    "PROTOCOL_ID",
    "CrdtLimits",
    "CrdtService",
    "LineageEdge",
    "Outcome",
    "Participant",
    "SessionChange",
    "SessionDoc",
    "SyncProtocolError",
    "TensorMessage",
    "UpdateStore",
]
