"""A sender peer in its own OS process, and the serialization boundary the node transport replaces.

``save_payload``/``load_payload`` stand in for the wire: tensors go out as one safetensors file
(one contiguous buffer) plus a JSON meta map; the receiver reads the whole file into one bytearray
and builds tensors over slices of it with ``torch.frombuffer`` (zero copy), exactly as it will from
a received message. Swap these two functions for the real transport and nothing else changes.

Run as ``python tests/helpers/runtime_peer.py --jobs JOBS.json --out DIR --cache DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from meshnode.runtime.buffers import TensorSlice, tensors_from_buffer  # noqa: E402
from meshnode.runtime.loader import TinySpec, load_model  # noqa: E402

ST_TO_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
               "I32": "int32", "U8": "uint8"}


def model_spec(job: dict[str, Any]) -> str | TinySpec:
    m = job["model"]
    if isinstance(m, str):
        return m
    return TinySpec(m["type"], m.get("config", {}), m.get("seed", 0))


def save_payload(folder: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(meta, sort_keys=True))


def load_payload(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One bytearray per message, tensors as zero-copy slices of it (as the transport delivers)."""
    buf = bytearray((folder / f"{name}.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    header = json.loads(bytes(buf[8:8 + n]))
    header.pop("__metadata__", None)
    base = 8 + n
    slices = [TensorSlice(k, ST_TO_DTYPE[e["dtype"]], tuple(e["shape"]), base + e["data_offsets"][0],
                          e["data_offsets"][1] - e["data_offsets"][0]) for k, e in header.items()]
    meta = json.loads((folder / f"{name}.json").read_text())
    return tensors_from_buffer(buf, slices), meta


def prompt_ids(lm: Any, job: dict[str, Any]) -> list[int]:
    p = job["prompt"]
    return lm.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)


def run_job(job: dict[str, Any], out: Path, cache: Path) -> None:
    from meshnode.runtime import hidden, kv

    lm = load_model(model_spec(job), dtype=job.get("dtype", "float32"),
                    num_threads=job.get("threads", 1), cache_dir=cache)
    folder = out / job["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "signature.bin").write_bytes(lm.signature.encode())
    ids = prompt_ids(lm, job)
    n = job.get("n", 32)
    toks, logits = kv.generate_reference(lm, ids, n)  # the sender continuing itself
    save_file({"tokens": torch.tensor(toks), "logits": logits}, str(folder / "ref.safetensors"))
    tensors, meta, state = kv.prefill_and_capture(lm, ids)
    save_payload(folder, "snap", tensors, meta)
    if job.get("turn2"):
        delta, dmeta = kv.append_turn(lm, state, list(job["turn2"]))
        save_payload(folder, "delta", delta, dmeta)
        full, fmeta = kv.capture(lm, state)
        save_payload(folder, "snap2", full, fmeta)
        toks2, logits2 = kv.continue_greedy(lm, state, n)
        save_file({"tokens": torch.tensor(toks2), "logits": logits2}, str(folder / "ref2.safetensors"))
    if job.get("hidden_layer") is not None:
        h, hmeta, hlogits = hidden.capture_hidden(lm, ids, int(job["hidden_layer"]))
        save_payload(folder, "hidden", h, hmeta)
        save_file({"logits": hlogits}, str(folder / "ref_hidden.safetensors"))
    (folder / "done").write_text("ok")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for job in json.loads(args.jobs.read_text()):
        run_job(job, args.out, args.cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
