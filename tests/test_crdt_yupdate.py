"""The update decoder that ownership rests on: it must agree with pycrdt on every honest edit,
and on anything else raise only its own error (or refuse, through ``ownership.check``)."""

from __future__ import annotations

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt_state.ownership import KeyIndex, Refusal, check, client_id
from crdt_state.schema import LineageEdge, Outcome, SessionDoc
from crdt_state.testing import sample_message
from crdt_state.yupdate import UpdateFormatError, decode

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PEERS = ("peerA", "peerB")
EDITS = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 7), st.integers(0, 3)),
                 min_size=1, max_size=25)


def _edit(doc: SessionDoc, me: str, kind: int, n: int) -> None:
    mid = f"m{n}"
    if kind == 0:
        doc.log_message(sample_message(n, me))
    elif kind == 1:
        doc.record_outcome(Outcome(mid, ("applied", "rejected")[n % 2], me, float(n)))
    elif kind == 2:
        doc.set_status(("open", "active", "closed", "failed")[n])
    elif kind == 3:
        doc.bump_turn(f"agent{n}", me)
    elif kind == 4:
        (doc.mark_joined if n % 2 else doc.mark_left)(me)
    elif kind == 5:
        doc.add_participant(f"p{n}", "agent", me)
    elif kind == 6:
        doc.add_lineage(LineageEdge(f"st{n}", None, mid, me, float(n)))
    else:
        doc.record_outcome(Outcome(mid, "applied", me, float(n), "again", {"t": 1.5}))


@SETTINGS
@given(EDITS)
def test_honest_edits_decode_to_the_keys_pycrdt_changes(edits) -> None:
    """Two writers edit concurrently-ish; each update's decoded targets are exactly the keys
    pycrdt reports as changed when applying it to the other replica."""
    logs: list[list[bytes]] = [[], []]
    docs = [SessionDoc(on_local_update=logs[i].append, client_id=client_id(p.encode(), b"w" * 8),
                       owner=p) for i, p in enumerate(PEERS)]
    docs[0].init("s", "ck", PEERS[0], dict.fromkeys(PEERS, "agent"), now=0.0)
    docs[1].apply_update(logs[0][0])
    index = KeyIndex()
    first = check(logs[0][0], PEERS[0], docs[0].doc.client_id, index, "s", genesis=True)
    assert first.genesis_ok
    index.add(first.client, first.targets)
    applied = [1, 0]
    for who, kind, n in edits:
        _edit(docs[who], PEERS[who], kind, n)
        if n % 3 == 0:  # sometimes sync: the other side's next edit overwrites these items
            for i in (0, 1):
                for upd in logs[i][applied[i]:]:
                    got = check(upd, PEERS[i], docs[i].doc.client_id, index, "s", False)
                    changed = _changed_keys(docs[1 - i], upd)
                    assert changed <= set(got.targets)  # the losers of a conflict change nothing
                    index.add(got.client, got.targets)
                applied[i] = len(logs[i])
    for i in (0, 1):
        for upd in logs[i][applied[i]:]:
            got = check(upd, PEERS[i], docs[i].doc.client_id, index, "s", False)
            index.add(got.client, got.targets)
            docs[1 - i].apply_update(upd)
    assert docs[0].snapshot() == docs[1].snapshot()


def _changed_keys(doc: SessionDoc, update: bytes) -> set[tuple[str, str]]:
    changed: set[tuple[str, str]] = set()
    subs = []
    for root in ("meta", "participants", "presence", "messages", "outcomes", "lineage", "turns"):
        m = doc.doc.get(root, type=pycrdt.Map)
        subs.append((m, m.observe(lambda ev, *_, root=root: changed.update(
            (root, k) for k in ev.keys))))
    doc.apply_update(update)
    for m, sub in subs:
        m.unobserve(sub)
    return changed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_format_error(data: bytes) -> None:
    try:
        decode(data)
    except UpdateFormatError:
        pass


def _honest_update() -> bytes:
    out: list[bytes] = []
    doc = SessionDoc(on_local_update=out.append, client_id=7)
    doc.init("s", "ck", "peerA", {"peerA": "owner"}, now=1.0)
    doc.record_outcome(Outcome("m1", "applied", "peerA", 2.0, "ok", {"t": 0.5}))
    return out[1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 60))
def test_mutated_updates_only_refused(flips, cut) -> None:
    buf = bytearray(_honest_update())
    for pos, val in flips:
        buf[pos % len(buf)] = val
    data = bytes(buf[: max(1, len(buf) - cut)])
    try:
        check(data, "peerA", 7, KeyIndex(), "s", genesis=False)
    except Refusal:
        pass


def test_truncated_update_names_the_problem() -> None:
    with pytest.raises(UpdateFormatError, match="truncated"):
        decode(_honest_update()[:-3])
    with pytest.raises(UpdateFormatError, match="trailing"):
        decode(_honest_update() + b"\x00")
