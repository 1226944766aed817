"""Weights-digest speed against raw BLAKE3 over the same bytes, measured in the same run.

The digest hashes each tensor (sorted by name) framed with its name/dtype/shape, straight from an
mmap; the raw figure is one blake3 over the whole file's mmap. The gap is the cost of canonical
order and framing. Sources: SmolLM2's GGUF, its dequantized safetensors (converted once into
--cache), and/or any --path given.

    .venv/bin/python scripts/bench_signature.py [--path P ...] [--repeat 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blake3  # noqa: E402

from discovery.builders import digest_gguf, digest_safetensors, safetensors_files  # noqa: E402


def raw_blake3(files: list[Path], threads: int) -> float:
    t = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            h = blake3.blake3(max_threads=threads)
            with memoryview(m) as mv:
                h.update(mv)
            h.hexdigest()
    return time.perf_counter() - t


def bench(path: Path, repeat: int, threads: int) -> dict[str, Any]:
    files = [path] if path.suffix == ".gguf" else safetensors_files(path)
    size = sum(f.stat().st_size for f in files)
    fn = digest_gguf if path.suffix == ".gguf" else digest_safetensors
    raw_blake3(files, threads)  # warm the page cache so both sides read from memory
    digest_s, raw_s = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(path, max_threads=threads)
        digest_s.append(time.perf_counter() - t)
        raw_s.append(raw_blake3(files, threads))
    d, r = min(digest_s), min(raw_s)
    return {"path": str(path), "bytes": size, "threads": threads, "digest_s": d, "raw_s": r,
            "digest_gbps": size / d / 1e9, "raw_gbps": size / r / 1e9, "ratio": r / d}


def default_paths(cache: Path) -> list[Path]:
    from meshnode.runtime.loader import gguf_to_safetensors, smollm2_gguf_path

    g = smollm2_gguf_path()
    return [g, gguf_to_safetensors(g, cache)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, action="append", help="safetensors file/dir or .gguf")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "latentlink")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="blake3 max_threads (-1 = AUTO)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results as JSON")
    args = ap.parse_args()
    threads = blake3.blake3.AUTO if args.threads < 0 else args.threads
    rows = [bench(p, args.repeat, threads) for p in (args.path or default_paths(args.cache))]
    for r in rows:
        print(f"{r['path']}: {r['bytes'] / 2**20:.0f} MiB  digest {r['digest_gbps']:.2f} GB/s  "
              f"raw blake3 {r['raw_gbps']:.2f} GB/s  (digest/raw speed {r['ratio']:.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
