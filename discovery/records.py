"""Signed model-advertisement records stored in the DHT under ``/latentlink/<peer id>``.

A provider record only says "peer P claims key K"; anyone can claim anything. The signature record
is what a lookup trusts: it lists the compat keys (and full signatures) P serves, P's addresses, a
sequence number and an expiry, and it is signed by P's libp2p identity key. The validator below runs
on every node that stores or returns the record (py-libp2p validates inbound PUT_VALUE), so a forged,
stale, oversized or malformed record is refused everywhere, not only by the final reader.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import msgpack
from libp2p.bitswap.cid import cid_to_text, compute_cid_v1_obj
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from discovery.signature import ModelSignature, SignatureError

NAMESPACE = "latentlink"
RECORD_DOMAIN = b"latentlink/record/v1\x00"
MAX_MODELS_PER_RECORD = 64


class RecordError(ValueError):
    """A discovery record is malformed, mis-signed, expired or oversized."""


def record_key(peer_id: ID | str) -> str:
    return f"/{NAMESPACE}/{peer_id}"


def provider_key(compat_key: str) -> str:
    """Provider-record key: a CIDv1 text whose multihash is sha2-256 of our namespaced key.

    py-libp2p 0.8.1 servers ignore FIND_NODE requests whose key is not a valid PeerId, so a plain
    text key is never routed past the first hop. A CID decodes to a sha2-256 multihash — the same
    shape as a PeerId — and is routed like one (and interoperates with go/js provider records).
    """
    return cid_to_text(compute_cid_v1_obj(f"/{NAMESPACE}/model/{compat_key}".encode()))


def provider_key_bytes(compat_key: str) -> bytes:
    """The multihash bytes the DHT stores provider records under for ``provider_key``."""
    return b"\x12\x20" + hashlib.sha256(f"/{NAMESPACE}/model/{compat_key}".encode()).digest()


@dataclass(frozen=True)
class ModelRecord:
    peer_id: str
    models: tuple[ModelSignature, ...]
    addrs: tuple[str, ...]
    seq: int
    expires_at: float
    public_key: bytes = b""
    signature: bytes = b""
    compat_keys: frozenset[str] = field(default=frozenset(), compare=False)

    def serves(self, compat_key: str) -> bool:
        return compat_key in self.compat_keys


def _body(peer_id: str, models: list[bytes], addrs: list[str], seq: int, expires_at: float) -> bytes:
    return msgpack.packb([peer_id, models, addrs, seq, expires_at], use_bin_type=True)


def make_record(key_pair: KeyPair, models: list[ModelSignature], addrs: list[str], seq: int,
                ttl_s: float, now: float | None = None) -> bytes:
    """Encode and sign a record; an empty ``models`` list is a tombstone (withdrawal)."""
    now = time.time() if now is None else now
    pid = str(ID.from_pubkey(key_pair.public_key))
    body = _body(pid, [m.encode() for m in models], list(addrs), seq, now + ttl_s)
    sig = key_pair.private_key.sign(RECORD_DOMAIN + body)
    return msgpack.packb([body, key_pair.public_key.serialize(), sig], use_bin_type=True)


def parse_record(value: bytes, max_bytes: int, now: float | None = None, key: str | None = None) -> ModelRecord:
    """Decode and verify; raises :class:`RecordError` on anything wrong."""
    if len(value) > max_bytes:
        raise RecordError(f"record of {len(value)} bytes exceeds {max_bytes}")
    try:
        outer = msgpack.unpackb(value, raw=False, max_bin_len=max_bytes, max_str_len=0,
                                max_array_len=3, max_map_len=0, max_ext_len=0)
        body, pub_bytes, sig = outer
        fields = msgpack.unpackb(body, raw=False, max_bin_len=max_bytes, max_str_len=4096,
                                 max_array_len=max(MAX_MODELS_PER_RECORD, 16), max_map_len=0, max_ext_len=0)
        pid, models_raw, addrs, seq, expires_at = fields
    except Exception as exc:
        raise RecordError(f"malformed record: {exc}") from None
    if not (isinstance(pid, str) and isinstance(models_raw, list) and isinstance(addrs, list)
            and isinstance(seq, int) and isinstance(expires_at, (int, float))
            and isinstance(pub_bytes, bytes) and isinstance(sig, bytes)):
        raise RecordError("record fields have wrong types")
    if len(models_raw) > MAX_MODELS_PER_RECORD or not all(isinstance(a, str) for a in addrs):
        raise RecordError("record lists too many models or bad addresses")
    try:
        pub = deserialize_public_key(pub_bytes)
    except Exception:
        raise RecordError("record public key is not a libp2p key") from None
    if str(ID.from_pubkey(pub)) != pid:
        raise RecordError("record public key does not match its peer id")
    if key is not None and key != record_key(pid):
        raise RecordError(f"record for {pid} stored under foreign key {key}")
    try:
        ok = pub.verify(RECORD_DOMAIN + body, sig)
    except Exception:
        ok = False
    if not ok:
        raise RecordError("record signature does not verify")
    now = time.time() if now is None else now
    if expires_at < now:
        raise RecordError("record expired")
    try:
        models = tuple(ModelSignature.decode(m) for m in models_raw if isinstance(m, bytes))
    except SignatureError as exc:
        raise RecordError(f"record holds a malformed signature: {exc}") from None
    if len(models) != len(models_raw):
        raise RecordError("record models must be bytes")
    return ModelRecord(pid, models, tuple(addrs), seq, float(expires_at), pub_bytes, sig,
                       frozenset(m.compat_key for m in models))


class RecordValidator(Validator):
    """DHT validator for the ``latentlink`` namespace (runs on every storing node)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def validate(self, key: str, value: bytes) -> None:
        parse_record(value, self.max_bytes, key=key)

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, v in enumerate(values):
            try:
                seq = parse_record(v, self.max_bytes, key=key).seq
            except RecordError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best
