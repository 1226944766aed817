"""Receive buffers: anonymous memory committed as chunks land, reused only when handed back.

A message's buffer is made when its first chunk arrives (``tensor_rpc`` never allocates for a
header alone). Fresh ``mmap`` memory costs nothing up front — the kernel commits each page when
the session first writes a chunk there — so a peer cannot pin memory it has not sent, and no large
allocation or prefault ever runs on the event loop. Reuse is explicit, never guessed from
reference counts: the application calls ``Received.release()`` when it is done with a message's
tensors, and only then may the pool hand that memory to a later message (page faults are the main
cost of fresh memory, ~1 GB/s here: a receiver that releases gets prefaulted buffers back).
Idle pooled memory is bounded by ``transport.recv_pool_bytes``.
"""

from __future__ import annotations

import mmap

from tensor_rpc.session import fresh_buffer

SMALL = 1 << 20  # fresh_buffer gives a plain bytearray below this: never pooled


class BufferPool:
    def __init__(self, max_idle_bytes: int) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[mmap.mmap] = []

    @property
    def idle_bytes(self) -> int:
        return sum(len(m) for m in self._idle)

    def __call__(self, n: int) -> bytearray | mmap.mmap:
        """A buffer of at least ``n`` bytes (the session views exactly ``n`` of it)."""
        if n < SMALL:
            return fresh_buffer(n)
        best = min((m for m in self._idle if len(m) >= n), key=len, default=None)
        if best is not None and len(best) <= 2 * n:  # do not park a small message in a huge map
            self._idle.remove(best)
            return best
        return fresh_buffer(n)

    def release(self, buf: object) -> None:
        """The application is done with ``buf`` (a message's memory): keep it for reuse if room."""
        if not isinstance(buf, mmap.mmap) or buf.closed:
            return
        if any(m is buf for m in self._idle):
            return
        # dropped maps are not closed: a view the application still holds keeps one alive safely
        while self._idle and self.idle_bytes + len(buf) > self.max_idle_bytes:
            self._idle.pop(0)
        if self.idle_bytes + len(buf) <= self.max_idle_bytes:
            self._idle.append(buf)
