"""A node survives hostile peers: each attack is refused with a logged reason, the victim's memory
stays within its configured budget, and an honest peer's transfer completes verified meanwhile.

The victim and the honest peer are real node processes (``tests/helpers/transfer_node.py``) on
127.0.0.1; the attacker (``tests/helpers/attacker.py``) is a real libp2p host in this test's trio
loop, built from our own protocol modules and misusing them on purpose. Peak RSS is the victim's
VmHWM from /proc, reset before each attack; ``pytest -s`` prints each attack's figures. A malformed
KV cache against ``meshnode handoff receive`` is in tests/test_hostile_handoff.py; the CRDT and DHT
rules behind the last two attacks are pinned in detail in tests/test_crdt_ownership.py and
tests/test_discovery_strict.py.
"""

from __future__ import annotations

import json
import secrets
import socket
import time

import blake3
import pytest
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.records.record import make_signed_put_record

from crdt_state import CrdtLimits, CrdtService
from crdt_state.schema import Outcome
from crdt_state.service import PROTOCOL_ID as CRDT_PROTOCOL
from crdt_state.testing import forge
from crdt_state.wire import Records, encode
from meshnode.config import TransportSection
from meshnode.tensor.lanes_out import _connect_bulk, bulk_targets
from tensor_rpc import (
    AckReceived,
    ErrorCode,
    Kind,
    LanesOffered,
    Limits,
    MessageRejected,
    Role,
    Session,
    TensorSpec,
)
from tensor_rpc.framing import FrameType
from tensor_rpc.states import OPEN
from tensor_rpc.testing import split_frames
from tensor_rpc.transport import lane_key
from tensor_rpc.transport.lane import BULK_FRAME
from tests.helpers.attacker import MiB, RawSession, attacker
from tests.helpers.nodeproc import control_get
from tests.helpers.sigs import fake_signature
from tests.helpers.transfer_peer import Peer, link

TOKEN = "correct horse battery staple"
BUDGET, PER_PEER = 256 * MiB, 128 * MiB
SESSIONS_PER_PEER, IN_FLIGHT = 4, 4
PROGRESS_S, HANDSHAKE_S, IDLE_S = 2.0, 2.0, 6.0
MARGIN = 96 * MiB  # interpreter, libp2p buffers, yamux windows, lane staging: not payload
HONEST = 24 * MiB + 7  # a size no attack uses, so the victim's event is recognisable
VICTIM = [f"limits.inflight_bytes={BUDGET}", f"limits.inflight_bytes_per_peer={PER_PEER}",
          f"protocol.max_message_bytes={PER_PEER}",
          f"limits.max_sessions_per_peer={SESSIONS_PER_PEER}", f"limits.messages_in_flight={IN_FLIGHT}",
          f"transport.progress_timeout_s={PROGRESS_S}", f"protocol.handshake_timeout_s={HANDSHAKE_S}",
          f"protocol.idle_timeout_s={IDLE_S}", "transport.lane_preauth_timeout_s=1",
          "transport.lane_preauth_max=16", f"limits.shared_token={TOKEN}",
          "dht.enabled=true", "control.enabled=true", "control.port=0",
          "crdt.anti_entropy_interval_s=0.2"]
SIG = fake_signature(0)
LIM = Limits(shared_token=TOKEN)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    victim = Peer(tmp, "victim", *VICTIM)
    honest = Peer(tmp, "honest", f"limits.shared_token={TOKEN}")
    yield victim, honest
    honest.stop()
    victim.stop()


async def call(peer: Peer, **cmd) -> dict:
    r = await trio.to_thread.run_sync(lambda: peer.cmd(**cmd))
    assert r["ok"], r
    return r


async def honest_transfer(victim: Peer, honest: Peer, path: str | None = None) -> dict:
    """The honest peer sends HONEST bytes (on its session, or a fresh one if that one ended, e.g.
    idled out); the victim's BLAKE3 must match."""
    send = dict(op="send", size=HONEST, path=path, check=True, timeout=120)
    r = await trio.to_thread.run_sync(lambda: honest.cmd(**send))
    if not r["ok"]:
        await trio.to_thread.run_sync(link, honest, victim)
        r = await call(honest, **send)

    def received() -> dict:
        while True:
            ev = victim.event("received", 60)
            if ev["nbytes"] == HONEST:
                return ev

    ev = await trio.to_thread.run_sync(received)
    assert ev["blake3"] == r["blake3"], "the honest transfer was not delivered intact"
    return r


