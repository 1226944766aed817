"""Tensor sessions through real nodes: an application that falls behind loses nothing."""

import numpy as np
import pytest
import trio

from meshnode.config import load_config
from meshnode.node import open_node
from meshnode.tensor import SessionClosed
from tensor_rpc import Kind
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
