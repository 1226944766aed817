"""TCP from a fixed local port: the socket work behind hole punching (DCUtR) and lane knocks.

Why a module of our own: py-libp2p 0.8.1's ``dial_with_source`` closes a failed socket plainly
(the next connect from that port then fails with EADDRNOTAVAIL, DESIGN.md §9), leaks it when the
dial is cancelled, and silently falls back to an ephemeral port when the bind fails (a punch that
cannot work, reported as tried). Here every socket carries ``SO_LINGER(1,0)`` from before its
connect, so every close of it — ours, or trio's own when a connect is cancelled — is a reset that
frees the 4-tuple at once; and a failed bind is an error.

* :func:`open_from` — connect from ``src`` (our listen port) to ``dst``: with the peer dialling us
  at the same time this is a TCP simultaneous open through both NATs.
* :func:`start_connect` — a non-blocking connect from a fresh local port: its SYN is on the wire
  (opening our NAT) when it returns, so the peer can be asked to dial that port back.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

import trio

_LINGER_ABORT = struct.pack("ii", 1, 0)


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def reusable(sock: socket.socket | trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def reset_on_close(sock: socket.socket | trio.socket.SocketType) -> None:
    """``SO_LINGER 0``: closing this socket sends a RST and frees its 4-tuple at once (no FIN-WAIT,
    no TIME_WAIT); whatever it still had unsent is dropped. go-libp2p does this on every TCP
    connection. It matters for a connection on our listen port: a graceful close on a lossy path
    leaves an orphan in FIN-WAIT-1 retransmitting its FIN for minutes (8 orphan retries), and
    while it holds (listen port, peer's listen port) every hole punch with that peer fails."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:  # already closed: nothing to set
        pass


def abort(sock: socket.socket | trio.socket.SocketType) -> None:
    """Close without TIME_WAIT: the local port is free for the next attempt at once."""
    reset_on_close(sock)
    sock.close()


async def open_from(src: tuple[str, int], dst: tuple[str, int], timeout_s: float) -> trio.SocketStream:
    """A TCP stream from ``src`` to ``dst`` (``src`` may be a listening port: SO_REUSEPORT).
    Raises ``OSError`` or ``trio.TooSlowError``; the socket never outlives a failure. The stream
    closes with a reset (``SO_LINGER 0``): whatever it still had unsent is dropped then."""
    if _family(src[0]) != _family(dst[0]):
        raise OSError(f"address family of {src[0]} differs from {dst[0]}")
    sock = trio.socket.socket(_family(dst[0]), socket.SOCK_STREAM)
    try:
        reusable(sock)
        # before connect(): the NATs fix this 4-tuple (both listen ports), so the same two peers
        # punching again soon must not find it held by a FIN-WAIT or TIME_WAIT. trio closes the
        # socket itself when connect() is cancelled; half-way through a simultaneous open (their
        # SYN in, our SYN-ACK unanswered: SYN-RECV) a plain close leaves a FIN-WAIT-1 orphan that
        # retransmits for minutes (seen at 20 % loss: every punch with that peer failed meanwhile)
        reset_on_close(sock)
        await sock.bind(src)
        with trio.fail_after(timeout_s):
            await sock.connect(dst)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        abort(sock)
        raise
    return trio.SocketStream(sock)


def start_connect(local_ip: str, dst: tuple[str, int]) -> socket.socket:
    """A non-blocking socket bound to ``(local_ip, <fresh port>)`` whose connect to ``dst`` has
    begun (its SYN has left). Wait for it with ``trio.lowlevel.wait_writable`` and read
    ``SO_ERROR``; :func:`abort` it on failure."""
    sock = socket.socket(_family(dst[0]), socket.SOCK_STREAM)
    try:
        reset_on_close(sock)
        sock.bind((local_ip, 0))
        sock.setblocking(False)
        err = sock.connect_ex(dst)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
    except BaseException:
        abort(sock)
        raise
    return sock
