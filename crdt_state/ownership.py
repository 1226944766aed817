"""Who may write which key of a session document, checked on the update before pycrdt sees it.

Signatures say who wrote a record; these rules say what that author may write. Every rule is a
function of the update, its author and the keys of items accepted earlier — never of which
concurrent value currently wins — so every honest replica accepts exactly the same records and
refuses the same forgeries, whatever order they arrive in.

| map            | key                      | who may write it                          | value must say  |
|----------------|--------------------------|-------------------------------------------|-----------------|
| ``meta``       | session_id, compat_key,  | the creator, in the document's first      | session_id is   |
|                | creator, created_at      | record only (never changed afterwards)    | the doc id,     |
|                |                          |                                           | creator = author|
| ``meta``       | status                   | any participant                           | a known status  |
| ``participants``| peer id                 | any participant                           | added_by=author |
| ``presence``   | peer id                  | that peer                                 |                 |
| ``messages``   | message_id US sender     | the sender                                | sender = author |
| ``outcomes``   | mid US sender US receiver| the receiver                              | by = author     |
| ``lineage``    | state_id US created_by   | its creator                               | created_by=author|
| ``turns``      | agent US writer          | that writer (its own G-counter slot)      | a number        |

(US = the unit separator ``\\x1f``; the owner is the part after the last one.) Owners are in the
keys so that a forger can never even *address* someone else's entry: a last-writer-wins map would
otherwise let any participant overwrite — and so erase — the receiver's real verdict.

Other checks: an item overwriting a key (pycrdt encodes it with the overwritten item as
``origin``) is resolved to that key through :class:`KeyIndex`; a deletion must be an overwrite of
the same key in the same update (nothing is ever removed otherwise); every item must carry the
pycrdt client id bound to its signed writer (:func:`client_id`) and the writer's next clock, so no
one can occupy another writer's item ids and make its real edits look like duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import blake3

from crdt_state.yupdate import Item, Update, UpdateFormatError, decode

SEP = "\x1f"
ROOTS = ("meta", "participants", "presence", "messages", "outcomes", "lineage", "turns")
GENESIS_META = ("session_id", "compat_key", "creator", "created_at")
STATUSES = ("open", "active", "closed", "failed")
Target = tuple[str, str]  # (root map, key)


def client_id(author: bytes, writer: bytes) -> int:
    """The pycrdt client id a writer must use: bound to its signed identity (53 bits, JS-safe)."""
    digest = blake3.blake3(b"latentlink/crdt/client/1" + author + writer).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 53) - 1)


def owned_key(name: str, owner: str) -> str:
    return f"{name}{SEP}{owner}"


def split_owned(key: str) -> tuple[str, str]:
    """``(name, owner)``; owner is empty when the key carries none."""
    name, sep, owner = key.rpartition(SEP)
    return (name, owner) if sep else (key, "")


class Refusal(Exception):
    """An update the author may not write; ``label`` is low-cardinality (for metrics)."""

    def __init__(self, label: str, reason: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.label = label
        self.reason = reason
        self.retryable = retryable


class KeyIndex:
    """Item id -> (map, key) for every item the document holds, per client in clock order.

    Needed because pycrdt's encoding of an overwrite names only the item it replaces. Clocks of a
    client are dense from 0 (enforced on admission), so each client's keys are a plain list; the
    (map, key) tuples are interned, so the index costs about one pointer per item.
    """

    def __init__(self) -> None:
        self._by_client: dict[int, list[Target]] = {}
        self._intern: dict[Target, Target] = {}

    def next_clock(self, client: int) -> int:
        return len(self._by_client.get(client, ()))

    def lookup(self, client: int, clock: int) -> Target | None:
        keys = self._by_client.get(client)
        return keys[clock] if keys is not None and 0 <= clock < len(keys) else None

    def add(self, client: int, targets: list[Target]) -> None:
        keys = self._by_client.setdefault(client, [])
        keys.extend(self._intern.setdefault(t, t) for t in targets)


@dataclass(frozen=True)
class Checked:
    """An update that passed: its item targets (for :meth:`KeyIndex.add`) and its client."""

    client: int
    targets: list[Target]
    genesis_ok: bool


def check(update: bytes, author: str, client: int, index: KeyIndex, doc_id: str,
          genesis: bool) -> Checked:
    """Raise :class:`Refusal` unless ``author`` may write everything ``update`` writes.

    ``genesis``: this would be the document's first record (it may set the session header, and
    must: ``genesis_ok`` tells whether it does).
    """
    try:
        parsed = decode(update)
    except UpdateFormatError as exc:
        raise Refusal("undecodable", f"unsupported pycrdt update: {exc}") from None
    targets = _resolve(parsed, client, index)
    for item, target in zip(parsed.items, targets, strict=True):
        _check_item(item, target, author, doc_id, genesis)
    _check_deletes(parsed, client, targets, index)
    written = {t: i.value for i, t in zip(parsed.items, targets, strict=True) if not i.deleted}
    genesis_ok = genesis and written.get(("meta", "session_id")) == doc_id \
        and written.get(("meta", "creator")) == author and ("participants", author) in written
    return Checked(client, targets, genesis_ok)


def _resolve(parsed: Update, client: int, index: KeyIndex) -> list[Target]:
    """The (map, key) each item writes; refuse items under a client id other than the writer's."""
    start = index.next_clock(client)
    own: list[Target] = []
    for n, item in enumerate(parsed.items):
        if item.client != client:
            raise Refusal("unauthorized", "items under another writer's pycrdt client id")
        if item.clock != start + n:
            raise Refusal("unauthorized", f"item clock {item.clock}, expected {start + n}")
        if item.right_origin is not None:
            raise Refusal("undecodable", "right origin in a map item")
        if item.origin is None:
            assert item.root is not None and item.key is not None  # the decoder guarantees it
            target = (item.root, item.key)
        else:
            target_or_none = _lookup(item.origin, client, start, own, index)
            if target_or_none is None:
                raise Refusal("missing_predecessor", "overwrites an item not received yet",
                              retryable=True)
            target = target_or_none
        if target[0] not in ROOTS:
            raise Refusal("unauthorized", f"unknown map {target[0]!r}")
        own.append(target)
    return own


