"""DCUtR in the NAT lab: two nodes behind home routers find each other through the DHT, connect
through a relay, upgrade to a direct connection by TCP hole punching, and hand a KV cache over a
bulk lane that crosses both NATs (knocked open); where the NATs do not allow it the relay carries
the session. Real node processes, real NATs (network namespaces), a tiny seeded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.natlab import (
    FAST,
    TEST_PREFIX,
    LabNode,
    lab_handoff,
    natlab,
    requires_lab,
    tiny_model,
)
from tests.helpers.nodeproc import wait_until
from tests.helpers.runtime_models import TINY_PROMPT

pytestmark = requires_lab
N = 16
EXTRA = [*FAST, "--set", "dcutr.relay_grace_s=1", "--set", "transport.inline_max_bytes=0"]
# (the tiny model's KV would otherwise go in-band on the stream: this tests the bulk lane)  # the tiny model's KV would otherwise go in-band


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, Path]:
    return tiny_model(tmp_path_factory.mktemp("lab-cache"))


def _handoff(lab, host: str, role: str, root: Path, model, boot: list[str], args: list[str]):
    return lab_handoff(lab, host, role, root, model, boot, [*EXTRA, *args])


def _pair(tmp_path: Path, model, profiles: list[str], expect_path: str) -> tuple[dict, dict]:
    """A receiver on h0 and a sender on h1 hand off once; the receiver's and sender's views of the
    upgrade."""
    procs: list = []
    with natlab.Lab(profiles, publics=2, prefix=TEST_PREFIX) as lab:
        try:
            pub0 = LabNode(lab, "pub0", tmp_path / "pub0", extra=FAST)
            pub1 = LabNode(lab, "pub1", tmp_path / "pub1", [pub0.addr], FAST)
            procs += [pub0, pub1]
            boot = [pub0.addr, pub1.addr]
            rx = _handoff(lab, "h0", "receive", tmp_path, model, boot, ["--tokens", str(N)])
            procs.append(rx)
            rx.next("model", 60)
            tx = _handoff(lab, "h1", "send", tmp_path, model, boot,
                          ["--tokens", str(N), "--prompt-ids", ",".join(map(str, TINY_PROMPT)),
                           "--find-timeout", "120", "--wait"])
            procs.append(tx)
            found = tx.next("found", 150)
            assert found["providers"][0]["peer_id"] == rx.peer_id
            tx.next("done", 120)
            applied = rx.next("applied", 60)
            ref = tx.of("reference")[0]
            assert applied["tokens"] == ref["tokens"] and applied["logits_blake3"] == ref["logits_blake3"]
            assert [s["path"] for s in tx.of("sent")] == [expect_path]
            if expect_path != "stream":  # direct: the relayed connection goes after its grace
                def kinds() -> list[str]:
                    return next(p["connections"] for p in tx.control("/peers")
                                if p["peer_id"] == rx.peer_id)
                wait_until(lambda: kinds() == ["direct"], 15, what="the relayed connection closed")
            return rx.control("/status"), {**tx.control("/status"), "peers": tx.control("/peers")}
        finally:
            for p in procs:
                p.stop() if isinstance(p, LabNode) else p.terminate()


def test_cone_to_cone_punches_direct_and_the_kv_goes_over_a_bulk_lane(tmp_path: Path, model) -> None:
    rx, tx = _pair(tmp_path, model, ["cone", "cone"], "bulk")
    out = rx["dcutr"]["outcomes"][tx["peer_id"]]
    assert out["path"] == "direct" and out["via"] == "punch", out
    assert tx["dcutr"]["outcomes"][rx["peer_id"]]["path"] == "direct"


def test_public_and_private_end_direct_dialled_by_the_private_side(tmp_path: Path, model) -> None:
    """The private node reaches the public one itself (its DHT traffic dials it; a relayed
    connection from the public side would be dialled back, DCUtR's unilateral upgrade, which
    tests/test_dcutr.py shows on loopback), and the KV goes over a bulk lane into the NAT."""
    rx, tx = _pair(tmp_path, model, ["cone", "public"], "bulk")
    peers = {p["peer_id"]: p["connections"] for p in tx["peers"]}
    assert peers[rx["peer_id"]] == ["direct"]
    out = rx["dcutr"]["outcomes"].get(tx["peer_id"])
    assert out is None or (out["path"], out["via"]) == ("direct", "unilateral"), out


@pytest.mark.parametrize("profiles", [["cone", "symmetric"], ["symmetric", "symmetric"]])
def test_symmetric_nat_stays_relayed_and_stops_after_three_attempts(tmp_path: Path, model,
                                                                     profiles: list[str]) -> None:
    rx, tx = _pair(tmp_path, model, profiles, "stream")
    out = rx["dcutr"]["outcomes"][tx["peer_id"]]
    assert out == {**out, "path": "relay_only", "attempts": 3}
    assert rx["dcutr"]["rounds"] == 3  # no punch traffic after the third
    assert tx["dcutr"]["outcomes"][rx["peer_id"]]["path"] == "relay_only"  # no false "direct"
    peers = {p["peer_id"]: p["connections"] for p in tx["peers"]}
    assert peers[rx["peer_id"]] == ["relayed"]
