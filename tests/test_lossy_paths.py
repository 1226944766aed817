"""What keeps a node usable over lossy paths, on loopback with real nodes: the TCP retransmission
timeout cap on every connection, a relayed connection that survives a direct one joining it (its
closing is DCUtR's), a relay that reaches a peer over the connection it reserved on, and a
session that runs over the relay when the direct connection beside it went silent."""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from libp2p.host.exceptions import StreamFailure

from meshnode.config import ConfigError, HostSection, load_config
from meshnode.host import build_host, close_listeners, is_relayed, new_stream_or_relayed
from meshnode.node import open_node
from meshnode.tcp_rto import TCP_RTO_MAX_MS, raw_socket
from tests.helpers.waits import until

BASE = ["host.listen_addrs=/ip4/127.0.0.1/tcp/0", "control.enabled=false", "dht.enabled=false",
        "nat.autonat_client=false", "nat.autonat_server=false", "relay.scan_interval_s=0.1"]


def _cfg(tmp_path, name: str, *extra: str):
    return load_config(env={}, overrides=[f"node.data_dir={tmp_path / name}", *BASE, *extra])


def _refusals(node, reason: str) -> float:
    return node.metrics.refusals.labels(component="relay", reason=reason)._value.get()


def _kernel_caps_rto() -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, 2000)
            return True
        except OSError:
            return False


def _sockets(node, peer) -> list[socket.socket]:
    out = []
    for conn in node.host.get_network().get_connections(peer):
        sock = raw_socket(conn.muxed_conn.secured_conn.conn.conn)  # (py-libp2p: no accessor)
        if sock is not None:
            out.append(sock)
    return out


def test_a_cap_below_the_kernels_floor_fails_at_start_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="host.tcp_rto_max_ms"):
        _cfg(tmp_path, "a", "host.tcp_rto_max_ms=500")


@pytest.mark.skipif(not _kernel_caps_rto(), reason="kernel lacks TCP_RTO_MAX_MS (Linux 6.15+)")
async def test_both_ends_of_a_connection_carry_the_configured_cap(tmp_path):
    async with open_node(_cfg(tmp_path, "a", "host.tcp_rto_max_ms=1500")) as a, \
            open_node(_cfg(tmp_path, "b", "host.tcp_rto_max_ms=3000")) as b:
        await a.connect(f"{b.addrs[0]}")
        (sa,) = _sockets(a, b.peer_id)  # dialled by py-libp2p
        (sb,) = _sockets(b, a.peer_id)  # accepted by our listener
        assert sa.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS) == 1500
        assert sb.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS) == 3000


@pytest.mark.skipif(not _kernel_caps_rto(), reason="kernel lacks TCP_RTO_MAX_MS (Linux 6.15+)")
async def test_zero_leaves_the_kernels_default(tmp_path):
    with socket.socket() as fresh:
        default = fresh.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS)
    async with open_node(_cfg(tmp_path, "a", "host.tcp_rto_max_ms=0")) as a, \
            open_node(_cfg(tmp_path, "b", "host.tcp_rto_max_ms=0")) as b:
        await a.connect(f"{b.addrs[0]}")
        (sa,) = _sockets(a, b.peer_id)
        assert sa.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS) == default


async def _reserved(node) -> str:
    async def ready():
        return node.relay_client.circuit_addrs()
    return str((await until(ready, 15, "a relay reservation"))[0])


async def _relay_and_two(tmp_path, stack, *extra: str):
    """A relay r, a peer a, and a peer b holding a reservation on r (its circuit address)."""
    r = await stack.enter_async_context(open_node(_cfg(
        tmp_path, "r", "relay.hop=always", "relay.client=never")))
    a = await stack.enter_async_context(open_node(_cfg(tmp_path, "a", "relay.client=never", *extra)))
    b = await stack.enter_async_context(open_node(_cfg(
        tmp_path, "b", "relay.client=always", f"relay.relays={r.addrs[0]}", *extra)))
    return r, a, b


async def test_a_direct_connection_joining_a_relayed_one_does_not_close_it(tmp_path):
    """py-libp2p trims a peer's connections beyond ``max_connections_per_peer`` (1) as soon as
    one is added, oldest first once past its 20 s grace: the relayed one went, on one side only."""
    async with AsyncExitStack() as stack:  # (the direct connection is made by hand here)
        r, a, b = await _relay_and_two(tmp_path, stack, "dcutr.enabled=false")
        await a.connect(await _reserved(b))
        (relayed,) = a.host.get_network().get_connections(b.peer_id)
        assert is_relayed(relayed)
        relayed._created_at -= 3600  # an old relayed connection: past py-libp2p's grace period
        direct_addr = multiaddr.Multiaddr(str(b.addrs[0]).split("/p2p/")[0])
        await a.host.get_network().dial_addr(direct_addr, b.peer_id)
        await trio.sleep(0.5)  # (py-libp2p closes what it trims in a background task)
        conns = a.host.get_network().get_connections(b.peer_id)
        assert relayed in conns and any(not is_relayed(c) for c in conns)
        assert not relayed.muxed_conn.is_closed


