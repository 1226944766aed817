#!/usr/bin/env python3
"""Connect time and 1 KiB request/response latency: our hardened host vs py-libp2p defaults vs raw TCP.

Everything is measured in the same run on 127.0.0.1:
  * connect: fresh Noise+yamux connection (ours: max_connections_per_peer=1; default: py-libp2p's
    ConnectionConfig, which stalls ~250 ms) — target p50 < 20 ms;
  * 1 KiB echo over one open libp2p stream vs a raw TCP socket with TCP_NODELAY (the ceiling).
Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import multiaddr  # noqa: E402
import trio  # noqa: E402
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402

from discovery.streamio import read_exactly  # noqa: E402
from meshnode.config import HostSection  # noqa: E402
from meshnode.host import build_host, muxer_options, security_options  # noqa: E402
from meshnode.logs import setup_logging  # noqa: E402

ECHO = "/latentlink/bench-echo/1.0.0"
LOOP = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(xs_s: list[float]) -> dict:
    ms = [x * 1e3 for x in xs_s]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "mean_ms": statistics.fmean(ms)}


async def bench_connect(make_host, n: int) -> list[float]:
    server = make_host()
    out = []
    async with server.run(listen_addrs=[LOOP]):
        info = info_from_p2p_addr(server.get_addrs()[0])
        for _ in range(n):
            client = make_host()
            async with client.run(listen_addrs=[LOOP]):
                t = time.perf_counter()
                await client.connect(info)
                out.append(time.perf_counter() - t)
                await client.get_network().close_peer(server.get_id())
    return out


async def bench_rr(n: int, size: int) -> list[float]:
    cfg = HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"])
    a, b = build_host(cfg, create_new_key_pair()), build_host(cfg, create_new_key_pair())

    async def echo(stream):
        try:
            while True:
                await stream.write(await read_exactly(stream, size))
        except Exception:
            pass

    b.set_stream_handler(ECHO, echo)
    out = []
    async with a.run(listen_addrs=[LOOP]), b.run(listen_addrs=[LOOP]):
        await a.connect(info_from_p2p_addr(b.get_addrs()[0]))
        s = await a.new_stream(b.get_id(), [ECHO])
        msg = b"x" * size
        for i in range(n + 20):
            t = time.perf_counter()
            await s.write(msg)
            await read_exactly(s, size)
            if i >= 20:
                out.append(time.perf_counter() - t)
        await s.reset()
    return out


def bench_raw_tcp(n: int, size: int) -> list[float]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(size)
        try:
            while True:
                got = 0
                while got < size:
                    k = c.recv_into(memoryview(buf)[got:])
                    if not k:
                        return
                    got += k
                c.sendall(buf)
        finally:
            c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    cli = socket.create_connection(srv.getsockname())
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg, buf, out = b"x" * size, bytearray(size), []
    for i in range(n + 20):
        t = time.perf_counter()
        cli.sendall(msg)
        got = 0
        while got < size:
            got += cli.recv_into(memoryview(buf)[got:])
        if i >= 20:
            out.append(time.perf_counter() - t)
    cli.close()
    srv.close()
    return out


def raw_connect(n: int) -> list[float]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c = socket.create_connection(srv.getsockname())
        out.append(time.perf_counter() - t)
        s, _ = srv.accept()
        c.close()
        s.close()
    srv.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connects", type=int, default=30, help="connections per variant")
    ap.add_argument("--default-connects", type=int, default=8, help="connections with py-libp2p defaults (slow)")
    ap.add_argument("--requests", type=int, default=500, help="request/response round trips")
    ap.add_argument("--size", type=int, default=1024, help="request size in bytes")
    ap.add_argument("--json", default="bench-results/connect.json", help="where to write JSON")
    args = ap.parse_args()
    setup_logging("error")

    cfg = HostSection(listen_addrs=["/ip4/127.0.0.1/tcp/0"])

    def ours():
        return build_host(cfg, create_new_key_pair())

    def default():
        kp = create_new_key_pair()
        return new_host(key_pair=kp, sec_opt=security_options(kp), muxer_opt=muxer_options())

    print("measuring connect (ours)...", file=sys.stderr)
    res = {"connect_ours": summary(trio.run(bench_connect, ours, args.connects))}
    print("measuring connect (py-libp2p default ConnectionConfig)...", file=sys.stderr)
    res["connect_py_libp2p_default"] = summary(trio.run(bench_connect, default, args.default_connects))
    res["connect_raw_tcp"] = summary(raw_connect(args.connects))
    print("measuring request/response...", file=sys.stderr)
    res["rr_libp2p_stream"] = summary(trio.run(bench_rr, args.requests, args.size))
    res["rr_raw_tcp_nodelay"] = summary(bench_raw_tcp(args.requests, args.size))
    res["target"] = {"connect_p50_ms_lt": 20.0, "met": res["connect_ours"]["p50_ms"] < 20.0}
    res["size_bytes"] = args.size

    print(f"\n{'measurement':<30}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}")
    for k, v in res.items():
        if isinstance(v, dict) and "p50_ms" in v:
            print(f"{k:<30}{v['n']:>6}{v['p50_ms']:>10.3f}{v['p99_ms']:>10.3f}")
    print(f"\ntarget connect p50 < 20 ms: {'MET' if res['target']['met'] else 'NOT MET'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
