"""
Results on disk: one JSON record and one markdown table per run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from bench.conditions import oneLine


def writeRecord(record: dict[str, Any], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out, f"{record['variant']}-{stamp}")
    paths = {"json": base + ".json", "md": base + ".md"}
    with open(paths["json"], "w", encoding="utf-8") as f:
        # File names only: the record stays valid wherever results are moved.
        json.dump({**record, "files": {k: os.path.basename(v) for k, v in paths.items()}}, f, indent=2)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(record))
    return paths


def writeMeasurement(out: str, name: str, conditions: dict[str, Any], result: Any, text: str) -> None:
    """
    Write a measurement of one of the standalone benchmarks (C{bench.nat},
    C{bench.natmesh}, C{bench.relay}) as C{name-stamp.json} (its conditions
    and result) and C{.md} (C{text}), and print C{text}.
    """
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"conditions": conditions, "result": result}, f, indent=2)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    sys.stdout.write(text)


def markdown(record: dict[str, Any]) -> str:
    lines = [f"### {record['letter']}) {record['title']} (`{record['variant']}`)", ""]
    params = ", ".join(f"{k}={v}" for k, v in record["parameters"].items())
    lines.append(f"Parameters: {params}. Run {record['started']}, {record.get('seconds', '?')} s.")
    lines.append("")
    lines.append(f"Machine: {oneLine(record['conditions'])}.")
    git = record["conditions"].get("git") or {}
    if git.get("commit"):
        lines.append(f"Commit {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}.")
    load, loadEnd = record["conditions"].get("load_average"), record.get("load_average_end")
    if load:
        lines.append(
            f"Load average (1, 5, 15 min) at the start: {' '.join(map(str, load))}"
            + (f"; at the end: {' '.join(map(str, loadEnd))}." if loadEnd else ".")
        )
    lines.append("")
    status = record["status"]
    if status != "ok":
        lines.append(f"**{status}**: {record.get('reason', '')}")
        lines.append("")
        return "\n".join(lines)
    header = record.get("header") or ("Measure", "Value")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in record.get("rows", []):
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    lines.append("")
    goals = record.get("goals") or []
    if goals:
        lines.append("| Goal | Measured | Met |")
        lines.append("|---|---|---|")
        for goal in goals:
            lines.append(f"| {goal['goal']} | {goal['measured']} | {'yes' if goal['met'] else 'no'} |")
        lines.append("")
    for note in record.get("notes") or []:
        lines.append(f"- {note}")
    if record.get("notes"):
        lines.append("")
    return "\n".join(lines)


def summaryTable(records: list[dict[str, Any]]) -> str:
    lines = ["| Scenario | Status | Lost | Seconds |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['letter']}) {r['variant']} | {r['status']} | {r.get('lost')} | {r.get('seconds')} |")
    return "\n".join(lines) + "\n"
