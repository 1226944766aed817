"""Lane authentication: a direct socket proves knowledge of the session key before any payload.

Both ends of a session hold the same directional chunk key (sender's ``send`` = receiver's
``recv``). The lane key is a keyed BLAKE2b of that key, so it never leaves the process and dies with
the session (keys are wiped on close). The handshake on a fresh socket, connector C (data sender)
and acceptor A (data receiver)::

    C -> A   "LLN1" | kind:u8 | sid(16) | nonce_c(32)
    A -> C   nonce_a(32) | MAC(lane_key, "A" | nonce_c | nonce_a)
    C -> A   MAC(lane_key, "C" | nonce_c | nonce_a)

A drops the connection (and logs) on an unknown session id or a wrong MAC; C refuses an acceptor
that cannot prove the key either. Fresh nonces on both sides make a recorded handshake useless.
The acceptor's steps are pure functions (its node runs them on non-blocking sockets under a
timeout, so idle connections never hold a thread); the connector's side is a blocking call for
its worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from typing import Any

MAGIC = b"LLN1"
KIND_BULK = 1
KIND_SHM = 2
NONCE_BYTES = 32
MAC_BYTES = 32
HELLO = struct.Struct(">4sB16s32s")
_LABEL = b"latentlink/tensor-rpc/lane/v1\x00"


class LaneAuthError(ConnectionError):
    """The other end of a lane socket could not prove the session key (or spoke garbage)."""


def lane_key(session: Any, sending: bool) -> bytes:
    """Key for the lane that carries chunks in one direction (same value on both ends), derived
    from the session's directional chunk key (``Session.lane_secret``; UsageError once wiped)."""
    raw = session.lane_secret(sending)
    return hashlib.blake2b(_LABEL + session.session_id, key=raw, digest_size=32).digest()


def mac(key: bytes, *parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), key=key, digest_size=MAC_BYTES).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("lane closed by peer")
        got += k


def connect_handshake(sock: socket.socket, kind: int, session_id: bytes, key: bytes) -> None:
    """Connector side (blocking). Raises :class:`LaneAuthError` if the acceptor lacks the key."""
    nc = os.urandom(NONCE_BYTES)
    sock.sendall(HELLO.pack(MAGIC, kind, session_id, nc))
    reply = recv_exact(sock, NONCE_BYTES + MAC_BYTES)
    na, proof = reply[:NONCE_BYTES], reply[NONCE_BYTES:]
    if not hmac.compare_digest(proof, mac(key, b"A", nc, na)):
        raise LaneAuthError("lane acceptor failed to prove the session key")
    sock.sendall(mac(key, b"C", nc, na))


def parse_hello(data: bytes) -> tuple[int, bytes, bytes]:
    """Acceptor, step 1 (pure): the connector's ``HELLO.size`` bytes -> (kind, session id, nonce)."""
    magic, kind, sid, nc = HELLO.unpack(data)
    if magic != MAGIC or kind not in (KIND_BULK, KIND_SHM):
        raise LaneAuthError("not a LatentLink lane")
    return kind, sid, nc


def acceptor_reply(key: bytes, nc: bytes) -> tuple[bytes, bytes]:
    """Acceptor, step 2 (pure): (our nonce, the bytes to send: nonce || our proof of the key)."""
    na = os.urandom(NONCE_BYTES)
    return na, na + mac(key, b"A", nc, na)


def check_connector(key: bytes, nc: bytes, na: bytes, proof: bytes) -> None:
    """Acceptor, step 3 (pure): the connector's proof, demanded before any payload."""
    if not hmac.compare_digest(proof, mac(key, b"C", nc, na)):
        raise LaneAuthError("lane connector failed to prove the session key")
