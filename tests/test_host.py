"""The host composition: our yamux is the one py-libp2p builds, its reader never blocks on writes,
a closed inbound connection gives its slot back, a stopped node closes its listener, and an
explicit dial is not refused after a failed one, and an accepted connection closes with a reset."""

from __future__ import annotations

import struct

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.exceptions import SwarmDialAllFailedError
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux.yamux import FLAG_ACK, TYPE_WINDOW_UPDATE, YAMUX_HEADER_FORMAT
from multiaddr import Multiaddr

from meshnode.config import HostSection, load_config
from meshnode.host import Yamux, build_host, muxer_options
from meshnode.node import open_node
from tests.helpers.tcpstate import CLOSING, states_on
from tests.helpers.waits import until

ACK = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_WINDOW_UPDATE, FLAG_ACK, 5, 0)


class _Conn:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.written.append(data)


def _muxer() -> Yamux:
    m = Yamux.__new__(Yamux)  # only what _write_frame touches
    m._write_lock = trio.Lock()
    m.secured_conn = _Conn()
    m.is_initiator_value = True  # read by the library's frame logging
    return m


def test_py_libp2p_builds_our_yamux():
    muxer_options()
    assert muxer_multistream.Yamux is Yamux


async def test_reader_task_does_not_wait_behind_a_stuck_data_write():
    m = _muxer()
    returned = trio.Event()

    async def reader() -> None:  # named like py-libp2p's muxer reader task
        await m._write_frame(ACK)
        returned.set()

    async with trio.open_nursery() as n:
        await m._write_lock.acquire()  # a data write stuck on a full TCP buffer holds the lock
        n.start_soon(reader, name="libp2p.stream_muxer.yamux.yamux.Yamux._handle_incoming_with_ready_signal")
        with trio.fail_after(2):
            await returned.wait()  # the reader went back to reading at once
        assert m.secured_conn.written == []
        m._write_lock.release()
        with trio.fail_after(2):
            while not m.secured_conn.written:
                await trio.sleep(0.01)
        assert m.secured_conn.written == [ACK]  # ... and the ACK went out once the lock freed


async def test_other_tasks_still_wait_their_turn():
    m = _muxer()
    async with trio.open_nursery() as n:
        await m._write_lock.acquire()
        n.start_soon(m._write_frame, ACK)
        await trio.sleep(0.05)
        assert m.secured_conn.written == []  # ordinary writers queue on the lock
        m._write_lock.release()
    assert m.secured_conn.written == [ACK]


async def test_a_closed_inbound_connection_frees_its_slot():
    """py-libp2p 0.8.1 held each inbound connection's slot until the host stopped: after
    ``max_connections`` peers had come and gone, every new one was refused."""
    server = build_host(HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"], max_connections=3),
                        create_new_key_pair())
    async with server.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = PeerInfo(server.get_id(), server.get_addrs())
        for _ in range(8):  # more peers than slots, one after another
            client = build_host(HostSection(listen_addrs=[]), create_new_key_pair())
            async with client.run(listen_addrs=[]):
                await client.connect(info)
                await client.new_stream(info.peer_id, ["/ipfs/id/1.0.0"])  # upgraded and served
                await client.disconnect(info.peer_id)
        limiter = server.get_network()._inbound_limiter

        async def all_free() -> bool:
            return limiter.borrowed_tokens == 0
        await until(all_free, 10, "every inbound slot freed")


async def test_a_stopped_node_leaves_no_listener_behind(tmp_path):
    """py-libp2p 0.8.1 left a stopped swarm's listen socket serving (its shutdown was cancelled
    before it reached the listeners): a node started again in the same process shared the port
    with the dead swarm, which accepted and reset inbound connections."""
    cfg = load_config(env={}, overrides=[f"node.data_dir={tmp_path}", "control.enabled=false",
                                         "dht.enabled=false", "host.listen_addrs=/ip4/127.0.0.1/tcp/0"])
    async with open_node(cfg) as node:
        port = int(node.host.get_addrs()[0].value_for_protocol("tcp"))
        await _dial(port)  # listening now
    with pytest.raises(ConnectionRefusedError):
        await _dial(port)


async def _dial(port: int) -> None:
    with trio.socket.socket() as sock:
        await sock.connect(("127.0.0.1", port))


async def test_an_explicit_dial_is_not_refused_after_a_failed_one(tmp_path):
    """py-libp2p refuses to dial a peer whose last dial failed, for a while (its negative cache):
    a caller retrying a peer that has come back must still get through."""
    with trio.socket.socket() as probe:  # a free port for b, the same across b's restart
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def cfg(name: str, listen: str = "/ip4/127.0.0.1/tcp/0"):
        return load_config(env={}, overrides=[f"node.data_dir={tmp_path / name}", "control.enabled=false",
                                              "dht.enabled=false", f"host.listen_addrs={listen}"])
    async with open_node(cfg("a")) as a:
        async with open_node(cfg("b", f"/ip4/127.0.0.1/tcp/{port}")) as b:
            addr = str(b.addrs[0])
        with pytest.raises(SwarmDialAllFailedError):  # b is down
            await a.connect(addr)
        async with open_node(cfg("b", f"/ip4/127.0.0.1/tcp/{port}")) as b:  # b is back
            await a.connect(addr)
            assert a.host.get_network().get_connections(b.peer_id)


async def test_an_accepted_connection_closes_with_a_reset(tmp_path):
    """Every connection on our listen port closes with a RST: a graceful close on a lossy path
    leaves a FIN-WAIT orphan holding (listen port, peer's port) for minutes, and a hole punch with
    that peer — the same 4-tuple — fails as long as it lives (the NAT matrix's relayed runs).
    Here a peer connects and never speaks; the node gives up on the upgrade and drops it."""
    cfg = load_config(env={}, overrides=[f"node.data_dir={tmp_path}", "control.enabled=false",
                                         "dht.enabled=false", "host.listen_addrs=/ip4/127.0.0.1/tcp/0",
                                         "host.dial_timeout_s=1"])
    async with open_node(cfg) as node:
        port = int(node.host.get_addrs()[0].value_for_protocol("tcp"))
        with trio.socket.socket() as silent:
            await silent.connect(("127.0.0.1", port))
            with trio.fail_after(30), pytest.raises(ConnectionResetError):
                while await silent.recv(4096):  # (the node's multistream greeting, then the end)
                    pass
            assert not CLOSING & set(states_on(port))  # nothing left holding the 4-tuple
