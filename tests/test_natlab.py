"""The NAT lab behaves like the routers it models (DESIGN.md §9), and leaves nothing behind."""

from __future__ import annotations

import time

import pytest

from tests.helpers.natlab import TEST_PREFIX, finish, natlab, probe, requires_lab, start_probe

pytestmark = requires_lab
PUB = "11.0.0.10"


@pytest.fixture(scope="module")
def lab():
    with natlab.Lab(["cone", "symmetric", "nat", "cone", "public"], publics=1,
                    prefix=TEST_PREFIX) as built:
        yield built
    assert natlab.leftovers(TEST_PREFIX) == []


def test_cone_keeps_the_source_port_and_symmetric_does_not(lab):
    srv = start_probe(lab, "pub0", "listen", "7001", "--accept", "3")
    cone = probe(lab, "h0", "connect", PUB, "7001", "--bind", "5101")
    sym = [probe(lab, "h1", "connect", PUB, "7001", "--bind", "5102") for _ in range(2)]
    finish(srv)
    assert (cone["seen_ip"], cone["seen_port"]) == (lab.hosts["h0"].wan_ip, 5101)
    assert all(s["seen_ip"] == lab.hosts["h1"].wan_ip for s in sym)
    assert [s["seen_port"] for s in sym] != [5102, 5102]


def test_unsolicited_inbound_is_dropped_by_the_firewall_and_reset_without_it(lab):
    for host, error in (("h0", "TimeoutError"), ("h2", "ConnectionRefusedError")):
        listener = start_probe(lab, host, "listen", "6001", "--timeout", "3")
        got = probe(lab, "pub0", "connect", lab.hosts[host].wan_ip, "6001", "--timeout", "1.5")
        listener.kill()
        listener.wait()
        assert got == {"ok": False, "error": error, "errno": 111 if error.startswith("Conn") else None}


def test_public_host_is_reachable_directly(lab):
    srv = start_probe(lab, "h4", "listen", "6002")
    got = probe(lab, "h0", "connect", lab.hosts["h4"].ip, "6002")
    finish(srv)
    assert got["ok"] and got["seen_ip"] == lab.hosts["h0"].wan_ip


def _punch(lab, a: str, b: str, port: int) -> tuple[dict, dict]:
    at = f"{time.time() + 0.3:.3f}"
    pa = start_probe(lab, a, "punch", str(port), lab.hosts[b].wan_ip, str(port), "--at", at,
                     "--timeout", "3")
    pb = start_probe(lab, b, "punch", str(port), lab.hosts[a].wan_ip, str(port), "--at", at,
                     "--timeout", "3")
    return finish(pa), finish(pb)


def test_tcp_simultaneous_open_punches_cone_to_cone(lab):
    a, b = _punch(lab, "h0", "h3", 4101)
    assert a["ok"] and b["ok"]


def test_tcp_simultaneous_open_fails_through_a_symmetric_nat(lab):
    a, b = _punch(lab, "h0", "h1", 4102)
    assert not a["ok"] and not b["ok"]


def test_loss_drops_packets_on_the_wan_links():
    with natlab.Lab(["cone"], publics=1, loss=0.3, prefix=TEST_PREFIX) as lossy:
        counter = start_probe(lossy, "pub0", "udp-count", "9001", "2")
        sent = probe(lossy, "h0", "udp-send", PUB, "9001", "300")
        got = finish(counter)
    assert sent == {"sent": 300}
    assert 0 < got["received"] < 300


def test_teardown_kills_processes_and_is_idempotent():
    lab = natlab.Lab(["cone"], publics=1, prefix=TEST_PREFIX).up()
    proc = start_probe(lab, "h0", "listen", "6003", "--timeout", "60")
    assert set(lab.down()) == {f"{TEST_PREFIX}-{n}" for n in ("wan", "pub0", "r0", "h0")}
    assert proc.wait(timeout=5) != 0
    assert lab.down() == []
    assert natlab.leftovers(TEST_PREFIX) == []


def test_bad_profile_and_loss_are_refused_naming_them():
    with pytest.raises(natlab.LabError, match="unknown router profile 'home'"):
        natlab.Lab(["home"])
    with pytest.raises(natlab.LabError, match="loss must be in"):
        natlab.Lab(["cone"], loss=1.5)
