"""A ``tests/helpers/transfer_node.py`` process driven over stdin/stdout (transfer, hostile tests)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Peer:
    """One transfer_node process; a reader thread splits its output into replies and events."""

    def __init__(self, tmp: Path, name: str, *sets: str, nofile: int = 0) -> None:
        self.dir = tmp / name
        self.err_path = tmp / f"{name}.stderr"
        args = [sys.executable, str(ROOT / "tests/helpers/transfer_node.py"), "--data-dir", str(self.dir)]
        for s in sets:
            args += ["--set", s]
        if nofile:
            args += ["--nofile", str(nofile)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, cwd=ROOT, env=env)
        self.replies: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        self.ready = self.event("ready", 30)
        self.addr, self.peer_id, self.pid = self.ready["addr"], self.ready["peer_id"], self.ready["pid"]

    def _reader(self) -> None:
        for line in self.proc.stdout:
            obj = json.loads(line)
            (self.replies if "ok" in obj else self.events).put(obj)

    def cmd(self, timeout: float = 120, **obj) -> dict:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply to {obj} in {timeout}s:\n{self.stderr()}") from None

    def event(self, kind: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if ev.get("event") == kind:
                return ev
        raise AssertionError(f"no {kind!r} event in {timeout}s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")[-6000:]

    def log(self) -> str:
        """Everything the process logged so far."""
        return self.err_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def link(sender: Peer, receiver: Peer) -> str:
    assert sender.cmd(op="connect", addr=receiver.addr)["ok"]
    r = sender.cmd(op="open", peer=receiver.peer_id)
    assert r["ok"], r
    return r["session"]
