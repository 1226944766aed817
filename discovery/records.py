"""Signed model-advertisement records stored in the DHT under ``/latentlink/<peer id>``.

A provider record only says "peer P claims key K"; anyone can claim anything. The signature record
is what a lookup trusts: it lists the compat keys (and full signatures) P serves, P's addresses, a
sequence number and an expiry, and it is signed by P's libp2p identity key. The validator below runs
on every node that stores or returns the record (py-libp2p validates inbound PUT_VALUE), so a forged,
stale, oversized or malformed record is refused everywhere, not only by the final reader.

A record also lists the *roles* its node serves (short tokens such as ``apply``: "injects received
model state into its runtime"). Discovery treats them as opaque labels; this module only bounds
them. Records signed before roles existed (a 5-field body) parse as serving no roles.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from libp2p.bitswap.cid import cid_to_text, compute_cid_v1_obj
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from discovery.signature import ModelSignature, SignatureError
from discovery.streamio import FrameError, pack, unpack_bounded

NAMESPACE = "latentlink"
RECORD_DOMAIN = b"latentlink/record/v1\x00"
MAX_MODELS_PER_RECORD = 64
MAX_ADDRS_PER_RECORD = 64
MAX_ROLES = 8
MAX_ROLE_CHARS = 32
MAX_RECORD_STR = 4096  # longest string (peer id, address, role) a record body may hold
_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)


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
    roles: tuple[str, ...] = ()
    compat_keys: frozenset[str] = field(default=frozenset(), compare=False)

    def serves(self, compat_key: str) -> bool:
        return compat_key in self.compat_keys


def check_roles(roles: object) -> tuple[str, ...]:
    """The roles of a record, or :class:`RecordError`: a list of at most ``MAX_ROLES`` distinct
    ASCII tokens (letters, digits, ``._-``, starting with a letter or digit) of at most
    ``MAX_ROLE_CHARS`` characters. Which roles exist is not this module's business."""
    if not isinstance(roles, (list, tuple)):
        raise RecordError("record roles must be a list")
    if len(roles) > MAX_ROLES:
        raise RecordError(f"record lists {len(roles)} roles, more than {MAX_ROLES}")
    for r in roles:
        if not (isinstance(r, str) and len(r) <= MAX_ROLE_CHARS and _ROLE.fullmatch(r)):
            raise RecordError(f"bad role {str(r)[:40]!r}: want an ASCII token of at most "
                              f"{MAX_ROLE_CHARS} characters")
    if len(set(roles)) != len(roles):
        raise RecordError("record lists a role twice")
    return tuple(roles)


def normalize_roles(roles: Sequence[str]) -> tuple[str, ...]:
    """Sorted, deduplicated and checked (a caller's bad role raises :class:`RecordError`)."""
    if isinstance(roles, str):  # a lone string would silently become a list of letters
        raise RecordError("roles must be a sequence of strings, not a string")
    return check_roles(sorted(set(roles)))


def make_record(key_pair: KeyPair, models: list[ModelSignature], addrs: list[str], seq: int,
                ttl_s: float, now: float | None = None, roles: Sequence[str] = ()) -> bytes:
    """Encode and sign a record; an empty ``models`` list is a tombstone (withdrawal)."""
    now = time.time() if now is None else now
    pid = str(ID.from_pubkey(key_pair.public_key))
    body = pack([pid, [m.encode() for m in models], list(addrs), seq, now + ttl_s,
                 list(normalize_roles(roles))])
    sig = key_pair.private_key.sign(RECORD_DOMAIN + body)
    return pack([body, key_pair.public_key.serialize(), sig])


def parse_record(value: bytes, max_bytes: int, now: float | None = None, key: str | None = None) -> ModelRecord:
    """Decode and verify; raises :class:`RecordError` on anything wrong."""
    if len(value) > max_bytes:
        raise RecordError(f"record of {len(value)} bytes exceeds {max_bytes}")
    try:
        outer = unpack_bounded(value, max_items=3, max_str=0, max_bin=max_bytes, max_map=0)
        if not (isinstance(outer, list) and len(outer) == 3 and isinstance(outer[0], bytes)):
            raise RecordError("malformed record: want [body, public key, signature]")
        body, pub_bytes, sig = outer
        fields = unpack_bounded(body, max_items=max(MAX_MODELS_PER_RECORD, MAX_ADDRS_PER_RECORD),
                                max_str=MAX_RECORD_STR, max_bin=max_bytes, max_map=0)
    except FrameError as exc:
        raise RecordError(f"malformed record: {exc}") from None
    # 5 fields: a record signed before roles existed; 6: with roles.
    if not (isinstance(fields, list) and len(fields) in (5, 6)):
        raise RecordError("malformed record: body must be a list of 5 or 6 fields")
    pid, models_raw, addrs, seq, expires_at = fields[:5]
    if not (isinstance(pid, str) and isinstance(models_raw, list) and isinstance(addrs, list)
            and isinstance(seq, int) and not isinstance(seq, bool)
            and isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool)
            and isinstance(pub_bytes, bytes) and isinstance(sig, bytes)):
        raise RecordError("record fields have wrong types")
    if len(models_raw) > MAX_MODELS_PER_RECORD or len(addrs) > MAX_ADDRS_PER_RECORD:
        raise RecordError("record lists too many models or addresses")
    if not all(isinstance(a, str) for a in addrs):
        raise RecordError("record addresses must be strings")
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
    roles = check_roles(fields[5]) if len(fields) == 6 else ()
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
                       roles=roles, compat_keys=frozenset(m.compat_key for m in models))


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
