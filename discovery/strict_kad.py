"""A Kademlia DHT server that stores values only in namespaces it has a validator for.

py-libp2p 0.8.1's ``KadDHT`` validates an inbound ``PUT_VALUE`` through its ``NamespacedValidator``,
but that validator *accepts* a key whose namespace has no validator ("/evil/x": a warning, then
stored) and passes a key without a namespace to a validator that accepts everything. Any peer could
therefore park up to 1 MiB per key (50,000 keys) on our nodes. We only ever serve our own signed
records (``/latentlink/<peer id>``), so everything else is refused.

Why this shape (the narrowest hook we found): the ``PUT_VALUE`` branch of
``KadDHT._do_handle_stream`` calls ``self.validator.validate(key, value)`` before it stores
anything, and treats any exception as "do not store, reset the stream" (the spec's answer). So we
replace only the validator — a strict :class:`NamespacedValidator` over exactly the namespaces we
register, without py-libp2p's default ``pk``/``ipns`` ones — and leave the message loop untouched.
The validator is not told who sent the record, so :class:`StrictKadDHT` overrides the public
stream handler just to remember the inbound peer in a context variable (trio gives every handler
task its own context) for the refusal log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar

from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.records.utils import InvalidRecordType, split_key
from libp2p.records.validator import NamespacedValidator, Validator

log = logging.getLogger("discovery.dht")

# The peer whose inbound DHT stream is being handled in this task (None: a local call).
_INBOUND_PEER: ContextVar[ID | None] = ContextVar("latentlink_dht_inbound_peer", default=None)

RefuseCallback = Callable[[str], None]


def key_namespace(key: str) -> str | None:
    """``"/ns/rest"`` -> ``"ns"``; a key without a namespace -> None."""
    try:
        return split_key(key)[0]
    except InvalidRecordType:
        return None


class StrictValidator(NamespacedValidator):
    """Accepts a record only if its key's namespace has a registered validator that accepts it.

    Each refusal is logged (peer, namespace, reason) and reported through ``on_refuse`` with the
    label ``unknown_namespace`` (no validator, or no namespace at all) or ``invalid_record`` (the
    namespace's validator refused the value).
    """

    def __init__(self, validators: dict[str, Validator], on_refuse: RefuseCallback,
                 room: Callable[[str], bool] = lambda key: True) -> None:
        super().__init__(dict(validators), strict_validation=True)
        self._on_refuse = on_refuse
        self._room = room  # may a value under this key be stored (store not full, or a known key)

    def _refused(self, reason: str, key: str, namespace: str | None, detail: str) -> None:
        self._on_refuse(reason)
        peer = _INBOUND_PEER.get()
        log.info("dht value refused", extra={"kv": {
            "reason": reason, "peer": str(peer) if peer else "local", "namespace": namespace,
            "key": key[:80], "detail": detail}})

    def validate(self, key: str, value: bytes) -> None:
        namespace = key_namespace(key)
        validator = self._validators.get(namespace) if namespace is not None else None
        if validator is None:
            self._refused("unknown_namespace", key, namespace, "no validator for this namespace")
            raise InvalidRecordType(f"no validator for the namespace of {key[:80]!r}")
        try:
            validator.validate(key, value)
        except ValueError as exc:  # our validators signal a bad value with ValueError subclasses
            self._refused("invalid_record", key, namespace, str(exc))
            raise
        if not self._room(key):  # anyone can mint identities, each with a valid record
            self._refused("store_full", key, namespace, "value store full (dht.max_stored_records)")
            raise InvalidRecordType("value store full")


class StrictKadDHT(KadDHT):
    """``KadDHT`` whose value store takes only records a registered namespace validator accepts."""

    def __init__(self, host: IHost, mode: DHTMode, validators: dict[str, Validator],
                 on_refuse: RefuseCallback, max_values: int = 1024) -> None:
        def room(key: str) -> bool:
            store = self.value_store.store
            return key.encode() in store or len(store) < max_values

        super().__init__(host, mode, validator=StrictValidator(validators, on_refuse, room),
                         validator_changed=True,  # no default pk/ipns validators either
                         strict_validation=True)

    async def handle_stream(self, stream: INetStream) -> None:
        token = _INBOUND_PEER.set(stream.muxed_conn.peer_id)
        try:
            await super().handle_stream(stream)
        finally:
            _INBOUND_PEER.reset(token)
