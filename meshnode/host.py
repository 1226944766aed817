"""Assemble the libp2p host explicitly, with every security choice visible here.

py-libp2p's defaults are unsafe or slow for us (DESIGN.md §7): it offers plaintext, TLS and SECIO
next to Noise, and its connection manager stalls ``connect()`` for 250 ms unless only one
connection per peer is allowed. We therefore pass the security and muxer options ourselves: Noise
only (a plaintext-only peer fails negotiation), yamux only — our :class:`Yamux` subclass, which
keeps the muxer's reader from blocking behind a stuck data write (see its docstring).
"""

from __future__ import annotations

from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux as _LibYamux

from discovery.streamio import is_relayed  # noqa: F401 - re-exported: the node's callers use it here
from meshnode.config import HostSection
from meshnode.logs import get_logger, kv
from meshnode.nat.punch import reset_on_close
from meshnode.tcp_rto import cap_upgrades

log = get_logger("meshnode.host")


def security_options(key_pair: KeyPair) -> dict:
    """Noise is the only security protocol we negotiate (no plaintext, no SECIO, no TLS)."""
    return {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)}


_READER_TASK = "._handle_incoming_with_ready_signal"


class Yamux(_LibYamux):
    """py-libp2p 0.8.1's yamux, except that its reader task never waits for the write lock.

    The reader answers a peer's SYN (ACK/RST) and ping inline through ``_write_frame``, which takes
    the connection's write lock. When both peers stream at each other, each side's lock can be held
    by a data write stuck on a full TCP send buffer; a reader waiting on it stops draining its
    socket, so the other side's buffer never empties either: both hang forever (reproduced with
    two node processes streaming 256 MiB each way while a CRDT stream opens). Here such a reply is
    written by its own task as soon as the lock frees, and the reader keeps reading.
    """

    async def _write_frame(self, data: bytes) -> None:
        if self._write_lock.locked() and trio.lowlevel.current_task().name.endswith(_READER_TASK):
            trio.lowlevel.spawn_system_task(self._deferred_write, data, name="yamux-deferred-write")
            return
        await super()._write_frame(data)

    async def _deferred_write(self, data: bytes) -> None:
        try:
            await super()._write_frame(data)
        except Exception:  # the connection went away: nothing left to answer
            pass


def muxer_options() -> dict:
    # py-libp2p 0.8.1 ignores the class given here for yamux and builds
    # ``muxer_multistream.Yamux`` itself: point that name at ours (idempotent, this module only
    # ever installs the same subclass)
    muxer_multistream.Yamux = Yamux
    return {YAMUX_PROTOCOL_ID: Yamux}


