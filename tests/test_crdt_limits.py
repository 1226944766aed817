"""What one peer can make a CRDT node hold or spend: streams, documents, records, in-flight pulls.

Each limit comes from ``CrdtLimits`` (the ``[crdt]`` config section); each refusal is reported
through ``on_refuse`` with its label. Real libp2p hosts on 127.0.0.1 where the limit lives in the
service, the sans-I/O engine with explicit time where it lives in the engine.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from crdt_state.limits import CrdtLimits
from crdt_state.ratelimit import PeerBuckets
from crdt_state.service import PROTOCOL_ID, CrdtService
from crdt_state.store import UpdateStore
from crdt_state.sync import SyncEngine
from crdt_state.testing import hello_all, introduce, pump, running_host
from crdt_state.testing import sample_message as msg
from crdt_state.wire import Records, Step1, encode
from meshnode.config import CrdtSection

FAST = CrdtLimits(anti_entropy_interval_s=0.1, request_timeout_s=1.0)


class Refusals:
    """``on_refuse`` for a test: labels in arrival order, and a way to wait for the n-th."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self._changed = trio.Event()

    def __call__(self, label: str) -> None:
        self.labels.append(label)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, label: str, n: int = 1) -> None:
        with trio.fail_after(10):
            while self.labels.count(label) < n:
                await self._changed.wait()


async def _services(stack: AsyncExitStack, limits: list[CrdtLimits], refusals: Refusals,
                    stores: list[UpdateStore | None] | None = None) -> list[CrdtService]:
    """Running services; the first one reports its refusals to ``refusals``."""
    hosts, services = [], []
    for i, lim in enumerate(limits):
        host, kp = await stack.enter_async_context(running_host())
        hosts.append(host)
        services.append(CrdtService(host, kp, stores[i] if stores else None, lim,
                                    on_refuse=refusals if i == 0 else None))
    introduce(hosts)
    for svc in services:
        await stack.enter_async_context(svc.run())
    return services


async def _open(host: IHost, to: IHost) -> INetStream | None:
    """A raw CRDT stream, or None when the peer reset it before our side finished negotiating."""
    try:
        return await host.new_stream(to.get_id(), [PROTOCOL_ID])
    except StreamFailure:
        return None


async def _assert_reset(stream: INetStream | None) -> None:
    """The refused stream is closed on us: py-libp2p 0.8.1's yamux reports the peer's RST as
    StreamReset or, when its reader saw the RST before our read, as StreamEOF."""
    if stream is not None:
        with pytest.raises((StreamReset, StreamEOF)):
            await stream.read(1)


