# -*- test-case-name: timtx.test.test_membership -*-
"""
C{python -m timtx cluster members --config node.ini} (or C{python -m
timtx.cluster members ...}): print a node's view
of the cluster, as the node last saved it in its data directory (a running
node rewrites it within a second of every change; a stopped one left its
last view there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, TextIO

from timtx.config import ConfigError, load


def formatMembers(saved: dict[str, Any]) -> str:
    """
    The members file as a table, this node marked with C{*}.
    """
    rows = [("", "NODE", "STATE", "INCARNATION", "PEER ADDRESS", "CLIENT ADDRESSES")]
    for member in sorted(saved.get("members", []), key=lambda m: str(m.get("nodeId"))):
        rows.append(
            (
                "*" if member.get("nodeId") == saved.get("nodeId") else "",
                str(member.get("nodeId")),
                str(member.get("state")),
                str(member.get("incarnation")),
                str(member.get("address")),
                " ".join(member.get("clientAddresses") or []) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    savedAt = saved.get("savedAt")
    if isinstance(savedAt, int | float):
        when = datetime.datetime.fromtimestamp(savedAt, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(f"(as saved by node {saved.get('nodeId')} at {when})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(prog="python -m timtx cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    members = commands.add_parser("members", help="print this node's view of the cluster")
    members.add_argument("--config", default="node.ini", help="the node's configuration (default: node.ini)")
    members.add_argument("--json", action="store_true", help="print the saved view as JSON")
    args = parser.parse_args(argv)

    from timtx.cluster.membership import readMembers

    try:
        config = load(args.config)
    except ConfigError as e:
        print(e, file=err)
        return 2
    dataDir = config.resolve(config.node.data_dir)
    try:
        saved = readMembers(dataDir)
    except FileNotFoundError:
        print(f"no cluster view in {dataDir}: the node has not taken part in a cluster yet", file=err)
        return 1
    except (OSError, ValueError) as e:
        print(f"cannot read the cluster view in {dataDir}: {e}", file=err)
        return 1
    print(json.dumps(saved, indent=1) if args.json else formatMembers(saved), file=out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
