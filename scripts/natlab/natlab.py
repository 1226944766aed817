"""A NAT lab made of Linux network namespaces: a public segment, routers, private hosts behind them.

Why namespaces and not containers: they are what the kernel gives a root process for free, start in
milliseconds, and the NAT under test is the real one (netfilter conntrack + MASQUERADE), the same
code that runs in most home routers. Everything the lab creates lives *inside* its own namespaces —
the public segment's bridge too — so the machine's own interfaces, routes and iptables rules are
never touched and no lab packet can leave: deleting the namespaces removes every veth and every
iptables rule with them (DESIGN.md §9).

Topology for ``Lab(profiles=["cone", "symmetric"], publics=1)``::

    pub0 11.0.0.10 ─┐                        ┌─ r0 11.0.1.1 ─ 10.1.0.1 ── h0 10.1.0.2  (cone)
                    ├── wan (bridge, 11/16) ─┤
                    │                        └─ r1 11.0.1.2 ─ 10.2.0.1 ── h1 10.2.0.2  (symmetric)

The public segment uses 11.0.0.0/16 (public-looking: libp2p peers and AutoNAT servers ignore RFC 1918
addresses). Router profiles:

* ``cone``      MASQUERADE (keeps the source port where it can: endpoint-independent mapping) with a
                home-router firewall: unsolicited inbound on the WAN is DROPPED — not rejected: an
                RST kills a hole punch.
* ``nat``       MASQUERADE without a firewall: unsolicited inbound reaches the router's own stack,
                which answers closed ports with RST.
* ``symmetric`` ``MASQUERADE --random-fully`` (a fresh random port per connection) plus the firewall.
* ``public``    no router: the host sits on the public segment itself (``r<i>`` is not created).
* ``firewall``  a public address, but the host's own firewall drops unsolicited inbound: the
                "closed port" case (reachable IP, unreachable listener) that fools AutoNAT v1.

``loss`` drops that share of packets at random on each WAN link, both directions
(``iptables -m statistic``; ``tc netem`` is not in every kernel); with ``lossy_publics=False``
only the routers' and test hosts' links lose packets, not the public infrastructure hosts'.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

PROFILES = ("cone", "nat", "symmetric", "public", "firewall")
WAN_NET = "11.0.0.0/16"
DEFAULT_PREFIX = "llnat"


class LabError(RuntimeError):
    """A lab command failed; the message names the command and what it printed."""


def need_root_tools() -> str | None:
    """Why the lab cannot run here, or ``None`` if it can (root, ``ip`` and ``iptables``)."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs '{tool}' (Debian: apt-get install iproute2 iptables)"
    return None


def sh(*args: str, check: bool = True) -> str:
    """Run one command; on failure raise :class:`LabError` naming it and its stderr."""
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Namespaces that belong to labs named ``prefix``."""
    out = sh("ip", "netns", "list", check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n == f"{prefix}-wan" or n.startswith(f"{prefix}-")]


def teardown(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Kill every process in the lab's namespaces, then delete them (with their veths and rules).
    Idempotent: a lab that is not there is a no-op. Returns the namespaces removed."""
    gone = namespaces(prefix)
    for ns in gone:
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for ns in gone:
        for _ in range(50):  # a killed process may hold the namespace for a moment
            if not sh("ip", "netns", "pids", ns, check=False).split():
                break
            time.sleep(0.02)
        sh("ip", "netns", "del", ns, check=False)
    return gone


@dataclass
class Host:
    """One end host of the lab: its namespace, its address, and the WAN address others see."""

    name: str
    ns: str
    ip: str
    profile: str  # "public" for hosts on the public segment
    wan_ip: str  # the router's public address, or ``ip`` for a public host
    router_ns: str | None = None


