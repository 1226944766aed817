"""The configuration described for people: ``meshnode config --list``, ``configs/node.toml``.

Everything is read off the typed sections in :mod:`meshnode.config` (their defaults and the
``doc`` of each field), so the table, the example file and the code cannot drift apart; a test
keeps ``configs/node.toml`` equal to :func:`render_toml`.
"""

from __future__ import annotations

from typing import Any, get_origin, get_type_hints

from meshnode.config import _Builder


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every setting; used by ``meshnode config --list`` and docs."""
    out = []
    b = _Builder()
    for s in b.sections:
        hints = get_type_hints(b.sections[s])
        defaults = b.sections[s]()
        for name, f in b.fields(s).items():
            typ = hints[name]
            tname = getattr(typ, "__name__", str(typ)) if get_origin(typ) is None else "list[str]"
            out.append((f"{s}.{name}", tname, getattr(defaults, name), f.metadata.get("doc", "")))
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def render_toml() -> str:
    """``configs/node.toml``: every key with its default and doc (a test keeps the file equal)."""
    lines = ["# LatentLink node configuration: every key, its default and what it does.",
             "# Precedence: built-in defaults < this file < MESHNODE_<SECTION>_<KEY> env < CLI "
             "--set section.key=value.",
             "# `meshnode config --list` prints the same table; unknown keys are rejected at "
             "start-up (exit 2).",
             "# Regenerate with `meshnode config --toml > configs/node.toml`."]
    section = None
    for key, _typ, default, doc in describe():
        sec, name = key.split(".", 1)
        if sec != section:
            lines += ["", f"[{sec}]"]
            section = sec
        if doc:
            lines.append(f"# {doc}")
        lines.append(f"{name} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"


#: keys whose value is a secret: never printed by ``meshnode config``
SECRET_KEYS = frozenset({"limits.shared_token"})
