"""Identity persistence and refusal of unsafe or corrupt key files."""

import os

import pytest

from meshnode.identity import IdentityError, load_or_create_identity, peer_id_of


def test_created_0600_and_stable(tmp_path):
    p = tmp_path / "sub" / "identity.key"
    a = load_or_create_identity(p)
    assert (os.stat(p).st_mode & 0o777) == 0o600
    assert peer_id_of(load_or_create_identity(p)) == peer_id_of(a)


def test_wrong_permissions_refused(tmp_path):
    p = tmp_path / "identity.key"
    load_or_create_identity(p)
    os.chmod(p, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(p)


def test_corrupt_key_refused(tmp_path):
    p = tmp_path / "identity.key"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\x08\x01garbage")
    os.close(fd)
    with pytest.raises(IdentityError, match="corrupt"):
        load_or_create_identity(p)
