"""The node's model, if ``[runtime].model`` names one: loaded off the event loop, then served.

One capability of the node (``run(task_status=...)``, composed in ``node.py``). Loading runs in a
worker thread (a GGUF is converted to safetensors the first time, ~25 s for SmolLM2); once loaded,
``on_loaded(lm)`` lets the node serve the model's signature and advertise it. torch and
transformers are imported only by nodes that load a model.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from meshnode.config import Config
from meshnode.logs import get_logger, kv

log = get_logger("meshnode.node")


class ModelHost:
    def __init__(self, config: Config, on_loaded: Callable[[Any], Awaitable[None]]) -> None:
        self.config, self._on_loaded = config, on_loaded
        self.model: Any = None  # meshnode.runtime.loader.LoadedModel once loaded
        self.error: str | None = None
        self._done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.config.runtime.model:
            return
        from meshnode.runtime.loader import load_model

        rt = self.config.runtime
        cache = Path(os.path.expanduser(rt.cache_dir)) if rt.cache_dir else self.config.data_dir / "models"
        log.info("loading model", extra=kv(model=rt.model, dtype=rt.dtype, cache=str(cache)))
        t0 = time.monotonic()
        try:
            # abandon_on_cancel: a node told to stop mid-conversion exits now (the cache is
            # published by an atomic rename, so an abandoned conversion leaves no partial model)
            lm = await trio.to_thread.run_sync(functools.partial(
                load_model, rt.model, dtype=rt.dtype, num_threads=rt.num_threads, cache_dir=cache),
                abandon_on_cancel=True)
        except Exception as exc:  # reported by wait() and /status; the node keeps running
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("model load failed", extra=kv(model=rt.model, err=exc))
            self._done.set()
            return
        self.model = lm
        self._done.set()
        log.info("model loaded", extra=kv(model=rt.model, compat_key=lm.signature.compat_key,
                                          load_s=round(time.monotonic() - t0, 2)))
        await self._on_loaded(lm)

    async def wait(self, timeout_s: float | None = None) -> Any:
        """The loaded model once ready; raises if loading failed or none is set."""
        if not self.config.runtime.model:
            raise RuntimeError("no model configured ([runtime].model)")
        with trio.fail_after(timeout_s) if timeout_s is not None else contextlib.nullcontext():
            await self._done.wait()
        if self.model is None:
            raise RuntimeError(f"model load failed: {self.error}")
        return self.model

    def status(self) -> dict[str, Any] | None:
        if not self.config.runtime.model:
            return None
        sig = self.model.signature if self.model is not None else None
        return {"model": self.config.runtime.model,
                "state": "ready" if sig else ("failed" if self.error else "loading"),
                "error": self.error, "compat_key": sig.compat_key if sig else None,
                "family": sig.family if sig else None}