async def _wait_for(pred, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


def test_limits_from_config() -> None:
    section = CrdtSection(max_links_per_peer=3, max_links=7, max_documents_per_peer=5,
                          updates_per_peer_per_s=0.5)
    lim = CrdtLimits.from_config(section)
    assert (lim.max_links_per_peer, lim.max_links, lim.max_documents_per_peer,
            lim.updates_per_peer_per_s) == (3, 7, 5, 0.5)
    assert lim.update_burst == 1  # one second's worth, at least one


async def test_extra_streams_from_one_peer_are_reset_honest_link_keeps_syncing() -> None:
    refusals = Refusals()
    async with AsyncExitStack() as stack:
        a, b = await _services(stack, [FAST, FAST], refusals)
        a.create_session("s", "ck", {b.peer_id: "agent"})
        await _wait_for(lambda: "s" in b.engine.replicas)
        # a already holds one stream with b (the honest link), so the first extra one fits.
        room = FAST.max_links_per_peer - 1
        streams = [await _open(b.host, a.host) for _ in range(room + 3)]
        await refusals.wait("links_per_peer", 3)
        live = [lk for lk in a._all_links if lk.peer == b.peer_id and not lk.closed]
        assert len(live) == FAST.max_links_per_peer
        for st in streams[room:]:  # refused: reset, never left open
            await _assert_reset(st)
        # The honest link still carries edits both ways.
        mid = b.log_message("s", kind="KV_CACHE", receiver=a.peer_id)
        await _wait_for(lambda: a.doc("s").message_count() == 1)
        a.set_status("s", "active")
        await _wait_for(lambda: b.doc("s").status == "active")
        assert [m.message_id for m in a.doc("s").messages()] == [mid]
        for st in streams[:room]:
            assert st is not None
            await st.reset()


async def test_streams_over_the_total_cap_are_reset() -> None:
    refusals = Refusals()
    capped = CrdtLimits(anti_entropy_interval_s=0.1, max_links=2)
    async with AsyncExitStack() as stack:
        a, *others = await _services(stack, [capped, FAST, FAST, FAST], refusals)
        streams = [await _open(o.host, a.host) for o in others]
        await refusals.wait("links", len(others) - capped.max_links)
        assert len([lk for lk in a._all_links if not lk.closed]) == capped.max_links
        for st in streams[capped.max_links:]:
            await _assert_reset(st)
        for st in streams[:capped.max_links]:
            assert st is not None
            await st.reset()


async def test_documents_per_creator_capped_only_max_persisted(tmp_path: Path) -> None:
    refusals = Refusals()
    capped = CrdtLimits(anti_entropy_interval_s=0.1, request_timeout_s=1.0,
                        max_documents_per_peer=3)
    extra = 2
    async with AsyncExitStack() as stack:
        store = UpdateStore(tmp_path, capped, fsync="never")
        a, b = await _services(stack, [capped, FAST], refusals, [store, None])
        sids = [f"s{i}" for i in range(capped.max_documents_per_peer + extra)]
        for sid in sids:
            b.create_session(sid, "ck", {a.peer_id: "agent"})
        await refusals.wait("documents_per_peer", extra)
        kept = sorted(a.engine.replicas)
        assert len(kept) == capped.max_documents_per_peer
        refused = sorted(set(sids) - set(kept))
        assert {d: a.engine.declined[d] for d in refused} == dict.fromkeys(
            refused, "documents_per_peer")
        # b keeps editing every session: the refused ones are never pulled or parsed again.
        for sid in sids:
            b.log_message(sid, kind="KV_CACHE", receiver=a.peer_id)
        await _wait_for(lambda: all(a.doc(s).message_count() == 1 for s in kept))
        b.set_status(kept[-1], "active")  # pushed after every refused doc's edit, same stream
        await _wait_for(lambda: a.doc(kept[-1]).status == "active")
        assert refusals.labels.count("documents_per_peer") == extra
        assert sorted(a.engine.replicas) == kept
        on_disk = {r.doc_id for r in UpdateStore(tmp_path, capped).load()}
        assert on_disk == set(kept)
        # Our own sessions are never limited, and do not count against anyone.
        for i in range(extra + 1):
            a.create_session(f"own{i}", "ck", {b.peer_id: "agent"})
        assert a.engine.documents_created_by(b.peer_id) == capped.max_documents_per_peer
    store.close()


def test_update_rate_refuses_then_later_accepts() -> None:
    """Over budget is retryable: the same records are accepted once the bucket has refilled."""
    slow = CrdtLimits(updates_per_peer_per_s=4.0)
    a = SyncEngine(create_new_key_pair(), CrdtLimits())
    b = SyncEngine(create_new_key_pair(), slow)
    a.create("s", "ck", {a.local_peer: "owner", b.local_peer: "agent"})
    recs = [r for i in range(10) for r in a.edit("s", lambda d, i=i: d.log_message(
        msg(i, a.local_peer)))]
    frame = encode(Records("s", a.replicas["s"].log[recs[0].key][:1] + recs))
    out = b.receive(a.local_peer, frame, now=0.0)
    assert len(out.accepted["s"]) == slow.update_burst
    assert {r.label for r in out.refused} == {"update_rate"}
    assert all(r.retryable for r in out.refused)
    assert b.retry_frames(a.local_peer, now=0.0) == []  # no budget yet: nothing asked
    now = 0.0
    while b.replicas["s"].vv() != a.replicas["s"].vv():
        now += 1.0
        retry = b.retry_frames(a.local_peer, now)
        assert retry, "a refused record must be asked for again"
        pump([a, b], [(1, 0, f) for f in retry], now=now)
    assert b.replicas["s"].doc.snapshot() == a.replicas["s"].doc.snapshot()


async def test_update_rate_over_libp2p_refuses_then_converges() -> None:
    refusals = Refusals()
    slow = CrdtLimits(anti_entropy_interval_s=0.1, request_timeout_s=1.0,
                      updates_per_peer_per_s=10.0)
    async with AsyncExitStack() as stack:
        a, b = await _services(stack, [slow, FAST], refusals)
        b.create_session("s", "ck", {a.peer_id: "agent"})
        for i in range(int(2.5 * slow.update_burst)):
            b.log_message("s", kind="KV_CACHE", receiver=a.peer_id, message_id=f"m{i:03d}")
        await refusals.wait("update_rate")
        await _wait_for(lambda: "s" in a.engine.replicas and a.get("s") == b.get("s"), 30)


def test_inflight_stays_bounded_under_step1_flood() -> None:
    lim = CrdtLimits(max_writers_per_doc=64, max_inflight=256, request_timeout_s=1.0)
    victim = SyncEngine(create_new_key_pair(), lim)
    other = SyncEngine(create_new_key_pair(), lim)
    victim.create("known", "ck", {victim.local_peer: "owner", other.local_peer: "agent"})
    author = other.signer.author

    def flood(doc_id: str, now: float) -> None:
        vv = {(author, os.urandom(8)): 5 for _ in range(lim.max_writers_per_doc)}
        victim.receive(other.local_peer, encode(Step1(doc_id, vv)), now)

    for i in range(40):  # unknown documents and the known one, many writers each
        flood(f"doc{i}", now=i * 0.01)
        flood("known", now=i * 0.01)
        assert len(victim.inflight) <= lim.max_inflight
    # Entries expire: past the request timeout one more STEP1 leaves only its own.
    flood("known", now=10.0)
    assert len(victim.inflight) == lim.max_writers_per_doc
    # Entries of a document we do not keep go with it.
    flood("stranger", now=10.0)
    rec = other.signer.sign("stranger", b"w" * 8, 1, b"\x00\x00")
    victim.receive(other.local_peer, encode(Records("stranger", [rec])), 10.0)
    assert "stranger" not in victim.replicas
    assert len(victim.inflight) == lim.max_writers_per_doc


def test_honest_sync_still_pulls_each_record_once_with_bounded_inflight() -> None:
    """The bound costs nothing on ordinary traffic: three engines still converge."""
    a, b, c = (SyncEngine(create_new_key_pair(), CrdtLimits(max_inflight=8)) for _ in range(3))
    a.create("s", "ck", {e.local_peer: "agent" for e in (a, b, c)})
    pump([a, b, c], hello_all([a, b, c]))
    for i in range(12):
        e = (a, b)[i % 2]
        e.edit("s", lambda d, i=i, e=e: d.log_message(msg(i, e.local_peer)))
    pump([a, b, c], hello_all([a, b, c]))
    snaps = [e.replicas["s"].doc.snapshot() for e in (a, b, c)]
    assert snaps[0] == snaps[1] == snaps[2] and len(snaps[0]["messages"]) == 12


def test_peer_buckets_bounded_and_refill() -> None:
    lim = CrdtLimits(updates_per_peer_per_s=2.0, max_links=4)
    buckets = PeerBuckets(lim.updates_per_peer_per_s, lim.update_burst, lim.max_links)
    for i in range(3 * lim.max_links):
        assert buckets.take(f"peer{i}", 10, now=0.0) == lim.update_burst
        assert len(buckets) <= lim.max_links
    assert buckets.take("peerX", 10, now=0.0) == lim.update_burst
    assert buckets.take("peerX", 10, now=0.0) == 0
    assert not buckets.available("peerX", now=0.0)
    assert buckets.take("peerX", 10, now=1.0 / lim.updates_per_peer_per_s) == 1
