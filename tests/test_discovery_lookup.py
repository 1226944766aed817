"""Bounded lookups and roles: the pure probe plan, then real in-process hosts."""

import dataclasses
from functools import partial

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.utils import xor_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from discovery.dht import Discovery, DiscoverySettings, plan_probes
from meshnode.config import HostSection
from meshnode.host import build_host, listen_multiaddrs
from tests.helpers.sigs import fake_signature
from tests.helpers.waits import until

LOOKUP_BOUND_S = 60


def _ids(n: int) -> list[ID]:
    return [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(n)]


def test_plan_probes_orders_self_cached_connected_then_by_distance_to_us():
    me, *others = _ids(9)
    cached, connected = {others[0]}, {others[0], others[1], others[2]}
    plan, skipped = plan_probes([*others, me, others[3]], me, connected, cached, max_probes=5)
    assert plan[:2] == [me, others[0]]
    assert set(plan[2:4]) == {others[1], others[2]}
    assert xor_distance(me.to_bytes(), plan[2].to_bytes()) < xor_distance(me.to_bytes(), plan[3].to_bytes())
    rest = sorted(others[3:], key=lambda p: xor_distance(me.to_bytes(), p.to_bytes()))
    assert plan[4:] == rest[:1] and skipped == rest[1:]
    assert len(set(plan) | set(skipped)) == 9  # deduplicated, nothing lost


def test_plan_probes_within_bound_skips_nothing():
    me, *others = _ids(4)
    plan, skipped = plan_probes(others, me, set(), set(), max_probes=16)
    assert sorted(plan, key=str) == sorted(others, key=str) and skipped == []


async def _serve(refused: list[str] | None = None, *,
                 task_status: trio.TaskStatus[Discovery] = trio.TASK_STATUS_IGNORED,
                 **settings) -> None:
    """A bare host (Noise + yamux, as the node builds it) running a Discovery until cancelled."""
    kp = create_new_key_pair()
    cfg = HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"])
    host = build_host(cfg, kp)
    async with host.run(listen_addrs=listen_multiaddrs(cfg)), trio.open_nursery() as n:
        disc = Discovery(host, kp, DiscoverySettings(**settings),
                         on_refuse=None if refused is None else refused.append)
        await n.start(disc.run)
        task_status.started(disc)


async def _discovery(nursery: trio.Nursery, refused: list[str] | None = None, **settings) -> Discovery:
    return await nursery.start(partial(_serve, refused, **settings))


async def _connect(a: Discovery, b: Discovery) -> None:
    with trio.fail_after(10):
        await a.host.connect(info_from_p2p_addr(b.host.get_addrs()[0]))




async def test_lookup_probes_at_most_the_bound_and_filters_by_role():
    key = fake_signature(0).compat_key
    refused: list[str] = []
    async with trio.open_nursery() as n:
        seeker = await _discovery(n, refused=refused)
        providers = [await _discovery(n) for _ in range(4)]
        for p in providers:
            await _connect(p, seeker)
        await providers[0].set_roles(["apply"])  # before advertising: signed into the first record
        for p in providers:
            await p.advertise(fake_signature(0))
        await providers[1].set_roles(["apply", "relay"])  # after: re-signed and re-published
        ids = {str(p.peer_id) for p in providers}

        async def all_found():
            return {r.peer_id for r in await seeker.find(key)} == ids

        await until(all_found, LOOKUP_BOUND_S, "lookup finding all 4 providers")
        assert refused == []

        async def appliers():
            got = await seeker.find(key, role="apply")
            return {r.peer_id: r.roles for r in got}

        got = await until(appliers, LOOKUP_BOUND_S, "lookup with role=apply finding 2 providers")
        assert got == {str(providers[0].peer_id): ("apply",),
                       str(providers[1].peer_id): ("apply", "relay")}
        assert await seeker.find(key, role="store") == []

        # The bound: 2 probes, the other 2 candidates are skipped and reported.
        seeker.s = dataclasses.replace(seeker.s, max_probes_per_lookup=2)
        bounded = await seeker.find(key)
        assert len(bounded) == 2 and {r.peer_id for r in bounded} <= ids
        assert refused == ["probe_limit", "probe_limit"]
        # limit=1 within the bound: one good result, nothing refused.
        seeker.s = dataclasses.replace(seeker.s, max_probes_per_lookup=16)
        assert len(await seeker.find(key, limit=1)) == 1
        assert refused == ["probe_limit", "probe_limit"]

        # A role change after others have fetched the record reaches their lookups.
        await providers[2].set_roles(["apply"])

        async def three_appliers():
            return len(await appliers()) == 3

        await until(three_appliers, LOOKUP_BOUND_S, "lookup seeing the new role")
        n.cancel_scope.cancel()
