"""A ``meshnode handoff send|receive`` process (a real node with a model loaded) and its JSON events.

Used by tests/test_handoff.py, scripts/demo.py and scripts/bench_handoff.py. Each event is one JSON
line on the process's stdout; a reader thread queues them so callers can wait with a timeout.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers.nodeproc import ROOT, clean_env, meshnode_cmd, stop_process


class NoEvent(AssertionError):
    """The awaited event did not come within the timeout (the process is still running)."""


class HandoffProc:
    def __init__(self, role: str, data_dir: Path, model: str, cache_dir: Path, *,
                 args: list[str] = (), bootstrap: list[str] = (), dht: bool = True,
                 env: dict[str, str] | None = None, listen: str = "/ip4/127.0.0.1/tcp/0",
                 prefix: list[str] = ()) -> None:
        """``prefix``: argv that runs the command elsewhere (a NAT-lab namespace), with
        ``listen`` the address it listens on there."""
        self.data_dir = Path(data_dir)
        self.prefix = list(prefix)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*prefix, *meshnode_cmd()] + [
            "handoff", role, "--json", "--model", str(model), "--data-dir", str(self.data_dir),
            "--listen", listen, "--control-port", "0", "--log-level", "warning",
            "--set", f"runtime.cache_dir={cache_dir}", "--set", f"dht.enabled={'true' if dht else 'false'}",
            "--set", "host.peer_exchange_interval_s=0.3"]
        for b in bootstrap:
            cmd += ["--bootstrap", b]
        cmd += list(args)
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}.stderr"
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT,
                                     env=clean_env(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                                                   **(env or {})))
        self.events: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        started = self.next("started", 120)
        self.peer_id: str = started["peer_id"]
        self.addr: str = started["addrs"][0]
        self.control_url = f"http://127.0.0.1:{started['control_port']}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._q.put(json.loads(line))
            except ValueError:
                continue
        self._q.put(None)

    def next(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for the next event named ``event`` (earlier events are kept in ``self.events``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                ev = self._q.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise NoEvent(f"no {event!r} event in {timeout}s; stderr:\n{self.stderr()}") from None
            if ev is None:
                self._q.put(None)
                raise AssertionError(f"process exited before {event!r}; stderr:\n{self.stderr()}")
            self.events.append(ev)
            if ev.get("event") == "error" and event != "error":
                raise AssertionError(f"peer error: {ev}")
            if ev.get("event") == event:
                return ev

    def drain(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Collect every event still queued (call after the process exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self._q.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if ev is None:
                self._q.put(None)
                break
            self.events.append(ev)
        return self.events

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def control(self, path: str) -> Any:
        """GET a control-API route (inside the process's namespace when it runs in one)."""
        import sys
        import urllib.request

        if self.prefix:  # the API listens on the namespace's own loopback
            code = ("import sys, urllib.request; "
                    "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
            out = subprocess.run([*self.prefix, sys.executable, "-c", code, self.control_url + path],
                                 capture_output=True, text=True, timeout=15, check=True).stdout
            return json.loads(out)
        with urllib.request.urlopen(self.control_url + path, timeout=5) as r:
            return json.loads(r.read())

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 15.0) -> int:
        code = stop_process(self.proc, signal.SIGTERM, timeout)
        self._err.close()
        return code
