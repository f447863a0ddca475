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


def _path(member: dict[str, Any], isSelf: bool) -> str:
    """
    How the node reaches C{member}: C{tcp}, C{relayed via NODE},
    C{direct} (a punched UDP path), or C{-} (no link now).
    """
    if isSelf:
        return ""
    path = member.get("path")
    if path == "relayed":
        return f"relayed via {member.get('via')}"
    return str(path) if path else "-"


def _nat(member: dict[str, Any]) -> str:
    """
    What is known of C{member}'s NAT: C{none} (it can be dialled), or
    C{behind NAT} with the mapping seen, if known.
    """
    if member.get("reach", "dial") == "dial":
        return "none"
    mapping = (member.get("meta") or {}).get("nat.mapping")
    return f"behind NAT ({mapping})" if mapping else "behind NAT"


def _counters(member: dict[str, Any]) -> str:
    """
    Relay bytes and punch counters for one peer, where there are any.
    """
    parts = []
    if member.get("path") == "relayed":
        parts.append(f"relay {member.get('relayBytesSent', 0)}B out/{member.get('relayBytesReceived', 0)}B in")
    direct = member.get("direct")
    if member.get("path") == "direct" and isinstance(direct, dict):
        parts.append(f"direct {direct.get('datagramsOut', 0)} out/{direct.get('datagramsIn', 0)} in datagrams")
    punch = member.get("punch")
    if isinstance(punch, dict):
        text = f"punch {punch.get('successes', 0)}/{punch.get('attempts', 0)}"
        if punch.get("timeToDirect") is not None:
            text += f" in {punch['timeToDirect']:.2f}s"
        if punch.get("fallbacks"):
            text += f", {punch['fallbacks']} lost"
        parts.append(text)
    relayed = member.get("relayedFor")
    if isinstance(relayed, dict):
        parts.append(f"relayed for it {relayed.get('bytesFrom', 0)}B/{relayed.get('bytesTo', 0)}B")
        if relayed.get("limited"):
            parts.append(f"limited {relayed['limited']}")
    return ", ".join(parts) or "-"


def formatMembers(saved: dict[str, Any]) -> str:
    """
    The members file as a table, this node marked with C{*}: each member's
    state and addresses, how this node reaches it (PATH), its NAT, and the
    relay and punch counters of the link.
    """
    rows = [("", "NODE", "STATE", "INCARNATION", "PEER ADDRESS", "CLIENT ADDRESSES", "PATH", "NAT", "COUNTERS")]
    for member in sorted(saved.get("members", []), key=lambda m: str(m.get("nodeId"))):
        isSelf = member.get("nodeId") == saved.get("nodeId")
        rows.append(
            (
                "*" if isSelf else "",
                str(member.get("nodeId")),
                str(member.get("state")),
                str(member.get("incarnation")),
                str(member.get("address")),
                " ".join(member.get("clientAddresses") or []) or "-",
                _path(member, isSelf),
                _nat(member),
                "" if isSelf else _counters(member),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    relay = saved.get("relay")
    if isinstance(relay, dict) and (relay.get("opened") or relay.get("refused") or relay.get("dropped")):
        refused = sum((relay.get("refused") or {}).values())
        lines.append(
            f"relay: {relay.get('open', 0)} circuits open, {relay.get('opened', 0)} opened, "
            f"{refused} requests refused, {relay.get('dropped', 0)} messages dropped"
        )
    if saved.get("reachable") is False:
        lines.append(f"this node cannot be dialled; its relay: {saved.get('relayId') or '(none yet)'}")
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