def _lookup(ref: tuple[int, int], client: int, start: int, own: list[Target],
            index: KeyIndex) -> Target | None:
    ref_client, ref_clock = ref
    if ref_client == client and ref_clock >= start:
        n = ref_clock - start
        if n >= len(own):
            raise Refusal("undecodable", "item refers to a later item")
        return own[n]
    return index.lookup(ref_client, ref_clock)


def _check_item(item: Item, target: Target, author: str, doc_id: str, genesis: bool) -> None:
    root, key = target
    value = None if item.deleted else item.value
    if root == "meta":
        if key in GENESIS_META:
            if not genesis:
                raise Refusal("unauthorized", f"meta.{key} is set once, by the first record")
            if (key == "session_id" and value != doc_id) or (key == "creator" and value != author):
                raise Refusal("unauthorized", f"genesis meta.{key} does not match")
        elif key != "status" or (not item.deleted and value not in STATUSES):
            raise Refusal("unauthorized", f"meta.{key} may not be written")
        return
    if root == "participants":
        _field(item, "added_by", author, "unauthorized", f"participant added_by is not {author}")
        return
    owner = key if root == "presence" else split_owned(key)[1]
    label = "forged_outcome" if root == "outcomes" else "unauthorized"
    if owner != author:
        raise Refusal(label, f"{root} entry of {owner or 'nobody'} written by {author}")
    field_of = {"messages": "sender", "outcomes": "by", "lineage": "created_by"}.get(root)
    if field_of is not None:
        _field(item, field_of, author, label, f"{root} entry claims {field_of} other than author")
    elif root == "turns" and not item.deleted and not isinstance(value, (int, float)):
        raise Refusal("unauthorized", "turn counter is not a number")
    elif root == "presence" and not item.deleted and not isinstance(value, dict):
        raise Refusal("unauthorized", "presence entry is not a record")


def _field(item: Item, name: str, author: str, label: str, reason: str) -> None:
    if item.deleted:
        return
    value: Any = item.value
    if not isinstance(value, dict) or value.get(name) != author:
        raise Refusal(label, reason)


def _check_deletes(parsed: Update, client: int, targets: list[Target], index: KeyIndex) -> None:
    """A deletion is only the other half of an overwrite: of a key this update also writes."""
    total = sum(length for _, _, length in parsed.deletes)
    written = set(targets)
    start = index.next_clock(client)
    if total > len(parsed.items):  # refused before walking ranges that may be huge
        ref_client, first, _ = parsed.deletes[0]
        target = _lookup((ref_client, first), client, start, targets, index)
        label = "forged_outcome" if target and target[0] == "outcomes" else "unauthorized"
        raise Refusal(label, f"deletes {total} entries but writes {len(parsed.items)}")
    for ref_client, first, length in parsed.deletes:
        for clock in range(first, first + length):
            target = _lookup((ref_client, clock), client, start, targets, index)
            if target is None:
                raise Refusal("missing_predecessor", "deletes an item not received yet",
                              retryable=True)
            if target not in written:
                label = "forged_outcome" if target[0] == "outcomes" else "unauthorized"
                raise Refusal(label, f"deletes {target[0]} entry {target[1]!r} without writing it")
