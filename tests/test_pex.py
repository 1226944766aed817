"""Peer exchange dial policy: the pure budget/backoff, then a lying peer over real hosts."""

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from discovery.streamio import frame, pack_frame
from meshnode.config import HostSection
from meshnode.host import build_host, listen_multiaddrs
from meshnode.peer_exchange import MAX_BACKOFF_FACTOR, PEX_PROTOCOL, DialPolicy, PeerExchange

CFG = HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"])


def test_budget_is_shared_in_turn_between_offering_peers():
    policy: DialPolicy[str] = DialPolicy(dials_per_round=3, backoff_s=10.0)
    liar = [f"fake{i}" for i in range(100)]
    dial, skipped = policy.plan([liar, ["honest1", "honest2"], ["honest1"]], now=0.0)
    assert dial == ["fake0", "honest1", "fake1"]
    assert ("honest2", "round_limit") in skipped
    assert len(skipped) == 100 + 2 - 3  # every other distinct candidate, once
    assert {r for _, r in skipped} == {"round_limit"}


def test_failed_peer_backs_off_doubling_up_to_the_cap_and_success_forgets_it():
    policy: DialPolicy[str] = DialPolicy(dials_per_round=8, backoff_s=10.0)
    now, waits = 0.0, []
    for _ in range(8):
        policy.failed("p", now)
        assert policy.plan([["p"]], now)[1] == [("p", "backoff")]
        # Find when it may be dialled again, by asking the policy only.
        later = now
        while policy.in_backoff("p", later):
            later += 1.0
        waits.append(later - now)
        assert policy.plan([["p"]], later) == (["p"], [])
        now = later
    assert waits == [10.0 * min(2 ** i, MAX_BACKOFF_FACTOR) for i in range(8)]
    policy.succeeded("p")
    policy.failed("p", now)
    assert not policy.in_backoff("p", now + 10.0)  # back to the first step


def test_failures_are_bounded_and_stale_ones_forgotten():
    policy: DialPolicy[int] = DialPolicy(dials_per_round=8, backoff_s=1.0, max_tracked=50)
    for i in range(200):
        policy.failed(i, now=float(i))
    assert len(policy) <= 50
    assert policy.in_backoff(199, 199.5)  # the newest failures are the ones kept
    policy.plan([], now=199.0 + 1.0 + MAX_BACKOFF_FACTOR * 1.0 + 1.0)
    assert len(policy) == 0


def test_zero_budget_dials_nobody_and_bad_settings_are_refused():
    assert DialPolicy(0, 1.0).plan([["a"]], 0.0) == ([], [("a", "round_limit")])
    with pytest.raises(ValueError, match="dials_per_round"):
        DialPolicy(-1, 1.0)


async def test_lying_peer_gets_bounded_dials_and_backoff_over_real_hosts():
    """Host b answers PEX with 6 peers at a closed port; a dials 2 per round, never re-dials a
    failed one within its backoff, and counts every skipped dial and a malformed reply."""
    refused: list[str] = []
    dials: list[bool] = []
    kp_a, kp_b = create_new_key_pair(), create_new_key_pair()
    a, b = build_host(CFG, kp_a), build_host(CFG, kp_b)
    fakes = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(6)]
    reply = {"body": pack_frame([[p.to_base58(), ["/ip4/127.0.0.1/tcp/1"]] for p in fakes])}

    async def lie(stream) -> None:
        await stream.write(reply["body"])
        await stream.close()

    async with a.run(listen_addrs=listen_multiaddrs(CFG)), b.run(listen_addrs=listen_multiaddrs(CFG)):
        b.set_stream_handler(PEX_PROTOCOL, lie)
        pex = PeerExchange(a, max_peers=64, interval_s=1.0, dial_timeout_s=5.0, on_dial=dials.append,
                           dials_per_round=2, dial_backoff_s=3600.0, on_refuse=refused.append)
        with trio.fail_after(10):
            await a.connect(info_from_p2p_addr(b.get_addrs()[0]))
        with trio.fail_after(30):
            await pex.round()
            assert dials == [False, False]
            assert sorted(refused) == ["round_limit"] * 4
            refused.clear()
            await pex.round()
            assert dials == [False] * 4
            assert sorted(refused) == ["backoff"] * 2 + ["round_limit"] * 2
            refused.clear()
            await pex.round()
            assert dials == [False] * 6 and refused == ["backoff"] * 4
            refused.clear()
            await pex.round()  # everyone failed once: all six wait out their backoff
            assert dials == [False] * 6 and refused == ["backoff"] * 6
            refused.clear()
            reply["body"] = frame(b"\xc1 not msgpack")
            await pex.round()
            assert refused == ["bad_reply"] and len(dials) == 6
