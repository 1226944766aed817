"""Sans-I/O engine: convergence, schema typing, and rejection of unauthorised updates."""

from __future__ import annotations

import dataclasses

from libp2p.crypto.ed25519 import create_new_key_pair

from crdt_state.limits import CrdtLimits
from crdt_state.schema import SessionDoc
from crdt_state.signing import Signer
from crdt_state.sync import SyncEngine
from crdt_state.testing import hello_all, pump
from crdt_state.testing import sample_message as msg
from crdt_state.wire import Records, SignedUpdate, Step1, encode

LIMITS = CrdtLimits(max_update_bytes=4096, max_document_bytes=1 << 20)


def make(n: int) -> list[SyncEngine]:
    return [SyncEngine(create_new_key_pair(), LIMITS) for _ in range(n)]


def test_schema_roundtrip_types() -> None:
    d = SessionDoc()
    d.init("s", "ck", "peerA", {"peerA": "owner", "peerB": "agent"}, now=1.0)
    d.log_message(msg(3, "peerA"))
    m = d.messages()[0]
    assert m == msg(3, "peerA")
    assert isinstance(m.nbytes, int) and isinstance(m.layers[0], int)
    assert d.bump_turn("ag", "peerA") == 1 and d.bump_turn("ag", "peerB") == 2
    assert d.turns() == {"ag": 2}
    snap = d.snapshot()
    assert snap["participants"][0]["peer_id"] == "peerA" and snap["status"] == "open"


def test_engines_converge_and_pull_each_record_once() -> None:
    a, b, c = make(3)
    parts = {e.local_peer: "agent" for e in (a, b, c)}
    a.create("s1", "ck", parts)
    pump([a, b, c], hello_all([a, b, c]))
    assert b.replicas["s1"].doc.participant_ids() == sorted(parts)
    for i in range(30):
        e = a if i % 2 else b
        e.edit("s1", lambda d, i=i, e=e: d.log_message(msg(i, e.local_peer)))
    # c learns both histories at once; in-flight tracking keeps it from pulling twice.
    moved = pump([a, b, c], hello_all([a, b, c]))
    snaps = [e.replicas["s1"].doc.snapshot() for e in (a, b, c)]
    assert snaps[0] == snaps[1] == snaps[2] and len(snaps[0]["messages"]) == 30
    total = sum(r.size() for recs in a.replicas["s1"].log.values() for r in recs)
    assert moved < 3 * total


def _setup() -> tuple[SyncEngine, SyncEngine, SyncEngine]:
    a, b, outsider = make(3)
    a.create("s", "ck", {a.local_peer: "owner", b.local_peer: "agent"})
    pump([a, b], hello_all([a, b]))
    return a, b, outsider


def _forge(key_pair, base: SyncEngine, fn) -> SignedUpdate:
    """A genuine pycrdt update made on a copy of ``base``'s doc, signed with ``key_pair``."""
    copy = SessionDoc()
    copy.apply_update(base.replicas["s"].doc.doc.get_update())
    captured: list[bytes] = []
    copy._on_local_update = captured.append
    fn(copy)
    return Signer(key_pair).sign("s", b"\x01" * 8, 1, captured[0])


def test_foreign_unsigned_missigned_oversized_rejected_doc_unchanged() -> None:
    a, b, _ = _setup()
    kp_out = create_new_key_pair()
    out_id = Signer(kp_out).peer_id.to_base58()
    rep = a.replicas["s"]
    before_state, before_snap = rep.doc.doc.get_update(), rep.doc.snapshot()

    foreign = _forge(kp_out, a, lambda d: d.log_message(msg(1, out_id)))
    self_add = _forge(kp_out, a, lambda d: d.add_participant(out_id, "x", out_id))
    good_b = b.edit("s", lambda d: d.log_message(msg(2, b.local_peer)))[0]
    cases = {
        "foreign": foreign,
        "foreign-self-add": self_add,
        "unsigned": dataclasses.replace(good_b, sig=b""),
        "mis-signed": dataclasses.replace(good_b, sig=bytes(64)),
        "key-mismatch": dataclasses.replace(foreign, author=good_b.author),
        "oversized": b.signer.sign("s", b"\x02" * 8, 1, bytes(LIMITS.max_update_bytes + 1)),
    }
    reasons = {}
    for name, rec in cases.items():
        out = a.receive(b.local_peer, encode(Records("s", [rec])), 0.0)
        assert not out.accepted, name
        assert len(out.rejected) == 1, name
        reasons[name] = out.rejected[0].reason
        assert rep.doc.doc.get_update() == before_state, name
        assert rep.doc.snapshot() == before_snap, name
    assert "not a participant" in reasons["foreign"]
    assert "not a participant" in reasons["foreign-self-add"]
    assert reasons["unsigned"] == "unsigned update"
    assert "signature" in reasons["mis-signed"]
    assert "author" in reasons["key-mismatch"]
    assert "oversized" in reasons["oversized"]

    # The genuine record from b is still accepted afterwards.
    out = a.receive(b.local_peer, encode(Records("s", [good_b])), 0.0)
    assert out.accepted["s"] == [good_b]
    assert len(rep.doc.messages()) == 1


def test_document_size_limit() -> None:
    a, b, _ = _setup()
    small = dataclasses.replace(LIMITS, max_document_bytes=a.replicas["s"].nbytes + 50)
    a.replicas["s"].limits = small
    rec = b.edit("s", lambda d: d.log_message(msg(7, b.local_peer)))[0]
    out = a.receive(b.local_peer, encode(Records("s", [rec])), 0.0)
    assert not out.accepted and "size limit" in out.rejected[0].reason


def test_unknown_session_from_non_member_is_not_kept() -> None:
    a, b, outsider = _setup()
    # a session that does not list `outsider` is never stored by it
    frames = outsider.receive(a.local_peer, a.step1("s"), 0.0).frames
    assert frames  # it asks...
    out = a.receive(outsider.local_peer, frames[0], 0.0)
    assert out.frames == []  # ...and a refuses to hand the session to a non-participant
    assert "s" not in outsider.replicas
    rec = a.replicas["s"].log[next(iter(a.replicas["s"].log))][0]
    outsider.receive(a.local_peer, encode(Records("s", [rec])), 0.0)
    assert "s" not in outsider.replicas
    assert outsider.receive(a.local_peer, encode(Step1("t", {})), 0.0).frames == []


def test_accept_session_hook_declines_invitation() -> None:
    a, b = make(2)
    b.accept_session = lambda doc: doc.compat_key == "wanted"
    a.create("nope", "other-model", {a.local_peer: "owner", b.local_peer: "agent"})
    a.create("yes", "wanted", {a.local_peer: "owner", b.local_peer: "agent"})
    pump([a, b], hello_all([a, b]))
    assert set(b.replicas) == {"yes"} and dict(b.declined) == {"nope": "declined"}
    assert b.receive(a.local_peer, a.step1("nope"), 0.0).frames == []
