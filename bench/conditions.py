"""
The conditions of a run, recorded with every result: machine, software,
and the checkout's commit.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from typing import Any

from bench.nodeproc import ROOT

PACKAGES = (
    "twisted",
    "autobahn",
    "thrift",
    "cryptography",
    "zope.interface",
    "pyinstrument",
    "txpostgres",
    "psycopg2",
    "PyMySQL",
    "mysqlclient",
)


def _cpuModel() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memoryGiB() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def collect() -> dict[str, Any]:
    from timtx._version import __version__ as timtxVersion
    from timtx.protocols import codec

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpu": _cpuModel(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memoryGiB(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "packages": {name: _version(name) for name in PACKAGES},
        "timtx": timtxVersion,
        "thrift_c_codec": codec.ACCELERATED,
        "fd_limit": [soft, hard],
        "git": _git(),
        # The machine is shared: what else ran weighs on every number.
        "load_average": loadAverage(),
    }


def loadAverage() -> list[float]:
    """
    The 1, 5 and 15 minute load averages.
    """
    return [round(load, 2) for load in os.getloadavg()]


def oneLine(c: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in c["packages"].items() if v and k != "zope.interface")
    return (
        f"{c['cpu']}, {c['cores_usable']} cores, {c['memory_gib']} GiB; {c['os']}; {c['python']}; {packages}; "
        f"thrift C codec: {'yes' if c['thrift_c_codec'] else 'no'}"
    )
