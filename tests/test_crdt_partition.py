"""Five real libp2p hosts share one session, split 3|2, edit on both sides, heal, converge."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from crdt_state.limits import CrdtLimits
from crdt_state.service import CrdtService
from crdt_state.testing import start_services

FAST = CrdtLimits(anti_entropy_interval_s=0.1, request_timeout_s=1.0)


async def _wait_converged(services: list[CrdtService], sid: str, pred, timeout: float = 15.0
                          ) -> None:
    with trio.fail_after(timeout):
        while True:
            snaps = [s.get(sid) if sid in s.engine.replicas else None for s in services]
            if all(x is not None and pred(x) for x in snaps) and all(x == snaps[0] for x in snaps):
                return
            await trio.sleep(0.05)


async def test_five_nodes_partition_heal_converge() -> None:
    async with AsyncExitStack() as stack:
        hosts, services = await start_services(stack, 5, FAST)
        ids = [s.peer_id for s in services]
        sid = "sess-partition"
        services[0].create_session(sid, "compat-abc", {p: "agent" for p in ids})
        await _wait_converged(services, sid, lambda s: len(s["participants"]) == 5)
        for svc in services[1:]:
            svc.join(sid)
        await _wait_converged(services, sid, lambda s: all(
            p["joined_at"] is not None for p in s["participants"]))

        # Partition {0,1,2} | {3,4}: close connections and refuse re-dial both ways.
        left, right = services[:3], services[3:]
        async with trio.open_nursery() as nursery:
            for a in left:
                for b in right:
                    nursery.start_soon(a.block, b.peer_id)
                    nursery.start_soon(b.block, a.peer_id)

        mids = {"left": [], "right": []}
        for i in range(20):
            for side, group in (("left", left), ("right", right)):
                svc = group[i % len(group)]
                mids[side].append(svc.log_message(
                    sid, kind="KV_CACHE", receiver=ids[(i + 1) % 5], layers=(0, 11),
                    tokens=(0, 32 + i), nbytes=1000 + i, checksums=[f"{side}{i:04x}"],
                    path="stream", timings={"send_ms": 1.5}))
        left[0].set_status(sid, "active")
        right[1].bump_turn(sid, "agent-R")
        left[1].bump_turn(sid, "agent-L")
        right[0].bump_turn(sid, "agent-L")  # concurrent increments of one counter add up
        # The receiver of right's first message (on the left side) records its outcome before
        # the message itself can reach it.
        assert ids[1] == left[1].peer_id
        left[1].record_outcome(sid, mids["right"][0], "applied", sender=right[0].peer_id)
        left[2].add_lineage(sid, "state-1", None, mids["left"][0])
        right[1].add_lineage(sid, "state-2", "state-1", mids["right"][0])

        # Each side converges internally and does not see the other's edits.
        await _wait_converged(left, sid, lambda s: len(s["messages"]) == 20)
        await _wait_converged(right, sid, lambda s: len(s["messages"]) == 20)
        assert services[0].get(sid)["messages"] != services[3].get(sid)["messages"]

        for a in left:
            for b in right:
                a.unblock(b.peer_id)
                b.unblock(a.peer_id)
        await _wait_converged(services, sid, lambda s: len(s["messages"]) == 40)  # bounded wait

        snap = services[4].get(sid)
        got = {m["message_id"] for m in snap["messages"]}
        assert got == set(mids["left"]) | set(mids["right"])
        assert snap["status"] == "active"
        assert snap["turns"] == {"agent-R": 1, "agent-L": 2}
        assert [e["state_id"] for e in snap["lineage"]] == ["state-1", "state-2"]
        by_id = {m["message_id"]: m for m in snap["messages"]}
        assert by_id[mids["right"][0]]["outcome"]["status"] == "applied"
        assert snap["unverified_outcomes"] == []
        assert isinstance(by_id[mids["left"][0]]["nbytes"], int)
        # Raw CRDT state is identical too, not just the typed view.
        states = {s.engine.replicas[sid].doc.doc.get_update() == b"" for s in services}
        assert states == {False}
