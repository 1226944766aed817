"""Who may write which map: forged entries are refused on every honest replica, for good.

Sans-I/O (engines and a frame pump) for each rule, then real libp2p hosts for the case the rules
exist for: a participant forging the receiver's verdict while the receiver's real one replicates.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from crdt_state.limits import CrdtLimits
from crdt_state.ownership import SEP, client_id
from crdt_state.schema import LineageEdge, Outcome, SessionDoc, TensorMessage
from crdt_state.service import PROTOCOL_ID, CrdtService
from crdt_state.sync import SyncEngine
from crdt_state.testing import forge, hello_all, pump, running_host
from crdt_state.wire import Records, SignedUpdate, encode

LIMITS = CrdtLimits(max_update_bytes=8192, max_document_bytes=1 << 20)


def _message(mid: str, sender: str, receiver: str) -> TensorMessage:
    return TensorMessage(message_id=mid, kind="KV_CACHE", sender=sender, receiver=receiver,
                         nbytes=10, sent_at=1.0)


def _trio() -> tuple[SyncEngine, SyncEngine, SyncEngine]:
    """Sender ``a`` logs m1 to receiver ``r``, which records its outcome; ``f`` is a participant."""
    a, r, f = (SyncEngine(create_new_key_pair(), LIMITS) for _ in range(3))
    a.create("s", "ck", {a.local_peer: "owner", r.local_peer: "agent", f.local_peer: "agent"})
    pump([a, r, f], hello_all([a, r, f]))
    a.edit("s", lambda d: d.log_message(_message("m1", a.local_peer, r.local_peer)))
    pump([a, r, f], hello_all([a, r, f]))
    r.edit("s", lambda d: d.record_outcome(Outcome("m1", "applied", r.local_peer, 2.0,
                                                   sender=a.local_peer)))
    pump([a, r, f], hello_all([a, r, f]))
    return a, r, f


def _push(dst: SyncEngine, src: SyncEngine, rec: SignedUpdate):
    return dst.receive(src.local_peer, encode(Records("s", [rec])), 0.0)


def test_forged_outcome_refused_and_writer_poisoned() -> None:
    a, r, f = _trio()
    m1 = ("m1", a.local_peer)
    real = a.replicas["s"].doc.outcomes()[m1]
    assert real.by == r.local_peer
    before = a.replicas["s"].doc.snapshot()
    slot = f"m1{SEP}{a.local_peer}{SEP}{r.local_peer}"
    forgeries = {
        # f claims to be the receiver, in the receiver's own slot (overwriting its item)
        "as receiver": lambda d: d.record_outcome(Outcome("m1", "rejected", r.local_peer, 3.0,
                                                          sender=a.local_peer)),
        # f writes the receiver's slot, honest about who it is
        "in receiver's slot": lambda d: d._outcomes.__setitem__(
            slot, {"status": "rejected", "reason": "", "by": f.local_peer,
                   "sender": a.local_peer, "at": 3.0, "timings": {}}),
        # f erases the receiver's verdict
        "delete": lambda d: d._outcomes.pop(slot),
    }
    for name, fn in forgeries.items():
        rec = forge(f.signer, f, "s", fn)
        out = _push(a, f, rec)
        assert not out.accepted, name
        assert [x.label for x in out.refused] == ["forged_outcome"], name
        assert a.replicas["s"].doc.snapshot() == before, name
        assert rec.key in a.replicas["s"].poisoned, name
        # The same writer's next record is never fetched or parsed: it can never follow.
        nxt = f.signer.sign("s", rec.writer, 2, rec.update)
        assert _push(a, f, nxt).rejected == [], name
    assert a.replicas["s"].doc.outcomes()[m1] == real


def test_outcome_in_own_slot_is_kept_apart_as_unverified() -> None:
    a, r, f = _trio()
    rec = forge(f.signer, f, "s", lambda d: d.record_outcome(
        Outcome("m1", "rejected", f.local_peer, 3.0, "I say so", sender=a.local_peer)))
    out = _push(a, f, rec)
    assert out.accepted["s"] == [rec]  # its own slot: admitted, replicated, but not a verdict
    doc = a.replicas["s"].doc
    assert doc.outcomes()[("m1", a.local_peer)].by == r.local_peer
    snap = doc.snapshot()
    assert snap["messages"][0]["outcome"]["by"] == r.local_peer
    assert [o["by"] for o in snap["unverified_outcomes"]] == [f.local_peer]


def test_same_message_id_from_two_senders_keeps_both_outcomes() -> None:
    """Tensor sessions number each direction from the start, so ids repeat across senders."""
    a, r, f = _trio()
    f.edit("s", lambda d: d.log_message(_message("m1", f.local_peer, r.local_peer)))
    pump([a, r, f], hello_all([a, r, f]))
    r.edit("s", lambda d: d.record_outcome(Outcome("m1", "rejected", r.local_peer, 3.0,
                                                   sender=f.local_peer)))
    pump([a, r, f], hello_all([a, r, f]))
    got = {k: o.status for k, o in a.replicas["s"].doc.outcomes().items()}
    assert got == {("m1", a.local_peer): "applied", ("m1", f.local_peer): "rejected"}
    snap = a.replicas["s"].doc.snapshot()
    assert {m["sender"]: m["outcome"]["status"] for m in snap["messages"]} == \
        {a.local_peer: "applied", f.local_peer: "rejected"}


def test_other_maps_are_written_by_their_owner_only() -> None:
    a, r, f = _trio()
    fp, rp = f.local_peer, r.local_peer
    cases = {
        "message as another sender": lambda d: d.log_message(_message("m2", rp, fp)),
        "message in another's slot": lambda d: d._messages.__setitem__(
            f"m1{SEP}{a.local_peer}", {"sender": fp}),
        "lineage as another": lambda d: d.add_lineage(LineageEdge("st", None, "m1", rp, 1.0)),
        "participant added_by another": lambda d: d.add_participant("x", "agent", rp),
        "presence of another": lambda d: d.mark_joined(rp),
        "turn slot of another": lambda d: d.bump_turn("ag", rp),
        "creator rewritten": lambda d: d._meta.__setitem__("creator", fp),
        "unknown status": lambda d: d._meta.__setitem__("status", "owned"),
        "participant removed": lambda d: d._participants.pop(rp),
    }
    before = a.replicas["s"].doc.snapshot()
    for name, fn in cases.items():
        out = _push(a, f, forge(f.signer, f, "s", fn))
        assert not out.accepted, name
        assert [x.label for x in out.refused] == ["unauthorized"], name
        assert a.replicas["s"].doc.snapshot() == before, name


def test_items_under_another_writers_client_id_refused() -> None:
    """Squatting the receiver's pycrdt ids would make its real next edit look like a duplicate."""
    a, r, f = _trio()
    rkey = next(k for k in a.replicas["s"].log if k[0] == r.signer.author)
    squat = forge(f.signer, f, "s", lambda d: d.mark_joined(f.local_peer),
                  pycrdt_client=client_id(*rkey))
    out = _push(a, f, squat)
    assert [x.label for x in out.refused] == ["unauthorized"]
    r.edit("s", lambda d: d.mark_joined(r.local_peer))
    pump([a, r], hello_all([a, r]))
    joined = {p.peer_id: p.joined_at for p in a.replicas["s"].doc.participants()}
    assert joined[r.local_peer] is not None


