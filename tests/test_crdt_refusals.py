"""Refusals are all counted, and logged with reason and peer at most once per second per
(peer, label), the next line saying how many were not logged."""

from __future__ import annotations

import logging

from crdt_state.refusals import LOG_EVERY_S, RefusalLog

log = logging.getLogger("test.crdt.refusals")


def test_every_refusal_counted_logs_throttled_per_peer_and_label(caplog) -> None:
    counted: list[str] = []
    refusals = RefusalLog(log, counted.append, max_keys=8)
    caplog.set_level(logging.WARNING, logger=log.name)
    for _ in range(5):
        refusals.refuse("update_rate", "peerA", "over budget", now=0.0)
    refusals.refuse("update_rate", "peerB", "over budget", now=0.0)  # another peer: own line
    refusals.refuse("links", "peerA", "too many streams", now=0.0)   # another label: own line
    refusals.refuse("update_rate", "peerA", "over budget", now=LOG_EVERY_S)
    assert counted == ["update_rate"] * 6 + ["links", "update_rate"]
    assert refusals.counts == {"update_rate": 7, "links": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "crdt: refused update_rate from peerA: over budget",
        "crdt: refused update_rate from peerB: over budget",
        "crdt: refused links from peerA: too many streams",
        "crdt: refused update_rate from peerA: over budget (+4 more since the last report)",
    ]


def test_throttle_memory_bounded() -> None:
    refusals = RefusalLog(log, None, max_keys=4)
    for i in range(100):
        refusals.refuse("links", f"peer{i}", "too many streams", now=0.0)
    assert refusals.tracked <= 4
