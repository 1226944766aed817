"""AutoNAT v2 wire messages (libp2p/specs ``autonat/autonat-v2.md``), declared with
:mod:`meshnode.nat.pbschema` (no generated code). Each message is varint-length-prefixed; every
read is bounded (``MAX_MESSAGE_BYTES``) before a byte is buffered.
"""

from __future__ import annotations

from typing import Any

from meshnode.nat.pbschema import F, WireError, build, encode, scalar, sub
from meshnode.nat.pbschema import decode as decode
from meshnode.nat.pbschema import read as _read

DIAL_REQUEST_PROTOCOL = "/libp2p/autonat/2/dial-request"
DIAL_BACK_PROTOCOL = "/libp2p/autonat/2/dial-back"

#: a DialRequest with 16 addresses, or a DialDataResponse of 4096 data bytes, fits easily
MAX_MESSAGE_BYTES = 8192
MAX_ADDRS = 16
DIAL_DATA_CHUNK = 4096  # spec: the data field of each DialDataResponse is at most 4096 bytes

# DialStatus
DIAL_UNUSED, E_DIAL_ERROR, E_DIAL_BACK_ERROR, DIAL_OK = 0, 100, 101, 200
# DialResponse.ResponseStatus
E_INTERNAL_ERROR, E_REQUEST_REJECTED, E_DIAL_REFUSED, RESPONSE_OK = 0, 100, 101, 200
# DialBackResponse.DialBackStatus
DIAL_BACK_OK = 0

_CLASSES = build("latentlink.autonatv2", {
    "DialRequest": [scalar("addrs", 1, F.TYPE_BYTES, repeated=True), scalar("nonce", 2, F.TYPE_FIXED64)],
    "DialDataRequest": [scalar("addrIdx", 1, F.TYPE_UINT32), scalar("numBytes", 2, F.TYPE_UINT64)],
    "DialResponse": [scalar("status", 1, F.TYPE_INT32), scalar("addrIdx", 2, F.TYPE_UINT32),
                     scalar("dialStatus", 3, F.TYPE_INT32)],
    "DialDataResponse": [scalar("data", 1, F.TYPE_BYTES)],
    "DialBack": [scalar("nonce", 1, F.TYPE_FIXED64)],
    "DialBackResponse": [scalar("status", 1, F.TYPE_INT32)],
    "Message": [sub("dialRequest", 1, "DialRequest"), sub("dialResponse", 2, "DialResponse"),
                sub("dialDataRequest", 3, "DialDataRequest"),
                sub("dialDataResponse", 4, "DialDataResponse")],
}, oneofs={"Message": "msg"})
Message = _CLASSES["Message"]
DialBack = _CLASSES["DialBack"]
DialBackResponse = _CLASSES["DialBackResponse"]
AutonatError = WireError


async def read(stream: Any, cls: Any) -> Any:
    """One AutoNAT message of type ``cls`` (bounded to ``MAX_MESSAGE_BYTES``)."""
    return await _read(stream, cls, MAX_MESSAGE_BYTES)


__all__ = ["AutonatError", "encode", "decode"]


def dial_request(addrs: list[bytes], nonce: int) -> Any:
    m = Message()
    m.dialRequest.addrs.extend(addrs)
    m.dialRequest.nonce = nonce
    return m


def dial_response(status: int, addr_idx: int = 0, dial_status: int = DIAL_UNUSED) -> Any:
    m = Message()
    m.dialResponse.status = status
    m.dialResponse.addrIdx = addr_idx
    m.dialResponse.dialStatus = dial_status
    return m


def dial_data_request(addr_idx: int, num_bytes: int) -> Any:
    m = Message()
    m.dialDataRequest.addrIdx = addr_idx
    m.dialDataRequest.numBytes = num_bytes
    return m


def dial_data_response(data: bytes) -> Any:
    m = Message()
    m.dialDataResponse.data = data
    return m
