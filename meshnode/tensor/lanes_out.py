"""Our outgoing data lanes for one session (the data-sender side of bulk TCP and shm).

The peer says where it accepts lanes in a LANES frame (``tensor_rpc.lanectl``); we connect on
first use, prove the session key (``tensor_rpc.transport.auth``) and keep the lane for the
session. A path that cannot be opened, or that fails mid-transfer, is skipped for
``transport.lane_retry_s``. Connecting and sealing block, so they run in worker threads on their
own limiter (lane threads live as long as their lane; trio's default 40 would starve).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import trio

from meshnode.config import TransportSection
from meshnode.logs import get_logger, kv
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


def _connect_bulk(targets: list[tuple[str, int]], sid: bytes, key: bytes, max_sealed: int,
                  s: TransportSection) -> LaneSender:
    last: Exception = ConnectionError("no address to try")
    for host, port in targets:
        try:
            sock = socket.create_connection((host, port), timeout=s.lane_connect_timeout_s)
        except OSError as exc:
            last = exc
            continue
        try:
            tune(sock, s.lane_socket_buffer_bytes)
            connect_handshake(sock, KIND_BULK, sid, key)
            sock.settimeout(None)
            return LaneSender(sock, KIND_BULK, max_sealed)
        except BaseException:
            sock.close()
            raise
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
                 remote_ip: Callable[[], str | None]) -> None:
        self.settings = settings
        self.session = session
        self._remote_ip = remote_ip
        self._lanes: dict[str, LaneSender] = {}
        self._failed: dict[str, float] = {}  # path -> when it failed
        self._offer: LaneOffer | None = None
        self._offered = trio.Event()

    def offered(self, offer: LaneOffer) -> None:
        self._offer = offer
        self._offered.set()

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
            if path == "bulk":
                targets = bulk_targets(offer, self._remote_ip())
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
