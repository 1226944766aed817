"""Typed view of one session document; the only module that touches raw pycrdt structures.

Layout (all top-level pycrdt Maps; values are immutable JSON-like records, never nested shared
types, so two writers can never race to create the same nested container and lose one side).
Who may write what is enforced on admission by ``ownership.py``; ``US`` is ``\x1f``:

* ``meta``          session_id, compat_key, creator, created_at (first record only), status
* ``participants``  peer_id -> {role, added_by, added_at}       (any participant; added_by = writer)
* ``presence``      peer_id -> {joined_at, left_at}             (written by that peer only)
* ``messages``      "message_id US sender" -> tensor message record     (written by the sender)
* ``outcomes``      "message_id US sender US receiver" -> {status, reason, at, by, sender, timings}
  (written by the receiver)
* ``lineage``       "state_id US created_by" -> {parent, message_id, created_by, at}
* ``turns``         "agent US writer_peer" -> int               (a G-counter: each writer owns its
  own slot, so concurrent increments from two peers add up instead of overwriting each other)

Why the owner is part of the key: a last-writer-wins entry can be overwritten by anyone who can
address it; with the owner in the key, a forger can only write under its own name. Why split
sender and receiver fields: last-writer-wins on a whole record would drop one side's edit when the
sender and the receiver touch the same message concurrently.

Reading: an outcome counts as a message's outcome only when the message names its writer as the
receiver (:meth:`SessionDoc.outcomes`, keyed by (message_id, sender)); any other outcome — written before its message arrived, or
by a participant that was not the receiver — is reported apart, as unverified, never as a verdict.

pycrdt returns every number as a float (values below 2^53); the accessors convert back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pycrdt

from crdt_state.ownership import SEP, STATUSES, owned_key, split_owned

TURN_SEP = SEP


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
    """What the receiver records: applied, refused or rejected (with the reason).

    ``sender`` names the message's sender: message ids are only unique per sender (tensor
    sessions number each direction from the start), so (message_id, sender) names one message.
    """

    message_id: str
    status: str
    by: str
    at: float
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    sender: str = ""


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

    def __init__(self, on_local_update: Callable[[bytes], None] | None = None,
                 client_id: int | None = None, owner: str | None = None) -> None:
        """``client_id``: the pycrdt client id bound to this node's writer (``ownership.client_id``);
        a replica's peers refuse items under any other. ``owner``: the peer every local edit is
        written as; an edit in someone else's name raises ValueError before it touches the
        document (peers would refuse it, and with it every later edit of this writer)."""
        self.doc = pycrdt.Doc(client_id=client_id)
        self._owner = owner
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

    def _as(self, who: str, what: str) -> None:
        if self._owner is not None and who != self._owner:
            raise ValueError(f"{what} is {who!r}, but this replica writes as {self._owner!r}")

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
        self._as(creator, "creator")
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
        self._as(added_by, "added_by")
        now = time.time() if now is None else now
        with self._edit():
            self._participants[peer_id] = {"role": role, "added_by": added_by, "added_at": now}

    def mark_joined(self, peer_id: str, now: float | None = None) -> None:
        self._as(peer_id, "presence of")
        now = time.time() if now is None else now
        with self._edit():
            prev = self._presence.get(peer_id) or {}
            self._presence[peer_id] = {"joined_at": prev.get("joined_at") or now, "left_at": None}

    def mark_left(self, peer_id: str, now: float | None = None) -> None:
        self._as(peer_id, "presence of")
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
        self._as(msg.sender, "sender")
        with self._edit():
            self._messages[owned_key(msg.message_id, msg.sender)] = {
                "kind": msg.kind, "sender": msg.sender, "receiver": msg.receiver,
                "layers": list(msg.layers), "tokens": list(msg.tokens), "nbytes": msg.nbytes,
                "checksums": list(msg.checksums), "path": msg.path, "sent_at": msg.sent_at,
                "timings": dict(msg.timings),
            }

    def record_outcome(self, outcome: Outcome) -> None:
        self._as(outcome.by, "outcome by")
        with self._edit():
            self._outcomes[owned_key(f"{outcome.message_id}{SEP}{outcome.sender}", outcome.by)] = {
                "status": outcome.status, "reason": outcome.reason, "by": outcome.by,
                "sender": outcome.sender, "at": outcome.at, "timings": dict(outcome.timings),
            }

    def messages(self) -> list[TensorMessage]:
        out = []
        for key in self._messages.keys():
            mid, sender = split_owned(key)
            m = self._messages[key]
            if not isinstance(m, dict) or m.get("sender") != sender:
                continue  # admission refuses these; a document built without it may hold some
            out.append(TensorMessage(
                message_id=mid, kind=str(m["kind"]), sender=sender,
                receiver=str(m["receiver"]),
                layers=(_int(m["layers"][0]), _int(m["layers"][1])),
                tokens=(_int(m["tokens"][0]), _int(m["tokens"][1])),
                nbytes=_int(m["nbytes"]), checksums=tuple(str(c) for c in m["checksums"]),
                path=str(m["path"]), sent_at=float(m["sent_at"]),
                timings={str(k): float(v) for k, v in (m.get("timings") or {}).items()},
            ))
        out.sort(key=lambda m: (m.sent_at, m.message_id, m.sender))
        return out

    def message_count(self) -> int:
        return len(self._messages)

    def _all_outcomes(self) -> dict[tuple[str, str, str], Outcome]:
        """Every outcome entry, keyed by (message_id, sender, writer), whoever the receiver is."""
        out = {}
        for key in self._outcomes.keys():
            head, by = split_owned(key)
            mid, sender = split_owned(head)
            o = self._outcomes[key]
            if not isinstance(o, dict) or o.get("by") != by:
                continue
            out[(mid, sender, by)] = Outcome(
                message_id=mid, status=str(o["status"]), by=by, at=float(o["at"]),
                reason=str(o.get("reason") or ""),
                timings={str(k): float(v) for k, v in (o.get("timings") or {}).items()},
                sender=sender,
            )
        return out

    def outcomes(self) -> dict[tuple[str, str], Outcome]:
        """Verified outcomes: (message_id, sender) -> the outcome the message's receiver wrote."""
        everything = self._all_outcomes()
        return {(m.message_id, m.sender): o for m in self.messages()
                if (o := everything.get((m.message_id, m.sender, m.receiver))) is not None}

    def unverified_outcomes(self) -> list[Outcome]:
        """Outcomes not written by their message's receiver (or whose message is not here yet)."""
        named = {(m.message_id, m.sender, m.receiver) for m in self.messages()}
        return [o for k, o in sorted(self._all_outcomes().items()) if k not in named]

    # -- lineage and turns ---------------------------------------------------------------------

    def add_lineage(self, edge: LineageEdge) -> None:
        self._as(edge.created_by, "created_by")
        with self._edit():
            self._lineage[owned_key(edge.state_id, edge.created_by)] = {
                "parent": edge.parent, "message_id": edge.message_id,
                "created_by": edge.created_by, "at": edge.at,
            }

    def lineage(self) -> list[LineageEdge]:
        out = []
        for key in self._lineage.keys():
            sid, created_by = split_owned(key)
            e = self._lineage[key]
            if not isinstance(e, dict) or e.get("created_by") != created_by:
                continue
            out.append(LineageEdge(state_id=sid, parent=e.get("parent"),
                                   message_id=e.get("message_id"), created_by=created_by,
                                   at=float(e["at"])))
        out.sort(key=lambda e: (e.at, e.state_id, e.created_by))
        return out

    def bump_turn(self, agent_id: str, writer: str, by: int = 1) -> int:
        """Increment ``agent_id``'s counter in ``writer``'s own slot; returns the new total."""
        self._as(writer, "turn writer")
        key = owned_key(agent_id, writer)
        with self._edit():
            self._turns[key] = _int(self._turns.get(key)) + by
        return self.turns().get(agent_id, 0)

    def turns(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for key in self._turns.keys():
            agent = split_owned(key)[0]
            totals[agent] = totals.get(agent, 0) + _int(self._turns[key])
        return totals

    # -- snapshot ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain-Python, JSON-serialisable view (for the control API and tests).

        Each message carries the outcome written by the receiver it names (or None); outcomes
        written by anyone else, or ahead of their message, are listed apart as unverified.
        """
        everything = self._all_outcomes()
        return {
            "session_id": self.session_id,
            "compat_key": self.compat_key,
            "creator": self.creator,
            "status": self.status,
            "participants": [asdict(p) for p in self.participants()],
            "messages": [
                {**asdict(m), "layers": list(m.layers), "tokens": list(m.tokens),
                 "checksums": list(m.checksums),
                 "outcome": asdict(o)
                 if (o := everything.get((m.message_id, m.sender, m.receiver))) else None}
                for m in self.messages()
            ],
            "unverified_outcomes": [asdict(o) for o in self.unverified_outcomes()],
            "lineage": [asdict(e) for e in self.lineage()],
            "turns": self.turns(),
        }
