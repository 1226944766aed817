"""Protobuf messages declared in Python (no generated ``_pb2`` files), and bounded framing.

Why: generated files are tied to the protoc that made them and the runtime that reads them;
declaring the libp2p NAT protocols' few messages with ``descriptor_pb2`` keeps us on whatever
``protobuf`` py-libp2p already installs, with each schema readable next to the code that speaks
it. Enums are declared as ``int32`` fields: the same varint on the wire, and a peer's unknown enum
value arrives as a number we can refuse instead of an exception.

Framing (libp2p convention): each message is prefixed with its length as an unsigned varint; every
read is bounded before a byte of the body is buffered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

F = descriptor_pb2.FieldDescriptorProto
Field = tuple[str, int, int, int, str]  # name, number, type, label, message type name ("" if none)


def scalar(name: str, number: int, ftype: int, repeated: bool = False) -> Field:
    return (name, number, ftype, F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL, "")


def sub(name: str, number: int, type_name: str) -> Field:
    return (name, number, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, type_name)


class WireError(ValueError):
    """A peer's message was oversized, truncated or malformed."""


class StreamEnded(WireError):
    """The stream ended (closed or reset) before the next message began: the peer is done."""


def build(package: str, schema: Mapping[str, Sequence[Field]], syntax: str = "proto3",
          oneofs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Message classes for ``schema`` (message name -> fields). ``oneofs``: message name -> the
    name of one oneof that holds all its message-typed fields."""
    fd = descriptor_pb2.FileDescriptorProto(name=f"{package.replace('.', '/')}.proto",
                                            package=package, syntax=syntax)
    for mname, fields in schema.items():
        m = fd.message_type.add(name=mname)
        oneof = (oneofs or {}).get(mname)
        if oneof:
            m.oneof_decl.add(name=oneof)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = f".{package}.{tname}"
                if oneof:
                    f.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{n}"))
            for n in schema}


def encode(msg: Any) -> bytes:
    body = msg.SerializeToString()
    return encode_uvarint(len(body)) + body


def decode(cls: Any, body: bytes) -> Any:
    out = cls()
    try:
        out.ParseFromString(body)
    except DecodeError as exc:
        raise WireError(f"malformed {cls.DESCRIPTOR.name}: {exc}") from None
    return out


async def read(stream: Any, cls: Any, max_bytes: int) -> Any:
    """One varint-prefixed message of type ``cls`` from a libp2p stream, at most ``max_bytes``."""
    try:
        body = await read_varint_prefixed_bytes_limited(stream, max_bytes)
    except (StreamEOF, StreamReset) as exc:
        raise StreamEnded(f"stream ended: {type(exc).__name__}") from None
    except IncompleteReadError as exc:
        if "prefix" in str(exc):  # nothing of a next message had arrived
            raise StreamEnded("stream ended") from None
        raise WireError(f"truncated frame: {exc}"[:200]) from None
    except Exception as exc:  # libp2p raises several types for bad or oversized prefixes
        raise WireError(f"bad frame: {type(exc).__name__}: {exc}"[:200]) from None
    return decode(cls, body)
