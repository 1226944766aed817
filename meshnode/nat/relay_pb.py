"""Circuit Relay v2 wire messages (libp2p/specs ``relay/circuit-v2.md``), declared with
:mod:`meshnode.nat.pbschema`. proto2 like the spec (explicit presence: a ``type`` of 0 is sent,
not omitted); the spec's ``required`` fields are checked by the code that reads them. Messages are
varint-length-prefixed and read bounded to ``MAX_MESSAGE_BYTES`` (go-libp2p's 4 KiB).
"""

from __future__ import annotations

from typing import Any

from meshnode.nat.pbschema import F, WireError, build, encode, scalar, sub
from meshnode.nat.pbschema import read as _read

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE_BYTES = 4096

HOP_RESERVE, HOP_CONNECT, HOP_STATUS = 0, 1, 2
STOP_CONNECT, STOP_STATUS = 0, 1
OK = 100
RESERVATION_REFUSED = 200
RESOURCE_LIMIT_EXCEEDED = 201
PERMISSION_DENIED = 202
CONNECTION_FAILED = 203
NO_RESERVATION = 204
MALFORMED_MESSAGE = 400
UNEXPECTED_MESSAGE = 401
STATUS_NAMES = {OK: "OK", RESERVATION_REFUSED: "RESERVATION_REFUSED",
                RESOURCE_LIMIT_EXCEEDED: "RESOURCE_LIMIT_EXCEEDED",
                PERMISSION_DENIED: "PERMISSION_DENIED", CONNECTION_FAILED: "CONNECTION_FAILED",
                NO_RESERVATION: "NO_RESERVATION", MALFORMED_MESSAGE: "MALFORMED_MESSAGE",
                UNEXPECTED_MESSAGE: "UNEXPECTED_MESSAGE"}

_CLASSES = build("latentlink.circuitv2", {
    "Peer": [scalar("id", 1, F.TYPE_BYTES), scalar("addrs", 2, F.TYPE_BYTES, repeated=True)],
    "Reservation": [scalar("expire", 1, F.TYPE_UINT64),
                    scalar("addrs", 2, F.TYPE_BYTES, repeated=True),
                    scalar("voucher", 3, F.TYPE_BYTES)],
    "Limit": [scalar("duration", 1, F.TYPE_UINT32), scalar("data", 2, F.TYPE_UINT64)],
    "HopMessage": [scalar("type", 1, F.TYPE_INT32), sub("peer", 2, "Peer"),
                   sub("reservation", 3, "Reservation"), sub("limit", 4, "Limit"),
                   scalar("status", 5, F.TYPE_INT32)],
    "StopMessage": [scalar("type", 1, F.TYPE_INT32), sub("peer", 2, "Peer"),
                    sub("limit", 3, "Limit"), scalar("status", 4, F.TYPE_INT32)],
}, syntax="proto2")
HopMessage = _CLASSES["HopMessage"]
StopMessage = _CLASSES["StopMessage"]
RelayWireError = WireError


async def read(stream: Any, cls: Any) -> Any:
    msg = await _read(stream, cls, MAX_MESSAGE_BYTES)
    if not msg.HasField("type"):
        raise WireError(f"{cls.DESCRIPTOR.name} without its required type")
    return msg


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, f"status {code}")


def hop(kind: int, *, status: int | None = None, peer: bytes | None = None,
        limit: tuple[int, int] | None = None, expire: int | None = None,
        addrs: list[bytes] | None = None) -> Any:
    m = HopMessage()
    m.type = kind
    if status is not None:
        m.status = status
    if peer is not None:
        m.peer.id = peer
    if limit is not None:
        m.limit.duration, m.limit.data = limit
    if expire is not None:
        m.reservation.expire = expire
        m.reservation.addrs.extend(addrs or [])
    return m


def stop(kind: int, *, status: int | None = None, peer: bytes | None = None,
         limit: tuple[int, int] | None = None) -> Any:
    m = StopMessage()
    m.type = kind
    if status is not None:
        m.status = status
    if peer is not None:
        m.peer.id = peer
    if limit is not None:
        m.limit.duration, m.limit.data = limit
    return m


__all__ = ["HopMessage", "RelayWireError", "StopMessage", "encode", "hop", "read", "stop"]
