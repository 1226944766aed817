"""``meshnode agents run SCENARIO``: start the scenario's nodes, run it, measure, compare, report.

One ``meshnode agents serve`` process per node (127.0.0.1, ephemeral ports; the first is every
other's bootstrap peer). Agents find each other through the DHT by compat key and role. Before
anything runs, every node's model signature must equal the lead agent's (``compare`` names the
fields that differ: the scenario fails at once, exit 2). After the run, each receiver times the
two text baselines (:func:`meshnode.agents.serve.baseline`) on the exact token ids of its
handoffs, and the report sets them beside the KV handoff (:mod:`meshnode.agents.report`).

An agent on an unknown node, a node that dies, or an agent that times out ends that agent's row
with the reason; the others finish (exit 1 when any row failed).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from discovery.signature import ModelSignature, compare
from meshnode.agents.scenario import Scenario

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
DEFAULT_CACHE = Path(os.environ.get("LATENTLINK_CACHE_DIR", Path.home() / ".cache" / "latentlink")) / "models"


class NodeProc:
    def __init__(self, name: str, argv: list[str], events: queue.Queue, log_path: Path) -> None:
        self.name = name
        self.err = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        self.events = events
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["_node"] = self.name
            self.events.put(ev)
        self.events.put({"event": "exited", "_node": self.name, "code": self.proc.wait()})

    def send(self, **cmd: Any) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # it died: its exit event says so
            pass

    def stop(self, timeout: float = 20.0) -> None:
        self.send(cmd="quit")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.err.close()


class Run:
    """One scenario run: processes, the events they sent, and what failed."""

    def __init__(self, sc: Scenario, progress: Any, data_dir: Path, extra_sets: list[str],
                 log_level: str = "warning") -> None:
        self.sc, self.progress, self.data_dir, self.extra = sc, progress, data_dir, extra_sets
        self.log_level = log_level
        self.q: queue.Queue = queue.Queue()
        self.procs: dict[str, NodeProc] = {}
        self.events: list[dict] = []
        self.failed: dict[str, str] = {}  # agent -> reason
        self.done: set[str] = set()
        self.ready: set[str] = set()  # nodes
        self.models: dict[str, dict] = {}  # node -> its "model" (or "error") event

    def _argv(self, node: str, bootstrap: str | None) -> list[str]:
        sc = self.sc
        argv = [sys.executable, "-m", "meshnode.cli", "agents", "serve", sc.source, "--node", node,
                "--data-dir", str(self.data_dir / node), "--listen", "/ip4/127.0.0.1/tcp/0",
                "--control-port", "0", "--log-level", self.log_level,
                "--set", f"runtime.model={sc.model_of(node)}", "--set", f"runtime.dtype={sc.dtype}",
                "--set", f"runtime.num_threads={sc.threads}", "--set", "host.peer_exchange_interval_s=0.5"]
        if not any(s.startswith("runtime.cache_dir=") for s in self.extra):  # convert models once
            argv += ["--set", f"runtime.cache_dir={DEFAULT_CACHE}"]
        for s in self.extra:
            argv += ["--set", s]
        return argv + (["--bootstrap", bootstrap] if bootstrap else [])

    def wait_for(self, pred: Any, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {what} within {timeout:.0f} s") from None
            self.note(ev)
            if pred(ev):
                return ev

    def note(self, ev: dict) -> None:
        self.events.append(ev)
        self.progress(ev)
        kind, agent = ev.get("event"), ev.get("agent")
        if kind == "ready":
            self.ready.add(ev["_node"])
        elif kind in ("model", "error") and ev["_node"] not in self.models:
            self.models[ev["_node"]] = ev
        elif kind == "agent_done":
            self.done.add(agent)
        elif kind == "agent_failed":
            self.failed.setdefault(agent, ev["error"])
        elif kind == "exited":
            for a in self.sc.on_node(ev["_node"]):
                if a.name not in self.done:
                    self.failed.setdefault(a.name, f"node {ev['_node']} exited (code {ev['code']})")

    # -- phases -------------------------------------------------------------------------------------
    def start(self) -> None:
        sc = self.sc
        for a in sc.agents:
            if a.node not in sc.nodes:
                self.failed[a.name] = f"unknown node {a.node!r} (the scenario's nodes: {', '.join(sc.nodes)})"
        used = [n for n in sc.nodes if sc.on_node(n)]
        lead = next(a.node for a in sc.agents if a.role in ("reader", "driver"))
        order = [lead] + [n for n in used if n != lead]
        boot = None
        for node in order:
            self.procs[node] = NodeProc(node, self._argv(node, boot), self.q,
                                        self.data_dir / f"{node}.log")
            if boot is None:
                ev = self.wait_for(lambda e: e.get("event") in ("started", "exited"), 120,
                                   f"start of node {node}")
                if ev["event"] == "exited":
                    raise RuntimeError(f"node {node} failed to start (log: {self.data_dir / node}.log)")
                boot = ev["addrs"][0]
                # its model first: a GGUF is converted once into the shared cache, not N times
                self.wait_for(lambda e: e.get("event") in ("model", "error", "exited"),
                              self.sc.timeout_s, f"node {node}'s model")

    def check_models(self) -> str | None:
        """Every node's signature against the lead node's; the mismatch named, or ``None``."""
        sigs: dict[str, ModelSignature] = {}
        exited = {e["_node"]: e for e in self.events if e.get("event") == "exited"}
        while set(self.models) != set(self.procs):
            missing = [n for n in exited if n not in self.models]
            if missing:
                return f"node {missing[0]} exited before its model loaded (code {exited[missing[0]]['code']})"
            ev = self.wait_for(lambda e: e.get("event") in ("model", "error", "exited"),
                               self.sc.timeout_s, "model load")
            if ev["event"] == "exited":
                exited[ev["_node"]] = ev
        for node, ev in self.models.items():
            if ev["event"] != "model":
                return f"node {node}: {ev.get('error')}"
            sigs[node] = ModelSignature.from_dict(ev["signature"])
        lead = next(a.node for a in self.sc.agents if a.role in ("reader", "driver"))
        for node, sig in sigs.items():
            diff = compare(sigs[lead], sig)
            if diff:
                who = ", ".join(a.name for a in self.sc.on_node(node))
                return (f"agent(s) {who} on node {node} run a different model "
                        f"({self.sc.model_of(node)}) than {lead} ({self.sc.model_of(lead)}): "
                        f"mismatched signature fields: {', '.join(diff)}")
        return None

    def go(self) -> None:
        while self.ready != set(self.procs):
            self.wait_for(lambda e: e.get("event") == "ready", self.sc.timeout_s, "nodes ready")
        for p in self.procs.values():
            p.send(cmd="go")
        live = [a.name for a in self.sc.agents if a.name not in self.failed]
        deadline = time.monotonic() + self.sc.timeout_s * 2
        while any(a not in self.done and a not in self.failed for a in live):
            try:
                self.wait_for(lambda e: e.get("event") in ("agent_done", "agent_failed", "exited"),
                              max(1.0, deadline - time.monotonic()), "agents")
            except TimeoutError:
                for a in live:
                    if a not in self.done:
                        self.failed.setdefault(a, f"timed out after {self.sc.timeout_s * 2:.0f} s")
                break

    def baselines(self, jobs: list[dict]) -> list[dict]:
        """One at a time: a baseline's timing is not shared with another node's work."""
        got = []
        for job in jobs:
            node = self.sc.agent(job["agent"]).node
            if node not in self.procs or job["agent"] in self.failed:
                continue
            self.procs[node].send(cmd="baseline", **job)
            try:
                got.append(self.wait_for(lambda e: e.get("event") == "baseline", self.sc.timeout_s,
                                         "a text baseline"))
            except TimeoutError:
                break
        return got

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()
        while not self.q.empty():
            self.note(self.q.get())


def run(sc: Scenario, progress: Any, *, data_dir: str | None = None,
        extra_sets: list[str] = (), log_level: str = "warning") -> tuple[int, dict]:
    """Run ``sc``; returns (exit code, the report dict)."""
    from meshnode.agents import report

    with tempfile.TemporaryDirectory(prefix="latentlink-agents-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        r = Run(sc, progress, root, list(extra_sets), log_level)
        t0 = time.monotonic()
        try:
            r.start()
            why = r.check_models()
            if why is not None:
                return EXIT_CONFIG, {"error": why, "scenario": sc.name}
            r.go()
            jobs = report.baseline_jobs(sc, r.events, r.failed)
            base = r.baselines(jobs)
            out = report.build(sc, r.events, base, r.failed)
            out["wall_s"] = time.monotonic() - t0
            out["crdt"] = report.crdt_logs(root, r.procs)
        except (TimeoutError, RuntimeError) as exc:
            return EXIT_FAILED, {"error": str(exc), "scenario": sc.name, "failed": r.failed}
        finally:
            r.stop()
        return (EXIT_FAILED if r.failed else EXIT_OK), out
