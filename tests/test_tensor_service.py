"""Tensor sessions through real nodes: an application that falls behind loses nothing."""

import numpy as np
import pytest
import trio

from meshnode.config import load_config
from meshnode.node import open_node
from meshnode.tensor import SessionClosed
from tensor_rpc import ErrorCode, Kind
from tests.helpers.sigs import fake_signature


def _cfg(tmp_path, name, *extra):
    return load_config(env={}, overrides=[f"node.data_dir={tmp_path / name}", "control.enabled=false",
                                          "host.listen_addrs=/ip4/127.0.0.1/tcp/0",
                                          "transport.path=stream", *extra])


async def test_overloaded_receiver_closes_session_but_keeps_every_acked_message(tmp_path):
    async with open_node(_cfg(tmp_path, "a")) as a, \
            open_node(_cfg(tmp_path, "b", "transport.receive_queue_messages=2")) as b:
        a.serve(fake_signature(0))
        b.serve(fake_signature(0))
        await a.connect(str(b.addrs[0]))
        ts = await a.open_session(b.peer_id)
        rs = await b.accept_session(10)
        acked = []
        with pytest.raises(SessionClosed):
            for i in range(6):  # nobody on b reads: the 3rd queued message trips the limit
                x = np.full(16, i, dtype=np.float32)
                await ts.send([("x", "float32", x.shape, x)], kind=Kind.KV_CACHE, layers=(0, 1),
                              tokens=(0, 1), timeout_s=10)
                acked.append(i)
        got = []
        with trio.fail_after(10):
            while True:
                try:
                    rec = await rs.receive()
                except SessionClosed:
                    break
                got.append(int(np.frombuffer(rec.tensors[0][1], dtype=np.float32)[0]))
        assert acked and got[: len(acked)] == acked  # every acknowledged message is delivered


async def test_a_node_that_would_not_apply_state_refuses_sessions_at_once_naming_why(tmp_path):
    async with open_node(_cfg(tmp_path, "a")) as a, open_node(_cfg(tmp_path, "b")) as b:
        a.serve(fake_signature(0))
        b.serve(fake_signature(0), accept=False)  # e.g. `meshnode run` with a model: sends only
        assert b.roles == () and a.roles == ("apply",)
        await a.connect(str(b.addrs[0]))
        with pytest.raises(SessionClosed) as err:
            await a.open_session(b.peer_id)
        assert err.value.error.code is ErrorCode.UNSUPPORTED and "'apply' role" in str(err.value)
        status = b.status()["tensor"]
        assert status["sessions"] == 0 and status["unaccepted"] == 0
        metrics = b.metrics.render().decode()
        assert 'latentlink_refusals_total{component="tensor",reason="session_unsupported"} 1.0' in metrics


async def test_status_and_metrics_show_sessions_lanes_and_bytes_in_flight(tmp_path):
    async with open_node(_cfg(tmp_path, "a")) as a, open_node(_cfg(tmp_path, "b")) as b:
        a.serve(fake_signature(0))
        b.serve(fake_signature(0))
        await a.connect(str(b.addrs[0]))
        ts = await a.open_session(b.peer_id)
        rs = await b.accept_session(10)
        x = np.zeros(1 << 20, dtype=np.uint8)
        await ts.send([("x", "uint8", x.shape, x)], kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1))
        st = b.status()["tensor"]  # delivered, not taken yet: still charged to a
        assert st["by_state"] == {"READY": 1} and st["peers"][str(a.peer_id)]["inflight_bytes"] == x.nbytes
        b._refresh_gauges()
        samples = dict(line.rsplit(" ", 1) for line in b.metrics.render().decode().splitlines()
                       if line and not line.startswith("#"))
        assert float(samples['latentlink_tensor_sessions{state="READY"}']) == 1
        assert float(samples[f'latentlink_inflight_bytes{{peer="{a.peer_id}"}}']) == x.nbytes
        rec = await rs.receive()
        assert b.status()["tensor"]["inflight_bytes"] == 0  # the application has it now
        rec.release()
