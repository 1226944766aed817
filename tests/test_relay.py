"""Circuit Relay v2 on loopback, real nodes: reservations, circuits, and every limit the relay
enforces (slots freed on disconnect, reservations, data per direction, duration), plus a tensor
session that cannot fit through the circuit failing at once, naming the limit."""

from __future__ import annotations

from contextlib import AsyncExitStack

import numpy as np
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.peerinfo import PeerInfo

from meshnode.config import HostSection, load_config
from meshnode.host import build_host, is_relayed
from meshnode.nat import relay_pb as pb
from meshnode.node import open_node
from meshnode.tensor import CircuitLimitError
from tensor_rpc import Kind
from tests.helpers.sigs import fake_signature
from tests.helpers.waits import until

BASE = ["host.listen_addrs=/ip4/127.0.0.1/tcp/0", "control.enabled=false", "dht.enabled=false",
        "nat.autonat_client=false", "nat.autonat_server=false", "relay.scan_interval_s=0.1"]
ECHO = "/test/echo/1"


def _cfg(tmp_path, name: str, *extra: str):
    return load_config(env={}, overrides=[f"node.data_dir={tmp_path / name}", *BASE, *extra])


def _refusals(node, reason: str) -> float:
    return node.metrics.refusals.labels(component="relay", reason=reason)._value.get()


async def _reserved(client) -> str:
    async def ready():
        return client.relay_client.circuit_addrs()
    return str((await until(ready, 15, "a relay reservation"))[0])


async def test_circuit_connects_two_peers_and_the_slot_frees_on_disconnect(tmp_path):
    async with open_node(_cfg(tmp_path, "r", "relay.hop=always", "relay.client=never")) as r:
        relay = f"relay.relays={r.addrs[0]}"
        async with open_node(_cfg(tmp_path, "a", "relay.client=never", "relay.hop=never")) as a:
            async with open_node(_cfg(tmp_path, "b", "relay.client=always", "relay.hop=never", relay)) as b:
                addr = await _reserved(b)
                assert addr == f"{r.addrs[0]}/p2p-circuit/p2p/{b.peer_id}"  # exactly, not our id at R
                assert addr in {str(x) for x in b.host.get_addrs()}
                await a.connect(addr)
                conns = a.host.get_network().get_connections(b.peer_id)
                assert conns and all(is_relayed(c) for c in conns)
                assert r.relay.status()["circuits_made"] == 1
                assert b.peer_id in r.relay.reservations

            async def freed():
                return not r.relay.reservations
            await until(freed, 10, "the reservation freed when its peer left")


async def test_reservations_beyond_the_limit_are_refused_and_counted(tmp_path):
    async with open_node(_cfg(tmp_path, "r", "relay.hop=always", "relay.client=never",
                              "relay.max_reservations=1")) as r, \
            open_node(_cfg(tmp_path, "b", "relay.client=always", "relay.hop=never",
                           f"relay.relays={r.addrs[0]}")) as b:
        await _reserved(b)
        host = build_host(HostSection(listen_addrs=[]), create_new_key_pair())
        async with host.run(listen_addrs=[]):
            await host.connect(PeerInfo(r.peer_id, r.host.get_addrs()))
            s = await host.new_stream(r.peer_id, [pb.HOP_PROTOCOL])
            await s.write(pb.encode(pb.hop(pb.HOP_RESERVE)))
            assert (await pb.read(s, pb.HopMessage)).status == pb.RESERVATION_REFUSED
            s = await host.new_stream(r.peer_id, [pb.HOP_PROTOCOL])  # a circuit to nobody
            await s.write(pb.encode(pb.hop(pb.HOP_CONNECT, peer=host.get_id().to_bytes())))
            assert (await pb.read(s, pb.HopMessage)).status == pb.NO_RESERVATION
        assert _refusals(r, "relay_reservations_full") == 1
        assert _refusals(r, "relay_no_reservation") == 1


async def _relayed_pair(tmp_path, stack, *relay_settings):
    r = await stack.enter_async_context(open_node(_cfg(
        tmp_path, "r", "relay.hop=always", "relay.client=never", *relay_settings)))
    a = await stack.enter_async_context(open_node(_cfg(tmp_path, "a", "relay.client=never")))
    b = await stack.enter_async_context(open_node(_cfg(
        tmp_path, "b", "relay.client=always", f"relay.relays={r.addrs[0]}")))
    await a.connect(await _reserved(b))
    return r, a, b


async def test_data_limit_counts_each_direction_on_its_own(tmp_path):
    limit = 512 * 1024
    async with AsyncExitStack() as stack:
        r, a, b = await _relayed_pair(tmp_path, stack, f"relay.circuit_bytes={limit}")

        async def echo(stream):  # b sends back what it got
            try:
                while data := await stream.read(65536):
                    await stream.write(data)
            except Exception:  # the circuit was cut
                pass
        b.host.set_stream_handler(ECHO, echo)
        s = await a.host.new_stream(b.peer_id, [ECHO])
        circuit = a.host.get_network().get_connections(b.peer_id)[0]
        block = b"x" * 65536
        for _ in range(5):  # 320 KiB each way: 640 KiB over the circuit, under the limit per direction
            await s.write(block)
            got = 0
            while got < len(block):
                got += len(await s.read(len(block) - got))
        assert _refusals(r, "relay_data_limit") == 0
        with pytest.raises(StreamError):  # the circuit is cut: EOF or reset, by timing
            for _ in range(8):
                await s.write(block)
                await s.read(65536)

        async def cut():  # (peer exchange may dial b through the relay again: a new circuit)
            return _refusals(r, "relay_data_limit") == 1 and \
                circuit not in a.host.get_network().get_connections(b.peer_id)
        await until(cut, 10, "the circuit cut at its data limit")


