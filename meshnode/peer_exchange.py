"""Peer exchange (``/latentlink/pex/1.0.0``): learn the mesh from the peers we already know.

A node given a single bootstrap peer must come to see the whole mesh. Each round we ask every
connected peer for the peers *it* is connected to (with their listen addresses) and dial those we
do not know yet. Replies are bounded in count and bytes; addresses that fail to parse are skipped.
"""

from __future__ import annotations

import random

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from discovery.streamio import FrameError, frame, read_frame, unpack_bounded
from meshnode.logs import get_logger, kv

PEX_PROTOCOL = "/latentlink/pex/1.0.0"
MAX_REPLY_BYTES = 256 * 1024
log = get_logger("meshnode.pex")


class PeerExchange:
    def __init__(self, host: IHost, max_peers: int, interval_s: float, dial_timeout_s: float,
                 on_dial=None) -> None:
        self.host, self.max_peers, self.interval_s = host, max_peers, interval_s
        self.dial_timeout_s = dial_timeout_s
        self.on_dial = on_dial or (lambda ok: None)
        self.bytes_in = self.bytes_out = 0
        host.set_stream_handler(PEX_PROTOCOL, self._handle)

    def _known_peers(self, exclude: ID) -> list[list]:
        out = []
        me = self.host.get_id()
        for pid in self.host.get_connected_peers():
            if pid in (exclude, me):
                continue
            try:
                known = self.host.get_peerstore().addrs(pid)
            except Exception:  # no addresses recorded yet (identify still running)
                continue
            addrs = [str(a) for a in known if "/p2p-circuit" not in str(a)]
            if addrs:
                out.append([pid.to_base58(), addrs[:8]])
        random.shuffle(out)
        return out[: self.max_peers]

    async def _handle(self, stream) -> None:
        try:
            peer = stream.muxed_conn.peer_id
            reply = frame(msgpack.packb(self._known_peers(peer)))
            await stream.write(reply)
            self.bytes_out += len(reply)
        except Exception as exc:
            log.debug("pex reply failed", extra=kv(err=exc))
        finally:
            await stream.close()

    async def ask(self, peer: ID) -> list[PeerInfo]:
        stream = await self.host.new_stream(peer, [PEX_PROTOCOL])
        try:
            with trio.fail_after(self.dial_timeout_s):
                body = await read_frame(stream, MAX_REPLY_BYTES)
                self.bytes_in += len(body) + 4
        finally:
            await stream.close()
        infos = []
        items = unpack_bounded(body, max_items=max(self.max_peers, 8))
        if not isinstance(items, list):
            raise FrameError("pex reply must be a list")
        for item in items[: self.max_peers]:
            try:
                pid = ID.from_base58(item[0])
                addrs = [multiaddr.Multiaddr(a) for a in item[1][:8]]
                infos.append(PeerInfo(pid, addrs))
            except Exception:
                continue
        return infos

    async def round(self) -> None:
        me = self.host.get_id()
        connected = set(self.host.get_connected_peers())
        candidates: dict[ID, PeerInfo] = {}
        for peer in list(connected):
            try:
                for info in await self.ask(peer):
                    if info.peer_id != me and info.peer_id not in connected:
                        candidates.setdefault(info.peer_id, info)
            except Exception as exc:
                log.debug("pex ask failed", extra=kv(peer=peer, err=exc))
        async with trio.open_nursery() as n:
            for info in candidates.values():
                n.start_soon(self._dial, info)

    async def _dial(self, info: PeerInfo) -> None:
        try:
            with trio.fail_after(self.dial_timeout_s):
                await self.host.connect(info)
            self.on_dial(True)
            log.debug("pex dialled", extra=kv(peer=info.peer_id))
        except Exception as exc:
            self.on_dial(False)
            log.debug("pex dial failed", extra=kv(peer=info.peer_id, err=exc))

    async def run(self) -> None:
        if self.max_peers == 0:  # PEX off: answer nobody's questions with peers, ask none
            return
        while True:
            await self.round()
            await trio.sleep(self.interval_s * random.uniform(0.8, 1.2))
