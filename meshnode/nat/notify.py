"""A py-libp2p network notifee that reports a peer's last disconnect (and, if asked, every
other one: a peer that still has connections left)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID


class OnPeerGone(INotifee):
    """Calls ``callback(peer)`` when the last connection to ``peer`` closes, ``remaining(peer)``
    when one closes and others are left."""

    def __init__(self, callback: Callable[[ID], None],
                 remaining: Callable[[ID], None] | None = None) -> None:
        self.callback = callback
        self.remaining = remaining

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self.callback(peer)
        elif self.remaining is not None:
            self.remaining(peer)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        return None
