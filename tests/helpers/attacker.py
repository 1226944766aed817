"""A hostile peer for tests: a real libp2p host driving our own protocol modules wrongly on purpose.

It dials a victim node over 127.0.0.1 with Noise + yamux like any peer, then speaks the tensor
protocol through a real :class:`tensor_rpc.Session` — which it bends where an attack needs to
(declares payloads it never sends, reuses a session id, stops mid-handshake, widens its own
negotiated dtypes, reseals a chunk after delivery). Runs inside the test's trio loop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from meshnode.config import HostSection
from meshnode.host import build_host
from meshnode.tensor import TENSOR_PROTOCOL
from tensor_rpc import DTYPES, Closed, Event, HandshakeComplete, Limits, Role, Session

KiB, MiB = 1 << 10, 1 << 20


class RawSession:
    """One tensor session the attacker drives by hand over a real libp2p stream."""

    def __init__(self, session: Session, stream: Any) -> None:
        self.session = session
        self.stream = stream
        self.events: list[Event] = []
        self.eof = False

    async def flush(self) -> None:
        data = self.session.data_to_send()
        if data:
            await self.stream.write(data)

    async def read_once(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False once the stream ended (EOF or reset)."""
        with trio.move_on_after(timeout):
            try:
                data = await self.stream.read(1 << 20)
            except StreamEOF:
                data = b""
            except Exception:  # reset by the victim: that is the answer we wait for
                data = b""
            if not data:
                self.eof = True
                self.events += self.session.receive_eof()
                return False
            self.events += self.session.receive_data(data, trio.current_time())
        return True

    async def pump_until(self, pred: Callable[[list[Event]], bool], timeout: float,
                         send: bool = True) -> bool:
        """Read (and, with ``send``, write what the session has queued) until ``pred(events)``."""
        with trio.move_on_after(timeout):
            while not pred(self.events):
                if send:
                    await self.flush()
                if not await self.read_once(timeout):
                    return pred(self.events)
            if send:
                await self.flush()
            return True
        return pred(self.events)

    async def wait_closed_by_peer(self, timeout: float) -> bool:
        """True if the victim ended the stream within ``timeout`` (whatever it sent first)."""
        with trio.move_on_after(timeout):
            while await self.read_once(timeout):
                pass
            return True
        return False

    def closed_error(self) -> Any:
        closed = [e for e in self.events if isinstance(e, Closed)]
        return closed[-1].error if closed else None

    def widen_dtypes(self) -> None:
        """Pretend every dtype was negotiated (so send_message seals what the victim refused)."""
        ag = self.session.agreement
        assert ag is not None
        self.session.agreement = dataclasses.replace(ag, dtypes=frozenset(DTYPES))


class Attacker:
    def __init__(self, host: Any, key_pair: Any) -> None:
        self.host, self.key_pair = host, key_pair

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)

    async def connect(self, addr: str) -> ID:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await self.host.connect(info)
        return info.peer_id

    async def stream(self, peer: ID) -> Any:
        return await self.host.new_stream(peer, [TENSOR_PROTOCOL])

    async def session(self, peer: ID, signature: Any, *, limits: Limits | None = None,
                      handshake: bool = True, rng: Callable[[int], bytes] = os.urandom,
                      **kw: Any) -> RawSession:
        """A session to ``peer``: HELLO sent; with ``handshake`` also completed (or refused)."""
        raw = RawSession(Session(Role.INITIATOR, limits or Limits(), signature, self.key_pair,
                                 peer, rng=rng, **kw), await self.stream(peer))
        raw.events += raw.session.start(trio.current_time())
        await raw.flush()
        if handshake:
            await raw.pump_until(lambda evs: any(isinstance(e, (HandshakeComplete, Closed))
                                                 for e in evs), 15)
        return raw


@asynccontextmanager
async def attacker(tmp: Path):
    """An attacker host listening on 127.0.0.1 (ephemeral port), running for the block."""
    kp = create_new_key_pair()
    host = build_host(HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"]), kp)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        yield Attacker(host, kp)
