"""Ephemeral X25519 key exchange and directional session keys (wiped on close).

``crypto_kx`` gives each side an rx/tx pair from the two ephemeral keys; we then bind both keys to
the handshake transcript with keyed BLAKE2b so that keys from one session can never authenticate
bytes of another even if an ephemeral key were reused. Secrets live in ``bytearray`` objects filled
through the cffi layer so :meth:`SessionKeys.wipe` can really overwrite them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from nacl._sodium import ffi, lib

from . import aead as _aead  # noqa: F401  (runs sodium_init before any key is made)
from .errors import ErrorCode, ProtocolError

KEY_BYTES = 32
_KDF_LABEL = b"latentlink/tensor-rpc/key/v1\x00"


def wipe(buf: bytearray) -> None:
    """Overwrite a secret in place (sodium_memzero cannot be optimised away)."""
    if len(buf):
        with ffi.from_buffer(buf, require_writable=True) as p:
            lib.sodium_memzero(p, len(buf))


class EphemeralKey:
    """One X25519 key pair for one session; the secret half is wiped once keys are derived."""

    def __init__(self) -> None:
        self.public = bytearray(lib.crypto_kx_publickeybytes())
        self._secret = bytearray(lib.crypto_kx_secretkeybytes())
        with ffi.from_buffer(self.public, require_writable=True) as pk, \
                ffi.from_buffer(self._secret, require_writable=True) as sk:
            rc = lib.crypto_kx_keypair(pk, sk)
        if rc != 0:  # pragma: no cover - libsodium never fails here
            raise ProtocolError(ErrorCode.STATE, "key generation failed")

    def derive(self, peer_public: bytes, initiator: bool, transcript: bytes) -> SessionKeys:
        """Directional keys for this side; wipes the ephemeral secret (one use only)."""
        if len(peer_public) != KEY_BYTES or not any(self._secret):
            raise ProtocolError(ErrorCode.STATE, "ephemeral key unusable")
        rx, tx = bytearray(KEY_BYTES), bytearray(KEY_BYTES)
        fn = lib.crypto_kx_client_session_keys if initiator else lib.crypto_kx_server_session_keys
        with ffi.from_buffer(rx, require_writable=True) as prx, \
                ffi.from_buffer(tx, require_writable=True) as ptx, \
                ffi.from_buffer(self.public) as pk, ffi.from_buffer(self._secret) as sk:
            rc = fn(prx, ptx, pk, sk, bytes(peer_public))
        wipe(self._secret)
        if rc != 0:
            wipe(rx)
            wipe(tx)
            raise ProtocolError(ErrorCode.AUTH, "peer ephemeral key rejected")
        send_label, recv_label = (b"i2r", b"r2i") if initiator else (b"r2i", b"i2r")
        keys = SessionKeys(send=_bind(tx, transcript, send_label),
                           recv=_bind(rx, transcript, recv_label))
        wipe(rx)
        wipe(tx)
        return keys

    def wipe(self) -> None:
        wipe(self._secret)


def _bind(raw: bytearray, transcript: bytes, label: bytes) -> bytearray:
    h = hashlib.blake2b(_KDF_LABEL + transcript + label, key=bytes(raw), digest_size=KEY_BYTES)
    return bytearray(h.digest())


@dataclass
class SessionKeys:
    """Send and receive keys of one side of one session."""

    send: bytearray
    recv: bytearray

    def wipe(self) -> None:
        wipe(self.send)
        wipe(self.recv)
