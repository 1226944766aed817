"""``meshnode agents list|run|serve``: collaborative multi-agent runs (``meshnode/agents/``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_CONFIG = 2

RUN_HELP = """\
Run a scenario: start one node process per scenario node on 127.0.0.1 (they find each other
through the DHT), hand KV caches between the agents as the scenario's pattern says, time the two
text baselines on the same token ids, and print the comparison (or --json). Models are converted
once into ~/.cache/latentlink/models (override: --set runtime.cache_dir=DIR)."""
RUN_EXAMPLES = """\
examples:
  meshnode agents run read-once
  meshnode agents run configs/scenarios/relay.toml --json > relay.json
  meshnode agents run warm --keep /tmp/warm --log-level info   # keep the nodes' logs"""


def add_parser(sub: Any, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("agents", help="collaborative multi-agent runs over the mesh",
                       description="Scenarios of agents that hand each other their state "
                       "(configs/scenarios/*.toml): list them, run one, or (internally) serve "
                       "one node of a run.",
                       epilog="examples:\n  meshnode agents list   # the shipped scenarios\n"
                              "  meshnode agents run read-once",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = p.add_subparsers(dest="agents_cmd", required=True)
    c = asub.add_parser("list", help="the shipped scenarios",
                        description="List the scenarios in configs/scenarios/ with their descriptions.",
                        epilog="example:\n  meshnode agents list   # name and description of each",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.set_defaults(fn=cmd_list, no_config=True)
    c = asub.add_parser("run", help="run a scenario and compare KV handoff with text",
                        description=RUN_HELP, epilog=RUN_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("scenario", help="a shipped scenario's name (see 'agents list') or a .toml path")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--keep", metavar="DIR", help="keep the nodes' data and logs in DIR")
    c.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="the nodes' log level (their logs are in --keep DIR)")
    c.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="node setting for every node (repeatable)")
    c.set_defaults(fn=cmd_run, no_config=True)
    c = asub.add_parser("serve", help="one node of a scenario (started by 'agents run')",
                        description="Run one node of a scenario, driven over stdin/stdout by "
                        "'meshnode agents run' (not meant to be started by hand).",
                        epilog="example:\n  meshnode agents serve read-once --node n1 --data-dir /tmp/n1",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("scenario")
    c.add_argument("--node", required=True, help="which of the scenario's nodes this is")
    config_args(c)
    c.set_defaults(fn=cmd_serve)


def _load(name: str) -> Any:
    from meshnode.agents.scenario import ScenarioError, load, resolve
    try:
        return load(resolve(name))
    except ScenarioError as exc:
        print(f"meshnode: {exc}", file=sys.stderr)
        return None


def cmd_list(_cfg: Any, _args: argparse.Namespace) -> int:
    from meshnode.agents.scenario import available
    for name, desc in available():
        print(f"{name:<20} {desc}")
    return 0


def cmd_run(_cfg: Any, args: argparse.Namespace) -> int:
    from rich.console import Console

    from meshnode.agents import runner, show

    sc = _load(args.scenario)
    if sc is None:
        return EXIT_CONFIG
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console = err if args.json else out
    console.print(f"[bold]{sc.name}[/]: {sc.description}")
    code, report = runner.run(sc, show.Progress(console), data_dir=args.keep,
                              extra_sets=args.overrides, log_level=args.log_level)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        show.render(out, report)
    if report.get("error"):
        print(f"meshnode: {report['error']}", file=sys.stderr)
    return code


def cmd_serve(cfg: Any, args: argparse.Namespace) -> int:
    import trio

    from meshnode.agents.serve import serve
    from meshnode.logs import setup_logging

    sc = _load(args.scenario)
    if sc is None:
        return EXIT_CONFIG
    if args.node not in sc.nodes:
        print(f"meshnode: scenario {sc.name} has no node {args.node!r}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.node.log_level, cfg.node.log_json)
    return trio.run(serve, sc, args.node, cfg)
