"""Typed view of one session document; the only module that touches raw pycrdt structures.

Layout (all top-level pycrdt Maps; values are immutable JSON-like records, never nested shared
types, so two writers can never race to create the same nested container and lose one side):

* ``meta``          session_id, compat_key, status, created_at, creator
* ``participants``  peer_id -> {role, added_by, added_at}       (written by any participant)
* ``presence``      peer_id -> {joined_at, left_at}             (written by that peer only)
* ``messages``      message_id -> tensor message record         (written by the sender)
* ``outcomes``      message_id -> {status, reason, at, by, timings} (written by the receiver)
* ``lineage``       state_id -> {parent, message_id, created_by, at}
* ``turns``         "agent\\x1fwriter_peer" -> int              (a G-counter: each writer owns its
  own slot, so concurrent increments from two peers add up instead of overwriting each other)

Why split sender and receiver fields: last-writer-wins on a whole record would drop one side's
edit when the sender and the receiver touch the same message concurrently.

pycrdt returns every number as a float (values below 2^53); the accessors convert back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pycrdt

STATUSES = ("open", "active", "closed", "failed")
TURN_SEP = "\x1f"


@dataclass(frozen=True)
class Participant:
    peer_id: str
    role: str
    added_by: str
    added_at: float
    joined_at: float | None = None
    left_at: float | None = None


@dataclass(frozen=True)
class TensorMessage:
    """What the sender records when a tensor message leaves (DESIGN.md §4)."""

    message_id: str
    kind: str
    sender: str
    receiver: str
    layers: tuple[int, int] = (0, 0)
    tokens: tuple[int, int] = (0, 0)
    nbytes: int = 0
    checksums: tuple[str, ...] = ()
    path: str = ""
    sent_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What the receiver records: applied or rejected (with the reason)."""

    message_id: str
    status: str
    by: str
    at: float
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LineageEdge:
    state_id: str
    parent: str | None
    message_id: str | None
    created_by: str
    at: float


def _int(v: Any) -> int:
    return int(v) if v is not None else 0


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


