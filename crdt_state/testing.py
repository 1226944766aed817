"""Helpers for CRDT tests and benchmarks: in-process hosts and a frame pump between engines.

The node builds its own host in ``meshnode/``; nothing in production imports this module.

Noise only (DESIGN.md §7 trap 2), one connection per peer (trap 1: avoids a 250 ms connect stall),
loopback TCP on an ephemeral port.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from crdt_state.limits import CrdtLimits
from crdt_state.ownership import client_id
from crdt_state.schema import SessionDoc, TensorMessage
from crdt_state.service import CrdtService
from crdt_state.signing import Signer
from crdt_state.sync import SyncEngine
from crdt_state.wire import SignedUpdate

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def make_host(key_pair: KeyPair | None = None) -> tuple[IHost, KeyPair]:
    key_pair = key_pair or create_new_key_pair()
    noise = NoiseTransport(libp2p_keypair=key_pair,
                           noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise},
                    connection_config=ConnectionConfig(max_connections_per_peer=1))
    return host, key_pair


@asynccontextmanager
async def running_host(key_pair: KeyPair | None = None) -> AsyncIterator[tuple[IHost, KeyPair]]:
    host, kp = make_host(key_pair)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(LOOPBACK)]):
        yield host, kp


def introduce(hosts: list[IHost]) -> None:
    """Put every host's listen addresses into every other's peerstore, so they can dial."""
    for a in hosts:
        for b in hosts:
            if a is not b:
                a.get_peerstore().add_addrs(b.get_id(), b.get_addrs(), 3600)


async def start_services(stack: AsyncExitStack, n: int, limits: CrdtLimits
                         ) -> tuple[list[IHost], list[CrdtService]]:
    """``n`` running hosts, each with a running :class:`CrdtService`, all able to dial each other."""
    hosts, services = [], []
    for _ in range(n):
        host, kp = await stack.enter_async_context(running_host())
        hosts.append(host)
        services.append(CrdtService(host, kp, limits=limits))
    introduce(hosts)
    for svc in services:
        await stack.enter_async_context(svc.run())
    return hosts, services


async def connect(a: IHost, b: IHost) -> None:
    await a.connect(PeerInfo(b.get_id(), b.get_addrs()))


def pump(engines: list[SyncEngine], start: list[tuple[int, int, bytes]], now: float = 0.0) -> int:
    """Deliver frames between engines (index -> index) until quiet; returns bytes moved."""
    ids = [e.local_peer for e in engines]
    queue = list(start)
    moved = 0
    while queue:
        src, dst, frame = queue.pop(0)
        moved += len(frame)
        out = engines[dst].receive(ids[src], frame, now)
        queue.extend((dst, src, f) for f in out.frames)
    return moved


def hello_all(engines: list[SyncEngine]) -> list[tuple[int, int, bytes]]:
    return [(i, j, f) for i, e in enumerate(engines) for j, o in enumerate(engines)
            if i != j for f in e.hello(o.local_peer)]


def sample_message(i: int, sender: str) -> TensorMessage:
    return TensorMessage(message_id=f"m{i}", kind="KV_CACHE", sender=sender, receiver="x",
                         layers=(0, 11), tokens=(i, i + 8), nbytes=4096 + i,
                         checksums=("ab" * 16,), path="shm", sent_at=float(i),
                         timings={"encode_ms": 0.25})


def forge(signer: Signer, base: SyncEngine, doc_id: str, fn: Callable[[SessionDoc], object],
          writer: bytes | None = None, pycrdt_client: int | None = None) -> SignedUpdate:
    """What a malicious participant can send: a genuine pycrdt edit of a copy of ``base``'s
    document, made around the owner checks of the API, under a fresh writer, correctly signed.

    ``pycrdt_client`` defaults to the client id bound to that writer (so only the content of the
    edit is wrong); pass another writer's to try to squat its item ids.
    """
    writer = writer or os.urandom(8)
    captured: list[bytes] = []
    copy = SessionDoc(client_id=pycrdt_client or client_id(signer.author, writer))
    copy.doc.apply_update(base.replicas[doc_id].doc.doc.get_update())
    sub = copy.doc.observe(lambda event: captured.append(bytes(event.update)))
    fn(copy)  # through the typed API or straight into its pycrdt maps
    copy.doc.unobserve(sub)
    assert len(captured) == 1, "one edit, one update"
    return signer.sign(doc_id, writer, 1, captured[0])
