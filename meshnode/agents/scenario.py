"""Scenarios: who runs where, on which model, doing what — loaded from TOML, checked at load.

A scenario names its nodes (one node process each), its agents (each on a node) and a pattern:

* ``fanout`` — *read once, continue many*: the ``reader`` prefills the shared context once and
  hands its KV cache to every ``worker`` at once (one capture, N transfers); each worker appends
  its own instruction and continues.
* ``relay`` — *relay of thought*: the ``driver`` reasons for ``tokens`` tokens, hands its state to
  the ``partner``, who continues the same line and hands its delta back; ``rounds`` times.
* ``warm`` — *warm worker*: the ``reader`` extends the context round by round (``document_parts``)
  and after each round hands it to the ``worker``, which holds the earlier rounds already and is
  sent only what it lacks.

Text keys (``system``, ``document``, ``document_parts``, ``prompt``, ``instruction``) need a model
with a tokenizer; each has an ``*_ids`` twin (token ids) for models without one. Paths in
``document``/``document_parts`` are relative to the scenario file. Every error names the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PATTERNS = {"fanout": ("reader", "worker"), "relay": ("driver", "partner"), "warm": ("reader", "worker")}
SCENARIO_DIR = Path(__file__).resolve().parents[2] / "configs" / "scenarios"


class ScenarioError(ValueError):
    """An invalid scenario: names the key (``agents[1].node``) and the file."""

    def __init__(self, key: str, source: str, message: str) -> None:
        self.key = key
        super().__init__(f"scenario error: {key} (in {source}): {message}")


@dataclass(frozen=True)
class Text:
    """A piece of text, or the token ids standing for it."""

    text: str | None = None
    ids: tuple[int, ...] | None = None

    @property
    def given(self) -> bool:
        return self.text is not None or self.ids is not None


@dataclass(frozen=True)
class AgentSpec:
    name: str
    node: str
    role: str
    instructions: tuple[Text, ...] = ()  # one per round (a single one repeats)
    poison: bool = False  # tests/demos: spoil the held prefix's bits before the next round

    def instruction(self, round_: int) -> Text:
        if not self.instructions:
            return Text()
        return self.instructions[min(round_, len(self.instructions) - 1)]


@dataclass(frozen=True)
class NodeSpec:
    name: str
    model: str | None = None  # overrides the scenario's model on this node


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    pattern: str
    model: str
    dtype: str
    threads: int
    tokens: int
    rounds: int
    block_tokens: int
    timeout_s: float
    system: Text
    warm_system: bool
    parts: tuple[Text, ...]  # fanout: one; warm: one per round; relay: the prompt
    nodes: dict[str, NodeSpec]
    agents: tuple[AgentSpec, ...]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def agent(self, name: str) -> AgentSpec:
        return next(a for a in self.agents if a.name == name)

    def on_node(self, node: str) -> list[AgentSpec]:
        return [a for a in self.agents if a.node == node]

    def by_role(self, role: str) -> list[AgentSpec]:
        return [a for a in self.agents if a.role == role]

    def model_of(self, node: str) -> str:
        spec = self.nodes.get(node)
        return spec.model if spec is not None and spec.model else self.model


def resolve(name_or_path: str) -> Path:
    """A scenario by path, or by name among ``configs/scenarios/*.toml``."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return SCENARIO_DIR / f"{name_or_path}.toml"


def available() -> list[tuple[str, str]]:
    """(name, description) of every shipped scenario."""
    out = []
    for p in sorted(SCENARIO_DIR.glob("*.toml")):
        try:
            s = load(p)
            out.append((p.stem, s.description))
        except ScenarioError as exc:
            out.append((p.stem, f"INVALID: {exc}"))
    return out


class _Reader:
    def __init__(self, data: dict, source: str, base: Path) -> None:
        self.data, self.source, self.base = data, source, base
        self.used: set[str] = set()

    def fail(self, key: str, msg: str) -> ScenarioError:
        return ScenarioError(key, self.source, msg)

    def get(self, d: dict, key: str, typ: type | tuple, default: Any = ..., where: str = "") -> Any:
        full = f"{where}{key}"
        if key not in d:
            if default is ...:
                raise self.fail(full, "missing")
            return default
        v = d[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
            name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise self.fail(full, f"expected {name}, got {type(v).__name__}")
        return v

    def count(self, d: dict, key: str, default: int, lo: int, hi: int, where: str = "") -> int:
        v = self.get(d, key, int, default, where)
        if not lo <= v <= hi:
            raise self.fail(f"{where}{key}", f"{v} out of range [{lo}, {hi}]")
        return v

    def text(self, d: dict, key: str, where: str = "", path_ok: bool = False) -> Text:
        has_t, has_i = key in d, f"{key}_ids" in d
        if has_t and has_i:
            raise self.fail(f"{where}{key}", f"give {key} or {key}_ids, not both")
        if has_i:
            ids = self.get(d, f"{key}_ids", list, where=where)
            if not ids or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids):
                raise self.fail(f"{where}{key}_ids", "a non-empty list of token ids expected")
            return Text(ids=tuple(ids))
        if not has_t:
            return Text()
        v = self.get(d, key, str, where=where)
        if path_ok:
            p = (self.base / v)
            if not p.is_file():
                raise self.fail(f"{where}{key}", f"file not found: {p}")
            v = p.read_text(encoding="utf-8")
        if not v.strip():
            raise self.fail(f"{where}{key}", "empty text")
        return Text(text=v)


def load(path: str | Path) -> Scenario:
    p = Path(path)
    source = str(p)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError("-", source, "no such scenario file (meshnode agents list shows the "
                            "shipped ones)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("-", source, f"not valid TOML: {exc}") from None
    r = _Reader(data, source, p.parent)
    known = {"name", "description", "pattern", "model", "dtype", "threads", "tokens", "rounds",
             "block_tokens", "timeout_s", "system", "system_ids", "warm_system", "document",
             "document_ids", "document_parts", "prompt", "prompt_ids", "nodes", "agents"}
    for key in data:
        if key not in known:
            raise r.fail(key, f"unknown key (known: {', '.join(sorted(known))})")
    pattern = r.get(data, "pattern", str)
    if pattern not in PATTERNS:
        raise r.fail("pattern", f"{pattern!r}: one of {', '.join(PATTERNS)}")
    dtype = r.get(data, "dtype", str, "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise r.fail("dtype", f"{dtype!r}: float32, bfloat16 or float16")
    if pattern == "relay":
        parts = (r.text(data, "prompt"),)
        if not parts[0].given:
            raise r.fail("prompt", "missing (the relay pattern starts from a prompt)")
    elif pattern == "warm":
        raw = r.get(data, "document_parts", list)
        if len(raw) < 2:
            raise r.fail("document_parts", "at least two parts (one per round)")
        parts = tuple(r.text({"part": x} if isinstance(x, str) else {"part_ids": x}, "part",
                             f"document_parts[{i}].", path_ok=True) for i, x in enumerate(raw))
    else:
        parts = (r.text(data, "document", path_ok=True),)
        if not parts[0].given:
            raise r.fail("document", "missing (the shared context the reader reads once)")
    nodes_raw = r.get(data, "nodes", dict)
    if not nodes_raw:
        raise r.fail("nodes", "at least one node")
    nodes = {}
    for name, spec in nodes_raw.items():
        if not isinstance(spec, dict):
            raise r.fail(f"nodes.{name}", "a table expected")
        for k in spec:
            if k != "model":
                raise r.fail(f"nodes.{name}.{k}", "unknown key (known: model)")
        nodes[name] = NodeSpec(name, r.get(spec, "model", str, None, f"nodes.{name}."))
    agents_raw = r.get(data, "agents", list)
    roles = PATTERNS[pattern]
    agents, seen = [], set()
    for i, a in enumerate(agents_raw):
        w = f"agents[{i}]."
        if not isinstance(a, dict):
            raise r.fail(f"agents[{i}]", "a table expected")
        for k in a:
            if k not in ("name", "node", "role", "instruction", "instruction_ids", "instructions", "poison"):
                raise r.fail(w + k, "unknown key (known: name, node, role, instruction[s], poison)")
        name = r.get(a, "name", str, where=w)
        if name in seen or not name.replace("-", "").replace("_", "").isalnum():
            raise r.fail(w + "name", f"{name!r}: unique, letters, digits, - and _ only")
        seen.add(name)
        role = r.get(a, "role", str, where=w)
        if role not in roles:
            raise r.fail(w + "role", f"{role!r}: the {pattern} pattern has {' and '.join(roles)}")
        if "instructions" in a:
            lst = r.get(a, "instructions", list, where=w)
            instr = tuple(r.text({"i": x} if isinstance(x, str) else {"i_ids": x}, "i",
                                 f"{w}instructions[{j}].") for j, x in enumerate(lst))
        else:
            one = r.text(a, "instruction", w)
            instr = (one,) if one.given else ()
        if role == "worker" and not instr:
            raise r.fail(w + "instruction", "a worker needs its instruction")
        agents.append(AgentSpec(name, r.get(a, "node", str, where=w), role, instr,
                                r.get(a, "poison", bool, False, w)))
    for role in roles:
        have = [a for a in agents if a.role == role]
        if not have:
            raise r.fail("agents", f"the {pattern} pattern needs a {role}")
        if role in ("reader", "driver", "partner") and len(have) > 1:
            raise r.fail("agents", f"exactly one {role}")
    return Scenario(
        name=r.get(data, "name", str, p.stem), description=r.get(data, "description", str, ""),
        pattern=pattern, model=r.get(data, "model", str), dtype=dtype,
        threads=r.count(data, "threads", 1, 1, 256), tokens=r.count(data, "tokens", 32, 1, 4096),
        rounds=r.count(data, "rounds", len(parts) if pattern == "warm" else 1, 1, 64),
        block_tokens=r.count(data, "block_tokens", 16, 1, 4096),
        timeout_s=float(r.get(data, "timeout_s", float, 300.0)),
        system=r.text(data, "system"), warm_system=r.get(data, "warm_system", bool, False),
        parts=parts, nodes=nodes, agents=tuple(agents), source=source)
