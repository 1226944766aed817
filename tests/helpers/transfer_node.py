"""A real node process for transfer tests and ``scripts/bench_transfer.py``.

Serves ``fake_signature(0)``; driven by JSON lines on stdin, answers JSON lines on stdout. The first
line out is ``{"event": "ready", "addr", "peer_id", "bulk_port", "pid"}``. Incoming sessions are
accepted automatically; every verified message prints ``{"event": "received", ...}`` (with an
independent BLAKE3 of the whole buffer when the sender asked for ``check``).

Commands: ``connect {addr}``, ``open {peer}``, ``send {size, path?, check?, source?, stall_at?}``,
``send`` with ``break_at`` (a fraction) breaks the lane of its ``path`` when the sealer reaches
that point of the payload. ``sink {on}`` (stream incoming messages into a hashing sink: bounded memory), ``hold {on}`` (keep
received messages instead of releasing them) and ``held`` (BLAKE3 of each kept message, now),
``reset_peak`` (restart VmHWM, the peak RSS), ``stats`` (counts, RSS, CPU, trio tasks, the tensor
service's status), ``quit``. ``send`` with ``source`` produces the payload
chunk by chunk (never held whole); ``stall_at`` (a fraction) makes that source print a ``midway``
event and hang there, so a test can kill the sender mid-transfer deterministically.
Run: ``python tests/helpers/transfer_node.py --data-dir DIR [--set section.key=value ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402

from meshnode.config import load_config  # noqa: E402
from meshnode.logs import setup_logging  # noqa: E402
from meshnode.node import Node  # noqa: E402
from tensor_rpc import Kind, TensorSpec  # noqa: E402
from tests.helpers.sigs import fake_signature  # noqa: E402

_payloads: dict[int, np.ndarray] = {}


def out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def payload(size: int) -> np.ndarray:
    """Deterministic, non-trivial bytes (cached: regenerating 1 GiB per send would dominate)."""
    if size not in _payloads:
        _payloads.clear()
        words = np.arange((size + 7) // 8, dtype=np.uint64)
        words *= np.uint64(0x9E3779B97F4A7C15)
        words ^= words >> np.uint64(29)
        _payloads[size] = words.view(np.uint8)[:size]
    return _payloads[size]


class CyclicSource:
    """A payload of any size, produced on demand: a 64 MiB + 4 KiB block repeated (chunks inside
    one repetition are views of it; ones that straddle are copied into the sealer's scratch)."""

    PERIOD = 64 * 1024 * 1024 + 4096

    def __init__(self, size: int, stall_at: float | None = None) -> None:
        self.nbytes = size
        self.block = payload(self.PERIOD)
        self.stall = None if stall_at is None else int(size * stall_at)

    def chunk(self, offset: int, n: int, scratch: memoryview) -> memoryview:
        if self.stall is not None and offset >= self.stall:
            out({"event": "midway", "offset": offset})
            time.sleep(3600)
        rel = offset % self.PERIOD
        if rel + n <= self.PERIOD:
            return memoryview(self.block)[rel:rel + n]
        done = 0
        while done < n:
            take = min(self.PERIOD - rel, n - done)
            scratch[done:done + take] = memoryview(self.block)[rel:rel + take]
            done, rel = done + take, 0
        return scratch[:n]


class HashSink:
    """Receives a streamed message chunk by chunk: counts and hashes it, keeps nothing."""

    def __init__(self) -> None:
        self.hasher, self.nbytes, self.next, self.aborted = blake3.blake3(), 0, 0, False

    def write(self, offset: int, data: memoryview) -> None:
        assert offset == self.next, (offset, self.next)
        self.hasher.update(data)
        self.nbytes += len(data)
        self.next += len(data)

    def abort(self) -> None:
        self.aborted = True


def task_dump() -> list[str]:
    """Each trio task and the innermost frames it is suspended in (diagnostics for hangs)."""
    lines: list[str] = []

    def walk(task, depth: int) -> None:
        frames, coro = [], task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                frames.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append("  " * depth + f"{task.name} @ " + " > ".join(frames[-9:]))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return lines


def rss() -> dict:
    info = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            info[k] = int(v.split()[0]) * 1024
    return info


class BreakingSource:
    """``data`` as a payload source that, the first time a chunk at or past ``at`` (a byte
    offset) is asked for, breaks the session's lane for ``path`` (shuts its socket down): a lane
    failure at a deterministic point of the transfer. ``chunk`` runs in the lane's thread."""

    def __init__(self, data: np.ndarray, at: int, ts, path: str) -> None:
        self.view, self.nbytes, self.at, self.ts, self.path = memoryview(data), len(data), at, ts, path
        self.broken = False

    def chunk(self, offset: int, n: int, scratch: memoryview) -> memoryview:
        if not self.broken and offset >= self.at:
            self.broken = True
            lane = self.ts._sender.lanes._lanes.get(self.path)  # test hook: the session's own lane
            if lane is not None:
                import socket
                lane.sock.shutdown(socket.SHUT_RDWR)
                out({"event": "lane_broken", "path": self.path})
        return self.view[offset:offset + n]


async def main(args: argparse.Namespace) -> None:
    if args.nofile:  # test hook: a low descriptor limit (EMFILE on the lane listener)
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    overrides = [f"node.data_dir={args.data_dir}", "host.listen_addrs=/ip4/127.0.0.1/tcp/0",
                 "control.enabled=false", "dht.enabled=false", *args.set]
    cfg = load_config(None, env={}, overrides=overrides)
    setup_logging(cfg.node.log_level, False)
    node = Node(cfg)
    node.serve(fake_signature(0))
    stats = {"received": 0, "bytes": 0}
    sessions: dict[str, object] = {}
    sink: list = [None]  # sink factory applied to every session
    hold: list = [False]
    held: list = []  # received messages kept (not released) while hold is on

    def attach(ts) -> None:
        sessions[str(ts.peer_id)] = ts
        ts.sink_factory = sink[0]

    async def receiver(ts) -> None:
        while True:
            try:
                rec = await ts.receive()
            except Exception:
                return
            stats["received"] += 1
            nbytes = rec.sink.nbytes if rec.sink is not None else len(rec.buffer)
            stats["bytes"] += nbytes
            ev = {"event": "received", "mid": rec.header.message_id, "nbytes": nbytes,
                  "path": rec.path, "elapsed_s": rec.elapsed_s, "sink": rec.sink is not None}
            if rec.sink is not None:
                ev["blake3"] = rec.sink.hasher.hexdigest()
            elif rec.header.meta.get("check"):
                ev["blake3"] = blake3.blake3(rec.buffer).hexdigest()
            if hold[0]:
                held.append(rec)
            else:
                rec.release()  # its memory may serve the next message (page faults cost ~1 GB/s)
            out(ev)

    async def acceptor(nursery) -> None:
        while True:
            ts = await node.accept_session()
            attach(ts)
            nursery.start_soon(receiver, ts)

    async def dump_on_sigusr1() -> None:  # diagnostics for hangs: kill -USR1 <pid>
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                sys.stderr.write("\n".join(["== trio tasks"] + task_dump()) + "\n")
                sys.stderr.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dump_on_sigusr1)
        await nursery.start(node.run)
        nursery.start_soon(acceptor, nursery)
        addr = str(node.addrs[0])
        out({"event": "ready", "addr": addr if "/p2p/" in addr else f"{addr}/p2p/{node.peer_id}", "peer_id": str(node.peer_id),
             "bulk_port": node.tensors.lanes.bulk[0][1], "pid": os.getpid()})
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            op = cmd.get("op")
            try:
                if op == "connect":
                    await node.connect(cmd["addr"])
                    out({"ok": True})
                elif op == "open":
                    ts = await node.open_session(cmd["peer"])
                    attach(ts)
                    nursery.start_soon(receiver, ts)
                    out({"ok": True, "session": ts.session_id})
                elif op == "send":
                    ts = sessions[cmd["peer"]] if "peer" in cmd else next(iter(sessions.values()))
                    size = int(cmd["size"])
                    if cmd.get("source"):
                        data = None
                        src = CyclicSource(size, cmd.get("stall_at"))
                        digest = None  # the protocol's own digest of the source, reported below
                    else:
                        data = payload(size)
                        digest = blake3.blake3(data).hexdigest() if cmd.get("check") else None
                    if cmd.get("announce"):
                        out({"event": "sending"})
                    t0 = time.perf_counter()
                    common = {"kind": Kind.KV_CACHE, "layers": (0, 1), "tokens": (0, 1),
                              "meta": {"check": bool(cmd.get("check"))}, "path": cmd.get("path")}
                    spec = [TensorSpec("payload", "uint8", (size,), size)]
                    if data is None:
                        sent = await ts.send_from(spec, src, **common)
                        digest = sent.checksums[0].hex()
                    elif cmd.get("break_at") is not None:  # test hook: the lane fails mid-message
                        brk = BreakingSource(data, int(size * cmd["break_at"]), ts, cmd.get("path"))
                        sent = await ts.send_from(spec, brk, **common)
                    else:
                        sent = await ts.send([("payload", "uint8", [size], data)], **common)
                    dt = time.perf_counter() - t0
                    out({"ok": True, "path": sent.path, "mid": sent.message_id, "nbytes": sent.nbytes,
                         "elapsed_s": dt, "blake3": digest})
                elif op == "sessions":
                    out({"ok": True, "sessions": {p: s.session_id for p, s in sessions.items()}})
                elif op == "sink":
                    sink[0] = (lambda env: HashSink()) if cmd.get("on", True) else None
                    for ts in sessions.values():
                        ts.sink_factory = sink[0]
                    out({"ok": True})
                elif op == "hold":
                    hold[0] = bool(cmd.get("on", True))
                    out({"ok": True})
                elif op == "held":
                    out({"ok": True, "held": [{"mid": r.message_id,
                                              "blake3": blake3.blake3(r.buffer).hexdigest()}
                                             for r in held]})
                elif op == "reset_peak":
                    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                    out({"ok": True, **rss()})
                elif op == "stats":
                    # process_time: every thread, ns resolution (os.times ticks at 10 ms)
                    out({"ok": True, **stats, **rss(), "cpu_s": time.process_time(),
                         "tasks": len(tasks := task_dump()), "tensor": node.tensors.status(),
                         "session_tasks": sum("meshnode.tensor.driver" in t or "feed_lane" in t
                                              for t in tasks)})
                elif op == "quit":
                    out({"ok": True})
                    break
                else:
                    out({"ok": False, "error": f"unknown op {op}"})
            except Exception as exc:  # report, keep serving
                out({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        node.stop()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--nofile", type=int, default=0, help="RLIMIT_NOFILE for this process")
    trio.run(main, p.parse_args())
