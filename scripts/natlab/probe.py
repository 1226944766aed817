"""Tiny socket probes run inside lab namespaces; each prints one JSON line (what it saw).

    probe.py listen PORT [--accept N]        echo each peer's observed address back to it
    probe.py connect IP PORT [--bind PORT]   connect, print local and observed addresses
    probe.py punch LPORT RIP RPORT --at T    TCP simultaneous open from LPORT at wall time T
    probe.py udp-send IP PORT N / udp-count PORT SECONDS

Used by tests/test_natlab.py to prove what each router profile does, and by hand.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time


def _out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def listen(port: int, accept: int, timeout: float) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    srv.settimeout(timeout)
    _out(listening=port)
    for _ in range(accept):
        conn, addr = srv.accept()
        conn.sendall(f"{addr[0]} {addr[1]}\n".encode())
        _out(peer=addr[0], port=addr[1])
        conn.close()


def connect(ip: str, port: int, bind: int, timeout: float) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bind:
        s.bind(("0.0.0.0", bind))
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        seen = s.makefile().readline().split()
        _out(ok=True, local=s.getsockname()[1], seen_ip=seen[0], seen_port=int(seen[1]))
    except OSError as exc:
        _out(ok=False, error=type(exc).__name__, errno=getattr(exc, "errno", None))
    finally:
        s.close()


def punch(lport: int, rip: str, rport: int, at: float, timeout: float) -> None:
    """One TCP simultaneous-open attempt, the primitive DCUtR builds on (DESIGN.md §9)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", lport))
    s.settimeout(timeout)
    time.sleep(max(0.0, at - time.time()))
    t0 = time.monotonic()
    try:
        s.connect((rip, rport))
        s.sendall(b"hi")
        got = s.recv(2)
        _out(ok=got == b"hi", s=round(time.monotonic() - t0, 3))
        s.close()
    except OSError as exc:
        # after a failed attempt close with an RST (linger 0), or the next connect from this port
        # fails with EADDRNOTAVAIL
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        _out(ok=False, error=type(exc).__name__, s=round(time.monotonic() - t0, 3))


def udp_send(ip: str, port: int, n: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        s.sendto(struct.pack(">I", i), (ip, port))
        time.sleep(0.001)
    _out(sent=n)


def udp_count(port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    _out(listening=port)
    got, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            s.recv(64)
            got += 1
        except TimeoutError:
            pass
    _out(received=got)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("listen")
    a.add_argument("port", type=int)
    a.add_argument("--accept", type=int, default=1)
    a.add_argument("--timeout", type=float, default=10.0)
    a = sub.add_parser("connect")
    a.add_argument("ip")
    a.add_argument("port", type=int)
    a.add_argument("--bind", type=int, default=0)
    a.add_argument("--timeout", type=float, default=3.0)
    a = sub.add_parser("punch")
    a.add_argument("lport", type=int)
    a.add_argument("rip")
    a.add_argument("rport", type=int)
    a.add_argument("--at", type=float, required=True)
    a.add_argument("--timeout", type=float, default=4.0)
    a = sub.add_parser("udp-send")
    a.add_argument("ip")
    a.add_argument("port", type=int)
    a.add_argument("n", type=int)
    a = sub.add_parser("udp-count")
    a.add_argument("port", type=int)
    a.add_argument("seconds", type=float)
    ns = p.parse_args(argv)
    if ns.cmd == "listen":
        listen(ns.port, ns.accept, ns.timeout)
    elif ns.cmd == "connect":
        connect(ns.ip, ns.port, ns.bind, ns.timeout)
    elif ns.cmd == "punch":
        punch(ns.lport, ns.rip, ns.rport, ns.at, ns.timeout)
    elif ns.cmd == "udp-send":
        udp_send(ns.ip, ns.port, ns.n)
    else:
        udp_count(ns.port, ns.seconds)


if __name__ == "__main__":
    sys.exit(main())