def connection_config(cfg: HostSection) -> ConnectionConfig:
    high = max(1, cfg.max_connections - max(1, cfg.max_connections // 10))
    return ConnectionConfig(
        max_connections=cfg.max_connections,
        high_watermark=high,
        low_watermark=min(high, max(1, cfg.max_connections // 4)),
        min_connections=0,
        max_connections_per_peer=cfg.max_connections_per_peer,
        dial_timeout=cfg.dial_timeout_s,
        connection_timeout=cfg.dial_timeout_s,
        outbound_upgrade_timeout=cfg.dial_timeout_s,
        inbound_upgrade_timeout=cfg.dial_timeout_s,
    )


def listen_multiaddrs(cfg: HostSection) -> list[multiaddr.Multiaddr]:
    addrs = [multiaddr.Multiaddr(a) for a in cfg.listen_addrs]
    if not cfg.enable_quic:
        addrs = [a for a in addrs if "quic" not in str(a)]
    return addrs


def listen_ips(cfg: HostSection) -> list[str]:
    """The IP of each TCP listen address (a wildcard stays a wildcard): where data lanes listen."""
    out = []
    for a in listen_multiaddrs(cfg):
        for proto in ("ip4", "ip6"):
            try:
                out.append(a.value_for_protocol(proto))
            except Exception:  # multiaddr raises its own ProtocolLookupError for an absent part
                continue
    return list(dict.fromkeys(out))


def build_host(cfg: HostSection, key_pair: KeyPair) -> IHost:
    """A host with our identity, Noise+yamux, identify and ping, and the configured limits."""
    host = new_host(
        key_pair=key_pair,
        sec_opt=security_options(key_pair),
        muxer_opt=muxer_options(),
        listen_addrs=listen_multiaddrs(cfg),
        enable_quic=cfg.enable_quic,
        connection_config=connection_config(cfg),
    )
    swarm = host.get_network()
    release_inbound_slots(swarm)
    spare_relayed_connections(swarm)
    cap_upgrades(swarm, cfg.tcp_rto_max_ms)
    return host


def spare_relayed_connections(swarm: Any) -> None:
    """Keep py-libp2p from closing a relayed connection the moment a direct one joins it.

    With ``max_connections_per_peer`` = 1 (our default), py-libp2p 0.8.1 trims a peer's
    connections as soon as a second one is added: a DCUtR-punched connection made the swarm close
    the relayed one at once, on *our* side only, while the peer was still finishing its side of
    the punched connection (seconds on a lossy path) — it was left with no connection to us, and
    its next stream dialled our private address and failed (seen at 20 % loss). The relayed
    connection belongs to DCUtR, which closes it ``dcutr.relay_grace_s`` after the upgrade; here
    relayed connections are neither counted against the limit nor trimmed.
    """
    trim = swarm._trim_connections

    def trim_direct_only(peer_id: Any) -> None:
        conns = swarm.connections.get(peer_id)
        if not conns or not any(is_relayed(c) for c in conns):
            trim(peer_id)
            return
        swarm.connections[peer_id] = [c for c in conns if not is_relayed(c)]
        try:  # (synchronous: the closes it decides on are scheduled, not awaited)
            trim(peer_id)
        finally:  # it keeps the survivors in that list: put the relayed ones back beside them
            kept = {id(c) for c in swarm.connections.get(peer_id, [])}
            swarm.connections[peer_id] = [c for c in conns if is_relayed(c) or id(c) in kept]

    swarm._trim_connections = trim_direct_only


async def _close_quietly(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:  # boundary: the peer may have gone already
        pass


def release_inbound_slots(swarm: Any) -> None:
    """Free an inbound connection's slot (and its handler task) when that connection closes.

    py-libp2p 0.8.1 caps inbound connections with a limiter of ``max_connections`` slots, but its
    handler holds the slot until the *whole swarm* stops (``await self.manager.wait_finished()``
    after each upgrade): every inbound connection ever made leaks one slot and one task, and after
    ``max_connections`` of them the node refuses every inbound connection (reproduced: a relay
    stopped taking reservations after exactly 256 short-lived peers). Here the handler upgrades
    the connection as 0.8.1 does, then waits for that connection to close.

    Every accepted TCP connection is on our listen port, so it closes with a reset
    (:func:`~meshnode.nat.punch.reset_on_close`, as go-libp2p closes every TCP connection): a
    peer's hole-punch SYN that reaches our listener instead of our punching socket becomes such a
    connection, and a FIN-WAIT left by its graceful close on a lossy path would block the next
    punch with that peer, on the same 4-tuple, for minutes (the punching sockets' own case of
    this is in ``punch.open_from``).
    """
    from libp2p.abc import IMuxedConn
    from libp2p.network.connection.raw_connection import RawConnection

    async def handle(read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        sock = getattr(getattr(read_write_closer, "stream", None), "socket", None)
        if sock is not None:  # TCP (QUIC has no socket of its own here)
            reset_on_close(sock)
        remote = swarm._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await swarm.connection_gate.is_allowed(remote):
            await _close_quietly(read_write_closer)
            return
        conn: Any = read_write_closer
        try:
            if isinstance(read_write_closer, IMuxedConn):  # QUIC: multiplexed already
                muxed = read_write_closer
                await swarm.add_conn(muxed, direction="inbound")
            else:
                conn = RawConnection(read_write_closer, False)
                muxed = await swarm.upgrade_inbound_raw_conn(conn, maddr)
        except Exception as exc:  # a failed upgrade ends this connection only
            log.debug("inbound upgrade failed", extra=kv(err=exc))
            await _close_quietly(conn)
            return
        closed = getattr(muxed, "event_closed", None)
        if closed is None:  # a muxer without the event: keep 0.8.1's barrier
            await swarm.manager.wait_finished()
            return
        await closed.wait()

    swarm._do_handle_inbound_connection = handle


async def close_listeners(host: IHost) -> None:
    """Close the host's listen sockets; call before leaving ``host.run`` (shielded).

    py-libp2p 0.8.1's swarm closes its listeners only at the end of its shutdown ``finally``,
    after awaiting each connection's close — in a cancelled scope the first await raises, the
    listeners stay open, and their serving tasks (system tasks) outlive the host: a node stopped
    and started again in one process shared its SO_REUSEPORT port with the dead swarm, which
    accepted and reset about half the inbound connections (seen in the NAT matrix's public
    trials).
    """
    listeners = getattr(host.get_network(), "listeners", {})
    for listener in list(listeners.values()):
        try:
            await listener.close()
        except Exception as exc:  # boundary: shutting down, one bad listener must not stop the rest
            log.debug("listener close failed", extra=kv(err=exc))


def build_host_for_dialing(key_pair: KeyPair, dial_timeout_s: float) -> IHost:
    """A host that only dials out (no listener, so every dial uses a fresh ephemeral port): the
    AutoNAT server's dial-back host, which must never reuse a connection or our listen port."""
    return build_host(HostSection(listen_addrs=[], dial_timeout_s=dial_timeout_s), key_pair)


async def grow_yamux_window(stream: Any, target: int) -> None:
    """Grant the peer our whole yamux receive window up front.

    py-libp2p 0.8.1 starts streams at 256 KiB and, when a writer's window hits zero, polls for the
    update with 10 ms sleeps: ~26 MB/s until autotuning catches up. Best effort: other muxers skip.
    """
    try:
        grow = target - stream.target_recv_window
        if grow <= 0:
            return
        stream.target_recv_window = target
        stream.recv_window += grow
        await stream.send_window_update(grow)
    except AttributeError:
        return


async def close_stream(stream: Any, clean: bool, timeout_s: float) -> None:
    """FIN after a protocol's last words (a reset would make the peer's muxer discard what it has
    not read yet); after an error, wait at most ``timeout_s`` for the peer to end its side too,
    then reset, so a peer that never reads or closes cannot keep the stream alive."""
    try:
        with trio.move_on_after(timeout_s):
            await stream.close()
            if clean:
                return
            while await stream.read(65536):  # discard: the conversation is over
                pass
            return
        await stream.reset()
    except Exception as exc:  # boundary: the stream is gone either way
        log.debug("stream close", extra=kv(err=exc))


def remote_address(stream: Any) -> tuple[str, int] | None:
    """The (IP, port) the stream's connection comes from, if the transport knows one."""
    try:
        addr = stream.get_remote_address()
        return (addr[0], int(addr[1])) if addr else None
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def remote_ip(stream: Any) -> str | None:
    """The IP the stream's connection comes from, if the transport knows one."""
    addr = remote_address(stream)
    return addr[0] if addr else None


_LOCAL_ADDR_PATH = ("muxed_conn", "secured_conn", "conn", "conn", "stream", "stream", "socket")


def local_address(stream: Any) -> tuple[str, int] | None:
    """Our end (IP, port) of the TCP connection a stream rides on, if it is one. py-libp2p 0.8.1
    has no public accessor; the path is NetStream → Yamux → SecureSession → Noise read-writer →
    RawConnection → TrioTCPStream → trio SocketStream → socket."""
    obj = stream
    for attr in _LOCAL_ADDR_PATH:
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    try:
        addr = obj.getsockname()
    except OSError:
        return None
    return (addr[0], addr[1]) if isinstance(addr, tuple) else None


def _not_supported(exc: BaseException) -> bool:
    """The peer answered that it does not speak the protocol (py-libp2p has no distinct error
    type for it once every choice was refused: its message says so)."""
    return "not supported" in str(exc)


async def open_stream_on(conn: Any, protocol: str, timeout_s: float) -> Any:
    """A stream for ``protocol`` on this very connection (``host.new_stream`` picks a connection
    itself). Raises what the negotiation raises; the stream is reset then."""
    stream = await conn.new_stream()
    try:
        proto = await MultiselectClient().select_one_of(
            [protocol], MultiselectCommunicator(stream), max(1, int(timeout_s)))
        stream.set_protocol(proto)
    except BaseException:
        with trio.CancelScope(shield=True):
            await close_stream(stream, False, 0)
        raise
    return stream


async def new_stream_or_relayed(host: IHost, peer: ID, protocol: str, timeout_s: float) -> Any:
    """A stream to ``peer``, on the relayed connection if the one py-libp2p picks fails.

    py-libp2p prefers a direct connection for every new stream. Over a lossy path a punched
    connection can be one that only our side completed (the peer's side failed and its reset was
    lost): every stream opened on it times out in negotiation until TCP gives up on it. DCUtR
    keeps the relayed connection beside such a connection (it answered no ping), so the stream
    is opened there instead. Raises the first failure if there is no relay to try, or if the
    peer answered that it does not speak ``protocol`` (that answer holds on any connection).
    """
    try:
        return await host.new_stream(peer, [protocol])
    except Exception as exc:  # boundary: whatever failed, a relayed connection may still carry it
        conns = host.get_network().get_connections(peer)
        relayed = [c for c in conns if is_relayed(c) and not c.muxed_conn.is_closed]
        if _not_supported(exc.__cause__ or exc) or not relayed or all(is_relayed(c) for c in conns):
            raise  # (py-libp2p's own choice was a relayed connection already)
        log.warning("stream over the relay: the direct connection failed",
                    extra=kv(peer=peer, protocol=protocol, err=exc))
        return await open_stream_on(relayed[0], protocol, timeout_s)  # (its failure chains exc)


async def ping_over(conn: Any, timeout_s: float) -> bool:
    """One ``/ipfs/ping/1.0.0`` round trip on this very connection: proof the peer holds it too.
    A peer that answers "not supported" (ping is optional in libp2p) has answered: proof too."""
    stream = None
    ok = False
    try:
        with trio.fail_after(timeout_s):
            stream = await open_stream_on(conn, PING_PROTOCOL, timeout_s)
            await perform_ping_roundtrip(stream)
        ok = True
    except MultiselectClientError as exc:
        ok = _not_supported(exc)
        if not ok:
            log.debug("no ping over the connection", extra=kv(err=exc))
    except Exception as exc:  # boundary: any other failure means no proof
        log.debug("no ping over the connection", extra=kv(err=exc))
    if stream is not None:
        await close_stream(stream, ok, 1.0)
    return ok
