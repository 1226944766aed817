"""Where others see us: the IP a peer observes our connection coming from (its identify answer).

Behind a NAT that is the router's public address — what AutoNAT tests and what a hole punch
advertises (with our listen port: a cone NAT keeps the source port of a socket bound to it).
"""

from __future__ import annotations

from typing import Any

import multiaddr
import trio
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from meshnode.host import close_stream, is_relayed
from meshnode.logs import get_logger, kv
from meshnode.nat import dcutr_pb as pb

log = get_logger("meshnode.nat")
MAX_IDENTIFY_BYTES = 64 * 1024
OBSERVED_TTL_S = 60.0  # our public IP as an observer saw it is asked again after this
Endpoint = tuple[str, int]


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


class PunchAddrs:
    """The addresses a hole punch exchanges: ours (listen port on the IP observers see us at,
    cached per observer) and the peer's (what it lists, then the peerstore). Every lookup is
    bounded by ``timeout_s``; at most ``max_addrs`` of the peer's, public unless ``allow_private``."""

    def __init__(self, host: Any, timeout_s: float, max_addrs: int, allow_private: bool) -> None:
        self.host, self.timeout_s, self.max_addrs = host, timeout_s, max_addrs
        self.allow_private = allow_private
        self._seen: dict[Any, tuple[str, float]] = {}  # observer -> (our IP it sees, when asked)

    def listen_endpoints(self) -> list[Endpoint]:
        out = []
        for a in self.host.get_transport_addrs():
            ep = pb.tcp_endpoint(a) if "/0.0.0.0/" not in str(a) else ("0.0.0.0", int(a.value_for_protocol("tcp")))
            if ep is not None:
                out.append(ep)
        return out

    async def ours(self, relay: Any | None) -> list[multiaddr.Multiaddr]:
        """What we tell the peer to dial: our listen port on the IP the relay (or any directly
        connected peer) sees us at, then our listen addresses themselves."""
        listen = self.listen_endpoints()
        observers = [relay] if relay is not None else []
        observers += [p for p, conns in self.host.get_network().connections.items()
                      if conns and not all(is_relayed(c) for c in conns) and p not in observers]
        seen_ip = None
        with trio.move_on_after(self.timeout_s):  # all observers together
            for who in observers[:3]:
                cached = self._seen.get(who)
                if cached is not None and trio.current_time() - cached[1] < OBSERVED_TTL_S:
                    seen_ip = cached[0]
                else:
                    seen_ip = await observed_ip(self.host, who)
                    if seen_ip:
                        self._seen[who] = (seen_ip, trio.current_time())
                        while len(self._seen) > 64:
                            self._seen.pop(next(iter(self._seen)))
                if seen_ip:
                    break
        eps = [(seen_ip, port) for _, port in listen] if seen_ip else []
        eps += [ep for ep in listen if ep[0] != "0.0.0.0"]
        out = []
        for ip, port in dict.fromkeys(eps):
            proto = "ip6" if ":" in ip else "ip4"
            out.append(multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{port}"))
        return out

    async def theirs(self, peer: Any) -> list[Endpoint]:
        """The peer's dialable addresses: those it lists itself (identify, asked over the relayed
        connection — it may not have run yet), then what the peerstore knows."""
        raw: list[bytes] = []
        with trio.move_on_after(self.timeout_s):
            msg = await identify(self.host, peer)
            raw += list(msg.listen_addrs) if msg is not None else []
        try:
            raw += [a.to_bytes() for a in self.host.get_peerstore().addrs(peer)]
        except Exception:  # the peerstore raises when it knows no address
            pass
        raw = [r for r in raw if _not_circuit(r)]
        return pb.decode_addrs(raw, self.allow_private)[: self.max_addrs]


def _not_circuit(raw: bytes) -> bool:
    try:
        return "/p2p-circuit" not in str(multiaddr.Multiaddr(raw))
    except Exception:  # unparsable: decode_addrs drops it anyway
        return True
