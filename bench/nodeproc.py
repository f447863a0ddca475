"""
The node under test: a child process started from a config the benchmark
writes, measured through C{/proc}.

The node runs exactly as an operator runs it, C{python -m twisted tim
--config node.ini} (the same as C{twist tim}), with the timtx of the
checkout that holds C{bench/} first on its C{PYTHONPATH}.  Optionally it runs
under pyinstrument, which writes its profile when the node stops.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

#: The checkout holding bench/ and timtx/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TICKS = os.sysconf("SC_CLK_TCK")


def childEnvironment() -> dict[str, str]:
    """
    The environment of every child (node and workers): this checkout first
    on C{PYTHONPATH}.
    """
    env = dict(os.environ)
    paths = [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: What every benchmark node gets, whatever the scenario.  Limits meant for
#: people (request rate, HTTP rate, cheap connection caps) are off; password
#: hashing is cheap because the benchmarks register tens of thousands of
#: accounts (no scenario hashes a password in its measured phase).
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "node": {"worker_threads": 2},
    "client": {
        "tcp_listen": "",
        "request_rate": 0,
        "max_connections": 0,
        # Every generated client comes from 127.0.0.1.
        "max_connections_per_ip": 0,
        "auth_timeout": 120,
    },
    "accounts": {"scrypt_n": 16, "scrypt_r": 1, "http_rate": 0, "token_ttl": 3600},
    "devices": {"limit": 0, "type_limit": 0},
    "store": {"backend": "sqlite", "synchronous": "full"},
    # No admin side: nodes of one run would contend for its fixed port.
    "admin": {"listen": ""},
}


def renderConfig(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            lines.append(f"{key} = {value}")
        lines.append("")
    return "\n".join(lines)


def mergeSections(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return merged


class NodeProcess:
    """
    @ivar pid: the node's process id once started.
    @ivar sections: the config it was started with.
    """

    def __init__(self, directory: str, sections: dict[str, dict[str, Any]], profile: str | None = None):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.port = freePort()
        listen = f"tcp:{self.port}:interface=127.0.0.1:backlog=4096"
        self.sections = mergeSections(
            BASE_CONFIG, {"node": {"data_dir": os.path.join(directory, "data")}, "client": {"listen": listen}}, sections
        )
        self.configPath = os.path.join(directory, "node.ini")
        with open(self.configPath, "w", encoding="utf-8") as f:
            f.write(renderConfig(self.sections))
        self.logPath = os.path.join(directory, "node.log")
        self.profile = profile
        self.profilePath: str | None = None
        self.profiler: subprocess.Popen[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def wsURL(self) -> str:
        return f"ws://127.0.0.1:{self.port}/tim"

    @property
    def httpURL(self) -> str:
        return f"http://127.0.0.1:{self.port}/tim2"

    def command(self) -> list[str]:
        twist = ["--log-format=text", f"--log-file={self.logPath}", "tim", "--config", self.configPath]
        if self.profile == "pyinstrument":
            self.profilePath = os.path.join(self.directory, "node-profile.pyisession")
            return [sys.executable, "-m", "bench.profiled", self.profilePath, *twist]
        return [sys.executable, "-m", "twisted", *twist]

    async def start(self, reactor: Any, timeout: float = 60.0) -> None:
        """
        Start the node and wait until its log says it is ready.
        """
        out = open(os.path.join(self.directory, "node.out"), "wb")
        self.process = subprocess.Popen(
            self.command(), env=childEnvironment(), stdout=out, stderr=subprocess.STDOUT, cwd=self.directory
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited with {self.process.returncode}; see {self.directory}")
            if os.path.exists(self.logPath):
                with open(self.logPath, encoding="utf-8", errors="replace") as f:
                    # With [node] processes, every process says so.
                    if f.read().count("timtx node ready") >= self.processes:
                        return
            await deferLater(reactor, 0.1, lambda: None)
        raise RuntimeError(f"the node was not ready within {timeout}s; see {self.directory}")

    async def stop(self, reactor: Any, timeout: float = 60.0) -> int | None:
        """
        SIGTERM, then SIGKILL after C{timeout} seconds.

        @return: the exit status.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            await deferLater(reactor, 0.1, lambda: None)
        if process.poll() is None:
            process.kill()
            process.wait()
        self.profileEnd()
        return process.returncode

    def profileBegin(self) -> None:
        """
        With C{profile="py-spy"}, start sampling every thread of the node
        (the SQLite one too), and of every node process it runs, from
        outside; scenarios call this when their measured phase begins.
        Only the first measured phase is sampled.
        """
        if self.profile != "py-spy" or self.profilePath is not None:
            return
        self.profilePath = os.path.join(self.directory, "node-profile.pyspy")
        pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.profiler = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--threads",
                "--nonblocking",
                # With [node] processes, the node processes are children,
                # and so is the SQLite store's process.
                "--subprocesses",
                "--output",
                self.profilePath,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def profileEnd(self) -> None:
        """
        Stop py-spy; it writes its samples as it exits.
        """
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            return
        profiler.send_signal(signal.SIGINT)
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()

    # Measurements.

    @property
    def processes(self) -> int:
        """
        The node processes it runs (C{[node] processes}).
        """
        return int(self.sections.get("node", {}).get("processes", 1))

    def pids(self) -> list[int]:
        """
        The node's process and every process under it: with C{[node]
        processes} the node processes it runs, and the SQLite store's
        process of each (C{[store] sqlite_process}), whose CPU and memory
        are the node's as much as its own are.
        """
        found = [self.pid]
        for pid in found:
            found.extend(childPids(pid))
        return found

    def rssKB(self) -> int:
        return sum(procStatus(pid).get("VmRSS", 0) for pid in self.pids())

    def peakRssKB(self) -> int:
        return sum(procStatus(pid).get("VmHWM", 0) for pid in self.pids())

    def cpuSeconds(self) -> float:
        return sum(cpuSeconds(pid) for pid in self.pids())

    def openFiles(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def procStatus(pid: int) -> dict[str, int]:
    """
    The kB figures of C{/proc/<pid>/status} (VmRSS, VmHWM, ...).
    """
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                values[key] = int(parts[0])
    return values


def childPids(pid: int) -> list[int]:
    """
    The processes C{pid} started that still run.
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(word) for word in f.read().split()]
    except OSError:
        return []


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU seconds used by C{pid}, all threads.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat (utime, stime); the split dropped the first two.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def waitFor(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)
