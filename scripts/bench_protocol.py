#!/usr/bin/env python3
"""Throughput of the tensor protocol's data path, against memcpy and raw libsodium, in one run.

Measures, per payload size (medians of several repeats, buffers prefaulted and reused):
  memcpy              numpy copy into a prefaulted buffer (the ceiling for any "copy once" path)
  aegis256 raw        libsodium AEGIS-256 via cffi, chunked, encrypt and decrypt
  blake3              checksum alone (threads as --hash-threads, as the protocol does)
  send                Session.send_message (sealed header) + sealing every chunk (each hashed with
                      BLAKE3 as it is sealed) + the DIGEST frame; negotiated cipher (aegis128l)
  receive             header + DIGEST + opening every chunk into the message buffer + BLAKE3
                      verify + ACK
  pipeline            payload / (send + receive): one process doing both ends (target >= 1 GB/s)
  inline pipeline     the same over in-band CHUNK frames on one byte stream (the libp2p path)

Usage: bench_protocol.py [--sizes 1,16,64,256,1024] [--json out.json] [--chunk-mib 4]
                         [--hash-threads 1|0] [--no-inline] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nacl.bindings  # noqa: E402
from nacl._sodium import ffi, lib  # noqa: E402

from tensor_rpc import Kind, Limits, MessageReceived, TensorSpec, checksum  # noqa: E402
from tensor_rpc.testing import make_pair  # noqa: E402

MiB = 1 << 20
nacl.bindings.sodium_init()  # CPU feature detection: without it AEGIS is ~400x slower


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(size: int, chunk: int, repeats: int, inline: bool,
               hash_threads: int) -> dict[str, float]:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    dst = np.ones(size, dtype=np.uint8)  # prefaulted
    n_chunks = -(-size // chunk)
    tag = lib.crypto_aead_aegis256_abytes()
    sealed = np.ones(size + n_chunks * tag, dtype=np.uint8)
    res: dict[str, float] = {"size_mib": size / MiB}

    res["memcpy"] = _median(lambda: np.copyto(dst, payload), repeats)

    key, nonce, clen = b"k" * 32, b"n" * 32, ffi.new("unsigned long long *")
    src_p, dst_p, sealed_p = (ffi.from_buffer(payload), ffi.from_buffer(dst, require_writable=True),
                              ffi.from_buffer(sealed, require_writable=True))

    def raw_encrypt() -> None:
        for i in range(n_chunks):
            off, n = i * chunk, min(chunk, size - i * chunk)
            lib.crypto_aead_aegis256_encrypt(sealed_p + i * (chunk + tag), clen, src_p + off, n,
                                             b"ad", 2, ffi.NULL, nonce, key)

    def raw_decrypt() -> None:
        for i in range(n_chunks):
            off, n = i * chunk, min(chunk, size - i * chunk)
            rc = lib.crypto_aead_aegis256_decrypt(dst_p + off, clen, ffi.NULL,
                                                  sealed_p + i * (chunk + tag), n + tag, b"ad", 2,
                                                  nonce, key)
            assert rc == 0
    res["aegis_encrypt"] = _median(raw_encrypt, repeats)
    res["aegis_decrypt"] = _median(raw_decrypt, repeats)
    res["blake3"] = _median(lambda: checksum(memoryview(payload), hash_threads), repeats)

    # protocol: one tensor per 32 MiB "layer", like a KV cache split per layer
    per = min(size, 32 * MiB)
    specs = [TensorSpec(f"layer{i}", "uint8", (min(per, size - i * per),), min(per, size - i * per))
             for i in range(-(-size // per))]
    lim = Limits(chunk_bytes=chunk, max_message_bytes=max(size, MiB) * 2,
                 recv_window_bytes=1 << 40, messages_per_s=1e9, hash_threads=hash_threads)
    p = make_pair(lim, lim, buffer_factory=lambda n: memoryview(dst)[:n])
    sealed_mv = memoryview(sealed)
    state: dict[str, object] = {}

    def send() -> None:
        msg = p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=specs,
                               payload=payload, now=0.0, inline=False)
        for i in range(msg.n_chunks):
            off = i * (chunk + tag)
            msg.seal_chunk(i, sealed_mv[off:off + msg.sealed_size(i)])
        state["msg"], state["ctl"] = msg, p.a.data_to_send()

    def receive() -> None:
        msg = state["msg"]
        events = p.b.receive_data(state["ctl"], 0.0)
        for i in range(msg.n_chunks):
            off = i * (chunk + tag)
            events += p.b.receive_chunk(msg.message_id, i, sealed_mv[off:off + msg.sealed_size(i)],
                                        0.0)
        assert isinstance(events[-1], MessageReceived), events[-1]
        p.a.receive_data(p.b.data_to_send(), 0.0)  # the ACK (checksums compared)

    send_t, recv_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        send()
        t1 = time.perf_counter()
        receive()
        recv_t.append(time.perf_counter() - t1)
        send_t.append(t1 - t0)
    assert bytes(dst[:64]) == bytes(payload[:64]) and bytes(dst[-64:]) == bytes(payload[-64:])
    res["send"], res["receive"] = statistics.median(send_t), statistics.median(recv_t)
    res["pipeline"] = statistics.median(s + r for s, r in zip(send_t, recv_t, strict=True))

    if inline:
        def inline_round() -> None:
            p.a.send_message(kind=Kind.KV_CACHE, layers=(0, 1), tokens=(0, 1), tensors=specs,
                             payload=payload, now=0.0)
            got = []
            while True:
                frames = p.a.frames_to_send()
                if not frames:
                    break
                for f in frames:
                    got += p.b.receive_data(f, 0.0)
                p.a.receive_data(p.b.data_to_send(), 0.0)
            assert any(isinstance(e, MessageReceived) for e in got)
        res["inline_pipeline"] = _median(inline_round, repeats)
    p.a.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,16,64,256", help="payload sizes in MiB, comma separated")
    ap.add_argument("--chunk-mib", type=float, default=4.0, help="AEAD chunk size in MiB")
    ap.add_argument("--repeats", type=int, default=0, help="0 = auto (more for small sizes)")
    ap.add_argument("--hash-threads", type=int, default=1,
                    help="BLAKE3 threads per large tensor: 1 single (default), 0 AUTO")
    ap.add_argument("--no-inline", action="store_true", help="skip the in-band frame path")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args(argv)
    chunk = int(args.chunk_mib * MiB)
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",") if s.strip()]
    cols = ["memcpy", "aegis_encrypt", "aegis_decrypt", "blake3", "send", "receive", "pipeline",
            "inline_pipeline"]
    print(f"{'MiB':>6} " + " ".join(f"{c:>15}" for c in cols) + "   (GB/s, 1e9 bytes/s)")
    rows = []
    for size in sizes:
        repeats = args.repeats or max(3, min(9, (256 * MiB) // size))
        r = bench_size(size, chunk, repeats, not args.no_inline and size <= 256 * MiB,
                       args.hash_threads)
        gbps = {c: size / r[c] / 1e9 for c in cols if c in r}
        rows.append({"size_bytes": size, "repeats": repeats, "seconds": r, "gb_per_s": gbps})
        print(f"{size / MiB:>6.0f} " + " ".join(
            f"{gbps[c]:>15.2f}" if c in gbps else f"{'-':>15}" for c in cols), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "chunk_bytes": chunk, "hash_threads": args.hash_threads, "python": platform.python_version(), "machine": platform.machine(),
            "note": "pipeline = send + receive in one process; GB/s = 1e9 bytes/s",
            "results": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
