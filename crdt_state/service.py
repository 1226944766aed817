"""``/latentlink/crdt/1.0.0``: runs the sans-I/O :class:`SyncEngine` over py-libp2p streams.

One long-lived stream per peer (opening one costs ~5 ms). Each stream has a writer task fed by a
queue, so a reader never blocks on a write — two peers answering each other's large requests at
once would otherwise deadlock on full yamux windows. Writes are serialised by a ``trio.Lock``.
All tasks live in a nursery the caller owns (``run()`` or ``start(nursery)``); inbound streams
are read inside the handler task py-libp2p gives us, and end when the service stops.

Streams are capped: at most ``max_links_per_peer`` per peer (ours and theirs) and ``max_links`` in
all; an inbound stream past either cap is reset at once. That, the engine's limits (records per
peer per second, documents per creator) and protocol errors are *refusals*: each is counted through
``on_refuse(label)`` and logged with its reason and the peer (``refusals.py``).

The node composes this in ``meshnode/node.py``; the session API here is synchronous (edits are
local and immediate), pushes to participants happen in the background.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from crdt_state.limits import CrdtLimits
from crdt_state.refusals import RefusalLog
from crdt_state.replica import Rejected
from crdt_state.schema import LineageEdge, Outcome, SessionDoc, TensorMessage
from crdt_state.store import UpdateStore
from crdt_state.sync import Output, SyncEngine
from crdt_state.wire import SignedUpdate, SyncProtocolError, WriterKey

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/latentlink/crdt/1.0.0")
READ_CHUNK = 256 * 1024
WRITE_COALESCE_BYTES = 1024 * 1024
FULL_ROUND_EVERY = 10  # ticks between unconditional STEP1s (covers lost requests)
OUTCOME_STATUSES = ("applied", "refused", "rejected")
EDIT_HEADROOM = 2048  # pycrdt update overhead over the msgpack size of the values it carries


@dataclass(frozen=True)
class SessionChange:
    """Emitted to subscribers after a document changed (``origin``: "local" or a peer ID)."""

    session_id: str
    origin: str
    records: int


@dataclass
class Stats:
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    records_accepted: int = 0
    rejected: list[Rejected] = field(default_factory=list)


class _Link:
    """One stream to a peer: a send queue drained by one writer task, writes under a lock."""

    def __init__(self, peer: str, stream: INetStream, max_queued_bytes: int,
                 on_overflow: Callable[[_Link], None]) -> None:
        self.peer = peer
        self.stream = stream
        self.lock = trio.Lock()
        # Unbounded in count so a reader never blocks on its own replies; bounded in bytes.
        self.send_q, self.recv_q = trio.open_memory_channel[list[bytes]](math.inf)
        self.queued_bytes = 0
        self.max_queued_bytes = max_queued_bytes
        self._on_overflow = on_overflow
        self.closed = False
        self.last_vv: dict[str, dict[WriterKey, int]] = {}  # what our last STEP1s announced

    def queue(self, frames: list[bytes]) -> None:
        if frames and not self.closed:
            self.queued_bytes += sum(map(len, frames))
            if self.queued_bytes > self.max_queued_bytes:
                # A peer that asks faster than it reads: drop the stream; it can reconnect.
                self._on_overflow(self)
                self.closed = True
                self.send_q.close()
                return
            self.send_q.send_nowait(frames)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.send_q.close()
            with trio.move_on_after(1):
                try:
                    await self.stream.reset()
                except Exception:  # already gone: nothing left to release
                    pass


class CrdtService:
    def __init__(self, host: IHost, key_pair: KeyPair, store: UpdateStore | None = None,
                 limits: CrdtLimits | None = None, dial_timeout_s: float = 5.0,
                 accept_session: Callable[[SessionDoc], bool] | None = None,
                 on_refuse: Callable[[str], None] | None = None) -> None:
        """``accept_session`` decides whether to keep a session another peer created with us as
        a participant (default: keep every such invitation). ``on_refuse(label)`` is called once
        per refusal of a peer (the node counts them in /metrics)."""
        self.host = host
        self.limits = limits or CrdtLimits()
        self.refusals = RefusalLog(log, on_refuse, max_keys=4 * self.limits.max_links)
        self.store = store
        self.engine = SyncEngine(key_pair, self.limits, on_accept=self._persist,
                                 accept_session=accept_session)
        self.peer_id = self.engine.local_peer
        self.blocked: set[str] = set()
        self.stats = Stats()
        self.dial_timeout_s = dial_timeout_s
        self._links: dict[str, _Link] = {}
        self._all_links: set[_Link] = set()
        self._dialing: set[str] = set()
        self._dial_after: dict[str, float] = {}
        self._subs: list[tuple[str | None, trio.MemorySendChannel[SessionChange]]] = []
        self._nursery: trio.Nursery | None = None
        if store is not None:
            stale = self.engine.load(store.load())
            if stale:
                log.warning("crdt: %d stored records no longer pass admission (first: %s); "
                            "they are ignored", len(stale), stale[0].reason)

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def run(self) -> AsyncIterator[CrdtService]:
        """``async with service.run():`` — owns its nursery; everything stops on exit."""
        async with trio.open_nursery() as nursery:
            await self.start(nursery)
            try:
                yield self
            finally:
                with trio.CancelScope(shield=True):  # flush the store even when cancelled
                    await self.stop()
                nursery.cancel_scope.cancel()

    async def start(self, nursery: trio.Nursery) -> None:
        """Attach to the host and start anti-entropy in the caller's nursery."""
        self._nursery = nursery
        self.host.set_stream_handler(PROTOCOL_ID, self._handle_inbound)
        nursery.start_soon(self._anti_entropy_loop)

    async def stop(self) -> None:
        self._nursery = None  # late inbound streams are refused from here on
        for link in list(self._all_links):
            await link.close()
        self._links.clear()
        if self.store is not None:
            self.store.flush()
        for _, ch in self._subs:
            ch.close()
        self._subs.clear()

    # -- partitions (operators and tests) ------------------------------------------------------

    async def block(self, peer: str) -> None:
        """Cut a peer off: close its streams and connection, refuse it until :meth:`unblock`."""
        self.blocked.add(peer)
        for link in [lk for lk in self._all_links if lk.peer == peer]:
            await link.close()
        self._links.pop(peer, None)
        try:
            await self.host.disconnect(ID.from_base58(peer))
        except Exception as exc:  # already disconnected
            log.debug("disconnect %s: %s", peer, exc)

    def unblock(self, peer: str) -> None:
        self.blocked.discard(peer)
        self._dial_after.pop(peer, None)

    def connected(self, peer: str) -> None:
        """Hint from the node that a connection to ``peer`` came up: sync with it now."""
        self._dial_after.pop(peer, None)
        self._sync_with(peer)

    # -- session API ---------------------------------------------------------------------------

    def create_session(self, session_id: str, compat_key: str,
                       participants: Mapping[str, str] | Iterable[str]) -> None:
        """Create a session; ``participants`` maps peer ID -> role (a plain list means "agent")."""
        roles = dict(participants) if isinstance(participants, Mapping) else {
            p: "agent" for p in participants}
        roles.setdefault(self.peer_id, "owner")
        self._check_size(None, roles)
        recs = self.engine.create(session_id, compat_key, roles)
        self._after_local(session_id, recs)
        self.join(session_id)

    def join(self, session_id: str) -> None:
        self._edit(session_id, lambda d: d.mark_joined(self.peer_id))

    def leave(self, session_id: str) -> None:
        self._edit(session_id, lambda d: d.mark_left(self.peer_id))

    def add_participant(self, session_id: str, peer_id: str, role: str = "agent") -> None:
        self._edit(session_id, lambda d: d.add_participant(peer_id, role, self.peer_id))

    def set_status(self, session_id: str, status: str) -> None:
        self._edit(session_id, lambda d: d.set_status(status))

    def log_message(self, session_id: str, *, kind: str, receiver: str,
                    message_id: str | None = None, layers: tuple[int, int] = (0, 0),
                    tokens: tuple[int, int] = (0, 0), nbytes: int = 0,
                    checksums: Iterable[str] = (), path: str = "",
                    timings: Mapping[str, float] | None = None,
                    sent_at: float | None = None) -> str:
        """Record a tensor message this node sent; returns its message id."""
        msg = TensorMessage(
            message_id=message_id or uuid.uuid4().hex, kind=kind, sender=self.peer_id,
            receiver=receiver, layers=layers, tokens=tokens, nbytes=nbytes,
            checksums=tuple(checksums), path=path,
            sent_at=time.time() if sent_at is None else sent_at, timings=dict(timings or {}))
        self._check_size(session_id, msg.__dict__)
        self._edit(session_id, lambda d: d.log_message(msg))
        return msg.message_id

    def record_outcome(self, session_id: str, message_id: str, status: str, reason: str = "",
                       timings: Mapping[str, float] | None = None, *,
                       sender: str | None = None) -> None:
        """Record, as the receiver, that a message was applied, refused or rejected (and why).

        ``sender``: who sent it (message ids are unique per sender only). Left out, it is the
        sender of the one message with this id addressed to us, or else — the message may not
        have replicated yet — the one other participant of a two-party session.
        """
        if status not in OUTCOME_STATUSES:
            raise ValueError(f"status must be one of {OUTCOME_STATUSES}")
        doc = self.doc(session_id)
        known = [m for m in doc.messages() if m.message_id == message_id
                 and (sender is None or m.sender == sender)]
        if known and all(m.receiver != self.peer_id for m in known):
            # Peers would file it as unverified: only the receiver's outcome counts.
            raise ValueError(f"message {message_id!r} was not sent to this node")
        if sender is None:
            senders = {m.sender for m in known if m.receiver == self.peer_id} or \
                set(doc.participant_ids()) - {self.peer_id}
            if len(senders) != 1:
                raise ValueError(f"cannot tell who sent message {message_id!r}: pass sender=")
            (sender,) = senders
        out = Outcome(message_id, status, self.peer_id, time.time(), reason, dict(timings or {}),
                      sender)
        self._check_size(session_id, out.__dict__)
        self._edit(session_id, lambda d: d.record_outcome(out))

    def add_lineage(self, session_id: str, state_id: str, parent: str | None,
                    message_id: str | None = None) -> None:
        edge = LineageEdge(state_id, parent, message_id, self.peer_id, time.time())
        self._edit(session_id, lambda d: d.add_lineage(edge))

    def bump_turn(self, session_id: str, agent_id: str) -> int:
        box: list[int] = []
        self._edit(session_id, lambda d: box.append(d.bump_turn(agent_id, self.peer_id)))
        return box[0]

    def doc(self, session_id: str) -> SessionDoc:
        """Typed read access (mutate only through this service, or edits are not replicated)."""
        return self.engine.replicas[session_id].doc

    def get(self, session_id: str) -> dict[str, Any]:
        return self.doc(session_id).snapshot()

    def list_sessions(self) -> list[dict[str, Any]]:
        out = []
        for sid, rep in sorted(self.engine.replicas.items()):
            d = rep.doc
            out.append({"session_id": sid, "status": d.status, "compat_key": d.compat_key,
                        "participants": len(d.participant_ids()),
                        "messages": d.message_count(), "bytes": rep.nbytes})
        return out

    def subscribe(self, session_id: str | None = None, buffer: int = 256
                  ) -> trio.MemoryReceiveChannel[SessionChange]:
        """Change notifications (all sessions, or one). A slow reader misses events, not state."""
        send, recv = trio.open_memory_channel[SessionChange](buffer)
        self._subs.append((session_id, send))
        return recv

    # -- internals: local edits ----------------------------------------------------------------

    def _check_size(self, session_id: str | None, value: Any) -> None:
        """Refuse an edit that could not replicate, before it touches the document."""
        est = len(msgpack.packb(value, default=str, use_bin_type=True)) + EDIT_HEADROOM
        if est > self.limits.max_update_bytes:
            raise ValueError(f"edit of ~{est} bytes exceeds crdt.max_update_bytes")
        if session_id is not None:
            rep = self.engine.replicas[session_id]
            if rep.nbytes + est > self.limits.max_document_bytes:
                raise ValueError("session document would exceed crdt.max_document_bytes")

    def _edit(self, session_id: str, fn: Any) -> None:
        self._after_local(session_id, self.engine.edit(session_id, fn))

    def _after_local(self, session_id: str, recs: list[SignedUpdate]) -> None:
        if not recs:
            return
        frames = self.engine.push_frames(session_id, recs)
        for peer in self.engine.replicas[session_id].doc.participant_ids():
            if peer == self.peer_id or peer in self.blocked:
                continue
            link = self._links.get(peer)
            if link is not None and not link.closed:
                link.queue(frames)
            else:
                self._sync_with(peer)  # connect; the STEP1 exchange then carries these records
        self._notify(session_id, "local", len(recs))

    def _persist(self, rec: SignedUpdate) -> None:
        if self.store is not None:
            self.store.append(rec)

    def _notify(self, session_id: str, origin: str, n: int) -> None:
        change = SessionChange(session_id, origin, n)
        for sid, ch in list(self._subs):
            if sid is not None and sid != session_id:
                continue
            try:
                ch.send_nowait(change)
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subs.remove((sid, ch))

    # -- internals: streams --------------------------------------------------------------------

    def _sync_with(self, peer: str, only_changed: bool = False) -> None:
        """Send STEP1s to ``peer``, opening a stream in the background if there is none.

        With ``only_changed``, skip documents whose version vector has not moved since the last
        STEP1 to this peer: if the peer holds something new, its own STEP1 tells us.
        """
        if peer == self.peer_id or peer in self.blocked or self._nursery is None:
            return
        link = self._links.get(peer)
        if link is not None and not link.closed:
            self._send_step1s(link, only_changed)
        elif peer not in self._dialing and self._dial_after.get(peer, 0.0) <= trio.current_time():
            if self._link_refusal(peer) is not None:
                return  # no room for one more stream; anti-entropy tries again later
            self._dialing.add(peer)
            self._nursery.start_soon(self._open, peer)

    def _send_step1s(self, link: _Link, only_changed: bool) -> None:
        frames = []
        for doc_id in self.engine.docs_shared_with(link.peer):
            vv = self.engine.replicas[doc_id].vv()
            if only_changed and link.last_vv.get(doc_id) == vv:
                continue
            link.last_vv[doc_id] = vv
            frames.append(self.engine.step1(doc_id))
        link.queue(frames)

    async def _open(self, peer: str) -> None:
        try:
            with trio.fail_after(self.dial_timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer), [PROTOCOL_ID])
        except Exception as exc:  # unreachable peer: retry after one anti-entropy interval
            log.debug("crdt: cannot open stream to %s: %s", peer, exc)
            self._dial_after[peer] = trio.current_time() + self.limits.anti_entropy_interval_s
            return
        finally:
            self._dialing.discard(peer)
        link = await self._attach(peer, stream, inbound=False)
        if link is not None and self._nursery is not None:
            self._nursery.start_soon(self._read_loop, link)

    async def _handle_inbound(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        link = await self._attach(peer, stream, inbound=True)
        if link is not None:
            await self._read_loop(link)

    @staticmethod
    async def _reset(stream: INetStream) -> None:
        with trio.move_on_after(1):
            try:
                await stream.reset()
            except Exception as exc:  # already gone: nothing left to release
                log.debug("crdt: reset of a refused stream failed: %s", exc)

    def _link_refusal(self, peer: str) -> tuple[str, str] | None:
        """Why one more stream with ``peer`` is not allowed, as (label, reason); None if it is."""
        live = [lk for lk in self._all_links if not lk.closed]
        mine = sum(1 for lk in live if lk.peer == peer)
        if mine >= self.limits.max_links_per_peer:
            return "links_per_peer", (f"already {mine} CRDT streams with this peer "
                                      "(crdt.max_links_per_peer)")
        if len(live) >= self.limits.max_links:
            return "links", f"already {len(live)} CRDT streams in all (crdt.max_links)"
        return None

    async def _attach(self, peer: str, stream: INetStream, inbound: bool) -> _Link | None:
        """Adopt a stream (ours or the peer's) and greet with STEP1s; refuse it when the peer is
        blocked, the service stopped, or the stream would pass a cap (reset at once)."""
        if peer in self.blocked or self._nursery is None:
            await self._reset(stream)
            return None
        refusal = self._link_refusal(peer)
        if refusal is not None:
            if inbound:
                self._refuse(refusal[0], peer, refusal[1])
            else:  # we dialled while the peer's own stream arrived: ours is the extra one
                log.debug("crdt: closing our new stream to %s: %s", peer, refusal[1])
            await self._reset(stream)
            return None
        link = _Link(peer, stream, max(2 * self.limits.max_document_bytes, 16 * 1024 * 1024),
                     self._on_overflow)
        self._all_links.add(link)
        current = self._links.get(peer)
        if current is None or current.closed:
            self._links[peer] = link
        self._nursery.start_soon(self._write_loop, link)
        self._send_step1s(link, only_changed=False)  # anti-entropy on (re)connect
        return link

    async def _write_loop(self, link: _Link) -> None:
        try:
            async for frames in link.recv_q:
                # Coalesce whatever is queued into one write: each py-libp2p write costs a yamux
                # frame and a Noise message, far more than the bytes of a small CRDT frame.
                batch = list(frames)
                size = sum(map(len, batch))
                while size < WRITE_COALESCE_BYTES:
                    try:
                        more = link.recv_q.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.extend(more)
                    size += sum(map(len, more))
                link.queued_bytes -= size
                async with link.lock:
                    await link.stream.write(b"".join(batch))
                self.stats.bytes_sent += size
                self.stats.frames_sent += len(batch)
        except Exception as exc:
            log.debug("crdt: write to %s failed: %s", link.peer, exc)
        finally:
            await self._drop(link)

    async def _read_loop(self, link: _Link) -> None:
        channel = id(link)
        try:
            while not link.closed:
                data = await link.stream.read(READ_CHUNK)
                if not data:
                    break
                self.stats.bytes_received += len(data)
                out = self.engine.receive(link.peer, data, trio.current_time(), channel)
                self._handle_output(link, out)
        except SyncProtocolError as exc:
            self._refuse("protocol_error", link.peer, f"{exc}; dropping the stream")
        except Exception as exc:  # stream reset/EOF/closed: the peer went away
            log.debug("crdt: read from %s ended: %s", link.peer, exc)
        finally:
            self.engine.forget(link.peer, channel)
            await self._drop(link)

    def _refuse(self, label: str, peer: str, reason: str) -> None:
        self.refusals.refuse(label, peer, reason, trio.current_time())

    def _on_overflow(self, link: _Link) -> None:
        self._refuse("send_queue", link.peer, f"send queue over {link.max_queued_bytes} bytes "
                     "(the peer asks faster than it reads); dropping the stream")

    def _handle_output(self, link: _Link, out: Output) -> None:
        link.queue(out.frames)
        for rej in out.refused:
            rec = rej.record
            self._refuse(rej.label, link.peer, f"record {rec.doc_id!r} "
                         f"{ID(rec.author).to_base58()}#{rec.seq}: {rej.reason}")
            self.stats.rejected.append(rej)
            del self.stats.rejected[:-100]
        for doc_id, recs in out.accepted.items():
            self.stats.records_accepted += len(recs)
            self._notify(doc_id, link.peer, len(recs))

    async def _drop(self, link: _Link) -> None:
        await link.close()
        self._all_links.discard(link)
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
            # Promote another live stream to the same peer, if the peer opened one too.
            for other in self._all_links:
                if other.peer == link.peer and not other.closed:
                    self._links[link.peer] = other
                    break

    async def _anti_entropy_loop(self) -> None:
        tick = 0
        while True:
            await trio.sleep(self.limits.anti_entropy_interval_s)
            tick += 1
            if self.store is not None:
                try:
                    self.store.flush()
                except OSError as exc:  # e.g. EMFILE while a flood holds every descriptor
                    log.warning("crdt: could not flush the update log (retried next round): %s", exc)
            peers: set[str] = set()
            for rep in self.engine.replicas.values():
                peers.update(rep.doc.participant_ids())
            for peer in sorted(peers):
                self._sync_with(peer, only_changed=tick % FULL_ROUND_EVERY != 0)
            now = trio.current_time()
            for peer, link in list(self._links.items()):  # records refused as over budget
                if not link.closed:
                    link.queue(self.engine.retry_frames(peer, now))
