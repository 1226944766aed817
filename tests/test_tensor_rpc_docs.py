"""docs/PROTOCOL.md is the contract: it must name every frame type, error code, dtype and kind."""

from __future__ import annotations

from pathlib import Path

from tensor_rpc import DTYPES, ApplyMode, ErrorCode, Kind, Limits
from tensor_rpc.framing import FrameType
from tensor_rpc.handshake import Hello

DOC = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()


def test_doc_names_every_wire_constant():
    for t in FrameType:
        assert f"| 0x{int(t):02x} | {t.name}" in DOC, t
    for code in ErrorCode:
        assert f"| `{code.value}` |" in DOC, code
    for name in list(DTYPES) + [k.value for k in Kind] + [m.value for m in ApplyMode]:
        assert f"`{name}`" in DOC, name


def test_doc_lists_every_hello_key():
    import msgpack

    from tensor_rpc.testing import sample_signature
    keys = msgpack.unpackb(Hello.from_limits(Limits(), bytes(16), "i", sample_signature(),
                                             bytes(32)).encode())
    for k in keys:
        assert f"| `{k}` |" in DOC, k