@dataclass
class Lab:
    """Build with :meth:`up` (idempotent: an old lab of the same prefix is removed first), tear down
    with :meth:`down` — or use it as a context manager, which tears down on every exit path."""

    profiles: Sequence[str]
    publics: int = 1
    loss: float = 0.0
    lossy_publics: bool = True  # False: loss only on the routers' and test hosts' WAN links
    prefix: str = DEFAULT_PREFIX
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [p for p in self.profiles if p not in PROFILES]
        if bad:
            raise LabError(f"unknown router profile {bad[0]!r} (choose from {', '.join(PROFILES)})")
        if not 0.0 <= self.loss < 1.0:
            raise LabError(f"loss must be in [0, 1), got {self.loss}")
        if len(self.profiles) > 200 or self.publics > 200:
            raise LabError("at most 200 routers and 200 public hosts")

    # -- build ------------------------------------------------------------------------------------
    def up(self) -> Lab:
        why = need_root_tools()
        if why:
            raise LabError(why)
        teardown(self.prefix)
        try:
            self._build()
        except BaseException:
            teardown(self.prefix)
            raise
        return self

    def _ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _add_ns(self, name: str) -> str:
        ns = self._ns(name)
        sh("ip", "netns", "add", ns)
        self.ip(ns, "link", "set", "lo", "up")
        return ns

    def ip(self, ns: str, *args: str) -> str:
        return sh("ip", "-n", ns, *args)

    def exec_args(self, ns: str, *argv: str) -> list[str]:
        """argv that runs a command inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def sh_in(self, ns: str, *argv: str, check: bool = True) -> str:
        return sh(*self.exec_args(ns, *argv), check=check)

    def _wan_link(self, ns: str, ifname: str, addr: str, tag: str) -> None:
        """Connect namespace ``ns`` (interface ``ifname``) to the public bridge."""
        wan = self._ns("wan")
        port = f"p-{tag}"[:15]
        sh("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", wan)
        self.ip(wan, "link", "set", port, "master", "br0", "up")
        self.ip(ns, "addr", "add", f"{addr}/16", "dev", ifname)
        self.ip(ns, "link", "set", ifname, "up")

    def _build(self) -> None:
        wan = self._add_ns("wan")
        self.ip(wan, "link", "add", "br0", "type", "bridge")
        self.ip(wan, "link", "set", "br0", "up")
        for k in range(self.publics):
            name = f"pub{k}"
            ns = self._add_ns(name)
            addr = f"11.0.0.{10 + k}"
            self._wan_link(ns, "eth0", addr, name)
            if self.lossy_publics:
                self._lossy(ns, "eth0", chains=("INPUT", "OUTPUT"))
            self.hosts[name] = Host(name, ns, addr, "public", addr)
        for i, profile in enumerate(self.profiles):
            name = f"h{i}"
            if profile in ("public", "firewall"):
                ns = self._add_ns(name)
                addr = f"11.0.2.{1 + i}"
                self._wan_link(ns, "eth0", addr, name)
                self._lossy(ns, "eth0", chains=("INPUT", "OUTPUT"))
                if profile == "firewall":
                    self._firewall(ns, "eth0", chains=("INPUT",))
                self.hosts[name] = Host(name, ns, addr, profile, addr)
                continue
            r = self._add_ns(f"r{i}")
            wan_ip, lan = f"11.0.1.{1 + i}", f"10.{1 + i}.0"
            self._wan_link(r, "wan", wan_ip, f"r{i}")
            h = self._add_ns(name)
            sh("ip", "link", "add", "lan", "netns", r, "type", "veth", "peer", "name", "eth0", "netns", h)
            self.ip(r, "addr", "add", f"{lan}.1/24", "dev", "lan")
            self.ip(r, "link", "set", "lan", "up")
            self.ip(h, "addr", "add", f"{lan}.2/24", "dev", "eth0")
            self.ip(h, "link", "set", "eth0", "up")
            self.ip(h, "route", "add", "default", "via", f"{lan}.1")
            self._router(r, profile)
            self.hosts[name] = Host(name, h, f"{lan}.2", profile, wan_ip, r)

    def _router(self, r: str, profile: str) -> None:
        self.sh_in(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ipt = ["iptables", "-w"]
        masq = [*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        self.sh_in(r, *masq, *(["--random-fully"] if profile == "symmetric" else []))
        if profile in ("cone", "symmetric"):  # home-router firewall: DROP unsolicited inbound
            self._firewall(r, "wan", chains=("FORWARD", "INPUT"))
        self._lossy(r, "wan", chains=("FORWARD",))

    def _firewall(self, ns: str, ifname: str, chains: Sequence[str]) -> None:
        for chain in chains:
            self.sh_in(ns, "iptables", "-w", "-A", chain, "-i", ifname, "-m", "conntrack",
                       "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            self.sh_in(ns, "iptables", "-w", "-A", chain, "-i", ifname, "-j", "DROP")

    def _lossy(self, ns: str, ifname: str, chains: Sequence[str]) -> None:
        if self.loss <= 0:
            return
        for chain in chains:
            flags = ("-o",) if chain == "OUTPUT" else ("-i",) if chain == "INPUT" else ("-i", "-o")
            for flag in flags:
                self.sh_in(ns, "iptables", "-w", "-I", chain, "1", flag, ifname, "-m", "statistic",
                           "--mode", "random", "--probability", f"{self.loss:.4f}", "-j", "DROP")

    # -- use --------------------------------------------------------------------------------------
    def popen(self, host: str, argv: Sequence[str], **kw: object) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace (killed by :meth:`down` if still running)."""
        return subprocess.Popen(self.exec_args(self.hosts[host].ns, *argv), **kw)  # type: ignore[call-overload]

    def down(self) -> list[str]:
        return teardown(self.prefix)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def leftovers(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """What a torn-down lab must not leave: its namespaces (with them go its veths, rules and
    bridge), and processes still running inside them."""
    found = [f"netns {ns}" for ns in namespaces(prefix)]
    return found
