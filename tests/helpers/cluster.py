"""Spawn ``scripts/cluster.py`` processes (several nodes each) for tests and benchmarks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.helpers.nodeproc import ROOT, clean_env, stop_process


class ClusterProc:
    def __init__(self, data_dir: Path, nodes: int, models: list[int], bootstrap: list[str] = (),
                 sets: list[str] = (), seed: int = 0) -> None:
        args = [sys.executable, str(ROOT / "scripts" / "cluster.py"), "--nodes", str(nodes),
                "--data-dir", str(data_dir), "--control", "--seed", str(seed)]
        if models:
            args += ["--models", *map(str, models)]
        for b in bootstrap:
            args += ["--bootstrap", b]
        for s in sets:
            args += ["--set", s]
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.err_path = Path(data_dir) / "stderr.log"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._err, env=clean_env(), cwd=ROOT)
        self.nodes: list[dict] = []
        for line in self.proc.stdout:
            line = line.decode().strip()
            if line == "READY":
                break
            self.nodes.append(json.loads(line))
        if len(self.nodes) != nodes:
            raise RuntimeError(f"cluster failed to start: {self.err_path.read_text()[-3000:]}")

    @staticmethod
    def get(node: dict, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(node["control_url"] + path, timeout=timeout) as r:
            return json.loads(r.read())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = stop_process(self.proc, sig, timeout=30.0)
        self._err.close()
        return code
