"""AutoNAT v2 on loopback: the wire format, the proof (nonce on a fresh connection), the server's
limits, and hostile servers that claim what they did not do. Real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import multiaddr
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo

from meshnode.config import HostSection, load_config
from meshnode.host import build_host
from meshnode.nat import autonat_pb as pb
from meshnode.nat.autonat import dialable
from meshnode.nat.reachability import PRIVATE, PUBLIC, UNKNOWN, Reachability
from meshnode.node import open_node
from tests.helpers.waits import until

LOOP = ["host.listen_addrs=/ip4/127.0.0.1/tcp/0", "control.enabled=false", "dht.enabled=false",
        "nat.allow_private_addrs=true", "nat.confirmations=1"]


def _cfg(tmp_path, name: str, *extra: str):
    return load_config(env={}, overrides=[f"node.data_dir={tmp_path / name}", *LOOP, *extra])


def _refusals(node, reason: str) -> float:
    return node.metrics.refusals.labels(component="autonat", reason=reason)._value.get()


# -- the state machine ------------------------------------------------------------------------
def test_public_needs_proof_from_enough_servers():
    r = Reachability(confirmations=2, evidence_ttl_s=100)
    assert r.report("s1", "/ip4/11.0.0.1/tcp/1", "reachable", 0) is None
    change = r.report("s2", "/ip4/11.0.0.1/tcp/1", "reachable", 1)
    assert (change.old, change.new, change.public_addrs) == (UNKNOWN, PUBLIC, ("/ip4/11.0.0.1/tcp/1",))


def test_private_needs_votes_from_distinct_servers_and_ages_out():
    r = Reachability(confirmations=2, evidence_ttl_s=10)
    r.report("s1", "/ip4/11.0.0.1/tcp/1", "unreachable", 0)
    r.report("s1", "", "refused", 0)
    assert r.state == UNKNOWN  # one server, however many answers
    assert r.report("s2", "", "refused", 1).new == PRIVATE
    assert r.update(10.5).new == UNKNOWN  # s1's answers expired
    assert r.state == UNKNOWN


def test_a_proof_beats_any_number_of_votes_against():
    r = Reachability(confirmations=1, evidence_ttl_s=100)
    for s in ("s1", "s2", "s3"):
        r.report(s, "/ip4/11.0.0.1/tcp/1", "unreachable", 0)
    assert r.state == PRIVATE
    assert r.report("s4", "/ip4/11.0.0.1/tcp/1", "reachable", 1).new == PUBLIC


def test_unknown_outcome_and_bad_confirmations_are_refused():
    with pytest.raises(ValueError, match="unknown reachability outcome"):
        Reachability(1, 1).report("s", "a", "maybe", 0)
    with pytest.raises(ValueError, match="confirmations must be at least 1"):
        Reachability(0, 1)


def test_only_plain_public_ip4_tcp_addresses_are_dialable():
    assert dialable(multiaddr.Multiaddr("/ip4/11.0.0.1/tcp/4001"), False) == ("11.0.0.1", 4001)
    for bad in ("/ip4/10.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/1", "/ip4/0.0.0.0/tcp/1",
                "/ip4/11.0.0.1/udp/1", "/ip4/11.0.0.1/tcp/1/ws"):
        assert dialable(multiaddr.Multiaddr(bad), False) is None, bad
    assert dialable(multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1"), True) == ("127.0.0.1", 1)


# -- the codec --------------------------------------------------------------------------------
def test_wire_format_matches_the_spec_field_numbers():
    body = pb.encode(pb.dial_request([b"\x04\x0b\x00\x00\x01\x06\x0f\xa1"], 1))[1:]
    # Message.dialRequest (field 1, LEN) { addrs (1, LEN) 8 bytes, nonce (2, fixed64) }
    assert body == bytes([0x0A, 19, 0x0A, 8]) + b"\x04\x0b\x00\x00\x01\x06\x0f\xa1" + \
        bytes([0x11]) + (1).to_bytes(8, "little")
    assert pb.encode(pb.dial_response(pb.RESPONSE_OK, 0, pb.DIAL_OK))[1:] == \
        bytes([0x12, 6, 0x08, 0xC8, 0x01, 0x18, 0xC8, 0x01])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_rejects_garbage_with_its_own_error(data):
    for cls in (pb.Message, pb.DialBack, pb.DialBackResponse):
        try:
            pb.decode(cls, data)
        except pb.AutonatError:
            pass


# -- nodes ------------------------------------------------------------------------------------
async def test_two_nodes_prove_each_other_reachable(tmp_path):
    async with open_node(_cfg(tmp_path, "a", "nat.probe_interval_s=0.2")) as a, \
            open_node(_cfg(tmp_path, "b", "nat.probe_interval_s=0.2")) as b:
        await b.connect(str(a.addrs[0]))
        async def both_public():
            return a.autonat.state == PUBLIC and b.autonat.state == PUBLIC
        await until(both_public, 30, "both nodes public")
        assert a.autonat.status()["public_addrs"] == [str(a.addrs[0]).split("/p2p/")[0]]


async def test_a_closed_port_is_unreachable_not_public(tmp_path):
    """The py-libp2p AutoNAT v1 trap: asking over an open connection about a port nobody listens
    on. Our server dials back fresh, finds nothing, and says so."""
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    async with open_node(_cfg(tmp_path, "srv", "nat.autonat_client=false")) as srv, \
            open_node(_cfg(tmp_path, "cli", "nat.autonat_client=false")) as cli:
        await cli.connect(str(srv.addrs[0]))
        cli.autonat._candidates = _fixed([multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")])
        got = await cli.autonat.check(srv.peer_id)
        assert got == {"server": str(srv.peer_id), "addr": f"/ip4/127.0.0.1/tcp/{port}",
                       "outcome": "unreachable"}
        assert cli.autonat.state == PRIVATE


def _fixed(addrs):
    async def candidates(server, stream):
        return addrs
    return candidates


async def test_server_limits_are_enforced_and_counted(tmp_path):
    async with open_node(_cfg(tmp_path, "srv", "nat.autonat_client=false",
                              "nat.per_peer_interval_s=60")) as srv:
        host = build_host(HostSection(listen_addrs=[]), create_new_key_pair())
        async with host.run(listen_addrs=[]):
            await host.connect(PeerInfo(srv.peer_id, srv.host.get_addrs()))

            async def ask(addrs):
                s = await host.new_stream(srv.peer_id, [pb.DIAL_REQUEST_PROTOCOL])
                await s.write(pb.encode(pb.dial_request(addrs, 7)))
                return (await pb.read(s, pb.Message)).dialResponse.status

            too_many = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1").to_bytes()] * (pb.MAX_ADDRS + 1)
            assert await ask(too_many) == pb.E_REQUEST_REJECTED
            # a third party's IP: we never dial it (no amplification), so we refuse the request
            assert await ask([multiaddr.Multiaddr("/ip4/11.9.9.9/tcp/1").to_bytes()]) == pb.E_DIAL_REFUSED
            assert await ask([b"\xff\xfe"]) == pb.E_REQUEST_REJECTED  # the per-peer rate
            s = await host.new_stream(srv.peer_id, [pb.DIAL_REQUEST_PROTOCOL])
            await s.write(b"\xff\xff\xff\xff\x0f" + b"x" * 64)  # a 4 GiB length prefix
            with pytest.raises(Exception):  # noqa: B017 - the server just closes: any stream error
                await pb.read(s, pb.Message)
        assert _refusals(srv, "autonat_too_many_addrs") == 1
        assert _refusals(srv, "autonat_rate") == 1
        assert _refusals(srv, "autonat_bad_request") == 1


async def _hostile_server(handler):
    host = build_host(HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"]), create_new_key_pair())
    host.set_stream_handler(pb.DIAL_REQUEST_PROTOCOL, handler)
    return host


async def test_a_server_claiming_success_without_the_nonce_gives_no_evidence(tmp_path):
    async def liar(stream):
        await pb.read(stream, pb.Message)
        await stream.write(pb.encode(pb.dial_response(pb.RESPONSE_OK, 0, pb.DIAL_OK)))
        await stream.close()

    host = await _hostile_server(liar)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), \
            open_node(_cfg(tmp_path, "cli", "nat.autonat_client=false")) as cli:
        await cli.host.connect(PeerInfo(host.get_id(), host.get_addrs()))
        assert await cli.autonat.check(host.get_id()) is None
        assert cli.autonat.state == UNKNOWN
        assert _refusals(cli, "autonat_unproven") == 1


async def test_a_dial_back_on_the_request_connection_or_with_a_stranger_nonce_is_refused(tmp_path):
    async def reuser(stream):
        req = (await pb.read(stream, pb.Message)).dialRequest
        conn_peer = stream.muxed_conn.peer_id
        for nonce in (req.nonce, req.nonce ^ 1):  # right nonce, wrong connection; then a stranger
            back = await host.new_stream(conn_peer, [pb.DIAL_BACK_PROTOCOL])
            msg = pb.DialBack()
            msg.nonce = nonce
            await back.write(pb.encode(msg))
            with pytest.raises(Exception):  # noqa: B017 - the client resets the stream
                await pb.read(back, pb.DialBackResponse)
        await stream.write(pb.encode(pb.dial_response(pb.RESPONSE_OK, 0, pb.DIAL_OK)))
        await stream.close()

    host = await _hostile_server(reuser)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), \
            open_node(_cfg(tmp_path, "cli", "nat.autonat_client=false")) as cli:
        await cli.host.connect(PeerInfo(host.get_id(), host.get_addrs()))
        assert await cli.autonat.check(host.get_id()) is None
        assert cli.autonat.state == UNKNOWN
        assert _refusals(cli, "autonat_same_connection") == 1
        assert _refusals(cli, "autonat_unknown_nonce") == 1
        assert _refusals(cli, "autonat_unproven") == 1
