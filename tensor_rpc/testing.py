"""In-memory session pairs for tests, fuzzers and benchmarks (no network, no clock).

Kept in the package (not in tests/) because the node's own tests and ``scripts/bench_protocol.py``
wire sessions together the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from discovery.signature import ModelSignature

from .events import Event
from .framing import HEADER, HEADER_BYTES
from .limits import Limits
from .session import Role, Session


def sample_signature(**changes: Any) -> ModelSignature:
    """A small but complete signature; ``changes`` override fields (to provoke mismatches)."""
    sig = ModelSignature(
        family="llama", architecture="LlamaForCausalLM", weights_digest="ab" * 32,
        num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        rope={"type": "default", "theta": 10000.0}, norm={"type": "rms", "eps": 1e-5},
        vocab_size=128, special_tokens={"bos": 1, "eos": 2},
        cache_layout={"sliding_window": 0, "layer_types": ["full"] * 4},
        max_positions=2048, dtypes=("float32", "bfloat16"))
    return replace(sig, **changes)


def split_frames(data: bytes) -> list[bytes]:
    """Split a byte stream into whole frames (for tests that tamper with one frame)."""
    out, off = [], 0
    while off + HEADER_BYTES <= len(data):
        _, n = HEADER.unpack_from(data, off)
        out.append(data[off:off + HEADER_BYTES + n])
        off += HEADER_BYTES + n
    if off != len(data):
        out.append(data[off:])
    return out


Mutator = Callable[[str, int, bytes], bytes | None]


@dataclass
class Pair:
    """Initiator ``a`` and responder ``b`` joined by an in-memory wire with an optional mutator.

    ``mutate(direction, frame_number, frame)`` may return replacement bytes (or None to drop);
    ``direction`` is ``"a>b"`` or ``"b>a"``, frames are numbered per direction from 0.
    """

    a: Session
    b: Session
    key_a: Any
    key_b: Any
    mutate: Mutator | None = None
    events_a: list[Event] = field(default_factory=list)
    events_b: list[Event] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=lambda: {"a>b": 0, "b>a": 0})

    def _wire(self, direction: str, data: bytes) -> bytes:
        if self.mutate is None or not data:
            return data
        out = []
        for frame in split_frames(data):
            n = self.sent[direction]
            self.sent[direction] += 1
            new = self.mutate(direction, n, frame)
            if new is not None:
                out.append(new)
        return b"".join(out)

    def pump(self, now: float = 0.0, rounds: int = 10_000) -> None:
        """Move bytes both ways until both sides are quiet."""
        for _ in range(rounds):
            da, db = self.a.data_to_send(), self.b.data_to_send()
            if not da and not db:
                return
            if da:
                self.events_b += self.b.receive_data(self._wire("a>b", da), now)
            if db:
                self.events_a += self.a.receive_data(self._wire("b>a", db), now)


def make_pair(limits_a: Limits | None = None, limits_b: Limits | None = None,
              sig_a: ModelSignature | None = None, sig_b: ModelSignature | None = None,
              *, mutate: Mutator | None = None, handshake: bool = True, now: float = 0.0,
              bind_a: Any = None, bind_b: Any = None, keys: tuple[Any, Any] | None = None,
              **session_kw: Any) -> Pair:
    """Two sessions with fresh (or given) identities. ``bind_*`` overrides the expected peer IDs."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    ka, kb = keys or (create_new_key_pair(), create_new_key_pair())
    a = Session(Role.INITIATOR, limits_a or Limits(), sig_a or sample_signature(), ka,
                bind_a or ID.from_pubkey(kb.public_key), **session_kw)
    b = Session(Role.RESPONDER, limits_b or Limits(), sig_b or sample_signature(), kb,
                bind_b or ID.from_pubkey(ka.public_key), **session_kw)
    pair = Pair(a, b, ka, kb, mutate)
    if handshake:
        pair.events_a += a.start(now)
        pair.events_b += b.start(now)
        pair.pump(now)
    return pair
