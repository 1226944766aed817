"""Our outgoing data lanes for one session (the data-sender side of bulk TCP and shm).

The peer says where it accepts lanes in a LANES frame (``tensor_rpc.lanectl``); we connect on
first use, prove the session key (``tensor_rpc.transport.auth``) and keep the lane for the
session. A path that cannot be opened, or that fails mid-transfer, is skipped for
``transport.lane_retry_s``. Connecting and sealing block, so they run in worker threads on their
own limiter (lane threads live as long as their lane; trio's default 40 would starve).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable

import trio

from meshnode.config import TransportSection
from meshnode.logs import get_logger, kv
from meshnode.nat.punch import abort, start_connect
from meshnode.tcp_rto import cap_rto
from tensor_rpc import ProtocolError, Session, UsageError
from tensor_rpc.lanectl import LaneOffer
from tensor_rpc.transport import KIND_BULK, KIND_SHM, LaneSender, lane_key, tune
from tensor_rpc.transport.auth import connect_handshake

LANE_THREADS = trio.CapacityLimiter(4096)
log = get_logger("meshnode.tensor.lanes")


def bulk_targets(offer: LaneOffer, remote_ip: str | None) -> list[tuple[str, int]]:
    """Where to dial: the offered ``(ip, port)`` pairs, a wildcard IP meaning "the address you
    reach me on" (the control stream's remote IP). Pure, deduplicated, in offer order."""
    out: list[tuple[str, int]] = []
    for host, port in offer.bulk:
        if ipaddress.ip_address(host).is_unspecified:
            if remote_ip is None:
                continue
            host = remote_ip
        if (host, port) not in out:
            out.append((host, port))
    return out


def behind_nat(local_ip: str | None, remote_ip: str | None) -> bool:
    """Whether a peer at public ``remote_ip`` cannot dial us at our private ``local_ip``: we sit
    behind a NAT from its side (a peer on our LAN, or loopback, reaches us as we are). Pure."""
    if not local_ip or not remote_ip:
        return False
    return not ipaddress.ip_address(local_ip).is_global and ipaddress.ip_address(remote_ip).is_global


def needs_knock(offer: LaneOffer, remote_ip: str | None) -> bool:
    """Whether the peer's offered bulk addresses are not where we reach it (it is behind a NAT):
    a lane then gets through only as a simultaneous open — we dial, then the peer dials our
    port back (``knock``). Pure."""
    if remote_ip is None or not offer.bulk or not ipaddress.ip_address(remote_ip).is_global:
        return False
    return all(host != remote_ip and not ipaddress.ip_address(host).is_unspecified
               for host, _ in offer.bulk)


def _lane_over(sock: socket.socket, sid: bytes, key: bytes, max_sealed: int,
               s: TransportSection) -> LaneSender:
    """Prove the session key on a connected socket: it becomes our bulk lane."""
    try:
        sock.setblocking(True)
        sock.settimeout(s.lane_connect_timeout_s)
        tune(sock, s.lane_socket_buffer_bytes)
        connect_handshake(sock, KIND_BULK, sid, key)
        sock.settimeout(None)
        return LaneSender(sock, KIND_BULK, max_sealed)
    except BaseException:
        sock.close()
        raise


def _connect_bulk(targets: list[tuple[str, int]], sid: bytes, key: bytes, max_sealed: int,
                  s: TransportSection) -> LaneSender:
    last: Exception = ConnectionError("no address to try")
    for host, port in targets:
        try:
            sock = socket.create_connection((host, port), timeout=s.lane_connect_timeout_s)
        except OSError as exc:
            last = exc
            continue
        return _lane_over(sock, sid, key, max_sealed, s)
    raise last


def _connect_shm(name: str, sid: bytes, key: bytes, max_sealed: int, s: TransportSection) -> LaneSender:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(s.lane_connect_timeout_s)
        sock.connect("\0" + name)
        tune(sock, s.lane_socket_buffer_bytes)
        connect_handshake(sock, KIND_SHM, sid, key)
        lane = LaneSender.open_shm(sock, key, s.shm_ring_bytes, max_sealed)
        sock.settimeout(None)
        return lane
    except BaseException:
        sock.close()
        raise


