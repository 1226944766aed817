"""Build :class:`ModelSignature` parts from model files: the weights digest and the config mapping.

Why a digest over tensors and not over files: two nodes holding the same weights sharded differently
(one ``model.safetensors`` vs ``model-0000x-of-0000y``) must find each other. So we hash every tensor
in name order, each framed as ``(name, dtype, shape, byte length, raw bytes)``, never file bytes.

Hashing a large model takes seconds, so results are cached in a JSON file under a caller-given
directory keyed by (absolute path, size, mtime_ns) of every source file. No transformers import here:
safetensors headers are parsed directly (8-byte length + JSON) and tensor bytes are hashed from an
mmap, zero-copy; GGUF headers too (:func:`gguf_tensor_index`, not ``gguf.GGUFReader``, which is
~25-35x slower here: measured reason in its docstring), tensor bytes hashed from an mmap as well.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import blake3

from discovery.signature import ModelSignature

DIGEST_DOMAIN = b"latentlink/weights/v1\x00"
HASH_CHUNK = 64 * 1024 * 1024
DEFAULT_PROGRESS_BYTES = 256 * 1024 * 1024
CACHE_FILE = "weights_digest_cache.json"

# progress(label, bytes_done, bytes_total)
ProgressFn = Callable[[str, int, int], None]

# torch dtype name -> safetensors dtype tag, so a digest over a loaded state_dict equals the file's.
TORCH_TO_ST_DTYPE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


class WeightsDigester:
    """Streaming canonical digest: feed tensors in any order of *files*, but names must be sorted.

    The frame per tensor is length-prefixed so no two different tensor lists hash to the same bytes.
    """

    def __init__(self, max_threads: int = 1) -> None:
        self._h = blake3.blake3(DIGEST_DOMAIN, max_threads=max_threads)
        self._last: str | None = None
        self.bytes_hashed = 0

    def add(self, name: str, dtype: str, shape: Iterable[int], data: memoryview | bytes,
            progress: Callable[[int], None] | None = None) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"tensors must be fed in strictly sorted name order ({name!r})")
        self._last = name
        shape = [int(s) for s in shape]
        mv = memoryview(data).cast("B")
        header = json.dumps([name, dtype, shape, mv.nbytes], separators=(",", ":")).encode()
        self._h.update(struct.pack("<I", len(header)) + header)
        for off in range(0, mv.nbytes, HASH_CHUNK):
            piece = mv[off:off + HASH_CHUNK]
            self._h.update(piece)
            self.bytes_hashed += piece.nbytes
            if progress is not None:
                progress(piece.nbytes)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# -- safetensors ------------------------------------------------------------------------------------

def safetensors_files(path: str | os.PathLike[str]) -> list[Path]:
    """All ``*.safetensors`` files of a model dir (or the single file given)."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {p}")
    return files


def _read_st_header(f: Any) -> tuple[dict[str, Any], int]:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 100 * 1024 * 1024:
        raise ValueError("safetensors header too large")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def digest_safetensors(path: str | os.PathLike[str], *, progress: ProgressFn | None = None,
                       max_threads: int = 1) -> str:
    """Canonical digest of every tensor in a safetensors file or sharded dir (shard-independent)."""
    files = safetensors_files(path)
    index: list[tuple[str, int, dict[str, Any], int]] = []  # name, file idx, entry, data start
    for fi, fp in enumerate(files):
        with open(fp, "rb") as f:
            header, start = _read_st_header(f)
        index.extend((name, fi, entry, start) for name, entry in header.items())
    index.sort(key=lambda t: t[0])
    names = [t[0] for t in index]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names across shards")
    total = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, _, e, _ in index)
    tick = _ticker(str(path), total, progress)
    maps: dict[int, mmap.mmap] = {}
    handles = []
    try:
        d = WeightsDigester(max_threads)
        for name, fi, entry, start in index:
            if fi not in maps:
                fh = open(files[fi], "rb")
                handles.append(fh)
                maps[fi] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            a, b = entry["data_offsets"]
            with memoryview(maps[fi])[start + a:start + b] as mv:
                d.add(name, entry["dtype"], entry["shape"], mv, tick)
        return d.hexdigest()
    finally:
        for m in maps.values():
            m.close()
        for fh in handles:
            fh.close()


# -- GGUF ---------------------------------------------------------------------------------------------

