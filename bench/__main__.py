"""
Run benchmarks against a node started for the purpose.

    python -m bench login --sessions 10000
    python -m bench direct --pairs 100 --messages 1000 --store sqlite
    python -m bench all --quick

Each scenario's parameters are listed by C{python -m bench <scenario> -h};
C{--quick} changes every default to a small size.  Results go to
C{bench/results/} (C{--out}) as JSON and markdown.  The exit status is 1 if
a scenario failed or lost anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bench.nodeproc import ROOT
from bench.report import summaryTable
from bench.runner import runScenario
from bench.scenarios import SCENARIOS

DEFAULT_OUT = os.path.join(ROOT, "bench", "results")

#: What C{all} runs: (scenario, parameter overrides).
ALL = (
    ("login", {}),
    ("direct", {"store": "sqlite"}),
    ("direct", {"store": "memory"}),
    ("group", {}),
    ("vroom", {}),
    ("codec", {}),
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0].strip())
    sub = top.add_subparsers(dest="scenario", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true", help="small sizes, for CI")
        p.add_argument("--out", default=DEFAULT_OUT, help="directory for results (default: bench/results)")
        p.add_argument(
            "--profile", choices=("pyinstrument", "py-spy"), help="profile the node (see docs/benchmarks.md)"
        )
        p.add_argument("--keep", action="store_true", help="keep the node's directory (config, log, data)")
        p.add_argument("--summary", help="also write a summary of the run's outcomes to this JSON file")

    for name, scenario in SCENARIOS.items():
        p = sub.add_parser(name, help=f"{scenario.letter}) {scenario.title}")
        common(p)
        for param in scenario.params:
            p.add_argument(
                f"--{param.name}",
                type=param.type,
                default=None,
                choices=param.choices,
                help=f"{param.help} (default {param.default}; quick {param.quick})",
            )
    p = sub.add_parser("all", help="every scenario in turn (direct with both stores)")
    common(p)
    p.add_argument("--workers", type=int, help="load-generator processes")
    p.add_argument("--encoding", choices=("compact", "json", "mixed"), help="client encoding")
    return top


def resolve(name: str, given: dict[str, Any], quick: bool, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = {}
    for param in SCENARIOS[name].params:
        value = given.get(param.name)
        if value is None:
            value = (overrides or {}).get(param.name, param.quick if quick else param.default)
        params[param.name] = value
    return params


async def main(reactor: Any, argv: list[str]) -> int:
    args = parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    plan = ALL if args.scenario == "all" else ((args.scenario, {}),)
    records = []
    for name, overrides in plan:
        params = resolve(name, given, args.quick, overrides)
        record = await runScenario(reactor, SCENARIOS[name], params, args.out, args.profile, args.keep)
        records.append(record)
        if record["status"] == "ok":
            print(open(record["files"]["md"], encoding="utf-8").read())
    print(summaryTable(records))
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            outcome = [
                {k: r.get(k) for k in ("scenario", "variant", "status", "reason", "lost", "seconds", "files")}
                for r in records
            ]
            json.dump(outcome, f, indent=2)
    bad = [r for r in records if r["status"] == "failed" or r.get("lost")]
    return 1 if bad else 0


def run() -> None:
    from twisted.internet import defer, task

    def start(reactor: Any) -> Any:
        return defer.ensureDeferred(main(reactor, sys.argv[1:])).addCallback(_exitWith)

    task.react(start)


def _exitWith(status: int) -> None:
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    run()
