"""Tensor transfers between two real node processes over each data path (shm, bulk, stream).

Every payload is checked end to end: the sender's BLAKE3 of its buffer must equal an independent
BLAKE3 the receiver computes over the delivered buffer (on top of the protocol's own per-tensor
checks). Nodes are ``tests/helpers/transfer_node.py`` processes driven over stdin/stdout.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from tensor_rpc.transport import parse_peer_paths, path_order, segments_of
from tensor_rpc.transport.auth import HELLO, MAGIC
from tests.helpers.transfer_peer import Peer, link

ROOT = Path(__file__).resolve().parents[1]
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    a, b = Peer(tmp, "a"), Peer(tmp, "b")
    link(a, b)
    yield a, b, tmp
    a.stop()
    b.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def transfer(a: Peer, b: Peer, size: int, path: str | None, timeout: float = 180) -> dict:
    r = a.cmd(op="send", size=size, path=path, check=True, timeout=timeout)
    assert r["ok"], r
    ev = b.event("received", timeout)
    assert ev["nbytes"] == size == r["nbytes"]
    assert ev["blake3"] == r["blake3"], "receiver's BLAKE3 differs from the sender's"
    assert ev["path"] == r["path"]
    return r


@pytest.mark.parametrize("path", ["shm", "bulk", "stream"])
@pytest.mark.parametrize("size", [1 * KiB, 64 * MiB])
def test_path_moves_payload(pair, path, size):
    a, b, _ = pair
    r = transfer(a, b, size, path)
    assert r["path"] == path


@pytest.mark.parametrize("path", ["shm", "bulk", pytest.param("stream", marks=pytest.mark.slow)])
def test_path_moves_1gib(pair, path):
    a, b, _ = pair
    r = transfer(a, b, 1 * GiB, path)
    assert r["path"] == path


@pytest.mark.parametrize("path,size,fallback", [("shm", 256 * MiB, "bulk"),
                                                ("bulk", 16 * MiB, "stream")])
def test_lane_failure_falls_back_without_double_delivery(pair, path, size, fallback):
    a, b, _ = pair
    transfer(a, b, 1 * KiB, path)  # lane up
    before = b.cmd(op="stats")["received"]
    # the test hook shuts the sender's lane socket down when the sealer reaches the middle
    r = a.cmd(op="send", size=size, path=path, check=True, break_at=0.5, timeout=120)
    assert r["ok"], r
    assert a.event("lane_broken", 5)["path"] == path
    ev = b.event("received", 60)
    assert ev["blake3"] == r["blake3"]
    assert r["path"] == fallback == ev["path"]  # the next path carried a fresh copy
    time.sleep(0.5)
    assert b.cmd(op="stats")["received"] == before + 1  # delivered exactly once
    assert b.events.empty()
    assert "asking the peer to drop the message" in a.stderr()


def test_failed_lane_is_retried_after_lane_retry_s(pair):
    _, b, tmp = pair
    s = Peer(tmp, "retry", "transport.lane_retry_s=1.5")
    try:
        link(s, b)
        transfer(s, b, 1 * KiB, "shm")  # lane up
        r = s.cmd(op="send", size=64 * MiB, path="shm", check=True, break_at=0.5, timeout=120)
        assert s.event("lane_broken", 5)["path"] == "shm"
        assert b.event("received", 60)["blake3"] == r["blake3"] and r["path"] == "bulk"
        assert transfer(s, b, 1 * KiB, "shm")["path"] == "bulk"  # still inside the retry window
        time.sleep(1.6)
        assert transfer(s, b, 1 * KiB, "shm")["path"] == "shm"  # a fresh lane
    finally:
        s.stop()


@pytest.mark.parametrize("setting,expect", [("transport.path=bulk", "bulk"),
                                            ("transport.path=stream", "stream"),
                                            ("transport.path=auto", "shm"),
                                            ("transport.shm_enabled=false", "bulk")])
def test_forcing_path_by_config(pair, setting, expect):
    _, b, tmp = pair
    s = Peer(tmp, f"cfg-{secrets.token_hex(3)}", setting)
    try:
        link(s, b)
        assert transfer(s, b, 1 * MiB, None)["path"] == expect
    finally:
        s.stop()


def test_auto_sends_small_payloads_on_the_stream(pair):
    _, b, tmp = pair
    s = Peer(tmp, "auto-size")
    try:
        link(s, b)
        assert transfer(s, b, 1 * KiB, None)["path"] == "stream"  # <= transport.inline_max_bytes
        assert transfer(s, b, 1 * MiB, None)["path"] == "shm"
        assert transfer(s, b, 1 * KiB, "shm")["path"] == "shm"  # a forced path still wins
    finally:
        s.stop()


def test_forcing_path_per_peer(pair):
    _, b, tmp = pair
    s = Peer(tmp, "per-peer", f"transport.peer_paths={b.peer_id}=stream")
    try:
        link(s, b)
        assert transfer(s, b, 1 * MiB, None)["path"] == "stream"
        assert transfer(s, b, 1 * MiB, "bulk")["path"] == "bulk"  # per-call override still wins
    finally:
        s.stop()


@pytest.mark.parametrize("path", ["shm", "bulk", "stream"])
def test_sigkill_sender_mid_transfer_leaves_receiver_unchanged(pair, path):
    _, b, tmp = pair
    s = Peer(tmp, f"kill-{path}")
    try:
        link(s, b)
        before = b.cmd(op="stats")["received"]
        s.proc.stdin.write((json.dumps({"op": "send", "size": 256 * MiB, "path": path,
                                        "source": True, "stall_at": 0.5}) + "\n").encode())
        s.proc.stdin.flush()
        s.event("midway", 60)  # half the chunks are out; the sender hangs there
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
        time.sleep(1.0)
        assert b.cmd(op="stats")["received"] == before, "a partial message was delivered"
        assert b.events.empty()
        assert segments_of(s.pid) == [], "shared-memory segments left behind"
        assert b.proc.poll() is None
    finally:
        s.stop()


def assert_dropped(c: socket.socket) -> None:
    try:
        assert c.recv(100) == b""  # closed by the node
    except ConnectionResetError:  # closed with our unread bytes pending: also dropped
        pass


def test_bulk_lane_drops_connection_without_session_key(pair):
    a, b, _ = pair
    port = b.ready["bulk_port"]
    sid = bytes.fromhex(a.cmd(op="sessions")["sessions"][b.peer_id])
    # 1) unknown session id: dropped after the hello, nothing sent back
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(HELLO.pack(MAGIC, 1, secrets.token_bytes(16), secrets.token_bytes(32)))
        assert_dropped(c)
    # 2) a real session id but no key: the acceptor proves itself, our forged MAC is refused
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(HELLO.pack(MAGIC, 1, sid, secrets.token_bytes(32)))
        assert len(c.recv(64, socket.MSG_WAITALL)) == 64
        c.sendall(secrets.token_bytes(32) + b"\x00" * 1024)
        assert_dropped(c)
    # 3) a real session id announcing the shm kind on the TCP listener: the listener decides
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(HELLO.pack(MAGIC, 2, sid, secrets.token_bytes(32)))
        assert_dropped(c)
    time.sleep(0.3)
    assert b.stderr().count("data lane connection dropped") >= 3
    assert "announced on the kind-1 listener" in b.stderr()
    assert "connector failed to prove the session key" in b.stderr()
    transfer(a, b, 1 * MiB, "bulk")  # the real lane is unaffected


def test_path_order_rules():
    per = parse_peer_paths(["P1=stream", "P2=bulk"])
    assert path_order("X", "auto", per) == ["shm", "bulk", "stream"]
    assert path_order("P1", "auto", per) == ["stream"]
    assert path_order("P2", "auto", per) == ["bulk", "stream"]
    assert path_order("P2", "auto", per, override="shm") == ["shm", "bulk", "stream"]
    assert path_order("X", "auto", per, shm_enabled=False) == ["bulk", "stream"]
    assert path_order("X", "shm", per, shm_enabled=False) == ["bulk", "stream"]  # off means off
    # small payloads under auto take the stream (a lane costs ~1 ms more per message); forced wins
    assert path_order("X", "auto", per, nbytes=1024, inline_max_bytes=262144) == ["stream"]
    assert path_order("X", "auto", per, nbytes=262145, inline_max_bytes=262144)[0] == "shm"
    assert path_order("X", "auto", per, override="bulk", nbytes=1, inline_max_bytes=262144)[0] == "bulk"
    assert path_order("P2", "auto", per, nbytes=1, inline_max_bytes=262144)[0] == "bulk"
    with pytest.raises(ValueError):
        parse_peer_paths(["nope"])


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """Peers that accept 8 GiB messages; the receiver streams every message into a hashing sink."""
    tmp = tmp_path_factory.mktemp("bounded")
    limit = "protocol.max_message_bytes=8589934592"
    a, b = Peer(tmp, "big-a", limit), Peer(tmp, "big-b", limit)
    link(a, b)
    assert b.cmd(op="sink", on=True)["ok"]
    yield a, b
    a.stop()
    b.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("path,size", [("shm", 4 * GiB), ("bulk", 4 * GiB), ("stream", 1 * GiB)])
def test_large_payload_moves_in_bounded_memory(big_pair, path, size):
    """A payload produced chunk by chunk and streamed into a sink: neither side's peak RSS grows by
    512 MiB, whatever the size (4 GiB on the lanes; 1 GiB on the slower stream path is enough to
    show the bound, and the 4 GiB case costs half a minute there)."""
    a, b = big_pair
    base = {p: p.cmd(op="reset_peak")["VmRSS"] for p in (a, b)}
    r = a.cmd(op="send", size=size, path=path, source=True, timeout=600)
    assert r["ok"] and r["path"] == path, r
    ev = b.event("received", 600)
    assert ev["sink"] and ev["nbytes"] == size
    assert ev["blake3"] == r["blake3"], "the sink's own BLAKE3 differs from the sender's digest"
    for p in (a, b):
        growth = p.cmd(op="stats")["VmHWM"] - base[p]
        print(f"{path} {size / GiB:.0f} GiB in {r['elapsed_s']:.2f} s: peak RSS growth "
              f"{growth / MiB:.0f} MiB ({'sender' if p is a else 'receiver'})")
        assert growth < 512 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB moving {size / GiB:.0f} GiB"


def test_both_directions_at_once_on_the_stream(pair):
    """Each side streams 128 MiB to the other at the same time over one session's libp2p stream:
    neither reader ever waits on its own writer, so full yamux windows cannot deadlock (a stalled
    reader would make py-libp2p reset the stream after 5 s, DESIGN.md §7 item 4)."""
    a, b, _ = pair
    deadline = time.time() + 10
    while not b.cmd(op="sessions")["sessions"] and time.time() < deadline:
        time.sleep(0.05)  # b accepts a's session asynchronously
    for p in (a, b):
        p.proc.stdin.write((json.dumps({"op": "send", "size": 128 * MiB, "path": "stream",
                                        "check": True}) + "\n").encode())
        p.proc.stdin.flush()
    ra, rb = a.replies.get(timeout=180), b.replies.get(timeout=180)
    assert ra["ok"] and rb["ok"], (ra, rb)
    ea, eb = a.event("received", 60), b.event("received", 60)
    assert eb["blake3"] == ra["blake3"] and ea["blake3"] == rb["blake3"]
    assert ra["path"] == rb["path"] == "stream"
