"""Persistent Ed25519 node identity.

The peer ID is derived from this key, so it must survive restarts and must never be readable by
other users: the file is created with mode 0600 (atomically, never briefly world-readable) and a
file with looser permissions or undecodable content is refused rather than silently replaced —
replacing it would change the node's identity behind the operator's back.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

KEY_FILE_MODE = 0o600


class IdentityError(RuntimeError):
    """The identity file exists but cannot be used."""


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the key at ``path``, creating it (0600) on first run."""
    path = Path(path)
    if path.exists():
        return _load(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pair = create_new_key_pair()
    blob = key_pair.private_key.serialize()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return key_pair


def _load(path: Path) -> KeyPair:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise IdentityError(
            f"identity key {path} has permissions {stat.S_IMODE(st.st_mode):04o}; "
            f"it must be readable by its owner only (chmod 600 {path})"
        )
    data = path.read_bytes()
    try:
        private = deserialize_private_key(data)
    except Exception as exc:
        raise IdentityError(f"identity key {path} is corrupt or not a libp2p private key: {exc}") from None
    if private.get_type() != KeyType.Ed25519:
        raise IdentityError(f"identity key {path} is {private.get_type().name}, expected Ed25519")
    return KeyPair(private, private.get_public_key())


def peer_id_of(key_pair: KeyPair) -> ID:
    return ID.from_pubkey(key_pair.public_key)
