"""Real node processes on 127.0.0.1: mesh formation, restart identity, clean shutdown, Noise only."""

import os
import signal
import subprocess

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from tests.helpers.nodeproc import ROOT, NodeProc, clean_env, meshnode_cmd, wait_until

MESH_BOUND_S = 30.0
PERSISTENT = {"identity.key", "crdt", "models"}


def _shm_and_tmp_snapshot():
    return set(os.listdir("/dev/shm"))


def test_five_nodes_form_a_mesh_and_cli_lists_peers(tmp_path):
    shm_before = _shm_and_tmp_snapshot()
    first = NodeProc(tmp_path / "n0")
    nodes = [first] + [NodeProc(tmp_path / f"n{i}", bootstrap=[first.addr]) for i in range(1, 5)]
    try:
        ids = {n.peer_id for n in nodes}

        def all_see_all():
            return all({p["peer_id"] for p in n.get("/peers")} >= ids - {n.peer_id} for n in nodes)

        wait_until(all_see_all, MESH_BOUND_S, 0.2, "every node to see the 4 others")
        # The CLI talks to a running node through its control API.
        last = nodes[-1]
        r = subprocess.run(meshnode_cmd() + ["peers", "--data-dir", str(last.data_dir)],
                           capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        for other in ids - {last.peer_id}:
            assert other in r.stdout
        metrics = last.get("/metrics")
        assert "latentlink_connections 4.0" in metrics
        assert 'latentlink_protocol_bytes_total{direction="in",protocol="pex"}' in metrics
    finally:
        codes = [n.terminate() for n in nodes]
    assert codes == [0] * 5, [n.stderr() for n in nodes]
    for n in nodes:  # SIGTERM leaves no stray files: only persistent state (identity, CRDT log) stays
        left = set(os.listdir(n.data_dir))
        assert "identity.key" in left and left <= PERSISTENT, left
        assert not [f for f in os.listdir(n.data_dir / "crdt") if f.endswith(".tmp")]
        assert n.proc.poll() is not None
    assert _shm_and_tmp_snapshot() <= shm_before | set()


def test_restart_keeps_peer_id_and_sigint_exits_0(tmp_path):
    a = NodeProc(tmp_path / "a")
    pid1 = a.peer_id
    assert a.terminate(signal.SIGINT) == 0
    b = NodeProc(tmp_path / "a")
    try:
        assert b.peer_id == pid1
    finally:
        assert b.terminate() == 0
    r = subprocess.run(meshnode_cmd() + ["id", "--data-dir", str(tmp_path / "a")],
                       capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == pid1


def test_no_child_processes_left(tmp_path):
    a = NodeProc(tmp_path / "a")
    pid = a.proc.pid
    assert a.terminate() == 0
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
    assert not [line for line in out.splitlines()[1:] if line.split()[1] == str(pid)]


def test_plaintext_only_peer_cannot_connect(tmp_path):
    node = NodeProc(tmp_path / "a")
    try:
        async def attempt():
            kp = create_new_key_pair()
            h = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)})
            async with h.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                # Security negotiation fails (Noise only): every dial attempt fails; a stalled
                # negotiation that never completes counts as refused too.
                with pytest.raises((SwarmException, trio.TooSlowError)):
                    with trio.fail_after(10):
                        await h.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addr)))
                assert not h.get_connected_peers()

        trio.run(attempt)
        assert node.get("/peers") == []
    finally:
        assert node.terminate() == 0
