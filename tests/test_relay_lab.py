"""Circuit Relay v2 in the NAT lab: two nodes behind home routers find each other through the DHT,
connect through a relay that public nodes run, and a KV handoff between them verifies over the
circuit. Real node processes, real NATs (network namespaces), a tiny seeded model."""

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
from tests.helpers.runtime_models import TINY_PROMPT

pytestmark = requires_lab
N = 16
EXTRA: list[str] = FAST


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, Path]:
    return tiny_model(tmp_path_factory.mktemp("lab-cache"))


def _handoff(lab, host: str, role: str, root: Path, model, boot: list[str], args: list[str]):
    return lab_handoff(lab, host, role, root, model, boot, [*EXTRA, *args])


def test_kv_handoff_between_two_natted_nodes_over_a_relay(tmp_path: Path, model) -> None:
    procs: list = []
    with natlab.Lab(["cone", "cone", "symmetric"], publics=2, prefix=TEST_PREFIX) as lab:
        try:
            pub0 = LabNode(lab, "pub0", tmp_path / "pub0", extra=FAST)
            pub1 = LabNode(lab, "pub1", tmp_path / "pub1", [pub0.addr], FAST)
            procs += [pub0, pub1]
            boot = [pub0.addr, pub1.addr]
            rx = _handoff(lab, "h0", "receive", tmp_path, model, boot,
                          ["--tokens", str(N), "--sessions", "2"])
            procs.append(rx)
            rx.next("model", 60)
            ids = ",".join(map(str, TINY_PROMPT))
            for sender in ("h1", "h2"):  # cone <-> cone, then symmetric -> cone
                tx = _handoff(lab, sender, "send", tmp_path, model, boot,
                              ["--tokens", str(N), "--prompt-ids", ids, "--find-timeout", "120"])
                procs.append(tx)
                found = tx.next("found", 150)
                assert found["providers"][0]["peer_id"] == rx.peer_id
                tx.next("done", 120)
                applied = rx.next("applied", 60)
                ref = tx.of("reference")[0]
                assert applied["tokens"] == ref["tokens"] and applied["logits_blake3"] == ref["logits_blake3"]
                assert [s["path"] for s in tx.of("sent")] == ["stream"]  # no lane over a circuit
                assert tx.wait(30) == 0
            relays = [pub0.get("/status")["relay"], pub1.get("/status")["relay"]]
            assert sum(r["circuits_made"] for r in relays) >= 2
            assert all(r["serving"] for r in relays)
        finally:
            for p in procs:
                p.stop() if isinstance(p, LabNode) else p.terminate()
