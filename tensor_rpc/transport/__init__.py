"""Transports for tensor sessions: the libp2p stream (in ``meshnode.tensor_service``), a direct TCP
bulk lane and a same-host shared-memory lane. Lanes carry the session's sealed chunks only; headers,
acks and credits stay on the libp2p stream. Lane sockets prove the session key before any payload
(``auth``)."""

from .auth import KIND_BULK, KIND_SHM, LaneAuthError, lane_key
from .lane import LaneReceiver, LaneSender, tune
from .paths import PATHS, parse_peer_paths, path_order
from .shm import janitor, segments_of

__all__ = ["KIND_BULK", "KIND_SHM", "PATHS", "LaneAuthError", "LaneReceiver", "LaneSender",
           "janitor", "lane_key", "parse_peer_paths", "path_order", "segments_of", "tune"]
