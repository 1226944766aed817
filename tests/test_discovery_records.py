"""Signed model records: the roles field (bounded, signed, optional for older records)."""

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from discovery.records import (
    MAX_ROLE_CHARS,
    MAX_ROLES,
    RECORD_DOMAIN,
    RecordError,
    make_record,
    normalize_roles,
    parse_record,
    record_key,
)
from discovery.streamio import pack, unpack_bounded
from tests.helpers.sigs import fake_signature

MAX = 16 * 1024


def _signed(kp, fields: list) -> bytes:
    """A record with a hand-made body, correctly signed: only the parser's field checks stand
    between it and acceptance."""
    body = pack(fields)
    return pack([body, kp.public_key.serialize(), kp.private_key.sign(RECORD_DOMAIN + body)])


def _fields(kp, *extra) -> list:
    pid = str(ID.from_pubkey(kp.public_key))
    return [pid, [fake_signature(0).encode()], ["/ip4/127.0.0.1/tcp/1"], 7, 4e9, *extra]


def test_roles_round_trip_sorted_and_signed():
    kp = create_new_key_pair()
    rec = parse_record(make_record(kp, [fake_signature(0)], [], seq=1, ttl_s=60,
                                   roles=["relay", "apply", "apply"]), MAX)
    assert rec.roles == ("apply", "relay")
    assert rec.serves(fake_signature(0).compat_key)
    # The roles are inside the signed body: changing them breaks the signature.
    raw = make_record(kp, [fake_signature(0)], [], seq=1, ttl_s=60, roles=["apply"])
    body, pub, sig = unpack_bounded(raw)
    fields = unpack_bounded(body)
    fields[5] = ["apply", "admin"]
    with pytest.raises(RecordError, match="signature"):
        parse_record(pack([pack(fields), pub, sig]), MAX)


def test_record_without_roles_field_parses_as_no_roles():
    kp = create_new_key_pair()
    rec = parse_record(_signed(kp, _fields(kp)), MAX, key=record_key(ID.from_pubkey(kp.public_key)))
    assert rec.roles == ()
    assert rec.seq == 7


@pytest.mark.parametrize("roles, match", [
    (["r"] * 2, "twice"),
    ([f"r{i}" for i in range(MAX_ROLES + 1)], "roles, more than"),
    (["x" * (MAX_ROLE_CHARS + 1)], "bad role"),
    (["äpply"], "bad role"),
    (["ap ply"], "bad role"),
    (["-apply"], "bad role"),
    ([""], "bad role"),
    ([7], "bad role"),
    ("apply", "must be a list"),
    ({"apply": 1}, "malformed"),  # maps are refused by the decoder itself
])
def test_parser_refuses_bad_roles(roles, match):
    kp = create_new_key_pair()
    with pytest.raises(RecordError, match=match):
        parse_record(_signed(kp, _fields(kp, roles)), MAX)


def test_parser_accepts_the_largest_roles():
    kp = create_new_key_pair()
    roles = [f"{i}" + "x" * (MAX_ROLE_CHARS - 1) for i in range(MAX_ROLES)]
    assert parse_record(_signed(kp, _fields(kp, roles)), MAX).roles == tuple(roles)


def test_parser_refuses_extra_fields_and_a_caller_bad_roles():
    kp = create_new_key_pair()
    with pytest.raises(RecordError, match="5 or 6 fields"):
        parse_record(_signed(kp, _fields(kp, [], "extra")), MAX)
    with pytest.raises(RecordError, match="bad role"):
        make_record(kp, [], [], seq=1, ttl_s=60, roles=["bad role"])
    with pytest.raises(RecordError, match="not a string"):
        normalize_roles("apply")