async def test_a_circuit_reaches_the_peer_over_the_connection_it_reserved_on(tmp_path):
    """A stale connection from the same peer (it restarted; its old connection lingers at the
    relay until TCP notices) must never carry the STOP stream: it would go unanswered."""
    async with AsyncExitStack() as stack:
        r = await stack.enter_async_context(open_node(_cfg(
            tmp_path, "r", "relay.hop=always", "relay.client=never")))
        b = await stack.enter_async_context(open_node(_cfg(
            tmp_path, "b", "relay.client=always", f"relay.relays={r.addrs[0]}")))
        circuit = await _reserved(b)
        # b's "old self": same identity, no relay client (it answers no STOP)
        stale = build_host(HostSection(listen_addrs=[]), b.key_pair)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(_run_host, stale)
        relay_ma = multiaddr.Multiaddr(str(r.addrs[0]).split("/p2p/")[0])
        await stale.get_network().dial_addr(relay_ma, r.peer_id)
        await trio.sleep(1)  # (a stream opened the moment the connection was up got reset here)
        # one open stream: py-libp2p's own choice (more streams first) would fall on this one
        held = [await stale.new_stream(r.peer_id, ["/ipfs/ping/1.0.0"])]
        assert len(r.host.get_network().get_connections(b.peer_id)) == 2
        for _ in range(4):  # whichever one py-libp2p would pick, STOP goes where b reserved
            a = await stack.enter_async_context(open_node(_cfg(tmp_path, f"a{_}", "relay.client=never")))
            await a.connect(circuit)
            conns = a.host.get_network().get_connections(b.peer_id)
            assert conns and all(is_relayed(c) for c in conns)
        assert r.relay.status()["circuits_made"] == 4
        assert _refusals(r, "relay_target_failed") == 0
        for st in held:
            await st.reset()


async def _run_host(host, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with host.run(listen_addrs=[]):
        task_status.started()
        await trio.sleep_forever()


async def test_a_session_to_a_peer_no_longer_connected_is_dialled_through_its_relay(tmp_path):
    """The stream's own dial would try the peer's direct addresses only: a peer reachable only
    through a relay, whose connection went (a lossy path, a closed circuit), was unreachable."""
    from tests.helpers.sigs import fake_signature

    async with AsyncExitStack() as stack:
        r, a, b = await _relay_and_two(tmp_path, stack, "dcutr.enabled=false")
        await close_listeners(b.host)  # b's own address takes no connection: only its circuit does
        circuit = await _reserved(b)
        a.serve(fake_signature(0))
        b.serve(fake_signature(0), accept=True)
        await a.connect(circuit)
        for conn in list(a.host.get_network().get_connections(b.peer_id)):
            await conn.close()

        async def gone():
            return not a.host.get_network().get_connections(b.peer_id)
        await until(gone, 5, "the relayed connection closed")
        # a knows b's addresses (as from a DHT lookup): its circuit, and its direct one (closed)
        known = [circuit.rsplit("/p2p/", 1)[0], str(b.addrs[0]).rsplit("/p2p/", 1)[0]]
        a.host.get_peerstore().add_addrs(b.peer_id, [multiaddr.Multiaddr(x) for x in known], 3600)
        ts = await a.open_session(b.peer_id)
        assert is_relayed(ts.stream)
        await ts.close("done")


async def test_a_session_whose_direct_connection_went_silent_runs_over_the_relay(tmp_path):
    """A direct connection beside the relayed one (DCUtR keeps both when the direct one answers
    no ping) that carries nothing any more: py-libp2p still picks it for every new stream."""
    from tests.helpers.sigs import fake_signature
    from tests.helpers.silent_pipe import SilentPipe

    async with AsyncExitStack() as stack:
        r, a, b = await _relay_and_two(tmp_path, stack, "dcutr.enabled=false")
        a.serve(fake_signature(0))
        b.serve(fake_signature(0), accept=True)
        await a.connect(await _reserved(b))
        pipe = SilentPipe(int(b.addrs[0].value_for_protocol("tcp")))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(pipe.run)
        await a.host.get_network().dial_addr(
            multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{pipe.port}"), b.peer_id)
        conns = a.host.get_network().get_connections(b.peer_id)
        assert any(is_relayed(c) for c in conns) and any(not is_relayed(c) for c in conns)
        with pytest.raises(StreamFailure):  # a protocol the peer refused: no second try
            await new_stream_or_relayed(a.host, b.peer_id, "/latentlink/none/1.0.0", 5)
        pipe.go_silent()
        ts = await a.open_session(b.peer_id)
        assert is_relayed(ts.stream)
        theirs = await b.accept_session(5)
        assert is_relayed(theirs.stream)
        await ts.close("done")
