"""AutoNAT v2 wire messages (libp2p/specs ``autonat/autonat-v2.md``), built from a descriptor.

Why a descriptor and not generated ``_pb2`` code: generated files are tied to the protoc that
made them and the runtime that reads them; declaring the seven messages here with
``descriptor_pb2`` keeps us on whatever ``protobuf`` py-libp2p already installs, and the schema
readable in one place. Enums are declared as ``int32`` fields: the same varint on the wire, and a
peer's unknown enum value arrives as a number we can refuse instead of an exception.

Framing (spec "RPC Messages"): each message is prefixed with its length as an unsigned varint.
Every read is bounded (``MAX_MESSAGE_BYTES``) before a byte is buffered.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

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

_F = descriptor_pb2.FieldDescriptorProto
_SCHEMA: dict[str, list[tuple[str, int, int, int]]] = {  # message: (field, number, type, label)
    "DialRequest": [("addrs", 1, _F.TYPE_BYTES, _F.LABEL_REPEATED),
                    ("nonce", 2, _F.TYPE_FIXED64, _F.LABEL_OPTIONAL)],
    "DialDataRequest": [("addrIdx", 1, _F.TYPE_UINT32, _F.LABEL_OPTIONAL),
                        ("numBytes", 2, _F.TYPE_UINT64, _F.LABEL_OPTIONAL)],
    "DialResponse": [("status", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL),
                     ("addrIdx", 2, _F.TYPE_UINT32, _F.LABEL_OPTIONAL),
                     ("dialStatus", 3, _F.TYPE_INT32, _F.LABEL_OPTIONAL)],
    "DialDataResponse": [("data", 1, _F.TYPE_BYTES, _F.LABEL_OPTIONAL)],
    "DialBack": [("nonce", 1, _F.TYPE_FIXED64, _F.LABEL_OPTIONAL)],
    "DialBackResponse": [("status", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL)],
}
_ONEOF = [("dialRequest", 1, "DialRequest"), ("dialResponse", 2, "DialResponse"),
          ("dialDataRequest", 3, "DialDataRequest"), ("dialDataResponse", 4, "DialDataResponse")]


def _build() -> dict[str, Any]:
    fd = descriptor_pb2.FileDescriptorProto(name="latentlink/autonat_v2.proto",
                                            package="latentlink.autonatv2", syntax="proto3")
    for name, fields in _SCHEMA.items():
        m = fd.message_type.add(name=name)
        for fname, num, ftype, label in fields:
            m.field.add(name=fname, number=num, type=ftype, label=label)
    msg = fd.message_type.add(name="Message")
    msg.oneof_decl.add(name="msg")
    for fname, num, tname in _ONEOF:
        msg.field.add(name=fname, number=num, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
                      type_name=f".latentlink.autonatv2.{tname}", oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"latentlink.autonatv2.{n}"))
            for n in [*_SCHEMA, "Message"]}


_CLASSES = _build()
Message = _CLASSES["Message"]
DialBack = _CLASSES["DialBack"]
DialBackResponse = _CLASSES["DialBackResponse"]


class AutonatError(ValueError):
    """A peer's AutoNAT message was oversized, truncated or malformed."""


def encode(msg: Any) -> bytes:
    body = msg.SerializeToString()
    return encode_uvarint(len(body)) + body


def decode(cls: Any, body: bytes) -> Any:
    out = cls()
    try:
        out.ParseFromString(body)
    except DecodeError as exc:
        raise AutonatError(f"malformed {cls.DESCRIPTOR.name}: {exc}") from None
    return out


async def read(stream: Any, cls: Any) -> Any:
    """One varint-prefixed message of type ``cls`` from a libp2p stream (bounded)."""
    try:
        body = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES)
    except Exception as exc:  # libp2p raises several types for short/oversized prefixes
        raise AutonatError(f"bad frame: {type(exc).__name__}: {exc}"[:200]) from None
    return decode(cls, body)


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