class LaneClient:
    def __init__(self, settings: TransportSection, session: Session,
                 remote_ip: Callable[[], str | None],
                 local_end: Callable[[], tuple[str, int] | None] = lambda: None,
                 ask_knock: Callable[[int], None] = lambda port: None,
                 tcp_rto_max_ms: int = 0) -> None:
        self.settings = settings
        self.tcp_rto_max_ms = tcp_rto_max_ms
        self.session = session
        self._remote_ip = remote_ip
        self._local_end = local_end
        self._ask_knock = ask_knock
        self._lanes: dict[str, LaneSender] = {}
        self._failed: dict[str, float] = {}  # path -> when it failed
        self._offer: LaneOffer | None = None
        self._offered = trio.Event()

    def offered(self, offer: LaneOffer) -> None:
        self._offer = offer
        self._offered.set()

    async def _punch_bulk(self, offer: LaneOffer, remote: str) -> socket.socket:
        """A bulk lane socket through the peer's NAT: dial its bulk port at the address we reach
        it on (our SYN opens our own NAT and dies at the peer's), ask it to dial our port back
        (``knock``); the SYNs cross into one connection."""
        local = self._local_end()
        port = next((p for h, p in offer.bulk if (":" in h) == (":" in remote)), None)
        if local is None or port is None:
            raise ConnectionError("no bulk lane of the peer's address family, or no local address")
        sock = start_connect(local[0], (remote, port))
        try:
            self._ask_knock(sock.getsockname()[1])
            with trio.fail_after(self.settings.lane_connect_timeout_s):
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            abort(sock)
            raise
        return sock

    def open_paths(self) -> list[str]:
        return list(self._lanes)

    async def get(self, path: str) -> LaneSender | None:
        """The lane for ``path``, connecting if needed; ``None`` if it cannot be had now."""
        lane = self._lanes.get(path)
        if lane is not None:
            return lane
        failed = self._failed.get(path)
        s = self.settings
        if failed is not None and trio.current_time() - failed < s.lane_retry_s:
            return None
        try:
            with trio.fail_after(s.lane_connect_timeout_s):  # the peer sends LANES when READY
                await self._offered.wait()
            offer = self._offer
            assert offer is not None
            key = lane_key(self.session, sending=True)
            assert self.session.agreement is not None
            max_sealed = self.session.agreement.chunk_bytes + self.session.tag_bytes
            sid = self.session.session_id
            remote = self._remote_ip()
            if path == "bulk" and needs_knock(offer, remote):
                assert remote is not None
                sock = await self._punch_bulk(offer, remote)
                lane = await trio.to_thread.run_sync(_lane_over, sock, sid, key, max_sealed, s,
                                                     limiter=LANE_THREADS)
            elif path == "bulk":
                targets = bulk_targets(offer, remote)
                if not targets:
                    raise ConnectionError("peer offers no bulk lane")
                lane = await trio.to_thread.run_sync(_connect_bulk, targets, sid, key, max_sealed, s,
                                                     limiter=LANE_THREADS)
            else:
                if not offer.shm:
                    raise ConnectionError("peer offers no shm lane")
                lane = await trio.to_thread.run_sync(_connect_shm, offer.shm, sid, key, max_sealed, s,
                                                     limiter=LANE_THREADS)
        except (OSError, ConnectionError, ProtocolError, UsageError, trio.TooSlowError) as exc:
            self._failed[path] = trio.current_time()
            log.info("data lane unavailable; trying the next path",
                     extra=kv(peer=self.session.remote_peer_id, path=path, err=exc or "timeout"))
            return None
        cap_rto(lane.sock, self.tcp_rto_max_ms)
        self._lanes[path] = lane
        log.info("data lane open", extra=kv(peer=self.session.remote_peer_id, path=path))
        return lane

    def failed(self, path: str, exc: BaseException) -> None:
        lane = self._lanes.pop(path, None)
        if lane is not None:
            lane.close()
        self._failed[path] = trio.current_time()

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.close()
        self._lanes.clear()
