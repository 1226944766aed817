"""Our DHT server stores values only in our namespace, whatever another real peer PUTs."""

import logging

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.records.record import make_signed_put_record

from discovery.dht import Discovery, DiscoverySettings
from discovery.records import make_record, parse_record, record_key
from meshnode.config import HostSection
from meshnode.host import build_host, listen_multiaddrs
from tests.helpers.sigs import fake_signature

CFG = HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"])


async def test_put_value_outside_our_namespace_is_refused_over_the_wire(caplog):
    caplog.set_level(logging.INFO, logger="discovery.dht")
    refused: list[str] = []
    kp_a, kp_b = create_new_key_pair(), create_new_key_pair()
    a, b = build_host(CFG, kp_a), build_host(CFG, kp_b)
    async with a.run(listen_addrs=listen_multiaddrs(CFG)), b.run(listen_addrs=listen_multiaddrs(CFG)):
        ours = Discovery(a, kp_a, DiscoverySettings(), on_refuse=refused.append)
        # The other side is a stock py-libp2p DHT: only its PUT_VALUE sender is used.
        theirs = KadDHT(b, DHTMode.CLIENT)
        async with trio.open_nursery() as n:
            await n.start(ours.run)
            with trio.fail_after(10):
                await b.connect(info_from_p2p_addr(a.get_addrs()[0]))

            async def put(key: bytes, value: bytes) -> bool:
                rec = make_signed_put_record(key, value, b.get_private_key())
                with trio.fail_after(10):
                    return await theirs.value_store._store_at_peer(a.get_id(), key, value, record=rec)

            for key in (b"/evil/x", b"no-namespace"):
                assert not await put(key, b"parked data")
                assert ours.dht.value_store.get(key) is None
            assert refused == ["unknown_namespace", "unknown_namespace"]
            logged = [r.kv for r in caplog.records if r.name == "discovery.dht" and hasattr(r, "kv")]
            assert [(e["reason"], e["peer"], e["namespace"]) for e in logged] == [
                ("unknown_namespace", str(b.get_id()), "evil"),
                ("unknown_namespace", str(b.get_id()), None)]

            # A forged record in our namespace (b's record under someone else's key) is refused
            # by the namespace's validator; b's own valid record is stored.
            victim = ID.from_pubkey(create_new_key_pair().public_key)
            forged = make_record(kp_b, [fake_signature(0)], [], seq=1, ttl_s=60)
            assert not await put(record_key(victim).encode(), forged)
            assert ours.dht.value_store.get(record_key(victim).encode()) is None
            assert refused[-1] == "invalid_record"

            key = record_key(b.get_id()).encode()
            assert await put(key, forged)
            stored = ours.dht.value_store.get(key)
            assert stored is not None and stored.value == forged
            assert parse_record(stored.value, 16 * 1024, key=key.decode()).peer_id == str(b.get_id())
            assert len(refused) == 3
            n.cancel_scope.cancel()


async def test_value_store_is_bounded_even_for_valid_records():
    """Anyone can mint identities, each with a valid record: the store takes only so many keys."""
    refused: list[str] = []
    kp_a, kp_b = create_new_key_pair(), create_new_key_pair()
    a, b = build_host(CFG, kp_a), build_host(CFG, kp_b)
    limit = 3
    async with a.run(listen_addrs=listen_multiaddrs(CFG)), b.run(listen_addrs=listen_multiaddrs(CFG)):
        ours = Discovery(a, kp_a, DiscoverySettings(max_stored_records=limit),
                         on_refuse=refused.append)
        theirs = KadDHT(b, DHTMode.CLIENT)
        async with trio.open_nursery() as n:
            await n.start(ours.run)
            with trio.fail_after(10):
                await b.connect(info_from_p2p_addr(a.get_addrs()[0]))
            stored = []
            for _ in range(limit + 2):  # fresh identities, each with its own valid record
                kp = create_new_key_pair()
                key = record_key(ID.from_pubkey(kp.public_key)).encode()
                rec = make_record(kp, [fake_signature(0)], [], seq=1, ttl_s=60)
                with trio.fail_after(10):
                    ok = await theirs.value_store._store_at_peer(
                        a.get_id(), key, rec, record=make_signed_put_record(key, rec, b.get_private_key()))
                stored.append(ok)
            assert len(ours.dht.value_store.store) <= limit
            assert stored.count(False) >= 2 and refused.count("store_full") == stored.count(False)
            n.cancel_scope.cancel()
