"""Cap TCP's retransmission timeout on every TCP connection the node makes (``host.tcp_rto_max_ms``).

Why: TCP doubles its retransmission timeout after each lost retransmission (0.2 s, 0.4 s, 0.8 s
... up to 120 s on Linux). A libp2p session is a chain of small exchanges (Noise, multistream,
yamux, identify, DCUtR, the tensor handshake), each waiting out whatever backoff its segments
hit, so on a lossy path one unlucky exchange stalls for tens of seconds and a session's timeout
fires on a connection that is fine. ``scripts/natlab/rto_bench`` measures it: 64-byte round trips
over one TCP connection per cap, 20 % loss at each end of the lab path (36 % each way), 480 s:
the kernel's default managed 87 round trips (mean 5.5 s, p99 75 s, one of 119 s); capped at 2 s,
397 (mean 1.2 s, max 8.7 s); at 1 s, all 400 (mean 0.73 s, max 6.8 s). Only the time between
retransmissions changes: congestion control (how much is in flight) is the kernel's as before.

``TCP_RTO_MAX_MS`` exists from Linux 6.15; on an older kernel (or another OS) the setting does
nothing and is reported once. ``0`` leaves the kernel's default.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from meshnode.logs import get_logger, kv

TCP_RTO_MAX_MS = 44  # linux/tcp.h (6.15+); Python's socket module does not name it yet
log = get_logger("meshnode.tcp")
_unsupported_reported = False


def cap_rto(sock: Any, max_ms: int) -> bool:
    """Set ``sock``'s largest retransmission timeout to ``max_ms`` (0: leave it); whether it took."""
    global _unsupported_reported
    if max_ms <= 0 or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, max_ms)
        return True
    except OSError as exc:  # an older kernel (ENOPROTOOPT), or the socket is closed already
        if not _unsupported_reported and exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            _unsupported_reported = True
            log.warning("host.tcp_rto_max_ms has no effect: this kernel lacks TCP_RTO_MAX_MS "
                        "(Linux 6.15+)", extra=kv(err=exc))
        return False


def raw_socket(raw_conn: Any) -> Any:
    """The OS socket under a py-libp2p TCP ``RawConnection`` (``None`` for a relayed one):
    RawConnection → TrioTCPStream → trio SocketStream → socket."""
    obj = raw_conn
    for attr in ("stream", "stream", "socket"):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def cap_upgrades(swarm: Any, max_ms: int) -> None:
    """Cap the timeout on every TCP connection the swarm upgrades, before its Noise handshake:
    dialled by py-libp2p, accepted by our listener, or punched by DCUtR (all pass through the
    swarm's two upgrade methods)."""
    if max_ms <= 0:
        return
    outbound, inbound = swarm.upgrade_outbound_raw_conn, swarm.upgrade_inbound_raw_conn

    async def upgrade_outbound(raw_conn: Any, *args: Any, **kw: Any) -> Any:
        cap_rto(raw_socket(raw_conn), max_ms)
        return await outbound(raw_conn, *args, **kw)

    async def upgrade_inbound(raw_conn: Any, *args: Any, **kw: Any) -> Any:
        cap_rto(raw_socket(raw_conn), max_ms)
        return await inbound(raw_conn, *args, **kw)

    swarm.upgrade_outbound_raw_conn = upgrade_outbound
    swarm.upgrade_inbound_raw_conn = upgrade_inbound
