"""Bind the handshake transcript (and so the ephemeral X25519 keys) to libp2p identities.

A relay or anyone in the middle could swap ephemeral keys; they cannot produce a signature by the
peer's libp2p identity key over the transcript, and that key must hash to the peer ID the
connection authenticated. Signing is abstract: any object with ``sign(bytes) -> bytes`` and
``get_public_key()`` (a libp2p ``PrivateKey``) or a ``KeyPair`` works.
"""

from __future__ import annotations

from typing import Any, Protocol

import blake3

from .errors import ErrorCode, ProtocolError

_AUTH_LABEL = b"latentlink/tensor-rpc/auth/v1\x00"
_TRANSCRIPT_LABEL = b"latentlink/tensor-rpc/transcript/v1\x00"
_TOKEN_LABEL = b"latentlink/tensor-rpc/token/v1\x00"


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...
    def get_public_key(self) -> Any: ...


def as_signer(identity: Any) -> Signer:
    """Accept a libp2p ``KeyPair`` or a private key."""
    return identity.private_key if hasattr(identity, "private_key") else identity


def transcript_hash(initiator_hello: bytes, responder_hello: bytes) -> bytes:
    """32-byte hash of both hello bodies exactly as sent (length-prefixed, order fixed)."""
    h = blake3.blake3(_TRANSCRIPT_LABEL)
    for part in (initiator_hello, responder_hello):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def auth_payload(role: bytes, transcript: bytes) -> bytes:
    return _AUTH_LABEL + role + transcript


def sign_transcript(identity: Any, role: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(serialized public key, signature) proving this side holds its identity key."""
    signer = as_signer(identity)
    return signer.get_public_key().serialize(), signer.sign(auth_payload(role, transcript))


def verify_transcript(public_key_bytes: bytes, signature: bytes, role: bytes, transcript: bytes,
                      remote_peer_id: Any) -> None:
    """Check the signature and that the key is the one ``remote_peer_id`` was derived from."""
    try:
        from libp2p.crypto.serialization import deserialize_public_key
        from libp2p.peer.id import ID

        key = deserialize_public_key(bytes(public_key_bytes))
        peer_id = ID.from_pubkey(key)
        ok_sig = key.verify(auth_payload(role, transcript), bytes(signature))
        expected = remote_peer_id if isinstance(remote_peer_id, ID) else ID.from_base58(
            str(remote_peer_id))
    except Exception as exc:  # libp2p raises assorted types for undecodable keys
        raise ProtocolError(ErrorCode.AUTH, f"bad identity key: {type(exc).__name__}") from None
    if peer_id != expected:
        raise ProtocolError(ErrorCode.AUTH, "identity key is not bound to the authenticated peer ID")
    if not ok_sig:
        raise ProtocolError(ErrorCode.AUTH, "transcript signature invalid")


def token_proof(token: str, role: bytes, transcript: bytes) -> bytes:
    """Keyed BLAKE3 MAC proving knowledge of the shared token without revealing it."""
    key = blake3.blake3(_TOKEN_LABEL + token.encode()).digest()
    return blake3.blake3(role + transcript, key=key).digest()
