"""Bounds and access-control settings of one tensor session, as one frozen value.

Field names are identical to the node config keys (``[protocol]``, ``[limits]`` and
``[transport].recv_window_bytes`` in ``meshnode/config.py``) so the mapping is mechanical and an
operator reading either place sees the same words (invariant E: nothing baked in).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, ProtocolError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Hard protocol bounds, independent of configuration (a peer cannot negotiate outside them).
MIN_CHUNK_BYTES = 4 * KiB
MAX_CHUNK_BYTES = 256 * MiB
MAX_HANDSHAKE_FRAME = 64 * KiB


@dataclass(frozen=True)
class Limits:
    """Everything a session needs to bound memory, time and abuse. Defaults match the config."""

    # [protocol]
    max_message_bytes: int = 2 * GiB
    max_metadata_bytes: int = 1 * MiB
    max_tensors_per_message: int = 4096
    chunk_bytes: int = 4 * MiB
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    ciphers: tuple[str, ...] = ("aegis128l", "aegis256", "xchacha20poly1305")
    residual_gain_max: float = 4.0
    # [limits]
    allowlist: tuple[str, ...] = ()
    denylist: tuple[str, ...] = ()
    shared_token: str = ""
    messages_per_s: float = 200.0
    bytes_per_s: float = float(4 * GiB)
    max_sessions_per_peer: int = 8
    max_sessions: int = 256
    max_unaccepted_sessions: int = 16
    inflight_bytes: int = 4 * GiB
    inflight_bytes_per_peer: int = 2 * GiB
    messages_in_flight: int = 8  # incomplete incoming messages per session
    # [transport]
    recv_window_bytes: int = 64 * MiB
    transfer_timeout_s: float = 120.0  # a sent message without ACK/REJECT by then is reported failed
    progress_timeout_s: float = 30.0  # an incoming message with no chunk/DIGEST for this long: rejected
    # not (yet) a config key: BLAKE3 threads per large tensor, 1 = single, 0 = blake3 AUTO
    hash_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("ciphers", "allowlist", "denylist"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ProtocolError(ErrorCode.LIMIT, f"chunk_bytes {self.chunk_bytes} out of range")
        if self.max_message_bytes < 1 or self.max_metadata_bytes < 256:
            raise ProtocolError(ErrorCode.LIMIT, "message/metadata limits too small")
        if self.max_tensors_per_message < 1 or self.recv_window_bytes < 1:
            raise ProtocolError(ErrorCode.LIMIT, "tensor count / window must be positive")

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """Build from a ``meshnode.config.Config`` (duck-typed: ``.protocol``, ``.limits``, ``.transport``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for section in ("protocol", "limits", "transport"):
            sec = getattr(config, section, None)
            if sec is None:
                continue
            for f in dataclasses.fields(sec):
                if f.name in names:
                    kw[f.name] = getattr(sec, f.name)
        return cls(**kw)
