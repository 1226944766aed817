"""Lane control: the sealed control messages that set up data lanes and undo a failed lane send.

Three bodies, each a bounded msgpack map carried in a sealed control frame of the session (so they
are authenticated, ordered and replay-proof like every other control frame, and need no second
libp2p stream):

* ``LANES {"bulk": [[ip, port], ...], "shm": name | nil}`` — where the *sender of this frame*
  accepts data lanes (it is the data receiver on them). Sent once the session is READY; a later
  LANES replaces the earlier offer. Addresses are IP literals only (never resolved names). Two
  optional keys open a bulk lane through NATs (a TCP simultaneous open, ordered by these frames):

  - ``"knock": port`` — from a data sender that cannot reach the peer's offered addresses: it has
    just started dialling the peer's first offered bulk port of that family, at the address it
    reaches the peer on, from local ``port`` (its SYN opened its own NAT and died at the peer's);
    "dial me back there now" (its own offer is repeated unchanged);
  - ``"knocked": [ip, port]`` — the answer: the sender of this frame has started dialling
    ``[ip, port]`` (the asker's address as seen here, and its ``knock`` port) from that bulk port.
    The SYNs cross: one TCP connection both ends ``connect()``ed, on which the asker is the lane
    connector as on any lane. ``knocked`` absent in the answer: no knock (not behind a NAT, or
    knocks already in flight).
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
    knocked: tuple[str, int] | None = None
    knock: int | None = None


def encode_lanes(offer: LaneOffer) -> bytes:
    body: dict = {"bulk": [[h, p] for h, p in offer.bulk[:MAX_BULK_ADDRS]], "shm": offer.shm}
    if offer.knocked is not None:
        body["knocked"] = list(offer.knocked)
    if offer.knock is not None:
        body["knock"] = offer.knock
    return pack(body)


def _endpoint(item: object, what: str) -> tuple[str, int]:
    if not isinstance(item, list) or len(item) != 2:
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} must be [ip, port]")
    host, port = item
    if not isinstance(host, str):
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} host must be a string")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} host must be an IP literal") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} port out of range")
    return host, port


def decode_lanes(body: bytes) -> LaneOffer:
    d = unpack_map(body, MAX_LANE_BODY, max_array=MAX_BULK_ADDRS, max_map=5, max_str=64, max_bin=0)
    bulk = [_endpoint(item, "bulk lane address") for item in need(d, "bulk", list)]
    shm = d.get("shm")
    if shm is not None and (not isinstance(shm, str) or not SHM_NAME.fullmatch(shm)):
        raise ProtocolError(ErrorCode.MALFORMED, "shm lane name malformed")
    knocked = d.get("knocked")
    knock = d.get("knock")
    if knock is not None and (isinstance(knock, bool) or not isinstance(knock, int)
                              or not 0 < knock < 65536):
        raise ProtocolError(ErrorCode.MALFORMED, "knock port out of range")
    return LaneOffer(tuple(bulk), shm,
                     None if knocked is None else _endpoint(knocked, "knocked address"), knock)


def encode_mid(message_id: int) -> bytes:
    """ABANDON and ABANDONED body."""
    return pack({"mid": message_id})


def decode_mid(body: bytes) -> int:
    d = unpack_map(body, 64, max_array=0, max_map=2, max_str=8, max_bin=0)
    return need_uint(d, "mid")