async def test_an_idle_circuit_is_cut_at_its_duration(tmp_path):
    async with AsyncExitStack() as stack:
        r, a, b = await _relayed_pair(tmp_path, stack, "relay.circuit_duration_s=1")
        circuit = a.host.get_network().get_connections(b.peer_id)[0]

        async def cut():
            return circuit not in a.host.get_network().get_connections(b.peer_id)
        await until(cut, 10, "the idle circuit cut at its duration")
        assert _refusals(r, "relay_duration_limit") == 1


async def test_a_message_larger_than_the_circuit_fails_at_once_naming_the_limit(tmp_path):
    async with AsyncExitStack() as stack:
        r, a, b = await _relayed_pair(tmp_path, stack, "relay.circuit_bytes=1048576")
        a.serve(fake_signature(0))
        b.serve(fake_signature(0))
        ts = await a.open_session(b.peer_id)
        rs = await b.accept_session(10)
        small = np.arange(1024, dtype=np.float32)
        await ts.send([("x", "float32", small.shape, small)], kind=Kind.KV_CACHE, layers=(0, 1),
                      tokens=(0, 1), timeout_s=20)
        got = await rs.receive()
        assert bytes(got.tensors[0][1]) == small.tobytes()
        big = np.zeros(512 * 1024, dtype=np.float32)  # 2 MiB > 1 MiB per direction
        with pytest.raises(CircuitLimitError, match=r"relay\.circuit_bytes"):
            await ts.send([("x", "float32", big.shape, big)], kind=Kind.KV_CACHE, layers=(0, 1),
                          tokens=(0, 1), timeout_s=20)
        assert r.relay.status()["circuits"][0]["up"] < 1048576  # nothing big was sent
        with trio.fail_after(20):
            await ts.close("done")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


RELAY_PROC = ["--set", "relay.hop=always", "--set", "relay.client=never", "--set", "dht.enabled=false",
              "--set", "nat.autonat_client=false", "--set", "nat.autonat_server=false"]


async def test_a_thousand_reserve_disconnect_cycles_leave_nothing_behind(tmp_path):
    """25 peers reserve and leave 40 times each, side by side (py-libp2p's resource manager
    rate-limits one peer's reconnects, rightly; a disconnect there takes ~0.2 s)."""
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    from tests.helpers.nodeproc import NodeProc
    relay = NodeProc(tmp_path / "relay", extra=RELAY_PROC)
    try:
        info = PeerInfo(ID.from_base58(relay.peer_id), [Multiaddr(relay.addr.split("/p2p/")[0])])

        async def cycles(host, n: int) -> None:
            for _ in range(n):
                await host.connect(info)
                s = await host.new_stream(info.peer_id, [pb.HOP_PROTOCOL])
                await s.write(pb.encode(pb.hop(pb.HOP_RESERVE)))
                assert (await pb.read(s, pb.HopMessage)).status == pb.OK
                await host.disconnect(info.peer_id)

        hosts = [build_host(HostSection(listen_addrs=[]), create_new_key_pair()) for _ in range(25)]
        rss: list[int] = []
        async with AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.run(listen_addrs=[]))
            for per_peer in (4, 36):  # 100 cycles, then 900 more
                async with trio.open_nursery() as n:
                    for host in hosts:
                        n.start_soon(cycles, host, per_peer)
                await trio.sleep(1.0)  # let the relay see the last disconnects
                rss.append(_rss_kib(relay.proc.pid))
        status = relay.get("/status")["relay"]
        print(f"\nrelay RSS after 100 cycles {rss[0] // 1024} MiB, after 1000 {rss[1] // 1024} MiB; "
              f"reservations made {status['reservations_made']}")
        assert status["reservations_made"] == 1000

        async def none_left():
            return relay.get("/status")["relay"]["reservations"] == 0
        await until(none_left, 10, "no reservation left")
        assert rss[1] - rss[0] < 32 * 1024, rss  # KiB: no per-cycle growth (900 cycles)
    finally:
        relay.terminate()


async def test_reservation_is_back_within_seconds_after_the_relay_restarts(tmp_path):
    from tests.helpers.nodeproc import NodeProc
    port = _free_port()
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    relay = NodeProc(tmp_path / "relay", extra=RELAY_PROC, listen=listen)
    try:
        async with open_node(_cfg(tmp_path, "b", "relay.client=always", "relay.hop=never",
                                  f"relay.relays={relay.addr}")) as b:
            await _reserved(b)
            relay.terminate()

            async def lost():
                return not b.relay_client.circuit_addrs()
            await until(lost, 10, "the reservation dropped with the relay", every=0.05)
            t0 = trio.current_time()
            relay = NodeProc(tmp_path / "relay", extra=RELAY_PROC, listen=listen)  # same identity
            await _reserved(b)
            gap = trio.current_time() - t0
            print(f"\nreservation back {gap:.2f} s after the relay restarted "
                  f"(retry backoff up to relay.retry_backoff_max_s)")
            assert relay.get("/status")["relay"]["reservations"] == 1
    finally:
        relay.terminate()
