"""Ed25519 signatures over CRDT updates with the author's libp2p identity key.

The signed bytes bind the document, the author, the writer incarnation and the sequence number to
the update, so a record cannot be replayed into another document or another slot. Verification
also checks that the public key hashes to the claimed peer ID, so a record names its author
truthfully or fails.
"""

from __future__ import annotations

import msgpack
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from crdt_state.wire import SignedUpdate

DOMAIN = "latentlink/crdt/update/1"


class BadSignature(Exception):
    """The record is unsigned, mis-signed, or its key does not match its author."""


def signed_bytes(doc_id: str, author: bytes, writer: bytes, seq: int, update: bytes) -> bytes:
    return msgpack.packb([DOMAIN, doc_id, author, writer, seq, update], use_bin_type=True)


class Signer:
    """Signs local updates as this node's libp2p identity."""

    def __init__(self, key_pair: KeyPair) -> None:
        self._key = key_pair.private_key
        self.pubkey = key_pair.public_key.serialize()
        self.peer_id = ID.from_pubkey(key_pair.public_key)
        self.author = self.peer_id.to_bytes()

    def sign(self, doc_id: str, writer: bytes, seq: int, update: bytes) -> SignedUpdate:
        sig = self._key.sign(signed_bytes(doc_id, self.author, writer, seq, update))
        return SignedUpdate(doc_id, self.author, writer, seq, update, self.pubkey, sig)


class Verifier:
    """Checks signatures; caches decoded public keys because peers reuse theirs for every record."""

    def __init__(self) -> None:
        self._keys: dict[bytes, tuple[PublicKey, bytes, str]] = {}

    def _key(self, pubkey: bytes) -> tuple[PublicKey, bytes, str]:
        hit = self._keys.get(pubkey)
        if hit is None:
            try:
                key = deserialize_public_key(pubkey)
                pid = ID.from_pubkey(key)
            except Exception as exc:  # protobuf/key-type errors: the key is simply unusable
                raise BadSignature(f"undecodable public key ({type(exc).__name__})") from None
            hit = (key, pid.to_bytes(), pid.to_base58())
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[pubkey] = hit
        return hit

    def verify(self, rec: SignedUpdate) -> str:
        """Return the author's base58 peer ID, or raise :class:`BadSignature`."""
        if not rec.sig or not rec.pubkey:
            raise BadSignature("unsigned update")
        key, author, b58 = self._key(rec.pubkey)
        if author != rec.author:
            raise BadSignature("public key does not hash to the claimed author")
        try:
            ok = key.verify(signed_bytes(rec.doc_id, rec.author, rec.writer, rec.seq, rec.update),
                            rec.sig)
        except Exception:
            ok = False
        if not ok:
            raise BadSignature("signature does not verify")
        return b58
