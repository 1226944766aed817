"""Scenario files are checked at load, every error naming its key; the shipped ones load."""

from __future__ import annotations

import pytest

from meshnode.agents.scenario import SCENARIO_DIR, ScenarioError, available, load, resolve

GOOD = """
name = "x"
pattern = "fanout"
model = "m"
document_ids = [1, 2, 3]
[nodes.n0]
[nodes.n1]
[[agents]]
name = "reader"
node = "n0"
role = "reader"
[[agents]]
name = "w"
node = "n1"
role = "worker"
instruction_ids = [4]
"""


def _load(tmp_path, text: str):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return load(p)


def test_the_shipped_scenarios_load():
    names = [n for n, desc in available() if not desc.startswith("INVALID")]
    assert {"read-once", "relay", "warm"} <= set(names)
    assert resolve("read-once") == SCENARIO_DIR / "read-once.toml"
    sc = load(resolve("read-once"))
    assert sc.parts[0].text and sc.warm_system and len(sc.by_role("worker")) == 2


@pytest.mark.parametrize(("edit", "key"), [
    (lambda t: 'colour = "blue"\n' + t, "colour"),
    (lambda t: t.replace('pattern = "fanout"', 'pattern = "chain"'), "pattern"),
    (lambda t: t.replace("instruction_ids = [4]", ""), "agents[1].instruction"),
    (lambda t: t.replace('role = "worker"', 'role = "partner"'), "agents[1].role"),
    (lambda t: t.replace('name = "w"', 'name = "reader"'), "agents[1].name"),
    (lambda t: t.replace("document_ids = [1, 2, 3]", 'document_ids = [1, 2, 3]\ndocument = "x.md"'),
     "document"),
    (lambda t: t.replace("document_ids = [1, 2, 3]", 'document = "missing.md"'), "document"),
    (lambda t: t.replace("document_ids = [1, 2, 3]", "document_ids = []"), "document_ids"),
    (lambda t: t.replace('model = "m"', "model = 3"), "model"),
    (lambda t: "tokens = 0\n" + t, "tokens"),
    (lambda t: t.replace("[nodes.n1]", "[nodes.n1]\ngpu = true"), "nodes.n1.gpu"),
])
def test_a_bad_scenario_names_the_key(tmp_path, edit, key):
    with pytest.raises(ScenarioError) as err:
        _load(tmp_path, edit(GOOD))
    assert err.value.key == key and key in str(err.value)


def test_a_missing_or_broken_file_is_a_scenario_error(tmp_path):
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load(tmp_path / "nope.toml")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        _load(tmp_path, "pattern = ")


def test_an_agent_on_an_undeclared_node_loads_and_is_reported_at_run_time(tmp_path):
    sc = _load(tmp_path, GOOD.replace('node = "n1"', 'node = "n7"'))
    assert sc.agent("w").node == "n7" and "n7" not in sc.nodes
