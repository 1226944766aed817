"""Ranges requested from some peer and not yet received, so that a second peer is not asked too.

Only an optimisation: after a partition heals each record crosses to each node once instead of
once per peer. Forgetting an entry costs at worst a duplicate pull, never correctness — which is
what lets the table be bounded under hostile input (STEP1s naming any number of documents and
writers): entries expire ``timeout_s`` after their last sign of progress, entries of documents we
did not keep are dropped with them, and past ``max_entries`` the oldest are forgotten.

Entries are kept in deadline order (every write moves its entry to the end with a deadline of
``now + timeout_s``; ``now`` never goes back in the service), so expiry and eviction are O(1).
"""

from __future__ import annotations

from collections import OrderedDict

from crdt_state.wire import WriterKey

Key = tuple[str, WriterKey]  # (doc_id, writer)


class InflightTable:
    def __init__(self, max_entries: int, timeout_s: float) -> None:
        self.max_entries = max_entries
        self.timeout_s = timeout_s
        self._entries: OrderedDict[Key, tuple[int, float]] = OrderedDict()
        self._by_doc: dict[str, set[WriterKey]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def awaited(self, doc_id: str, key: WriterKey, now: float) -> int | None:
        """The sequence number being fetched for this writer, while its request is alive."""
        hit = self._entries.get((doc_id, key))
        return hit[0] if hit is not None and hit[1] > now else None

    def known(self, doc_id: str, key: WriterKey) -> int | None:
        """Like :meth:`awaited`, expired or not (a late answer still ends its entry)."""
        hit = self._entries.get((doc_id, key))
        return hit[0] if hit is not None else None

    def expect(self, doc_id: str, key: WriterKey, upto: int, now: float) -> None:
        """Record (or refresh) that records up to ``upto`` are on their way."""
        self.expire(now)
        k = (doc_id, key)
        self._entries.pop(k, None)
        while len(self._entries) >= self.max_entries:
            (old_doc, old_key), _ = self._entries.popitem(last=False)
            self._unindex(old_doc, old_key)
        self._entries[k] = (upto, now + self.timeout_s)
        self._by_doc.setdefault(doc_id, set()).add(key)

    def done(self, doc_id: str, key: WriterKey) -> None:
        if self._entries.pop((doc_id, key), None) is not None:
            self._unindex(doc_id, key)

    def drop_doc(self, doc_id: str) -> None:
        """Forget every entry of a document we are not keeping."""
        for key in self._by_doc.pop(doc_id, ()):
            self._entries.pop((doc_id, key), None)

    def expire(self, now: float) -> None:
        while self._entries:
            (doc_id, key), (_, deadline) = next(iter(self._entries.items()))
            if deadline > now:
                break
            del self._entries[(doc_id, key)]
            self._unindex(doc_id, key)

    def _unindex(self, doc_id: str, key: WriterKey) -> None:
        keys = self._by_doc.get(doc_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_doc[doc_id]