def test_local_edit_in_another_name_raises_before_touching_the_doc() -> None:
    a, r, _ = _trio()
    before = a.replicas["s"].doc.snapshot()
    with pytest.raises(ValueError, match="writes as"):
        a.edit("s", lambda d: d.record_outcome(Outcome("m1", "applied", r.local_peer, 1.0)))
    assert a.replicas["s"].doc.snapshot() == before and a.replicas["s"].outbox == []
    bare = SessionDoc()  # without an owner (tools, tests) nothing is checked
    bare.record_outcome(Outcome("m1", "applied", "anyone", 1.0))


async def test_forged_outcome_over_libp2p_refused_real_outcome_replicates() -> None:
    fast = CrdtLimits(anti_entropy_interval_s=0.1, request_timeout_s=1.0, max_update_bytes=8192)
    refused: list[str] = []
    async with AsyncExitStack() as stack:
        (ha, ka), (hr, kr), (hf, kf) = [await stack.enter_async_context(running_host())
                                        for _ in range(3)]
        a = CrdtService(ha, ka, limits=fast, on_refuse=refused.append)
        r = CrdtService(hr, kr, limits=fast)
        f = CrdtService(hf, kf, limits=fast)
        for x in (ha, hr, hf):
            for y in (ha, hr, hf):
                if x is not y:
                    x.get_peerstore().add_addrs(y.get_id(), y.get_addrs(), 3600)
        for svc in (a, r, f):
            await stack.enter_async_context(svc.run())
        changes = a.subscribe("s")
        a.create_session("s", "ck", {r.peer_id: "agent", f.peer_id: "agent"})
        mid = a.log_message("s", kind="KV_CACHE", receiver=r.peer_id)
        with trio.fail_after(10):
            while "s" not in f.engine.replicas or f.doc("s").message_count() < 1:
                await trio.sleep(0.02)

        # f forges r's verdict and sends it to a over its own stream.
        forged = forge(f.engine.signer, f.engine, "s", lambda d: d.record_outcome(
            Outcome(mid, "rejected", r.peer_id, time.time(), "forged", sender=a.peer_id)))
        stream = await hf.new_stream(ha.get_id(), [PROTOCOL_ID])
        await stream.write(encode(Records("s", [forged])))
        with trio.fail_after(10):
            while "forged_outcome" not in refused:
                await trio.sleep(0.02)
        assert (mid, a.peer_id) not in a.doc("s").outcomes()

        # The real receiver's verdict still replicates (and the forger's writer stays refused).
        r.record_outcome("s", mid, "applied", "checksums verified")
        with trio.fail_after(10):
            async for _change in changes:
                if (mid, a.peer_id) in a.doc("s").outcomes():
                    break
        got = a.doc("s").outcomes()[(mid, a.peer_id)]
        assert (got.by, got.status, got.reason) == (r.peer_id, "applied", "checksums verified")
        assert forged.key in a.engine.replicas["s"].poisoned
        with pytest.raises(ValueError, match="not sent to this node"):
            f.record_outcome("s", mid, "rejected")
        await stream.reset()
