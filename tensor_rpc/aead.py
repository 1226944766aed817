"""Chunk and control-frame AEAD with counter nonces, through libsodium's cffi layer.

Why cffi: PyNaCl's public API only returns new ``bytes``; ``nacl._sodium.lib`` lets us write the
ciphertext straight into a preallocated frame and the plaintext straight into the receiver's
message buffer (DESIGN.md §6), which is what makes the bulk path faster than a copy into fresh memory.

Nonces are never sent: they are derived from counters both sides already know, so a replayed,
reordered or spliced sealed blob fails authentication. The associated data repeats what the nonce
encodes plus the session id and, for chunks, the final-chunk flag (truncation detection).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import nacl.bindings
from nacl._sodium import ffi, lib

from .errors import ErrorCode, ProtocolError

# Without sodium_init() libsodium never detects AES-NI and AEGIS runs ~400x slower (measured:
# 0.016 vs 6.6 GB/s). PyNaCl only calls it when nacl.bindings is imported; make it explicit.
nacl.bindings.sodium_init()


@dataclass(frozen=True)
class CipherSuite:
    name: str
    nonce_bytes: int
    tag_bytes: int
    encrypt: Callable[..., int]
    decrypt: Callable[..., int]


#: Preference order of the reference implementation. AEGIS-128L is the fastest here (in place:
#: ~16 GB/s vs ~10 for AEGIS-256, DESIGN.md §6); it uses the first 16 bytes of the 32-byte key.
CIPHERS: dict[str, CipherSuite] = {
    "aegis128l": CipherSuite("aegis128l", lib.crypto_aead_aegis128l_npubbytes(),
                             lib.crypto_aead_aegis128l_abytes(),
                             lib.crypto_aead_aegis128l_encrypt, lib.crypto_aead_aegis128l_decrypt),
    "aegis256": CipherSuite("aegis256", lib.crypto_aead_aegis256_npubbytes(),
                            lib.crypto_aead_aegis256_abytes(),
                            lib.crypto_aead_aegis256_encrypt, lib.crypto_aead_aegis256_decrypt),
    "xchacha20poly1305": CipherSuite(
        "xchacha20poly1305", lib.crypto_aead_xchacha20poly1305_ietf_npubbytes(),
        lib.crypto_aead_xchacha20poly1305_ietf_abytes(),
        lib.crypto_aead_xchacha20poly1305_ietf_encrypt,
        lib.crypto_aead_xchacha20poly1305_ietf_decrypt),
}

DOMAIN_CHUNK = 0x00
DOMAIN_CONTROL = 0x01
_NONCE = struct.Struct(">BQI")  # domain, message id or control seq, chunk index (0 for control)
_CHUNK_AD = struct.Struct(">4s16sQIB")  # magic, session id, message id, chunk index, final flag
_CONTROL_AD = struct.Struct(">4s16sQB")  # magic, session id, control seq, frame type
_MAGIC = b"LLT1"


class Sealer:
    """Encrypts with one directional key. Owns its key copy and wipes it on :meth:`wipe`."""

    def __init__(self, suite: CipherSuite, key: bytearray, session_id: bytes) -> None:
        self.suite = suite
        self._key = key
        self._kp = ffi.from_buffer(key)
        self.session_id = session_id
        self._clen = ffi.new("unsigned long long *")

    @property
    def tag_bytes(self) -> int:
        return self.suite.tag_bytes

    def _nonce(self, domain: int, counter: int, index: int) -> bytes:
        return _NONCE.pack(domain, counter, index).ljust(self.suite.nonce_bytes, b"\x00")

    def seal_chunk_into(self, message_id: int, index: int, final: bool,
                        plain: memoryview, out: memoryview) -> int:
        """Encrypt ``plain`` into ``out`` (needs ``len(plain)+tag_bytes``); returns bytes written."""
        ad = _CHUNK_AD.pack(_MAGIC, self.session_id, message_id, index, int(final))
        return self._seal(self._nonce(DOMAIN_CHUNK, message_id, index), ad, plain, out)

    def seal_control(self, seq: int, ftype: int, plain: bytes) -> bytes:
        out = bytearray(len(plain) + self.suite.tag_bytes)
        ad = _CONTROL_AD.pack(_MAGIC, self.session_id, seq, ftype)
        self._seal(self._nonce(DOMAIN_CONTROL, seq, 0), ad, memoryview(plain), memoryview(out))
        return bytes(out)

    def _seal(self, nonce: bytes, ad: bytes, plain: memoryview, out: memoryview) -> int:
        n = len(plain)
        if len(out) < n + self.suite.tag_bytes:
            raise ProtocolError(ErrorCode.LIMIT, "seal output buffer too small")
        if not any(self._key):
            raise ProtocolError(ErrorCode.STATE, "session keys wiped")
        # release cffi buffer exports before anything can raise: a traceback holding an exported
        # memoryview in a reference cycle crashes CPython's GC (seen under the fuzzer)
        with ffi.from_buffer(out, require_writable=True) as dst, ffi.from_buffer(plain) as src:
            rc = self.suite.encrypt(dst, self._clen, src, n, ad, len(ad), ffi.NULL, nonce, self._kp)
        if rc != 0:  # pragma: no cover
            raise ProtocolError(ErrorCode.STATE, "encryption failed")
        return n + self.suite.tag_bytes


class Opener:
    """Decrypts with one directional key, writing plaintext into caller memory."""

    def __init__(self, suite: CipherSuite, key: bytearray, session_id: bytes) -> None:
        self.suite = suite
        self._key = key
        self._kp = ffi.from_buffer(key)
        self.session_id = session_id
        self._mlen = ffi.new("unsigned long long *")

    @property
    def tag_bytes(self) -> int:
        return self.suite.tag_bytes

    def _nonce(self, domain: int, counter: int, index: int) -> bytes:
        return _NONCE.pack(domain, counter, index).ljust(self.suite.nonce_bytes, b"\x00")

    def open_chunk_into(self, message_id: int, index: int, final: bool,
                        sealed: bytes | bytearray | memoryview, out: memoryview) -> int:
        """Authenticate and decrypt one sealed chunk into ``out``; raises DECRYPT on any tamper."""
        ad = _CHUNK_AD.pack(_MAGIC, self.session_id, message_id, index, int(final))
        return self._open(self._nonce(DOMAIN_CHUNK, message_id, index), ad, sealed, out)

    def open_control(self, seq: int, ftype: int, sealed: bytes) -> bytes:
        n = len(sealed) - self.suite.tag_bytes
        if n < 0:
            raise ProtocolError(ErrorCode.DECRYPT, "sealed frame shorter than its tag")
        out = bytearray(n)
        ad = _CONTROL_AD.pack(_MAGIC, self.session_id, seq, ftype)
        self._open(self._nonce(DOMAIN_CONTROL, seq, 0), ad, sealed, memoryview(out))
        return bytes(out)

    def _open(self, nonce: bytes, ad: bytes, sealed: bytes | bytearray | memoryview,
              out: memoryview) -> int:
        n = len(sealed) - self.suite.tag_bytes
        if n < 0 or len(out) != n:
            raise ProtocolError(ErrorCode.DECRYPT, "sealed length does not match its slot")
        if not any(self._key):
            raise ProtocolError(ErrorCode.STATE, "session keys wiped")
        with (ffi.from_buffer(out, require_writable=True) if n else ffi.new("unsigned char[1]")) as dst, \
                ffi.from_buffer(sealed) as src:
            rc = self.suite.decrypt(dst, self._mlen, ffi.NULL, src, len(sealed), ad, len(ad),
                                    nonce, self._kp)
        if rc != 0:
            raise ProtocolError(ErrorCode.DECRYPT, "authentication failed")
        return n
