"""The session log capability: writes each tensor session's replicated CRDT log from events.

It subscribes to what the tensor service and the application publish on the node's bus and is
the only writer of transfer records and outcomes:

* a session we opened → the session document (us: sender, the peer: receiver);
* ``TransferSent`` (our message was acknowledged) → the message record: path, bytes, time,
  checksums;
* ``MessageApplied`` / ``MessageRefused`` (the application tried to apply a delivered message) and
  ``TransferFailed`` of a message we rejected → our outcome for it: ``applied``, ``refused`` or
  ``rejected`` with the reason. Outcomes are written only by the receiver's own replica, signed by
  its identity, so no other participant can state them for it.

The receiver's outcome may be ready before the sender's session document has replicated here; it
waits (bounded in number and by ``crdt.outcome_wait_s``) and is written when the document arrives,
woken by the CRDT service's change notifications — never by polling.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import trio

from crdt_state import CrdtService
from meshnode.bus import EventBus
from meshnode.logs import get_logger, kv
from meshnode.tensor.events import (
    MessageApplied,
    MessageRefused,
    SessionOpened,
    TransferFailed,
    TransferSent,
)

log = get_logger("meshnode.sessionlog")
MAX_PENDING = 1024  # outcomes waiting for their session document, all sessions together


@dataclass
class _Pending:
    deadline: float
    sender: str
    message_id: str
    status: str
    reason: str
    timings: dict[str, float] = field(default_factory=dict)


class SessionLog:
    def __init__(self, crdt: CrdtService, bus: EventBus, outcome_wait_s: float) -> None:
        self.crdt = crdt
        self.bus = bus
        self.outcome_wait_s = outcome_wait_s
        self._pending: dict[str, list[_Pending]] = defaultdict(list)
        self._timer: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        events = self.bus.subscribe(SessionOpened, TransferSent, TransferFailed, MessageApplied,
                                    MessageRefused)
        changes = self.crdt.subscribe()
        async with trio.open_nursery() as n:
            n.start_soon(self._on_changes, changes)
            n.start_soon(self._expire)
            task_status.started()
            async for ev in events:
                try:
                    self._on(ev)
                except (ValueError, KeyError) as exc:  # metadata must never block the data path
                    log.warning("could not write the session log", extra=kv(event=type(ev).__name__,
                                                                             err=exc))

    def _on(self, ev: object) -> None:
        crdt = self.crdt
        if isinstance(ev, SessionOpened):
            if ev.initiator:
                crdt.create_session(ev.session_id, ev.compat_key,
                                    {crdt.peer_id: "sender", ev.peer: "receiver"})
        elif isinstance(ev, TransferSent):
            if ev.session_id in crdt.engine.replicas:
                crdt.log_message(ev.session_id, kind=ev.kind, receiver=ev.peer,
                                 message_id=str(ev.message_id), layers=ev.layers, tokens=ev.tokens,
                                 nbytes=ev.nbytes, checksums=[c.hex() for c in ev.checksums],
                                 path=ev.path, timings={"transfer_s": ev.elapsed_s})
        elif isinstance(ev, MessageApplied):
            self._outcome(ev.session_id, ev.peer, ev.message_id, "applied", "applied by the runtime",
                          ev.timings)
        elif isinstance(ev, MessageRefused):
            self._outcome(ev.session_id, ev.peer, ev.message_id, "refused", ev.reason, {})
        elif isinstance(ev, TransferFailed) and ev.local:
            self._outcome(ev.session_id, ev.peer, ev.message_id, "rejected", str(ev.error), {})

    def _outcome(self, sid: str, sender: str, mid: int, status: str, reason: str,
                 timings: dict[str, float]) -> None:
        """Our verdict on ``sender``'s message ``mid`` (message ids count per direction)."""
        if sid in self.crdt.engine.replicas:
            self.crdt.record_outcome(sid, str(mid), status, reason, timings, sender=sender)
            return
        if sum(len(v) for v in self._pending.values()) >= MAX_PENDING:
            log.warning("too many outcomes wait for their session document; dropped",
                        extra=kv(session=sid, message=mid, status=status))
            return
        self._pending[sid].append(_Pending(trio.current_time() + self.outcome_wait_s, sender,
                                           str(mid), status, reason, timings))
        self._arm()

    async def _on_changes(self, changes: trio.MemoryReceiveChannel) -> None:
        async for change in changes:
            waiting = self._pending.pop(change.session_id, None)
            for p in waiting or ():
                try:
                    self.crdt.record_outcome(change.session_id, p.message_id, p.status, p.reason,
                                             p.timings, sender=p.sender)
                except (ValueError, KeyError) as exc:
                    log.warning("could not record outcome", extra=kv(err=exc))

    def _arm(self) -> None:
        if self._timer is not None:
            times = [p.deadline for ps in self._pending.values() for p in ps]
            self._timer.deadline = min(times, default=math.inf)

    async def _expire(self) -> None:
        while True:
            with trio.CancelScope() as self._timer:
                self._arm()
                await trio.sleep_forever()
            now = trio.current_time()
            for sid in list(self._pending):
                keep = [p for p in self._pending[sid] if p.deadline > now]
                for p in self._pending[sid]:
                    if p.deadline <= now:
                        log.warning("session document never arrived; outcome not recorded",
                                    extra=kv(session=sid, message=p.message_id, status=p.status))
                if keep:
                    self._pending[sid] = keep
                else:
                    del self._pending[sid]
