"""Persistence: crash recovery of the signed-update log, then catch-up from a peer.

Includes a real ``kill -9`` of a subprocess node writing to its store over libp2p.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from crdt_state.limits import CrdtLimits
from crdt_state.service import CrdtService
from crdt_state.store import HEADER, UpdateStore
from crdt_state.sync import SyncEngine
from crdt_state.testing import hello_all, pump, running_host
from crdt_state.testing import sample_message as msg

LIMITS = CrdtLimits()


def _engine_with_store(tmp: Path, kp, fsync: str = "never") -> tuple[SyncEngine, UpdateStore]:
    store = UpdateStore(tmp, LIMITS, fsync=fsync)
    eng = SyncEngine(kp, LIMITS, on_accept=store.append)
    eng.load(store.load())
    return eng, store


def _record_offsets(path: Path) -> list[int]:
    data, pos, offs = path.read_bytes(), 0, []
    while pos < len(data):
        offs.append(pos)
        n, _ = HEADER.unpack_from(data, pos)
        pos += HEADER.size + n
    return offs


def test_crash_truncated_and_flipped_tail_recover_then_catch_up(tmp_path: Path, caplog) -> None:
    kp_a = create_new_key_pair()
    a, store = _engine_with_store(tmp_path, kp_a, fsync="always")
    b = SyncEngine(create_new_key_pair(), LIMITS)
    a.create("s", "ck", {a.local_peer: "owner", b.local_peer: "agent"})
    for i in range(10):
        a.edit("s", lambda d, i=i: d.log_message(msg(i, a.local_peer)))
    pump([a, b], hello_all([a, b]))
    full = b.replicas["s"].doc.snapshot()
    assert len(full["messages"]) == 10
    # "kill -9": abandon the store without close(); then damage the tail.
    path = store.path_for("s")
    offs = _record_offsets(path)
    n_records = len(offs)  # genesis + 10 messages
    size = path.stat().st_size
    os.truncate(path, size - 7)  # last record partially written

    caplog.set_level(logging.WARNING, logger="crdt_state.store")
    a2, store2 = _engine_with_store(tmp_path, kp_a)
    assert "partial record" in caplog.text
    assert path.stat().st_size == offs[-1]
    assert len(a2.replicas["s"].doc.messages()) == 9
    store2.close()

    raw = bytearray(path.read_bytes())  # flip a byte inside the (now) last record
    raw[offs[-2] + HEADER.size + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    caplog.clear()
    a3, store3 = _engine_with_store(tmp_path, kp_a)
    assert "checksum mismatch" in caplog.text
    assert len(UpdateStore(tmp_path, LIMITS).load()) == n_records - 2
    assert len(a3.replicas["s"].doc.messages()) == 8

    # Catch up from b: the lost records come back (signed by a's earlier incarnation) and persist.
    pump([a3, b], hello_all([a3, b]))
    assert a3.replicas["s"].doc.snapshot() == full
    a3.edit("s", lambda d: d.set_status("active"))  # new incarnation: no sequence clash
    pump([a3, b], hello_all([a3, b]))
    assert b.replicas["s"].doc.status == "active"
    store3.close()
    a4, _ = _engine_with_store(tmp_path, kp_a)
    assert a4.replicas["s"].doc.snapshot() == b.replicas["s"].doc.snapshot()


CHILD = r"""
import sys, trio, multiaddr
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from crdt_state.limits import CrdtLimits
from crdt_state.service import CrdtService
from crdt_state.store import UpdateStore
from crdt_state.testing import running_host

async def main():
    seed, data_dir, peer, addr = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    limits = CrdtLimits(anti_entropy_interval_s=0.1, fsync="never")
    async with running_host(create_new_key_pair(seed)) as (host, kp):
        host.get_peerstore().add_addrs(ID.from_base58(peer), [multiaddr.Multiaddr(addr)], 3600)
        svc = CrdtService(host, kp, UpdateStore(data_dir, limits), limits)
        async with svc.run():
            svc.create_session("s", "ck", {peer: "agent"})
            i = 0
            while True:  # write until killed
                svc.log_message("s", kind="KV_CACHE", receiver=peer, message_id=f"c{i:05d}")
                i += 1
                await trio.sleep(0.002)
trio.run(main)
"""


async def test_kill_9_subprocess_then_restart_recovers_and_catches_up(tmp_path: Path) -> None:
    limits = CrdtLimits(anti_entropy_interval_s=0.1, request_timeout_s=1.0)
    seed = os.urandom(32)
    async with running_host() as (host_b, kp_b):
        svc_b = CrdtService(host_b, kp_b, limits=limits)
        async with svc_b.run():
            addr = str(host_b.get_addrs()[0]).split("/p2p/")[0]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, seed.hex(), str(tmp_path), svc_b.peer_id, addr],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                with trio.fail_after(30):
                    while "s" not in svc_b.engine.replicas or \
                            svc_b.doc("s").message_count() < 50:
                        await trio.sleep(0.05)
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
            seen_by_b = svc_b.doc("s").message_count()
            # b keeps working while a is down
            svc_b.log_message("s", kind="HIDDEN_SLICE", receiver="a", message_id="while-down")

            kp_a = create_new_key_pair(seed)
            store = UpdateStore(tmp_path, limits)
            async with running_host(kp_a) as (host_a, _):
                svc_a = CrdtService(host_a, kp_a, store, limits)
                recovered = svc_a.doc("s").message_count()
                assert recovered >= seen_by_b - 1  # a logs before it pushes; at most a torn tail
                host_a.get_peerstore().add_addrs(host_b.get_id(), host_b.get_addrs(), 3600)
                async with svc_a.run():
                    with trio.fail_after(15):
                        while svc_a.get("s") != svc_b.get("s"):
                            await trio.sleep(0.05)
                ids = {m["message_id"] for m in svc_a.get("s")["messages"]}
                assert "while-down" in ids
            store.close()
