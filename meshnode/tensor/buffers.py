"""Receive buffers: anonymous memory committed just ahead of the chunks, reused only when handed back.

A message's buffer is made when its first chunk arrives (``tensor_rpc`` never allocates for a
header alone), as a fresh anonymous mapping: nothing is committed up front. As each chunk lands the
session charges it — and, budget permitting, the next one — to the node's receive budget and asks
the buffer to commit that charged range ahead of the data (:meth:`ReceiveMap.commit`): a worker
thread populates those pages (``MADV_POPULATE_WRITE``) while the event loop opens the current
chunk, so neither the loop nor a lane ever waits on page faults (~2.5 µs per 4 KiB here), and no
page is committed that the budget did not grant. So a peer cannot pin memory it has not sent, and
no large allocation or prefault ever runs on the event loop.

Reuse is explicit, never guessed from reference counts: the application calls
``Received.release()`` when it is done with a message's tensors, and only then may the pool hand
that memory to a later message. An application that keeps what it received (a KV cache injected
zero-copy lives on as the cache) never hands it back; for it, each *delivered* (verified) message
makes the pool prepare one fresh, already committed map of that size in the worker thread, so
the next message of that size lands in committed memory. Idle pooled memory — handed back or
prepared — is bounded by ``transport.recv_pool_bytes``; a peer that only starts messages (never
completing one) makes the pool prepare nothing.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
from collections import deque
from typing import Any

from tensor_rpc.session import fresh_buffer

SMALL = 1 << 20  # fresh_buffer gives a plain bytearray below this: never pooled, never committed
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python 3.11's mmap module lacks the name
_STEP = 4 << 20
log = logging.getLogger("meshnode.tensor.buffers")


class _Populator:
    """One daemon thread that commits memory, in the order asked: ranges of receive maps, and
    whole maps the pool prepares. A plain thread, not a trio task: the sans-I/O session asks from
    synchronous code, and the work is blocking syscalls that must not run on the event loop."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Any, int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.enabled = True

    def submit(self, m: Any, start: int, end: int) -> None:
        """Commit ``m[start:end]`` (``m`` a ReceiveMap), or run ``m()`` when ``end`` is 0."""
        if not self.enabled and end:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="latentlink-commit", daemon=True)
            self._thread.start()
        self._q.put((m, start, end))

    def _run(self) -> None:
        page = mmap.PAGESIZE
        while True:
            m, start, end = self._q.get()
            if end == 0:
                m()
                continue
            a = start - start % page
            try:
                while a < end and not m.closed:
                    n = min(_STEP, end - a, len(m) - a)
                    m.madvise(_MADV_POPULATE_WRITE, a, n)
                    a += n
            except OSError as exc:  # an older kernel (EINVAL): chunks fault their pages instead
                self.enabled = False
                log.info("receive buffers cannot be committed ahead (%s); page faults instead", exc)
            except ValueError:  # the map was closed meanwhile: nothing left to commit
                continue
            finally:
                del m  # drop the reference: the map may be freed


_POPULATOR = _Populator()


class ReceiveMap(mmap.mmap):
    """An anonymous mapping that can commit ranges ahead of the data, off the event loop."""

    committed: int

    def commit(self, start: int, end: int) -> None:
        """Commit payload bytes ``[start, end)`` (the session guarantees the budget holds them)."""
        start = max(start, getattr(self, "committed", 0))
        end = min(end, len(self))
        if end > start:
            self.committed = end
            _POPULATOR.submit(self, start, end)


def exported(m: mmap.mmap) -> bool:
    """True while any buffer export (memoryview, array, tensor) of ``m`` exists."""
    try:
        m.resize(len(m))  # CPython refuses while exports exist; a same-size remap is free
    except BufferError:
        return True
    except (OSError, ValueError, SystemError):  # cannot tell: never reuse it
        return True
    return False


class BufferPool:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._idle: list[ReceiveMap] = []
        self._lent: deque[ReceiveMap] = deque()  # handed out; reusable once unexported

    @property
    def idle_bytes(self) -> int:
        return sum(len(m) for m in self._idle)

    def __call__(self, n: int) -> bytearray | ReceiveMap:
        """A buffer of at least ``n`` bytes (the session views exactly ``n`` of it)."""
        if n < SMALL:
            return fresh_buffer(n)
        for m in [m for m in self._lent if not exported(m)]:  # their readers are all gone
            self._lent.remove(m)
            self._idle.append(m)
        best = min((m for m in self._idle if len(m) >= n), key=len, default=None)
        if best is not None and len(best) <= 2 * n:  # do not park a small message in a huge map
            self._idle.remove(best)
            best.committed = len(best)  # pooled memory is committed already
        else:
            best = ReceiveMap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._lent.append(best)
        self._trim()
        return best

    def release(self, buf: object) -> None:
        """The application handed ``buf`` back: reusable now, if nothing exports it any more."""
        if isinstance(buf, ReceiveMap) and buf in self._lent and not exported(buf):
            self._lent.remove(buf)
            self._idle.append(buf)
            self._trim()

    def _trim(self) -> None:
        """Forget the oldest maps past ``max_bytes`` (idle first; a lent one stays the
        application's and is freed when it lets go). Maps are never closed here: a view the
        application still holds keeps its map alive safely."""
        total = sum(len(m) for m in self._idle) + sum(len(m) for m in self._lent)
        while total > self.max_bytes and (self._idle or len(self._lent) > 1):
            m = self._idle.pop(0) if self._idle else self._lent.popleft()
            total -= len(m)
