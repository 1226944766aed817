"""docs/PROTOCOL.md is the contract: it must name every frame type, error code, dtype, kind and
HELLO key, print the state table of ``tensor_rpc.states`` exactly, and map every limit to config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import msgpack

from tensor_rpc import DTYPES, SUPPORTED_VERSIONS, ApplyMode, ErrorCode, Kind, Limits, RuntimeTerms
from tensor_rpc.framing import FrameType
from tensor_rpc.handshake import Hello
from tensor_rpc.states import CALLS, FRAMES, State
from tensor_rpc.testing import sample_signature

DOC = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()


def section(number: str) -> str:
    """The text of ``## <number>.`` up to the next ``## `` heading."""
    m = re.search(rf"^## {re.escape(number)}\. .*?(?=^## |\Z)", DOC, re.M | re.S)
    assert m, f"PROTOCOL.md has no section {number}"
    return m.group(0)


def table_rows(text: str, header: str) -> list[list[str]]:
    """Body rows (cells stripped) of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(f"| {header} |")), None)
    assert start is not None, f"no table with header {header!r}"
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_doc_is_this_version():
    assert DOC.startswith(f"# LatentLink tensor protocol, version {max(SUPPORTED_VERSIONS)}\n")
    assert f"this document is version `{max(SUPPORTED_VERSIONS)}`" in DOC


def test_doc_names_every_wire_constant():
    for t in FrameType:
        assert f"| 0x{int(t):02x} | {t.name}" in DOC, t
    for code in ErrorCode:
        assert f"| `{code.value}` |" in DOC, code
    for name in list(DTYPES) + [k.value for k in Kind] + [m.value for m in ApplyMode]:
        assert f"`{name}`" in DOC, name


def test_doc_lists_every_hello_key():
    terms = RuntimeTerms("bfloat16", 1, ("bfloat16",))
    for t in (None, terms):
        keys = msgpack.unpackb(Hello.from_limits(Limits(), bytes(16), "i", sample_signature(),
                                                 bytes(32), t).encode())
        for k in keys:
            assert f"| `{k}` |" in section("3"), k
    for k in terms.to_wire():
        assert f'"{k}"' in section("3"), k


def test_state_tables_equal_states_py():
    text = section("9")
    frames: dict[State, frozenset[FrameType]] = {}
    for cells in table_rows(text, "state"):
        (name,) = ticked(cells[0])
        assert State[name] not in frames, f"state {name} listed twice"
        frames[State[name]] = frozenset(FrameType[f] for f in ticked(cells[1]))
    assert frames == FRAMES
    calls: dict[str, frozenset[State]] = {}
    for cells in table_rows(text, "call"):
        (name,) = ticked(cells[0])
        call = name.removesuffix("()")
        assert call not in calls, f"call {call} listed twice"
        calls[call] = frozenset(State[s] for s in ticked(cells[1]))
    assert calls == CALLS


def test_frame_table_lists_each_type_once():
    rows = table_rows(section("2"), "type")
    assert sorted(int(r[0], 16) for r in rows) == sorted(int(t) for t in FrameType)
    assert {r[0]: r[1] for r in rows} == {f"0x{int(t):02x}": t.name for t in FrameType}


def test_config_mapping_covers_every_limit():
    from meshnode.config import Config

    cfg = Config()
    documented: dict[str, set[str]] = {}
    for cells in table_rows(section("11"), "config section"):
        (sec,) = ticked(cells[0])
        documented[sec.strip("[]")] = set(ticked(cells[1]))
    limit_fields = {f.name for f in dataclasses.fields(Limits)}
    expected = {sec: {f.name for f in dataclasses.fields(getattr(cfg, sec))} & limit_fields
                for sec in documented}
    assert documented == expected
    mapped = set().union(*documented.values())
    unmapped = limit_fields - mapped
    assert unmapped == {"hash_threads"} and "`Limits.hash_threads`" in section("11")
    lim = Limits.from_config(cfg)
    for sec, names in documented.items():
        for name in names:
            assert getattr(lim, name) == getattr(getattr(cfg, sec), name) or \
                tuple(getattr(getattr(cfg, sec), name)) == getattr(lim, name), name


def test_doc_refers_to_the_lane_transports():
    assert "docs/MESH.md` §5" in section("1")
