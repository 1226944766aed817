"""Import the NAT lab (scripts/natlab/natlab.py) for tests, and run its probes inside a lab."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "natlab"))
import natlab  # noqa: E402

PROBE = [sys.executable, str(ROOT / "scripts" / "natlab" / "probe.py")]
TEST_PREFIX = "lltest"

requires_lab = pytest.mark.skipif(natlab.need_root_tools() is not None,
                                  reason=natlab.need_root_tools() or "")


def probe(lab: natlab.Lab, host: str, *args: str) -> dict:
    """Run one probe to completion inside ``host``; its JSON line."""
    out = lab.sh_in(lab.hosts[host].ns, *PROBE, *args)
    return json.loads(out.strip().splitlines()[-1])


def start_probe(lab: natlab.Lab, host: str, *args: str) -> subprocess.Popen:
    """Start a probe in the background; its first line (e.g. ``listening``) has been read."""
    proc = lab.popen(host, [*PROBE, *args], stdout=subprocess.PIPE, text=True)
    if args[0] in ("listen", "udp-count"):
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
    return proc


def finish(proc: subprocess.Popen, timeout: float = 15.0) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


__all__ = ["LabNode", "TEST_PREFIX", "finish", "natlab", "probe", "requires_lab", "start_probe"]


class LabNode:
    """A real ``meshnode run`` process inside a lab host, listening on its lab address."""

    def __init__(self, lab: natlab.Lab, host: str, data_dir: Path, bootstrap: list[str] = (),
                 extra: list[str] = (), port: int = 4001) -> None:
        from tests.helpers.nodeproc import clean_env, meshnode_cmd
        self.lab, self.host, self.data_dir = lab, host, Path(data_dir)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        ip = lab.hosts[host].ip
        args = [*meshnode_cmd(), "run", "--data-dir", str(self.data_dir),
                "--listen", f"/ip4/{ip}/tcp/{port}", "--control-port", "0", "--print-addrs", *extra]
        for b in bootstrap:
            args += ["--bootstrap", b]
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}.stderr"
        self._err = open(self.stderr_path, "wb")
        self.proc = lab.popen(host, args, stdout=subprocess.PIPE, stderr=self._err,
                              env=clean_env(), cwd=ROOT)
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"node in {host} failed to start:\n{self.stderr()}")
        self.addr = line
        self.peer_id = line.rsplit("/p2p/", 1)[1]

    def get(self, path: str):
        """GET a control-API route (the API listens on the namespace's own loopback)."""
        port = json.loads((self.data_dir / "control.json").read_text())["port"]
        code = ("import sys, urllib.request; "
                "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
        out = self.lab.sh_in(self.lab.hosts[self.host].ns, sys.executable, "-c", code,
                             f"http://127.0.0.1:{port}{path}")
        return json.loads(out)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        from tests.helpers.nodeproc import stop_process
        stop_process(self.proc)
        self._err.close()
        if self.proc.stdout:
            self.proc.stdout.close()


# the NAT lab's node settings for tests: fast probes, short timeouts
FAST = ["--set", "nat.probe_interval_s=0.5", "--set", "nat.server_retry_s=2",
        "--set", "host.peer_exchange_interval_s=0.5", "--set", "host.dial_timeout_s=3",
        "--set", "nat.dial_back_timeout_s=2", "--set", "relay.scan_interval_s=0.5",
        "--set", "relay.direct_dial_timeout_s=1"]


def tiny_model(cache: Path) -> tuple[str, Path]:
    """A tiny seeded llama saved under ``cache``: (its path, the cache)."""
    from meshnode.runtime.loader import TinySpec, load_model
    from tests.helpers.runtime_models import TINY_MODELS
    spec = TINY_MODELS["llama"]
    return str(load_model(TinySpec(spec["type"], spec["config"], seed=0), cache_dir=cache).source), cache


def lab_handoff(lab: natlab.Lab, host: str, role: str, root: Path, model: tuple[str, Path],
                boot: list[str], args: list[str]):
    """``meshnode handoff <role>`` inside lab host ``host``, listening on its lab address."""
    from tests.helpers.handoff_peer import HandoffProc
    path, cache = model
    return HandoffProc(role, root / f"{role}-{host}", path, cache, bootstrap=boot,
                       listen=f"/ip4/{lab.hosts[host].ip}/tcp/4001",
                       prefix=lab.exec_args(lab.hosts[host].ns), args=list(args))
