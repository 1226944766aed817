"""Receive memory is reused only once nothing can read it any more (no export of any kind)."""

import gc

import numpy as np
import torch

from meshnode.tensor.buffers import BufferPool, ReceiveMap, exported
from meshnode.tensor.received import Received

MiB = 1 << 20


def _received(pool: BufferPool, n: int) -> tuple[ReceiveMap, Received]:
    m = pool(n)
    buf = memoryview(m).cast("B")[:n]
    return m, Received("peer", None, buf, [(None, buf[: n // 2]), (None, buf[n // 2:])], "bulk",
                       0.0, None, pool.release)


def test_memory_a_tensor_still_views_is_never_handed_out_again():
    pool = BufferPool(64 * MiB)
    m, rec = _received(pool, 4 * MiB)
    t = torch.frombuffer(rec.tensors[0][1], dtype=torch.uint8)  # the application keeps a tensor
    a = np.frombuffer(rec.buffer, dtype=np.uint8)  # and an array
    rec.release()
    assert exported(m)
    assert pool(4 * MiB) is not m  # a fresh map: the tensor's bytes are not rewritten
    del t
    assert pool(4 * MiB) is not m  # the array still reads it
    del a
    gc.collect()
    assert not exported(m)
    assert pool(4 * MiB) is m  # nothing reads it any more: reused


def test_dropping_the_received_object_is_enough():
    pool = BufferPool(64 * MiB)
    m, rec = _received(pool, 4 * MiB)
    del rec
    gc.collect()
    assert pool(4 * MiB) is m


def test_pool_holds_at_most_its_bound():
    pool = BufferPool(8 * MiB)
    views = [memoryview(pool(4 * MiB)) for _ in range(4)]  # all four in use at once
    assert len({id(v.obj) for v in views}) == 4
    assert sum(len(m) for m in pool._idle) + sum(len(m) for m in pool._lent) <= pool.max_bytes


def test_small_buffers_are_plain_bytearrays():
    assert isinstance(BufferPool(64 * MiB)(1024), bytearray)
