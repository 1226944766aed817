"""DCUtR wire messages (libp2p/specs ``relay/DCUtR.md``), declared with :mod:`meshnode.nat.pbschema`.

One message type, ``HolePunch {type, ObsAddrs}``, proto2 like the spec, varint-length-prefixed and
read bounded to 4 KiB (the spec's SHOULD). Peer addresses are parsed here, bounded to
``MAX_ADDRS``, and anything that is not a plain ``/ip4|ip6/<ip>/tcp/<port>`` is dropped: a punch
dials TCP addresses only (py-libp2p 0.8.1 cannot punch QUIC, DESIGN.md §11).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import multiaddr

from meshnode.nat.pbschema import F, WireError, build, encode, scalar
from meshnode.nat.pbschema import read as _read

PROTOCOL = "/libp2p/dcutr"
MAX_MESSAGE_BYTES = 4096
MAX_ADDRS = 16
CONNECT, SYNC = 100, 300
TYPE_NAMES = {CONNECT: "CONNECT", SYNC: "SYNC"}

HolePunch = build("latentlink.holepunch", {
    "HolePunch": [scalar("type", 1, F.TYPE_INT32), scalar("ObsAddrs", 2, F.TYPE_BYTES, repeated=True)],
}, syntax="proto2")["HolePunch"]


def message(kind: int, addrs: list[multiaddr.Multiaddr] = ()) -> bytes:
    """One encoded, length-prefixed ``HolePunch``."""
    m = HolePunch()
    m.type = kind
    m.ObsAddrs.extend(a.to_bytes() for a in list(addrs)[:MAX_ADDRS])
    return encode(m)


def tcp_endpoint(addr: multiaddr.Multiaddr) -> tuple[str, int] | None:
    """``(ip, port)`` of exactly ``/ip4|ip6/<ip>/tcp/<port>`` (a trailing ``/p2p`` allowed)."""
    names = [p.name for p in addr.protocols()]
    if names[-1:] == ["p2p"]:
        names = names[:-1]
    if len(names) != 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        return None
    ip, port = addr.value_for_protocol(names[0]), int(addr.value_for_protocol("tcp"))
    if not 0 < port < 65536 or ipaddress.ip_address(ip).is_unspecified:
        return None
    return ip, port


def decode_addrs(raw: Any, allow_private: bool) -> list[tuple[str, int]]:
    """The TCP endpoints a peer named, deduplicated, in its order; private and loopback IPs only
    with ``allow_private`` (labs); unparsable entries are skipped, never fatal."""
    out: list[tuple[str, int]] = []
    for item in list(raw)[:MAX_ADDRS]:
        try:
            ep = tcp_endpoint(multiaddr.Multiaddr(bytes(item)))
        except Exception:  # multiaddr raises several types for bad bytes: skip the entry
            continue
        if ep is None or ep in out:
            continue
        if not allow_private and not ipaddress.ip_address(ep[0]).is_global:
            continue
        out.append(ep)
    return out


async def read(stream: Any, expect: int) -> Any:
    """The next ``HolePunch``; it must be of type ``expect``."""
    msg = await _read(stream, HolePunch, MAX_MESSAGE_BYTES)
    if not msg.HasField("type") or msg.type != expect:
        got = TYPE_NAMES.get(msg.type, str(msg.type)) if msg.HasField("type") else "no type"
        raise WireError(f"expected {TYPE_NAMES[expect]}, got {got}")
    return msg


__all__ = ["CONNECT", "PROTOCOL", "SYNC", "HolePunch", "WireError", "decode_addrs", "message", "read",
           "tcp_endpoint"]