async def peak_growth(victim: Peer, base: dict) -> int:
    return (await call(victim, op="stats"))["VmHWM"] - base["VmRSS"]


async def during_attack(victim: Peer, honest: Peer, base: dict, attack: str,
                        bound: int = BUDGET + MARGIN, path: str | None = None) -> dict:
    """While the attack holds whatever it holds: the honest peer's transfer completes verified,
    and the victim's peak RSS since ``base`` stays within ``bound`` (the configured budget plus
    the stated margin). Prints the figures (pytest -s) for the record."""
    r = await honest_transfer(victim, honest, path=path)
    grown = await peak_growth(victim, base)
    print(f"\n[hostile] {attack}: victim peak RSS +{max(grown, 0) / MiB:.0f} MiB (bound "
          f"{bound / MiB:.0f} MiB); honest transfer over {r['path']}: verified")
    assert grown < bound
    return r


class NeverSource:
    """A payload that is declared and never produced (the header-only attack)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def chunk(self, offset: int, n: int, scratch: memoryview) -> memoryview:
        raise AssertionError("never sent")


def _header_only(raw: RawSession, nbytes: int) -> None:
    raw.session.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                             tensors=[TensorSpec("x", "uint8", (nbytes,), nbytes)],
                             payload=NeverSource(nbytes), now=trio.current_time(), inline=False)


def _rejected(raw: RawSession, code: ErrorCode) -> list[MessageRejected]:
    return [e for e in raw.events if isinstance(e, MessageRejected) and e.error.code is code]


async def test_header_only_memory_pin_over_many_sessions(mesh, tmp_path):
    victim, honest = mesh
    base = await call(victim, op="reset_peak")
    async with attacker(tmp_path) as atk:
        peer = await atk.connect(victim.addr)
        sessions = [await atk.session(peer, SIG, limits=LIM) for _ in range(SESSIONS_PER_PEER + 2)]
        live = [r for r in sessions if r.session.state in OPEN]
        refused = [r for r in sessions if r not in live]
        assert len(live) == SESSIONS_PER_PEER
        assert all(r.closed_error().code is ErrorCode.LIMIT for r in refused)
        for raw in live:  # every allowed header declares the largest payload; no chunk follows
            for _ in range(IN_FLIGHT + 1):
                _header_only(raw, PER_PEER)
            await raw.flush()
        for raw in live:  # the one over limits.messages_in_flight is refused at once
            assert await raw.pump_until(lambda _, r=raw: _rejected(r, ErrorCode.LIMIT), 10)
        stats = await call(victim, op="stats")
        assert stats["tensor"]["inflight_bytes"] == 0  # headers alone hold nothing
        await during_attack(victim, honest, base, "header-only pin, "
                            f"{len(live) * IN_FLIGHT} headers x {PER_PEER // MiB} MiB declared",
                            bound=HONEST + MARGIN)
        for raw in live:  # and they are dropped once they make no progress
            assert await raw.pump_until(
                lambda _, r=raw: len(_rejected(r, ErrorCode.TIMEOUT)) == IN_FLIGHT, PROGRESS_S * 5)
    log = victim.log()
    assert "tensor session refused" in log and "limits.max_sessions_per_peer" in log
    assert "limits.messages_in_flight" in log and "no progress" in log


async def _send_without_digest(raw: RawSession, nbytes: int) -> int:
    """Stream every chunk of a message in-band but never its DIGEST: the victim must hold it
    incomplete. Returns the message id."""
    payload = memoryview(bytearray(nbytes))
    msg = raw.session.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                                   tensors=[TensorSpec("x", "uint8", (nbytes,), nbytes)],
                                   payload=payload, now=trio.current_time())
    def refused() -> bool:
        return any(isinstance(e, MessageRejected) and e.message_id == msg.message_id
                   for e in raw.events)

    with trio.fail_after(60):
        while not msg.digest_sent and not refused():
            frames = b"".join(raw.session.frames_to_send(8 * MiB))
            keep = [f for f in split_frames(frames) if f[0] != FrameType.DIGEST]
            if keep:
                await raw.stream.write(b"".join(keep))
            elif not msg.digest_sent:
                await raw.read_once(5)  # wait for CREDIT (or the victim's REJECT)
    return msg.message_id


async def test_receive_budget_caps_what_one_peer_holds(mesh, tmp_path):
    victim, honest = mesh
    base = await call(victim, op="reset_peak")
    async with attacker(tmp_path) as atk:
        peer = await atk.connect(victim.addr)
        hold = await atk.session(peer, SIG, limits=LIM)
        more = await atk.session(peer, SIG, limits=LIM)
        await _send_without_digest(hold, 96 * MiB)  # 96 MiB held, incomplete
        await _send_without_digest(more, 96 * MiB)  # passes the per-peer budget mid-way
        assert await more.pump_until(lambda _: _rejected(more, ErrorCode.LIMIT), 20)
        assert "inflight_bytes_per_peer" in _rejected(more, ErrorCode.LIMIT)[0].error.message
        # the node-wide budget keeps room for others
        await during_attack(victim, honest, base, "chunks held incomplete up to the per-peer budget",
                            bound=PER_PEER + HONEST + MARGIN)
        assert await hold.pump_until(lambda _: _rejected(hold, ErrorCode.TIMEOUT), PROGRESS_S * 5)
        assert (await call(victim, op="stats"))["tensor"]["inflight_bytes"] == 0  # freed again
    assert "receive budget" in victim.log()


async def test_idle_unauthenticated_lane_sockets(mesh):
    victim, honest = mesh
    port = victim.ready["bulk_port"]
    base = await call(victim, op="reset_peak")
    socks = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        r = await during_attack(victim, honest, base, "200 idle unauthenticated lane sockets",
                                path="bulk")
        assert r["path"] == "bulk"  # the honest lane got through; no silent fallback to the stream
    finally:
        for s in socks:
            s.close()
    log = victim.log()
    assert "lane pre-auth full" in log and "data lane connection dropped" in log


async def test_emfile_on_the_lane_listener(tmp_path):
    victim = Peer(tmp_path, "victim-fd", "transport.lane_preauth_max=100000",
                  "transport.lane_preauth_timeout_s=2", nofile=160)
    honest = Peer(tmp_path, "honest-fd")
    socks = []
    try:
        await trio.to_thread.run_sync(link, honest, victim)
        base = await call(victim, op="reset_peak")
        for _ in range(300):  # more than the victim has descriptors
            try:
                socks.append(socket.create_connection(("127.0.0.1", victim.ready["bulk_port"]),
                                                      timeout=5))
            except OSError:  # the victim's backlog is full while it cannot accept: expected
                continue
        await trio.sleep(1.0)
        assert victim.proc.poll() is None and "lane accept failed; pausing" in victim.log()
        for s in socks:
            s.close()
        socks = []
        await trio.sleep(2.5)  # their pre-auth timeout frees the victim's descriptors
        r = await during_attack(victim, honest, base, "EMFILE on the lane listener (300 sockets, "
                                "160 descriptors)", path="bulk")
        assert r["path"] == "bulk"
    finally:
        for s in socks:
            s.close()
        honest.stop()
        victim.stop()


async def test_silent_peer_mid_handshake_and_mid_message(mesh, tmp_path):
    victim, honest = mesh
    await honest_transfer(victim, honest)
    with trio.fail_after(IDLE_S * 3):  # the honest session from before idles out
        while (await call(victim, op="stats"))["tensor"]["sessions"]:
            await trio.sleep(0.5)
    baseline = await call(victim, op="stats")
    base = await call(victim, op="reset_peak")
    async with attacker(tmp_path) as atk:
        peer = await atk.connect(victim.addr)
        # 1) opens the stream and says nothing: ABORT(TIMEOUT), then the stream is gone
        mute = RawSession(Session(Role.INITIATOR, LIM, SIG, atk.key_pair,
                                  peer), await atk.stream(peer))
        mute.session.start(trio.current_time())
        mute.session.data_to_send()  # its HELLO is never sent
        assert await mute.wait_closed_by_peer(HANDSHAKE_S * 5)
        assert mute.closed_error().code is ErrorCode.TIMEOUT
        # 2) a header and one chunk, then silence: the message, then the session, time out
        raw = await atk.session(peer, SIG, limits=LIM)
        msg = raw.session.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                                       tensors=[TensorSpec("x", "uint8", (16 * MiB,), 16 * MiB)],
                                       payload=bytes(16 * MiB), now=trio.current_time())
        frames = split_frames(b"".join(raw.session.frames_to_send(4 * MiB + 65536)))
        await raw.stream.write(b"".join(frames[:2]))  # HEADER + the first CHUNK only
        assert msg.next_chunk >= 1
        assert await raw.pump_until(lambda _: _rejected(raw, ErrorCode.TIMEOUT), PROGRESS_S * 5,
                                    send=False)
        await during_attack(victim, honest, base, "silent peer mid-handshake and mid-message")
        assert await raw.wait_closed_by_peer(IDLE_S * 3)
        assert raw.closed_error().code is ErrorCode.TIMEOUT
    with trio.fail_after(IDLE_S * 3):  # the honest session idles out too; nothing is left behind
        while (await call(victim, op="stats"))["tensor"]["sessions"]:
            await trio.sleep(0.5)
    after = await call(victim, op="stats")
    # every task of the dead sessions is gone (libp2p's own connection tasks are not ours to count)
    assert after["session_tasks"] == baseline["session_tasks"] == 0
    assert after["tensor"]["inflight_bytes"] == 0


async def test_session_id_collision(mesh, tmp_path):
    victim, honest = mesh
    sid = b"\x42" * 16
    base = await call(victim, op="reset_peak")
    async with attacker(tmp_path) as atk:
        peer = await atk.connect(victim.addr)
        first = await atk.session(peer, SIG, limits=LIM, rng=lambda n: sid)
        second = await atk.session(peer, SIG, limits=LIM, rng=lambda n: sid)
        assert first.session.state in OPEN
        err = second.closed_error()
        assert err.code is ErrorCode.STATE and "already in use" in err.message
        first.session.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                                   tensors=[TensorSpec("x", "uint8", (10,), 10)], payload=bytes(10),
                                   now=trio.current_time())
        assert await first.pump_until(lambda evs: any(isinstance(e, AckReceived) for e in evs), 10)
        await during_attack(victim, honest, base, "session-id collision")
    assert "session id already in use" in victim.log()


async def test_token_guessing_gets_no_proof_before_the_initiator_proves(mesh, tmp_path):
    victim, honest = mesh
    base = await call(victim, op="reset_peak")
    async with attacker(tmp_path) as atk:
        peer = await atk.connect(victim.addr)
        raw = await atk.session(peer, SIG, limits=Limits(shared_token="guess"), handshake=False)
        seen = bytearray()
        with trio.move_on_after(10):
            while True:
                try:
                    data = await raw.stream.read(65536)
                except StreamEOF:
                    break
                if not data:
                    break
                seen += data
                raw.events += raw.session.receive_data(data, trio.current_time())
                await raw.flush()  # our AUTH (with a wrong proof) goes out after HELLO(r)
        await during_attack(victim, honest, base, "shared-token guessing")
    types = [f[0] for f in split_frames(bytes(seen))]
    assert FrameType.HELLO in types and FrameType.AUTH not in types  # no responder proof, ever
    assert FrameType.ABORT in types and raw.closed_error().code is ErrorCode.ACCESS_DENIED


async def test_lane_frame_after_delivery_is_refused_and_changes_nothing(mesh, tmp_path):
    victim, honest = mesh
    base = await call(victim, op="reset_peak")
    await call(victim, op="hold", on=True)
    try:
        async with attacker(tmp_path) as atk:
            peer = await atk.connect(victim.addr)
            raw = await atk.session(peer, SIG, limits=LIM)
            assert await raw.pump_until(lambda evs: any(isinstance(e, LanesOffered) for e in evs), 10)
            s = raw.session
            n = 6 * MiB  # two chunks
            payload = bytes(range(256)) * (n // 256)
            msg = s.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1),
                                 tensors=[TensorSpec("x", "uint8", (n,), n)], payload=payload,
                                 now=trio.current_time(), inline=False)
            await raw.flush()
            lane = await trio.to_thread.run_sync(
                _connect_bulk, bulk_targets(s.peer_offer, "127.0.0.1"), s.session_id,
                lane_key(s, sending=True), s.agreement.chunk_bytes + s.tag_bytes, TransportSection())
            await trio.to_thread.run_sync(lane.send_message, msg)
            assert await raw.pump_until(lambda evs: any(isinstance(e, AckReceived) for e in evs), 20)
            before = (await call(victim, op="held"))["held"][-1]
            assert before["blake3"] == blake3.blake3(payload).hexdigest()
            # one more lane frame for the delivered message, validly sealed, different bytes
            forged = bytearray(msg.sealed_size(1))
            evil = memoryview(bytearray(n - s.agreement.chunk_bytes))
            s._sealer.seal_chunk_into(msg.message_id, 1, True, evil, memoryview(forged))
            lane.sock.sendall(BULK_FRAME.pack(msg.message_id, 1, len(forged)) + bytes(forged))
            assert await raw.wait_closed_by_peer(10)
            err = raw.closed_error()
            assert err is not None and err.code is ErrorCode.ORDER and "finished" in err.message
            lane.close()
            await during_attack(victim, honest, base, "lane frame after delivery")
        after = [h for h in (await call(victim, op="held"))["held"] if h["mid"] == before["mid"]]
        assert before in after  # the delivered tensors' BLAKE3 is unchanged
    finally:
        await call(victim, op="hold", on=False)


async def test_forged_crdt_outcome_is_refused(mesh, tmp_path):
    """A peer that shares a session document with the victim writes an outcome *as the victim*
    (the receiver's verdict): the victim's replica refuses the record and keeps its own log."""
    victim, honest = mesh
    base = await call(victim, op="reset_peak")
    async with attacker(tmp_path) as atk:
        peer = await atk.connect(victim.addr)
        crdt = CrdtService(atk.host, atk.key_pair, limits=CrdtLimits(anti_entropy_interval_s=0.2))
        async with crdt.run():
            sid = secrets.token_hex(16)
            crdt.create_session(sid, "ck", {victim.peer_id: "receiver"})
            mid = crdt.log_message(sid, kind="KV_CACHE", receiver=victim.peer_id)
            url = control_url(victim)
            with trio.fail_after(20):  # the victim took the document (it names it)
                while not (await trio.to_thread.run_sync(control_get, url, f"/sessions/{sid}")):
                    await trio.sleep(0.2)
            forged = forge(crdt.engine.signer, crdt.engine, sid, lambda d: d.record_outcome(
                Outcome(mid, "applied", victim.peer_id, time.time(), "forged",
                        sender=crdt.peer_id)))
            stream = await atk.host.new_stream(peer, [CRDT_PROTOCOL])
            await stream.write(encode(Records(sid, [forged])))
            with trio.fail_after(20):
                while "forged_outcome" not in victim.log():
                    await trio.sleep(0.2)
            doc = await trio.to_thread.run_sync(control_get, url, f"/sessions/{sid}")
            assert all(m["outcome"] is None for m in doc["messages"])  # no verdict in its name
            await during_attack(victim, honest, base, "forged CRDT outcome")
            await stream.reset()


async def test_values_in_unvalidated_dht_namespaces_are_refused(mesh, tmp_path):
    victim, honest = mesh
    base = await call(victim, op="reset_peak")
    async with attacker(tmp_path) as atk:
        peer = await atk.connect(victim.addr)
        theirs = KadDHT(atk.host, DHTMode.CLIENT)  # a stock py-libp2p DHT as the sender
        for key in (b"/evil/x", b"no-namespace"):
            rec = make_signed_put_record(key, b"parked data", atk.host.get_private_key())
            with trio.fail_after(10):
                assert not await theirs.value_store._store_at_peer(peer, key, b"parked data",
                                                                   record=rec)
        await during_attack(victim, honest, base, "values in unvalidated DHT namespaces")
    assert "dht value refused" in victim.log() and "unknown_namespace" in victim.log()


def control_url(peer: Peer) -> str:
    info = json.loads((peer.dir / "control.json").read_text())
    return f"http://127.0.0.1:{info['port']}"
