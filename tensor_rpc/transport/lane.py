"""Data lanes: blocking loops (run in worker threads) that move sealed chunks over a socket.

``bulk``: a direct TCP connection; each chunk is ``mid:u64 | index:u32 | sealed_len:u32`` followed
by the sealed bytes, sealed straight into one reusable send buffer and received with ``recv_into``
into one of the lane's own staging slots, from which the session decrypts into the message buffer
(one pass). A lane never sees a message buffer: only the session writes there, and never again
once the message is delivered. Flow control is TCP's window: memory on both sides is a couple of
chunks per lane plus socket buffers.

``shm``: the connector creates a ring segment, proves the peer maps it (nonce challenge, see
``shm.py``), then seals each chunk straight into the ring and sends only
``mid | index | sealed_len | offset:u64`` over a Unix socket; the receiver decrypts from the ring
into the message buffer and answers ``freed:u32``. The ring size is the credit; notifications are
socket messages (no polling loops).
"""

from __future__ import annotations

import hmac
import os
import queue
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from .auth import KIND_BULK, KIND_SHM, NONCE_BYTES, LaneAuthError, mac, recv_exact, recv_into_exact
from .shm import Segment

BULK_FRAME = struct.Struct(">QII")
SHM_FRAME = struct.Struct(">QIIQ")
FREED = struct.Struct(">I")
SHM_OFFER = struct.Struct(">HQ")
RING_BASE = 4096  # ring data starts after the page that holds the challenge nonce
STAGING_SLOTS = 2  # bulk: chunk k+1 is received while the session opens chunk k
Submit = Callable[[int, int, memoryview, Callable[[], None]], None]


def tune(sock: socket.socket, buffer_bytes: int) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
        except OSError:
            pass


class LaneSender:
    """Sender end of one lane (one direction of one session). Not thread-safe: one send at a time."""

    def __init__(self, sock: socket.socket, kind: int, max_sealed: int,
                 segment: Segment | None = None) -> None:
        self.sock, self.kind, self.segment = sock, kind, segment
        self.path = "bulk" if kind == KIND_BULK else "shm"
        self._max_sealed = max_sealed
        self._buf = bytearray(BULK_FRAME.size + max_sealed) if kind == KIND_BULK else None
        if segment is not None:
            self._ring = segment.view[RING_BASE:]
            self._cap = len(self._ring)
            self._head = self._tail = 0  # virtual positions: allocated / freed bytes (incl. waste)
            self._inflight: deque[int] = deque()

    @classmethod
    def open_shm(cls, sock: socket.socket, key: bytes, ring_bytes: int, max_sealed: int) -> LaneSender:
        """Create the ring, prove the peer maps it, unlink its name; the peer unlinks too."""
        if ring_bytes < 2 * max_sealed:
            ring_bytes = 2 * max_sealed
        seg = Segment.create(RING_BASE + ring_bytes)
        try:
            seg.prefault(write=True)
            nonce = os.urandom(NONCE_BYTES)
            seg.view[:NONCE_BYTES] = nonce
            name = seg.name.encode()
            sock.sendall(SHM_OFFER.pack(len(name), seg.size) + name)
            proof = recv_exact(sock, 32)
            if not hmac.compare_digest(proof, mac(key, b"S", nonce)):
                raise LaneAuthError("peer could not read the shared segment (not the same host)")
        except BaseException:
            seg.unlink()
            seg.close()
            raise
        seg.unlink()
        return cls(sock, KIND_SHM, max_sealed, seg)

    def send_message(self, msg: Any) -> None:
        """Seal and send every chunk of ``msg`` (an ``OutgoingMessage``); blocking."""
        if self.kind == KIND_BULK:
            view = memoryview(self._buf)
            for i in range(msg.n_chunks):
                n = msg.sealed_size(i)
                BULK_FRAME.pack_into(view, 0, msg.message_id, i, n)
                msg.seal_chunk(i, view[BULK_FRAME.size:BULK_FRAME.size + n])
                self.sock.sendall(view[:BULK_FRAME.size + n])
            return
        for i in range(msg.n_chunks):
            n = msg.sealed_size(i)
            off = self._alloc(n)
            msg.seal_chunk(i, self._ring[off:off + n])
            self.sock.sendall(SHM_FRAME.pack(msg.message_id, i, n, off))

    def _alloc(self, n: int) -> int:
        pos = self._head % self._cap
        waste = self._cap - pos if pos + n > self._cap else 0
        need = waste + n
        while self._head + need - self._tail > self._cap:
            (freed,) = FREED.unpack(recv_exact(self.sock, FREED.size))
            for _ in range(freed):
                self._tail += self._inflight.popleft()
        self._head += need
        self._inflight.append(need)
        return 0 if waste else pos

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.segment is not None:
            self._ring.release()
            self.segment.close()