_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFCursor:
    """Minimal reader of GGUF headers: metadata values are skipped, not decoded (see
    :func:`gguf_tensor_index` for why this is not ``gguf.GGUFReader``)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _GGUF_SCALAR:
            return self.unpack(_GGUF_SCALAR[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _GGUF_SCALAR:  # skip fixed-size elements in one step
                self.pos += count * struct.calcsize(_GGUF_SCALAR[etype])
                return None
            for _ in range(count):
                self.value(etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_tensor_index(buf: memoryview) -> list[tuple[str, str, list[int], int, int]]:
    """(name, ``gguf:<type>``, dims as stored, absolute offset, byte length) of every tensor.

    The same five values ``gguf.GGUFReader`` gives (``name``, ``tensor_type``, ``shape``,
    ``data_offset``, ``n_bytes``; tests/test_signature.py checks both agree tensor by tensor), but
    not through it, for a measured reason: ``GGUFReader.__init__`` builds a numpy array for every
    metadata value, one per vocabulary string, and has no way to skip them. On SmolLM2-135M's GGUF
    (94 MiB; 49,152-token vocab plus merges; gguf 0.19.0, 2-core box) constructing the reader
    took 3.1-5.4 s, this index 0.14 s. ``scripts/bench_signature.py``, whole digest, best of 5:
    2.5-3.7 s (0.026-0.040 GB/s) with ``GGUFReader``, 0.10-0.17 s (0.58-1.02 GB/s) with this
    one (raw BLAKE3 over the file: 0.03 s), the same digest either way. The digest is taken at
    every model load with a cold cache, so the reader would be ~95% of it. The gguf package
    still supplies the type table (``GGML_QUANT_SIZES``, ``GGMLQuantizationType``).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # local: only needed for GGUF

    c = _GGUFCursor(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    c.pos = 4
    version = c.unpack("<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} not supported")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    alignment = 32
    for _ in range(n_kv):
        key = c.string()
        v = c.value(c.unpack("<I"))
        if key == "general.alignment":
            alignment = int(v)
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
        qtype, offset = GGMLQuantizationType(c.unpack("<I")), c.unpack("<Q")
        infos.append((name, qtype, dims, offset))
    data_start = -(-c.pos // alignment) * alignment
    out = []
    for name, qtype, dims, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        count = 1
        for d in dims:
            count *= d
        nbytes = count // block * type_size
        if data_start + offset + nbytes > buf.nbytes:
            raise ValueError(f"GGUF tensor {name} runs past the end of the file")
        out.append((name, "gguf:" + qtype.name, dims, data_start + offset, nbytes))
    return out


def digest_gguf(path: str | os.PathLike[str], *, progress: ProgressFn | None = None,
                max_threads: int = 1) -> str:
    """Canonical digest of the tensors of a GGUF file (quantized bytes as stored, dtype ``gguf:<type>``)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        mv = memoryview(m)
        try:
            index = sorted(gguf_tensor_index(mv), key=lambda t: t[0])
            tick = _ticker(str(path), sum(t[4] for t in index), progress)
            d = WeightsDigester(max_threads)
            for name, dtype, dims, off, nbytes in index:
                with mv[off:off + nbytes] as piece:
                    d.add(name, dtype, dims, piece, tick)
            return d.hexdigest()
        finally:
            mv.release()


# -- in-memory tensors (loaded models, tiny test models) ----------------------------------------------

def digest_tensors(tensors: Mapping[str, Any], max_threads: int = 1) -> str:
    """Digest of a ``name -> torch.Tensor`` map; equals :func:`digest_safetensors` of the same
    tensors saved to disk. Tensors that share storage (tied embeddings) must be deduplicated by the
    caller the way ``save_pretrained`` does, or the digests will differ."""
    d = WeightsDigester(max_threads)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        dtype = TORCH_TO_ST_DTYPE[str(t.dtype).removeprefix("torch.")]
        raw = t.reshape(-1).view(_byte_dtype()).numpy() if t.numel() else b""
        d.add(name, dtype, list(t.shape), memoryview(raw))
    return d.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


# -- cache ----------------------------------------------------------------------------------------------

def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return safetensors_files(path)


def _cache_key(kind: str, path: Path) -> str:
    parts = [kind]
    for f in _source_files(path):
        st = f.stat()
        parts.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return blake3.blake3("\n".join(parts).encode()).hexdigest()


def weights_digest(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                   progress: ProgressFn | None = None,
                   progress_min_bytes: int = DEFAULT_PROGRESS_BYTES,
                   max_threads: int = 1) -> str:
    """Digest of a safetensors file/dir or a ``.gguf`` file, cached under ``cache_dir``.

    ``progress`` defaults to a one-line stderr printer, shown only for sources larger than
    ``progress_min_bytes`` (so small test models stay silent).
    """
    p = Path(path)
    kind = "gguf" if p.suffix == ".gguf" else "safetensors"
    key = _cache_key(kind, p)
    cache = _load_cache(cache_dir)
    if key in cache:
        return cache[key]
    size = sum(f.stat().st_size for f in _source_files(p))
    if progress is None and size >= progress_min_bytes:
        progress = print_progress
    fn = digest_gguf if kind == "gguf" else digest_safetensors
    digest = fn(p, progress=progress if size >= progress_min_bytes else None, max_threads=max_threads)
    if cache_dir is not None:
        cache[key] = digest
        _store_cache(cache_dir, cache)
    return digest


def _load_cache(cache_dir: str | os.PathLike[str] | None) -> dict[str, str]:
    if cache_dir is None:
        return {}
    f = Path(cache_dir) / CACHE_FILE
    try:
        data = json.loads(f.read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cache(cache_dir: str | os.PathLike[str], cache: dict[str, str]) -> None:
    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{CACHE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(cache, sort_keys=True))
    os.replace(tmp, d / CACHE_FILE)  # atomic: concurrent nodes never read half a file


def print_progress(label: str, done: int, total: int) -> None:
    """Default progress printer (stderr, one rewritten line)."""
    end = "\n" if done >= total else ""
    print(f"\rhashing {label}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end=end,
          file=sys.stderr, flush=True)


def _ticker(label: str, total: int, progress: ProgressFn | None) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        progress(label, done, total)

    return tick


# -- config -> signature ----------------------------------------------------------------------------

def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal configs (Gemma 3 4B+) nest the decoder under ``text_config``."""
    tc = cfg.get("text_config")
    return tc if isinstance(tc, Mapping) else cfg


_NORM_TYPES = {
    "gpt2": ("layernorm", "pre"), "gemma3_text": ("rmsnorm_gemma", "pre+post"),
    "gemma3": ("rmsnorm_gemma", "pre+post"), "gemma2": ("rmsnorm_gemma", "pre+post"),
    "gemma": ("rmsnorm_gemma", "pre"), "qwen3": ("rmsnorm+qknorm", "pre"),
}


def _scalar(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _scalar(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_scalar(x) for x in v]
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    return str(v)


def _rope(cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    if model_type == "gpt2":
        return {"type": "learned_absolute"}
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    out: dict[str, Any] = {}
    if isinstance(params, Mapping) and params:
        # transformers 5.x: {"rope_type":..., "rope_theta":...} or per layer type {"full_attention": {...}}
        if all(isinstance(v, Mapping) for v in params.values()):
            for lt, p in sorted(params.items()):
                out[lt] = _scalar(dict(p))
        else:
            out.update(_scalar(dict(params)))
    if cfg.get("rope_theta") is not None and "rope_theta" not in out:
        out["rope_theta"] = cfg["rope_theta"]
    if isinstance(scaling, Mapping) and scaling:
        out["scaling"] = _scalar(dict(scaling))
    for k in ("rope_local_base_freq", "partial_rotary_factor"):
        if k in cfg:
            out[k] = cfg[k]
    out.setdefault("type", out.get("rope_type", "default") if "rope_type" in out else "rope")
    return out


def _norm(cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    ntype, placement = _NORM_TYPES.get(model_type, ("rmsnorm", "pre"))
    eps = cfg.get("rms_norm_eps", cfg.get("layer_norm_epsilon", cfg.get("layer_norm_eps")))
    return {"type": ntype, "eps": eps, "placement": placement}


def _cache_layout(cfg: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2 carries a window it does not use
        window = None
    layer_types = cfg.get("layer_types")
    if not layer_types:
        layer_types = ["sliding_attention" if window else "full_attention"] * n_layers
    return {"sliding_window": window, "layer_types": list(layer_types)}


def signature_from_config(config: Mapping[str, Any], weights_digest: str, *,
                          dtypes: Iterable[str] = ("float32", "bfloat16"),
                          family: str | None = None) -> ModelSignature:
    """Map a Hugging Face ``config.json`` dict to a :class:`ModelSignature`.

    Works on the plain dict (``config.to_dict()`` or the JSON file) so discovery never needs
    transformers. Field names differ between families (GPT-2's ``n_layer``/``n_embd``); both are read.
    """
    cfg = _text_config(config)
    model_type = str(cfg.get("model_type", config.get("model_type", "unknown")))
    archs = config.get("architectures") or cfg.get("architectures") or [model_type]
    n_layers = int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0)))
    hidden = int(cfg.get("hidden_size", cfg.get("n_embd", 0)))
    heads = int(cfg.get("num_attention_heads", cfg.get("n_head", 0)))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
    special = {k: _scalar(cfg.get(k, config.get(k)))
               for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    max_pos = int(cfg.get("max_position_embeddings", cfg.get("n_positions", 0)) or 0)
    return ModelSignature(
        family=family or model_type,
        architecture=str(archs[0]),
        weights_digest=weights_digest,
        num_layers=n_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope=_rope(cfg, model_type),
        norm=_norm(cfg, model_type),
        vocab_size=int(cfg.get("vocab_size", 0)),
        special_tokens=special,
        cache_layout=_cache_layout(cfg, n_layers),
        max_positions=max_pos,
        dtypes=tuple(dtypes),
    )


def signature_from_dir(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                       **kw: Any) -> ModelSignature:
    """Signature of a HF model dir (``config.json`` + safetensors)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return signature_from_config(cfg, weights_digest(path, cache_dir=cache_dir), **kw)


def iter_chunks(mv: memoryview, size: int = HASH_CHUNK) -> Iterator[memoryview]:
    """Slices of ``mv`` (used by the benchmark to hash raw bytes the same way)."""
    for off in range(0, mv.nbytes, size):
        yield mv[off:off + size]
