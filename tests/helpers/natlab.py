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


__all__ = ["TEST_PREFIX", "finish", "natlab", "probe", "requires_lab", "start_probe"]
