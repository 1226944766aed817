"""Lane control: the sealed control messages that set up data lanes and undo a failed lane send.

Three bodies, each a bounded msgpack map carried in a sealed control frame of the session (so they
are authenticated, ordered and replay-proof like every other control frame, and need no second
libp2p stream):

* ``LANES {"bulk": [[ip, port], ...], "shm": name | nil}`` — where the *sender of this frame*
  accepts data lanes (it is the data receiver on them). Sent once the session is READY; a later
  LANES replaces the earlier offer. Addresses are IP literals only (never resolved names).
* ``ABANDON {"mid": uint}`` — the data sender gave up on its message ``mid`` (its lane failed).
* ``ABANDONED {"mid": uint}`` — the data receiver's answer: ``mid`` is not pending any more and
  will never be delivered from here on. Because control frames are ordered, an ACK or REJECT the
  receiver had already sent for ``mid`` arrives *before* this answer, so the sender knows whether
  to resend (exactly once, whatever the timing).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .codec import need, need_uint, pack, unpack_map
from .errors import ErrorCode, ProtocolError

MAX_LANE_BODY = 4096
MAX_BULK_ADDRS = 8
SHM_NAME = re.compile(r"latentlink-lane-[0-9a-f]{32}")


@dataclass(frozen=True)
class LaneOffer:
    """Where a peer accepts data lanes: TCP ``(ip, port)`` pairs and an abstract Unix socket."""

    bulk: tuple[tuple[str, int], ...] = ()
    shm: str | None = None


def encode_lanes(offer: LaneOffer) -> bytes:
    return pack({"bulk": [[h, p] for h, p in offer.bulk[:MAX_BULK_ADDRS]], "shm": offer.shm})


def decode_lanes(body: bytes) -> LaneOffer:
    d = unpack_map(body, MAX_LANE_BODY, max_array=MAX_BULK_ADDRS, max_map=4, max_str=64, max_bin=0)
    bulk = []
    for item in need(d, "bulk", list):
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError(ErrorCode.MALFORMED, "bulk lane address must be [ip, port]")
        host, port = item
        if not isinstance(host, str):
            raise ProtocolError(ErrorCode.MALFORMED, "bulk lane host must be a string")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ProtocolError(ErrorCode.MALFORMED, "bulk lane host must be an IP literal") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ProtocolError(ErrorCode.MALFORMED, "bulk lane port out of range")
        bulk.append((host, port))
    shm = d.get("shm")
    if shm is not None and (not isinstance(shm, str) or not SHM_NAME.fullmatch(shm)):
        raise ProtocolError(ErrorCode.MALFORMED, "shm lane name malformed")
    return LaneOffer(tuple(bulk), shm)


def encode_mid(message_id: int) -> bytes:
    """ABANDON and ABANDONED body."""
    return pack({"mid": message_id})


def decode_mid(body: bytes) -> int:
    d = unpack_map(body, 64, max_array=0, max_map=2, max_str=8, max_bin=0)
    return need_uint(d, "mid")
