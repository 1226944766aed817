"""The sending half of a tensor session: path choice, one attempt per path, exactly-once retry.

A message goes on the first path of ``transport.path`` order that can be had (shm > bulk >
stream); a lane seals and moves its chunks in a worker thread. If the lane fails mid-message the
session asks the peer to drop it (``Session.send_failed`` → ABANDON); the ordered verdict — ACK
(it had arrived whole), REJECT, or ABANDONED (never delivered) — decides whether the same tensors go
again, as a new message, on the next path. Nothing is delivered twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from meshnode.host import is_relayed, local_address
from meshnode.logs import get_logger, kv
from meshnode.tensor.events import TransferSent
from meshnode.tensor.lanes_out import LANE_THREADS, LaneClient
from meshnode.tensor.received import CircuitLimitError, Sent, SessionClosed
from tensor_rpc import (
    AckReceived,
    ApplyMode,
    ErrorCode,
    Kind,
    MessageAbandoned,
    MessageRejected,
    ProtocolError,
    UsageError,
)
from tensor_rpc.envelope import TensorSpec
from tensor_rpc.message import PayloadSource
from tensor_rpc.transport import LaneSender

if TYPE_CHECKING:
    from meshnode.tensor.driver import TensorSession

log = get_logger("meshnode.tensor")


class _Waiter:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: AckReceived | MessageRejected | MessageAbandoned | None = None

    def resolve(self, ev: AckReceived | MessageRejected | MessageAbandoned | None) -> None:
        if not self.event.is_set():
            self.result = ev
            self.event.set()


class Sender:
    """One send at a time per session (each waits for its verdict)."""

    def __init__(self, ts: TensorSession) -> None:
        self.ts = ts
        self.lock = trio.Lock()
        self.waiters: dict[int, _Waiter] = {}
        self.lanes = LaneClient(ts._settings, ts.session, ts._remote_ip,
                                lambda: local_address(ts.stream), self._ask_knock,
                                ts._service.tcp_rto_max_ms)

    def offered(self, offer: Any) -> None:
        """The peer's LANES: where our lanes go; if it asks (``knock``), dial its lane back
        through our NAT (never over a relay: no lane goes there)."""
        self.lanes.offered(offer)
        if offer.knock is not None:
            ts = self.ts
            knocked = None if is_relayed(ts.stream) else \
                ts._service.lanes.knock_for(ts.stream, offer.knock)
            ts.session.offer_lanes(ts._service.lane_offer(knocked=knocked))

    def _ask_knock(self, port: int) -> None:
        """Ask the peer to dial our local ``port`` back for a bulk lane (answered by a LANES)."""
        self.ts.session.offer_lanes(self.ts._service.lane_offer(knock=port))
        self.ts._kick()

    def resolve(self, mid: int, ev: Any) -> None:
        waiter = self.waiters.get(mid)
        if waiter is not None:
            waiter.resolve(ev)

    def close(self) -> None:
        for w in self.waiters.values():
            w.resolve(None)
        self.lanes.close()

    async def send(self, specs: Sequence[TensorSpec], payload: PayloadSource, *, kind: Kind,
                   layers: tuple[int, int], tokens: tuple[int, int], meta: dict | None = None,
                   apply: ApplyMode = ApplyMode.OVERWRITE, gain: float | None = None,
                   batch_slot: int = 0, timeout_s: float | None = None,
                   path: str | None = None) -> Sent:
        """Send one message, falling back path by path; returns once it is acknowledged."""
        if self.ts.closed:
            raise self.ts.closed_error()
        t0 = trio.current_time()
        kw = dict(kind=kind, layers=layers, tokens=tokens, meta=meta, apply=apply, gain=gain,
                  batch_slot=batch_slot)
        order = self.ts._service.path_order(str(self.ts.peer_id), path, payload.nbytes)
        if is_relayed(self.ts.stream):  # lanes dial the peer itself: over a relay there is none
            self._check_circuit(payload.nbytes)
            order = ["stream"]
        async with self.lock:
            for p in order:
                lane = None
                if p != "stream":
                    lane = await self.lanes.get(p)
                    if lane is None:
                        continue
                    await self.ts.flush()  # clears finished inline messages from the outbox
                done = await self._send_once(specs, payload, lane, p, timeout_s, kw)
                if done is not None:
                    sent = Sent(done[0], payload.nbytes, done[1], p, trio.current_time() - t0)
                    self.ts._service.bus.publish(TransferSent(
                        self.ts.session_id, str(self.ts.peer_id), sent.message_id, kind.value,
                        tuple(layers), tuple(tokens), sent.nbytes, sent.checksums, p,
                        sent.elapsed_s))
                    return sent
            raise SessionClosed("no data path left", None)

    def _check_circuit(self, nbytes: int) -> None:
        """Fail at once, naming the limit, if the message cannot fit through the relay."""
        limit = self.ts._service.circuit_limit(self.ts.peer_id)
        if not limit or not limit[1]:
            return
        agreed = self.ts.session.agreement
        chunk = agreed.chunk_bytes if agreed is not None else 4 << 20
        need = nbytes + (nbytes // chunk + 1) * 64 + 65536  # tags, frame headers, envelope
        if need > limit[1]:
            raise CircuitLimitError(
                f"message of {nbytes} bytes (~{need} on the wire) exceeds the relay's circuit "
                f"limit of {limit[1]} bytes per direction (relay.circuit_bytes on the relay); "
                f"{self.ts.peer_id} is reachable only through that relay")

    async def _send_once(self, specs: Sequence[TensorSpec], payload: PayloadSource,
                         lane: LaneSender | None, path: str, timeout_s: float | None,
                         kw: dict[str, Any]) -> tuple[int, tuple[bytes, ...]] | None:
        """One attempt on one path: ``(mid, checksums)`` once acknowledged, ``None`` if the peer
        confirmed it dropped the message (its lane failed: send again on the next path)."""
        if self.ts.closed:
            raise self.ts.closed_error()
        msg = self.ts.session.send_message(tensors=specs, payload=payload, now=trio.current_time(),
                                        inline=lane is None, **kw)
        waiter = self.waiters[msg.message_id] = _Waiter()
        try:
            await self.ts.flush()
            if lane is not None:
                try:
                    await trio.to_thread.run_sync(lane.send_message, msg, abandon_on_cancel=True,
                                                  limiter=LANE_THREADS)
                except (OSError, ConnectionError, ProtocolError, UsageError) as exc:
                    self.lanes.failed(path, exc)
                    if self.ts.closed:
                        raise self.ts.closed_error() from exc
                    log.warning("data lane failed mid-transfer; asking the peer to drop the message",
                                extra=kv(peer=self.ts.peer_id, path=path, mid=msg.message_id, err=exc))
                    self.ts.session.send_failed(msg.message_id)
                self.ts._kick()  # the DIGEST (the lane sealed and hashed every chunk), or the ABANDON
            with trio.fail_after(timeout_s or self.ts.session.limits.transfer_timeout_s):
                await waiter.event.wait()
        finally:
            self.waiters.pop(msg.message_id, None)
        ev = waiter.result
        if ev is None:
            raise self.ts.closed_error()
        if isinstance(ev, MessageAbandoned):
            return None
        if isinstance(ev, MessageRejected):
            raise ev.error
        sent_sums = msg.digests
        if sent_sums is None or tuple(ev.checksums) != sent_sums:  # the session checks this too
            raise ProtocolError(ErrorCode.CHECKSUM, "acknowledged checksums differ from sent")
        return msg.message_id, sent_sums
