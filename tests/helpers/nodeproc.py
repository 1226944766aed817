"""Spawn real ``meshnode run`` processes for tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def meshnode_cmd() -> list[str]:
    return [sys.executable, "-m", "meshnode.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
    env.update(extra)
    env.setdefault("PYTHONPATH", str(ROOT))
    return env


def control_get(url: str, path: str):
    """GET a control-API JSON route of a node; None for 404 (e.g. a session not known yet)."""
    import urllib.error
    try:
        with urllib.request.urlopen(url + path, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


class NodeProc:
    """One node process listening on 127.0.0.1 with an ephemeral port and control port."""

    def __init__(self, data_dir: Path, bootstrap: list[str] = (), extra: list[str] = (),
                 config: Path | None = None, listen: str = "/ip4/127.0.0.1/tcp/0") -> None:
        self.data_dir = Path(data_dir)
        args = meshnode_cmd() + ["run", "--data-dir", str(self.data_dir),
                                 "--listen", listen, "--control-port", "0",
                                 "--print-addrs", "--set", "host.peer_exchange_interval_s=0.3"]
        if config:
            args += ["--config", str(config)]
        for b in bootstrap:
            args += ["--bootstrap", b]
        args += list(extra)
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}.stderr"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._err,
                                     env=clean_env(), cwd=ROOT)
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"node failed to start:\n{self.stderr()}")
        self.addr = line
        self.peer_id = line.rsplit("/p2p/", 1)[1]
        self.control_url = self._wait_control()

    def _wait_control(self, timeout: float = 20.0) -> str:
        deadline = time.time() + timeout
        f = self.data_dir / "control.json"
        while time.time() < deadline:
            if f.exists():
                try:
                    info = json.loads(f.read_text())
                    return f"http://{info['host']}:{info['port']}"
                except (ValueError, KeyError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"control API did not come up:\n{self.stderr()}")

    def get(self, path: str):
        with urllib.request.urlopen(self.control_url + path, timeout=5) as r:
            body = r.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        code = stop_process(self.proc, sig, timeout)
        self._err.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return code


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal ``proc`` (if still running), wait ``timeout`` s, then SIGKILL; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")