class LaneReceiver:
    """Receiver end: runs :meth:`run` in a worker thread until the lane closes."""

    def __init__(self, sock: socket.socket, kind: int, max_sealed: int) -> None:
        self.sock, self.kind = sock, kind
        self.path = "bulk" if kind == KIND_BULK else "shm"
        self._max_sealed = max_sealed
        self.segment: Segment | None = None
        self._closed = False
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()

    def attach_shm(self, key: bytes) -> None:
        """Map the sender's ring, answer its nonce challenge, unlink the name."""
        name_len, size = SHM_OFFER.unpack(recv_exact(self.sock, SHM_OFFER.size))
        name = recv_exact(self.sock, name_len).decode()
        seg = Segment.attach(name, size)
        seg.unlink()
        self.segment = seg
        seg.prefault(write=False)
        self.sock.sendall(mac(key, b"S", bytes(seg.view[:NONCE_BYTES])))

    def run(self, submit: Submit) -> None:
        """Receive chunks and hand them to ``submit(mid, index, sealed_view, done)``.

        bulk: each sealed chunk lands in one of the lane's ``STAGING_SLOTS`` staging buffers
        (prefaulted once, reused); ``done()`` — called once the session consumed the chunk —
        gives the slot back. shm: ``sealed_view`` lies in the sender's ring and ``done()`` returns
        that span to the sender, which is the lane's credit."""
        if self.kind == KIND_BULK:
            slots = [memoryview(bytearray(self._max_sealed)) for _ in range(STAGING_SLOTS)]
            for i in range(STAGING_SLOTS):
                self._free.put(i)
            head = bytearray(BULK_FRAME.size)
            while True:
                recv_into_exact(self.sock, memoryview(head))
                mid, idx, n = BULK_FRAME.unpack(head)
                if n > self._max_sealed:
                    raise LaneAuthError(f"lane chunk of {n} bytes exceeds {self._max_sealed}")
                slot = self._free.get()  # close() wakes us with -1
                if self._closed or slot < 0:
                    raise ConnectionError("lane closed")
                view = slots[slot][:n]
                recv_into_exact(self.sock, view)
                submit(mid, idx, view, lambda slot=slot: self._free.put(slot))
                view = None
        assert self.segment is not None
        ring = self.segment.view[RING_BASE:]
        sock = self.sock

        def freed() -> None:
            try:
                sock.sendall(FREED.pack(1))
            except OSError:
                pass

        while True:
            mid, idx, n, off = SHM_FRAME.unpack(recv_exact(self.sock, SHM_FRAME.size))
            if n > self._max_sealed or off + n > len(ring):
                raise LaneAuthError("shm chunk outside the ring")
            submit(mid, idx, ring[off:off + n], freed)

    def close(self) -> None:
        self._closed = True
        self._free.put(-1)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self.segment is not None:
            self.segment.close()


__all__ = ["KIND_BULK", "KIND_SHM", "LaneReceiver", "LaneSender", "tune"]
