"""Path selection: shm > bulk > stream, overridable globally (``transport.path``) and per peer
(``transport.peer_paths = ["<peer id>=<path>"]``). A forced path is tried first; on failure the
transfer falls back to the next slower path (the stream always works). Under ``auto``, a payload of
at most ``inline_max_bytes`` goes on the stream: a lane costs about a millisecond more per message
(thread hop, lane notifications) than the few microseconds it saves moving a small payload."""

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
               shm_enabled: bool = True, nbytes: int | None = None,
               inline_max_bytes: int = 0) -> list[str]:
    """Paths to try, in order, for one transfer of ``nbytes`` to ``peer``."""
    want = override or per_peer.get(peer) or default
    if want == "auto" and nbytes is not None and nbytes <= inline_max_bytes:
        return ["stream"]
    order = list(PATHS) if want == "auto" else list(PATHS[PATHS.index(want):])
    if not shm_enabled:  # an operator's "no shared memory" wins over a forced path
        order = [p for p in order if p != "shm"] or ["bulk", "stream"]
    return order
