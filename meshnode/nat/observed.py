"""Where others see us: the IP a peer observes our connection coming from (its identify answer).

Behind a NAT that is the router's public address — what AutoNAT tests and what a hole punch
advertises (with our listen port: a cone NAT keeps the source port of a socket bound to it).
"""

from __future__ import annotations

from typing import Any

import multiaddr
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from meshnode.host import close_stream
from meshnode.logs import get_logger, kv

log = get_logger("meshnode.nat")
MAX_IDENTIFY_BYTES = 64 * 1024


async def identify(host: Any, peer: Any) -> Any | None:
    """``peer``'s identify answer (its listen addresses, the address it sees us at), or ``None``
    (no answer is not an error)."""
    try:
        stream = await host.new_stream(peer, [IDENTIFY_PROTOCOL])
        try:
            body = await read_varint_prefixed_bytes_limited(stream, MAX_IDENTIFY_BYTES)
        finally:
            await close_stream(stream, True, 1.0)
        msg = Identify()
        msg.ParseFromString(body)
        return msg
    except Exception as exc:  # boundary: a peer that does not say is not fatal
        log.debug("no identify answer", extra=kv(peer=peer, err=exc))
        return None


async def observed_ip(host: Any, peer: Any) -> str | None:
    """The IPv4 address ``peer`` sees us at, or ``None``."""
    msg = await identify(host, peer)
    try:
        return multiaddr.Multiaddr(msg.observed_addr).value_for_protocol("ip4") if msg else None
    except Exception:  # multiaddr raises several types: an unusable answer is no answer
        return None
