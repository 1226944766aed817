"""Path selection: shm > bulk > stream, overridable globally (``transport.path``) and per peer
(``transport.peer_paths = ["<peer id>=<path>"]``). A forced path is tried first; on failure the
transfer falls back to the next slower path (the stream always works)."""

from __future__ import annotations

from collections.abc import Iterable

PATHS = ("shm", "bulk", "stream")


def parse_peer_paths(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        peer, sep, path = item.partition("=")
        path = path.strip()
        if not sep or path not in PATHS + ("auto",):
            raise ValueError(f"transport.peer_paths entry {item!r}: expected '<peer id>=auto|shm|bulk|stream'")
        out[peer.strip()] = path
    return out


def path_order(peer: str, default: str, per_peer: dict[str, str], override: str | None = None,
               shm_enabled: bool = True) -> list[str]:
    """Paths to try, in order, for one transfer to ``peer``."""
    want = override or per_peer.get(peer) or default
    order = list(PATHS) if want == "auto" else list(PATHS[PATHS.index(want):])
    if not shm_enabled:  # an operator's "no shared memory" wins over a forced path
        order = [p for p in order if p != "shm"] or ["bulk", "stream"]
    return order