class SessionDoc:
    """One session's pycrdt document with typed accessors.

    Mutations run in one pycrdt transaction each; when ``local`` is true the resulting binary
    update is captured and handed to ``on_local_update`` so the sync layer can sign and ship it.
    """

    def __init__(self, on_local_update: Callable[[bytes], None] | None = None) -> None:
        self.doc = pycrdt.Doc()
        self._meta = self.doc.get("meta", type=pycrdt.Map)
        self._participants = self.doc.get("participants", type=pycrdt.Map)
        self._presence = self.doc.get("presence", type=pycrdt.Map)
        self._messages = self.doc.get("messages", type=pycrdt.Map)
        self._outcomes = self.doc.get("outcomes", type=pycrdt.Map)
        self._lineage = self.doc.get("lineage", type=pycrdt.Map)
        self._turns = self.doc.get("turns", type=pycrdt.Map)
        self._on_local_update = on_local_update
        self._captured: list[bytes] = []
        self._capturing = False
        self._sub = self.doc.observe(self._observe)

    # -- update capture ------------------------------------------------------------------------

    def _observe(self, event: pycrdt.TransactionEvent) -> None:
        if self._capturing:
            self._captured.append(bytes(event.update))

    @contextmanager
    def _edit(self) -> Iterator[None]:
        """Run a local edit; emit its exact pycrdt update (not a state diff) afterwards."""
        self._capturing = True
        try:
            with self.doc.transaction():
                yield
        finally:
            self._capturing = False
        captured, self._captured = self._captured, []
        for update in captured:
            if self._on_local_update is not None:
                self._on_local_update(update)

    def apply_update(self, update: bytes) -> None:
        """Apply a remote (already verified) update; raises ValueError on undecodable bytes."""
        self.doc.apply_update(update)

    # -- session header ------------------------------------------------------------------------

    def init(self, session_id: str, compat_key: str, creator: str,
             participants: dict[str, str], now: float | None = None) -> None:
        """Genesis edit: header plus the initial participants (peer_id -> role)."""
        now = time.time() if now is None else now
        with self._edit():
            self._meta["session_id"] = session_id
            self._meta["compat_key"] = compat_key
            self._meta["creator"] = creator
            self._meta["created_at"] = now
            self._meta["status"] = "open"
            for peer, role in participants.items():
                self._participants[peer] = {"role": role, "added_by": creator, "added_at": now}

    @property
    def session_id(self) -> str | None:
        return self._meta.get("session_id")

    @property
    def compat_key(self) -> str | None:
        return self._meta.get("compat_key")

    @property
    def creator(self) -> str | None:
        return self._meta.get("creator")

    @property
    def status(self) -> str | None:
        return self._meta.get("status")

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {STATUSES}")
        with self._edit():
            self._meta["status"] = status

    # -- participants --------------------------------------------------------------------------

    def is_participant(self, peer_id: str) -> bool:
        return peer_id in self._participants

    def participant_ids(self) -> list[str]:
        return sorted(self._participants.keys())

    def add_participant(self, peer_id: str, role: str, added_by: str,
                        now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._edit():
            self._participants[peer_id] = {"role": role, "added_by": added_by, "added_at": now}

    def mark_joined(self, peer_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._edit():
            prev = self._presence.get(peer_id) or {}
            self._presence[peer_id] = {"joined_at": prev.get("joined_at") or now, "left_at": None}

    def mark_left(self, peer_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._edit():
            prev = self._presence.get(peer_id) or {}
            self._presence[peer_id] = {"joined_at": prev.get("joined_at"), "left_at": now}

    def participants(self) -> list[Participant]:
        out = []
        for peer in self.participant_ids():
            p = self._participants[peer]
            pres = self._presence.get(peer) or {}
            out.append(Participant(
                peer_id=peer, role=str(p.get("role", "")), added_by=str(p.get("added_by", "")),
                added_at=float(p.get("added_at", 0.0)),
                joined_at=_opt_float(pres.get("joined_at")), left_at=_opt_float(pres.get("left_at")),
            ))
        return out

    # -- tensor message log --------------------------------------------------------------------

    def log_message(self, msg: TensorMessage) -> None:
        with self._edit():
            self._messages[msg.message_id] = {
                "kind": msg.kind, "sender": msg.sender, "receiver": msg.receiver,
                "layers": list(msg.layers), "tokens": list(msg.tokens), "nbytes": msg.nbytes,
                "checksums": list(msg.checksums), "path": msg.path, "sent_at": msg.sent_at,
                "timings": dict(msg.timings),
            }

    def record_outcome(self, outcome: Outcome) -> None:
        with self._edit():
            self._outcomes[outcome.message_id] = {
                "status": outcome.status, "reason": outcome.reason, "by": outcome.by,
                "at": outcome.at, "timings": dict(outcome.timings),
            }

    def messages(self) -> list[TensorMessage]:
        out = []
        for mid in self._messages.keys():
            m = self._messages[mid]
            out.append(TensorMessage(
                message_id=mid, kind=str(m["kind"]), sender=str(m["sender"]),
                receiver=str(m["receiver"]),
                layers=(_int(m["layers"][0]), _int(m["layers"][1])),
                tokens=(_int(m["tokens"][0]), _int(m["tokens"][1])),
                nbytes=_int(m["nbytes"]), checksums=tuple(str(c) for c in m["checksums"]),
                path=str(m["path"]), sent_at=float(m["sent_at"]),
                timings={str(k): float(v) for k, v in (m.get("timings") or {}).items()},
            ))
        out.sort(key=lambda m: (m.sent_at, m.message_id))
        return out

    def message_count(self) -> int:
        return len(self._messages)

    def outcomes(self) -> dict[str, Outcome]:
        out = {}
        for mid in self._outcomes.keys():
            o = self._outcomes[mid]
            out[mid] = Outcome(
                message_id=mid, status=str(o["status"]), by=str(o["by"]), at=float(o["at"]),
                reason=str(o.get("reason") or ""),
                timings={str(k): float(v) for k, v in (o.get("timings") or {}).items()},
            )
        return out

    # -- lineage and turns ---------------------------------------------------------------------

    def add_lineage(self, edge: LineageEdge) -> None:
        with self._edit():
            self._lineage[edge.state_id] = {
                "parent": edge.parent, "message_id": edge.message_id,
                "created_by": edge.created_by, "at": edge.at,
            }

    def lineage(self) -> list[LineageEdge]:
        out = [
            LineageEdge(state_id=sid, parent=e.get("parent"), message_id=e.get("message_id"),
                        created_by=str(e["created_by"]), at=float(e["at"]))
            for sid, e in ((k, self._lineage[k]) for k in self._lineage.keys())
        ]
        out.sort(key=lambda e: (e.at, e.state_id))
        return out

    def bump_turn(self, agent_id: str, writer: str, by: int = 1) -> int:
        """Increment ``agent_id``'s counter in ``writer``'s own slot; returns the new total."""
        key = f"{agent_id}{TURN_SEP}{writer}"
        with self._edit():
            self._turns[key] = _int(self._turns.get(key)) + by
        return self.turns().get(agent_id, 0)

    def turns(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for key in self._turns.keys():
            agent = key.split(TURN_SEP, 1)[0]
            totals[agent] = totals.get(agent, 0) + _int(self._turns[key])
        return totals

    # -- snapshot ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain-Python, JSON-serialisable view (for the control API and tests)."""
        outcomes = self.outcomes()
        return {
            "session_id": self.session_id,
            "compat_key": self.compat_key,
            "creator": self.creator,
            "status": self.status,
            "participants": [asdict(p) for p in self.participants()],
            "messages": [
                {**asdict(m), "layers": list(m.layers), "tokens": list(m.tokens),
                 "checksums": list(m.checksums),
                 "outcome": asdict(outcomes[m.message_id]) if m.message_id in outcomes else None}
                for m in self.messages()
            ],
            "orphan_outcomes": [asdict(o) for mid, o in sorted(outcomes.items())
                                if mid not in self._messages],
            "lineage": [asdict(e) for e in self.lineage()],
            "turns": self.turns(),
        }
