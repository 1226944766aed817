"""DCUtR on loopback and without a network: the wire format, address filtering, the path state
machine and the punch memory (pure), and real nodes — a relayed connection dialled back directly
(the unilateral upgrade), the relayed connection closed after its grace period, a tensor session
that waits for the upgrade, and a responder that refuses what the spec does not allow. Punching
through NATs proper is tests/test_dcutr_lab.py (network namespaces)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.network.stream.exceptions import StreamReset

from meshnode.config import load_config
from meshnode.host import close_listeners, is_relayed
from meshnode.nat import dcutr_pb as pb
from meshnode.nat.paths import DIRECT, PENDING, PUNCHING, RELAY_ONLY, PeerPaths, PunchMemory
from meshnode.nat.pbschema import WireError, decode
from meshnode.node import open_node
from tests.helpers.sigs import fake_signature
from tests.helpers.waits import until

BASE = ["host.listen_addrs=/ip4/127.0.0.1/tcp/0", "control.enabled=false", "dht.enabled=false",
        "nat.autonat_client=false", "nat.autonat_server=false", "relay.scan_interval_s=0.1",
        "nat.allow_private_addrs=true", "dcutr.relay_grace_s=0.5"]


def _cfg(tmp_path, name: str, *extra: str):
    return load_config(env={}, overrides=[f"node.data_dir={tmp_path / name}", *BASE, *extra])


def _refusals(node, reason: str) -> float:
    return node.metrics.refusals.labels(component="dcutr", reason=reason)._value.get()


# -- wire --------------------------------------------------------------------------------------
def test_wire_format_matches_the_spec():
    addr = multiaddr.Multiaddr("/ip4/11.0.1.1/tcp/4001")
    body = pb.message(pb.CONNECT, [addr])[1:]
    # HolePunch { type (1, varint) = 100, ObsAddrs (2, LEN) }
    assert body == bytes([0x08, 100, 0x12, len(addr.to_bytes())]) + addr.to_bytes()
    assert pb.message(pb.SYNC)[1:] == bytes([0x08, 0xAC, 0x02])  # 300 as a varint


def test_only_plain_tcp_addresses_are_punched_and_private_ones_only_in_labs():
    raw = [multiaddr.Multiaddr(a).to_bytes() for a in (
        "/ip4/11.0.1.1/tcp/4001", "/ip4/10.1.0.2/tcp/4001", "/ip4/11.0.1.1/udp/4001/quic-v1",
        "/ip4/11.0.0.10/tcp/4001/p2p/12D3KooWReMk6cuzNmCVHBBPysAqGAYKR8U7GjpckEM7JCDfTtni/p2p-circuit",
        "/ip4/0.0.0.0/tcp/4001", "/ip4/11.0.1.1/tcp/4001")] + [b"\xff\x00garbage"]
    assert pb.decode_addrs(raw, allow_private=False) == [("11.0.1.1", 4001)]
    assert pb.decode_addrs(raw, allow_private=True) == [("11.0.1.1", 4001), ("10.1.0.2", 4001)]
    many = [multiaddr.Multiaddr(f"/ip4/11.0.2.{i}/tcp/1").to_bytes() for i in range(1, 40)]
    assert len(pb.decode_addrs(many, allow_private=False)) == pb.MAX_ADDRS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_rejects_garbage_with_its_own_error(data):
    try:
        msg = decode(pb.HolePunch, data)
    except WireError:
        return
    pb.decode_addrs(msg.ObsAddrs, allow_private=True)  # never raises


# -- pure state --------------------------------------------------------------------------------
async def test_paths_move_through_their_states_and_wake_waiters():
    paths = PeerPaths(memory=2)
    assert paths.set("p", PENDING, 0.0).new == PENDING
    assert paths.set("p", PENDING, 0.1) is None  # no change, no event
    assert paths.set("p", PUNCHING, 0.2).old == PENDING
    woke = []

    async def waiter() -> None:
        woke.append(await paths.wait_settled("p", 10))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.01)
        change = paths.set("p", DIRECT, 0.5, via="punch", attempts=2)
    assert woke == [DIRECT] and change.elapsed_s == 0.5
    assert paths.outcomes["p"] == {**paths.outcomes["p"], "path": DIRECT, "via": "punch", "attempts": 2}
    for peer in ("q", "r", "s"):  # outcomes are bounded
        paths.set(peer, RELAY_ONLY, 1.0)
    assert list(paths.outcomes) == ["r", "s"]
    paths.forget("s")
    assert paths.get("s") is None and await paths.wait_settled("s", 0) is None


def test_a_failed_peer_is_not_punched_again_until_its_addresses_change():
    memory = PunchMemory(limit=2)
    memory.failed("a", [("11.0.1.1", 4001)])
    assert memory.unchanged("a", [("11.0.1.1", 4001)])
    assert not memory.unchanged("a", [("11.0.1.9", 4001)])  # it moved: try again
    memory.failed("b", [])
    memory.failed("c", [])
    assert len(memory) == 2 and not memory.unchanged("a", [("11.0.1.1", 4001)])  # oldest forgotten


# -- real nodes --------------------------------------------------------------------------------
async def _relayed_pair(tmp_path, stack, *extra):
    r = await stack.enter_async_context(open_node(_cfg(
        tmp_path, "r", "relay.hop=always", "relay.client=never")))
    a = await stack.enter_async_context(open_node(_cfg(tmp_path, "a", "relay.client=never", *extra)))
    b = await stack.enter_async_context(open_node(_cfg(
        tmp_path, "b", "relay.client=always", f"relay.relays={r.addrs[0]}", *extra)))

    async def reserved():
        return b.relay_client.circuit_addrs()
    circuit = str((await until(reserved, 15, "a relay reservation"))[0])
    return r, a, b, circuit


async def test_a_relayed_peer_is_dialled_back_and_the_relay_dropped_after_the_grace(tmp_path):
    async with AsyncExitStack() as stack:
        r, a, b, circuit = await _relayed_pair(tmp_path, stack)
        a.serve(fake_signature(0))
        b.serve(fake_signature(0))
        await a.connect(circuit)
        assert all(is_relayed(c) for c in a.host.get_network().get_connections(b.peer_id))
        ts = await a.open_session(b.peer_id)  # waits for the upgrade: the session goes direct
        assert not is_relayed(ts.stream)
        assert a.holepunch.path(b.peer_id) == DIRECT

        async def b_done():
            return b.holepunch.paths.outcomes.get(str(a.peer_id))
        out = await until(b_done, 10, "b's upgrade outcome")
        assert (out["path"], out["via"]) == (DIRECT, "unilateral")

        async def relay_gone():
            conns = a.host.get_network().get_connections(b.peer_id)
            return conns and not any(is_relayed(c) for c in conns)
        await until(relay_gone, 10, "the relayed connection closed after the grace period")
        await ts.close("done")


async def test_with_the_upgrade_off_the_session_uses_the_relay_at_once(tmp_path):
    async with AsyncExitStack() as stack:
        r, a, b, circuit = await _relayed_pair(tmp_path, stack, "dcutr.enabled=false")
        a.serve(fake_signature(0))
        b.serve(fake_signature(0))
        await a.connect(circuit)
        ts = await a.open_session(b.peer_id)
        assert is_relayed(ts.stream) and a.holepunch.path(b.peer_id) == RELAY_ONLY
        await ts.close("done")


async def test_the_responder_refuses_an_upgrade_on_a_direct_connection(tmp_path):
    async with open_node(_cfg(tmp_path, "a")) as a, open_node(_cfg(tmp_path, "b")) as b:
        await a.connect(f"{b.addrs[0]}")
        stream = await a.host.new_stream(b.peer_id, [pb.PROTOCOL])
        # b resets the stream at once: the write (if the reset came first) or the read fails
        with pytest.raises((WireError, StreamReset)):
            await stream.write(pb.message(pb.CONNECT, a.addrs))
            await pb.read(stream, pb.CONNECT)

        async def counted():
            return _refusals(b, "dcutr_not_relayed") == 1
        await until(counted, 5, "the refusal counted")


async def test_against_a_peer_that_answers_one_round_per_stream_each_round_gets_a_fresh_one(tmp_path):
    """The spec retries on the same stream; go-libp2p and js-libp2p answer one CONNECT/SYNC round
    per stream and end it (seen against js-libp2p 3.x in scripts/natlab/interop_js). B, ours,
    opens a fresh stream for each later round, so such a peer still gets all three."""
    async with AsyncExitStack() as stack:
        r, _, b, circuit = await _relayed_pair(tmp_path, stack)
        # A's listener is closed (its address refuses the unilateral dial) and it punches like go/js
        a = await stack.enter_async_context(open_node(_cfg(tmp_path, "a2", "relay.client=never")))
        await close_listeners(a.host)
        rounds: list[int] = []

        async def one_round_per_stream(stream) -> None:
            await pb.read(stream, pb.CONNECT)
            await stream.write(pb.message(pb.CONNECT, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1")]))
            await pb.read(stream, pb.SYNC)
            rounds.append(1)
            await stream.reset()
        a.host.set_stream_handler(pb.PROTOCOL, one_round_per_stream)
        await a.connect(circuit)

        async def b_done():
            return b.holepunch.paths.outcomes.get(str(a.peer_id))
        out = await until(b_done, 30, "b's upgrade outcome")
        assert (out["path"], out["attempts"]) == (RELAY_ONLY, 3)
        assert len(rounds) == 3


async def test_the_relay_stays_while_the_direct_connection_answers_no_ping(tmp_path):
    """A side's upgrade of a punched connection can finish while the peer's has not (or failed):
    the relayed connection is closed only once a ping over the direct one comes back."""
    async with AsyncExitStack() as stack:
        r, a, b, circuit = await _relayed_pair(
            tmp_path, stack, "dcutr.relay_close_pings=2", "dcutr.exchange_timeout_s=0.5")
        async def silent(stream) -> None:  # takes the ping stream, never answers
            await trio.sleep_forever()
        for n in (a, b):  # neither answers a ping (either side's close would end the circuit)
            n.host.set_stream_handler("/ipfs/ping/1.0.0", silent)
        await a.connect(circuit)

        async def b_punched():
            return b.holepunch.stats["direct_unilateral"]
        await until(b_punched, 10, "b's direct connection")

        await trio.sleep(0.5 + 2 * 0.5 + 0.5)  # the grace, both pings' timeouts, a margin
        conns = b.host.get_network().get_connections(a.peer_id)
        assert any(is_relayed(c) for c in conns) and any(not is_relayed(c) for c in conns)

        for conn in [c for c in conns if not is_relayed(c)]:  # the direct one goes after all:
            await conn.close()

        async def back_to_the_relay():  # the path says so
            return b.holepunch.path(a.peer_id) == RELAY_ONLY
        await until(back_to_the_relay, 10, "the path back to relay_only")


async def test_a_peer_without_ping_keeps_its_direct_connection(tmp_path):
    """Ping is optional in libp2p: a peer that answers "not supported" has answered."""
    async with AsyncExitStack() as stack:
        r, a, b, circuit = await _relayed_pair(tmp_path, stack)
        for n in (a, b):
            n.host.remove_stream_handler("/ipfs/ping/1.0.0")
        await a.connect(circuit)

        async def direct_only():
            conns = b.host.get_network().get_connections(a.peer_id)
            return conns and not any(is_relayed(c) for c in conns)
        await until(direct_only, 10, "the relay closed, the direct connection kept")
        assert b.holepunch.path(a.peer_id) == DIRECT
