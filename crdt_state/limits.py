"""Size and timing limits for CRDT replication, lifted from the ``[crdt]`` config section.

Kept as its own small dataclass so the sans-I/O core never imports the node's config module
(dependencies point one way: meshnode -> crdt_state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KiB = 1024
MiB = 1024 * KiB

# Room in a frame for the envelope around the largest update: ids, public key, signature.
FRAME_OVERHEAD = 4 * KiB


@dataclass(frozen=True)
class CrdtLimits:
    max_update_bytes: int = 1 * MiB          # config: crdt.max_update_bytes
    max_document_bytes: int = 64 * MiB       # config: crdt.max_document_bytes
    anti_entropy_interval_s: float = 5.0     # config: crdt.anti_entropy_interval_s
    fsync: str = "batch"                     # config: crdt.fsync (always|batch|never)
    max_writers_per_doc: int = 4096          # bounds version vectors and requests
    max_records_per_frame: int = 4096
    request_timeout_s: float = 10.0          # a pull not answered by then is asked again
    # -- what one peer can make us hold or spend ("every peer is a suspect") --
    max_links_per_peer: int = 2              # config: crdt.max_links_per_peer (ours + theirs)
    max_links: int = 256                     # config: crdt.max_links
    max_documents_per_peer: int = 64         # config: crdt.max_documents_per_peer
    updates_per_peer_per_s: float = 500.0    # config: crdt.updates_per_peer_per_s
    # Ranges remembered as requested (only to avoid pulling one range from two peers at once):
    # past this the oldest are forgotten, which costs a duplicate pull, never correctness.
    max_inflight: int = 16384
    max_declined: int = 65536                # invitations remembered as refused (oldest forgotten)

    @property
    def max_frame_bytes(self) -> int:
        """Largest wire frame: one maximal update plus its envelope, or a batch of small ones."""
        return max(self.max_update_bytes + FRAME_OVERHEAD, 256 * KiB)

    @property
    def update_burst(self) -> float:
        """Records a peer may send at once: one second's worth, at least one."""
        return max(1.0, self.updates_per_peer_per_s)

    @classmethod
    def from_config(cls, section: Any, **overrides: Any) -> CrdtLimits:
        """Build from ``meshnode.config.CrdtSection`` (duck-typed: any object with the fields)."""
        kw = {
            "max_update_bytes": int(section.max_update_bytes),
            "max_document_bytes": int(section.max_document_bytes),
            "anti_entropy_interval_s": float(section.anti_entropy_interval_s),
            "fsync": str(section.fsync),
            "max_links_per_peer": int(section.max_links_per_peer),
            "max_links": int(section.max_links),
            "max_documents_per_peer": int(section.max_documents_per_peer),
            "updates_per_peer_per_s": float(section.updates_per_peer_per_s),
        }
        kw.update(overrides)
        return cls(**kw)
