"""The synchronous facade drives real nodes from plain Python threads and from asyncio."""

import asyncio
import threading

import numpy as np

from meshnode.config import load_config
from meshnode.sync_api import SyncNode
from tensor_rpc import Kind
from tests.helpers.sigs import fake_signature


def _cfg(tmp_path, name):
    return load_config(env={}, overrides=[f"node.data_dir={tmp_path / name}",
                                          "host.listen_addrs=/ip4/127.0.0.1/tcp/0",
                                          "control.enabled=false", "transport.path=stream"])


def test_sync_nodes_exchange_a_tensor_and_work_under_asyncio(tmp_path):
    sig = fake_signature(0)
    with SyncNode(_cfg(tmp_path, "a"), sig) as a, SyncNode(_cfg(tmp_path, "b"), sig) as b:
        a.connect(b.addrs[0])
        x = np.arange(1024, dtype=np.float32)
        got = {}

        def receiver():
            s = b.accept_session(timeout_s=20)
            got["rec"] = s.receive(timeout_s=20)

        t = threading.Thread(target=receiver)
        t.start()
        sa = a.open_session(b.peer_id)
        sent = sa.send([("x", "float32", x.shape, x)], kind=Kind.HIDDEN_SLICE, layers=(1, 2), tokens=(0, 4))
        t.join(30)
        rec = got["rec"]
        assert sent.nbytes == x.nbytes
        assert bytes(rec.tensors[0][1]) == x.tobytes() and rec.header.kind == Kind.HIDDEN_SLICE

        async def from_asyncio():  # the facade is usable from an asyncio program via to_thread
            return await asyncio.to_thread(lambda: a.peer_id), await asyncio.to_thread(
                lambda: sa.send([("y", "float32", (2,), np.ones(2, np.float32))], kind=Kind.KV_CACHE,
                                layers=(0, 1), tokens=(0, 2)))

        pid, sent2 = asyncio.run(from_asyncio())
        assert pid == a.peer_id and sent2.nbytes == 8
