"""AutoNAT v2 in the NAT lab: real node processes behind each router profile learn whether they
are reachable. No node behind a NAT or a closed port ever claims PUBLIC (a dial-back must deliver
our nonce on a fresh connection); public nodes do; the DHT turns client on private nodes."""

from __future__ import annotations

import time

import pytest

from tests.helpers.natlab import TEST_PREFIX, LabNode, natlab, requires_lab

pytestmark = requires_lab

PROFILES = ["cone", "symmetric", "nat", "public", "firewall"]
EXPECTED = {"pub0": "public", "pub1": "public", "h0": "private", "h1": "private",
            "h2": "private", "h3": "public", "h4": "private"}
FAST = ["--set", "nat.probe_interval_s=0.5", "--set", "nat.server_retry_s=2",
        "--set", "host.peer_exchange_interval_s=0.5", "--set", "host.dial_timeout_s=3",
        "--set", "nat.dial_back_timeout_s=2"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    nodes: dict[str, LabNode] = {}
    with natlab.Lab(PROFILES, publics=2, prefix=TEST_PREFIX) as lab:
        try:
            nodes["pub0"] = LabNode(lab, "pub0", root / "pub0", extra=FAST)
            nodes["pub1"] = LabNode(lab, "pub1", root / "pub1", [nodes["pub0"].addr], FAST)
            boot = [nodes["pub0"].addr, nodes["pub1"].addr]
            for i in range(len(PROFILES)):
                nodes[f"h{i}"] = LabNode(lab, f"h{i}", root / f"h{i}", boot, FAST)
            yield lab, nodes
        finally:
            for n in nodes.values():
                n.stop()


def _states(nodes):
    return {name: n.get("/status") for name, n in nodes.items()}


def test_every_profile_learns_its_reachability_and_no_nat_claims_public(mesh):
    _lab, nodes = mesh
    deadline = time.monotonic() + 90
    while True:
        status = _states(nodes)
        got = {k: v["reachability"]["state"] for k, v in status.items()}
        if got == EXPECTED or time.monotonic() > deadline:
            break
        assert not [k for k, s in got.items() if s == "public" and EXPECTED[k] != "public"], got
        time.sleep(0.5)
    assert got == EXPECTED, {k: (v["reachability"], nodes[k].stderr()[-600:]) for k, v in status.items()
                             if got[k] != EXPECTED[k]}
    for name, st in status.items():
        outcomes = {r["outcome"] for r in st["reachability"]["recent"]}
        if EXPECTED[name] == "private":
            assert "reachable" not in outcomes, (name, st["reachability"])
            assert st["dht_mode"] == "client"
        else:
            assert st["reachability"]["public_addrs"] == [f"/ip4/{_lab.hosts[name].ip}/tcp/4001"]
            assert st["dht_mode"] == "server"


def test_closed_port_behind_a_public_ip_is_tested_on_that_ip(mesh):
    """The firewall host's own address was dialled back and failed: a verdict about the right
    address, not a guess from the connection it asked on."""
    lab, nodes = mesh
    recent = nodes["h4"].get("/status")["reachability"]["recent"]
    assert {r["addr"] for r in recent if r["outcome"] == "unreachable"} == {
        f"/ip4/{lab.hosts['h4'].ip}/tcp/4001"}
