"""Service over real hosts: subscriptions, list/get, and an outsider's pushes refused on the wire."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack

import trio

from crdt_state.limits import CrdtLimits
from crdt_state.replica import Replica
from crdt_state.service import PROTOCOL_ID
from crdt_state.testing import start_services
from crdt_state.wire import Records, encode

FAST = CrdtLimits(anti_entropy_interval_s=0.1, request_timeout_s=1.0, max_update_bytes=8192)


async def test_subscribe_get_and_outsider_rejected_on_the_wire() -> None:
    async with AsyncExitStack() as stack:
        hosts, services = await start_services(stack, 3, FAST)
        a, b, outsider = services
        changes = b.subscribe("s")
        a.create_session("s", "ck", {a.peer_id: "owner", b.peer_id: "reader"})
        with trio.fail_after(10):
            async for change in changes:
                if change.origin == a.peer_id and "s" in b.engine.replicas \
                        and len(b.doc("s").participants()) == 2:
                    break
        mid = a.log_message("s", kind="KV_CACHE", receiver=b.peer_id, nbytes=123)
        with trio.fail_after(10):
            while b.doc("s").message_count() < 1:
                await trio.sleep(0.02)
        b.record_outcome("s", mid, "rejected", reason="checksum mismatch")
        with trio.fail_after(10):
            while (mid, a.peer_id) not in a.doc("s").outcomes():
                await trio.sleep(0.02)
        assert a.get("s")["messages"][0]["outcome"]["reason"] == "checksum mismatch"
        assert [x["session_id"] for x in a.list_sessions()] == ["s"]
        assert "s" not in outsider.engine.replicas  # never invited, never synced

        # The outsider writes into its own copy of the doc and pushes signed records to a.
        before = a.get("s")
        eng = outsider.engine
        rep = eng.replicas["s"] = Replica("s", FAST, eng.signer, eng.writer, eng.verifier)
        for recs in a.engine.replicas["s"].log.values():
            rep.admit(recs)
        forged = outsider.engine.edit("s", lambda d: d.set_status("failed"))
        unsigned = [dataclasses.replace(r, sig=b"") for r in forged]
        stream = await hosts[2].new_stream(hosts[0].get_id(), [PROTOCOL_ID])
        await stream.write(encode(Records("s", forged)) + encode(Records("s", unsigned)))
        with trio.fail_after(10):
            while len(a.stats.rejected) < 1:
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        assert a.get("s") == before
        assert a.get("s")["status"] == "open"
        assert any(r.reason == "unsigned update" for r in a.stats.rejected)
        await stream.reset()
