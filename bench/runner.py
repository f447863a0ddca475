"""
The parent side of a benchmark run: start the node and the worker processes,
let a scenario drive them, and write what came out.

A L{Scenario} declares its parameters (with a full-size default and a
C{--quick} one), the node config it needs, the worker role it uses, and an
async L{Scenario.drive} that sends commands to the workers and returns a
L{Result}.  A scenario whose feature the node lacks raises L{Unsupported}
and is recorded as skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol

from bench import conditions, serverdb
from bench.nodeproc import NodeProcess, childEnvironment, cpuSeconds, freePort, mergeSections


class Unsupported(Exception):
    """
    The node does not serve what this scenario measures (yet).
    """


class WorkerError(Exception):
    pass


class WorkerProcess(ProcessProtocol):
    """
    One C{bench.worker} child, spoken to in JSON lines.
    """

    def __init__(self, index: int):
        self.index = index
        self._buffer = b""
        self._pending: dict[int, Deferred[Any]] = {}
        self._nextId = 1
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            message = json.loads(line)
            if message["id"] == 0:
                self.ready.callback(None)
                continue
            d = self._pending.pop(message["id"])
            if message["ok"]:
                d.callback(message["result"])
            else:
                d.errback(WorkerError(f"worker {self.index}: {message['error']}"))

    def call(self, op: str, /, **args: Any) -> Deferred[Any]:
        commandId = self._nextId
        self._nextId += 1
        d: Deferred[Any] = Deferred()
        self._pending[commandId] = d
        line = json.dumps({"id": commandId, "op": op, "args": args}, separators=(",", ":"))
        self.transport.write(line.encode("utf-8") + b"\n")  # type: ignore[union-attr]
        return d

    def exit(self) -> None:
        self.transport.write(b'{"id":-1,"op":"exit"}\n')  # type: ignore[union-attr]

    def processEnded(self, reason: Any) -> None:
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(WorkerError(f"worker {self.index} exited: {reason.value}"))
        if not self.ready.called:
            self.ready.errback(WorkerError(f"worker {self.index} exited before starting: {reason.value}"))
        self.ended.callback(None)

    def cpuSeconds(self) -> float:
        try:
            return cpuSeconds(self.pid) if self.pid else 0.0
        except OSError:
            return 0.0


class WorkerPool:
    def __init__(self, reactor: Any, count: int, spec: dict[str, Any]):
        self.reactor = reactor
        self.count = count
        self.spec = spec
        self.workers: list[WorkerProcess] = []

    async def start(self) -> None:
        for index in range(self.count):
            worker = WorkerProcess(index)
            spec = {**self.spec, "index": index, "workers": self.count}
            self.reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "bench.worker", json.dumps(spec)],
                env=childEnvironment(),
                childFDs={0: "w", 1: "r", 2: 2},
            )
            self.workers.append(worker)
        await gatherResults([w.ready for w in self.workers], consumeErrors=True)

    def all(self, op: str, args: Callable[[int], dict[str, Any]] | dict[str, Any] | None = None) -> Deferred[list[Any]]:
        """
        Run C{op} on every worker, with C{args(workerIndex)} or the same
        C{args} for all.
        """
        calls = []
        for worker in self.workers:
            kwargs = args(worker.index) if callable(args) else (args or {})
            calls.append(worker.call(op, **kwargs))
        return gatherResults(calls, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def one(self, worker: int, op: str, /, **args: Any) -> Deferred[Any]:
        return self.workers[worker].call(op, **args)

    def cpuSeconds(self) -> float:
        return sum(w.cpuSeconds() for w in self.workers)

    async def stop(self) -> None:
        for worker in self.workers:
            if not worker.ended.called:
                try:
                    await worker.call("close").addTimeout(30, self.reactor)
                except Exception:
                    pass
                if not worker.ended.called:
                    worker.exit()
        for worker in self.workers:
            if not worker.ended.called:
                timer = self.reactor.callLater(10, lambda w=worker: w.ended.called or w.transport.signalProcess("KILL"))
                await worker.ended
                if timer.active():
                    timer.cancel()


@dataclass(frozen=True)
class Param:
    """
    A scenario parameter: C{--name value} on the command line.
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    quick: Any
    help: str
    choices: tuple[Any, ...] | None = None


@dataclass
class Result:
    """
    What a scenario measured.

    @ivar metrics: flat name -> number, for the JSON.
    @ivar rows: C{(measure, value)} for the markdown table.
    @ivar lost: messages (or logins) expected and never seen; asserted 0
        in C{--quick}.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    header: tuple[str, ...] = ("Measure", "Value")
    rows: list[tuple[str, ...]] = field(default_factory=list)
    lost: int = 0
    goals: list[tuple[str, str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Run:
    """
    What a scenario's L{Scenario.drive} works with.
    """

    def __init__(
        self,
        reactor: Any,
        params: dict[str, Any],
        node: NodeProcess | None,
        workers: WorkerPool | None,
        database: Any = None,
        nodes: list[NodeProcess] | None = None,
    ):
        self.reactor = reactor
        self.params = params
        self._node = node
        #: Every node of the run: C{[node]}, or the C{--nodes} of a cluster
        #: (the first being C{node}).
        self.nodes: list[NodeProcess] = nodes or ([node] if node is not None else [])
        self._workers = workers
        #: The database(s) made for the run (L{bench.serverdb}), if any.
        self.database = database
        self.started = time.monotonic()

    @property
    def node(self) -> NodeProcess:
        assert self._node is not None
        return self._node

    @property
    def workers(self) -> WorkerPool:
        assert self._workers is not None
        return self._workers

    def nodesCpuSeconds(self) -> float:
        """
        CPU seconds used so far by all the nodes of the run.
        """
        return sum(node.cpuSeconds() for node in self.nodes)

    def nodesRssKB(self) -> int:
        return sum(node.rssKB() for node in self.nodes)

    def log(self, message: str) -> None:
        print(f"  [{time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def share(
        self, indices: range | list[int], owner: Callable[[int], int] | None = None
    ) -> Callable[[int], list[int]]:
        """
        C{f(worker) -> the indices that worker owns}; by default index
        C{i} belongs to worker C{i % workers}.
        """
        count = self.workers.count
        owner = owner or (lambda i: i % count)
        table: dict[int, list[int]] = {w: [] for w in range(count)}
        for i in indices:
            table[owner(i)].append(i)
        return lambda w: table[w]


class Scenario:
    name = ""
    letter = ""
    title = ""
    #: "module:Class" of the worker role; empty for in-process scenarios.
    role = ""
    params: tuple[Param, ...] = ()

    def variant(self, params: dict[str, Any]) -> str:
        """
        The name results are filed under (a scenario may add its store).
        """
        return self.name

    def nodeSections(self, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {}

    async def drive(self, run: Run) -> Result:
        raise NotImplementedError


COMMON = (
    Param("workers", int, 2, 2, "load-generator processes"),
    Param("encoding", str, "compact", "mixed", "client encoding", ("compact", "json", "mixed")),
)


async def runScenario(
    reactor: Any, scenario: Scenario, params: dict[str, Any], out: str, profile: str | None = None, keep: bool = False
) -> dict[str, Any]:
    """
    Run one scenario with a node of its own; write and return its record.
    """
    started = time.time()
    print(f"== {scenario.letter}) {scenario.title}: {json.dumps(params)}", file=sys.stderr, flush=True)
    record: dict[str, Any] = {
        "scenario": scenario.name,
        "variant": scenario.variant(params),
        "letter": scenario.letter,
        "title": scenario.title,
        "parameters": params,
        "conditions": conditions.collect(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }
    workdir = tempfile.mkdtemp(prefix=f"timtx-bench-{scenario.name}-")
    node = workers = database = None
    nodes: list[NodeProcess] = []
    try:
        if scenario.role:
            sections = scenario.nodeSections(params)
            database = serverdb.forSections(sections)
            if database is not None:
                record["conditions"]["database_server"] = database.server()
            count = params.get("nodes", 1)
            if count > 1:
                nodes = clusterNodes(workdir, sections, count, profile)
            else:
                nodes = [NodeProcess(os.path.join(workdir, "node"), sections, profile)]
            node = nodes[0]
            record["node_config"] = node.sections
            # The first node alone, so that one node creates the schema.
            await node.start(reactor)
            await gatherResults([Deferred.fromCoroutine(n.start(reactor)) for n in nodes[1:]], consumeErrors=True)
            if count > 1:
                record["mesh_seconds"] = await waitForMesh(reactor, nodes)
            spec = {
                "role": scenario.role,
                "port": node.port,
                "ports": [n.port for n in nodes],
                "http": node.httpURL,
                "params": params,
            }
            workers = WorkerPool(reactor, params.get("workers", 2), spec)
            await workers.start()
        run = Run(reactor, params, node, workers, database, nodes)
        try:
            result = await scenario.drive(run)
        except Unsupported as e:
            record.update(status="skipped", reason=str(e), lost=0)
            print(f"   skipped: {e}", file=sys.stderr, flush=True)
        else:
            record.update(
                status="ok",
                lost=result.lost,
                metrics=result.metrics,
                header=result.header,
                rows=result.rows,
                goals=[{"goal": g, "measured": m, "met": ok} for g, m, ok in result.goals],
                notes=result.notes,
            )
    except Exception as e:
        import traceback

        traceback.print_exc()
        record.update(status="failed", reason=f"{type(e).__name__}: {e}", lost=None)
    finally:
        if workers is not None:
            await workers.stop()
        for other in nodes[1:]:
            record.setdefault("other_node_exits", []).append(await other.stop(reactor))
        if node is not None:
            record["node_exit"] = await node.stop(reactor)
            if node.profilePath and os.path.exists(node.profilePath):
                record["profile"] = renderProfile(node.profilePath, out, record["variant"])
        if database is not None:
            database.drop()
        record["seconds"] = round(time.time() - started, 1)
        record["load_average_end"] = conditions.loadAverage()
        if keep or record["status"] == "failed":
            record["workdir"] = workdir
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    from bench.report import writeRecord

    record["files"] = writeRecord(record, out)
    return record


def clusterNodes(
    workdir: str, sections: dict[str, dict[str, Any]], count: int, profile: str | None = None
) -> list[NodeProcess]:
    """
    C{count} nodes forming one cluster (docs/cluster.md) on the store of
    C{sections}: each with its own data directory and free client and peer
    ports, all with one node key file, one cluster secret and every peer
    address as a seed.  Only the first is profiled.
    """
    import secrets

    peers = [freePort() for _ in range(count)]
    seeds = ", ".join(f"127.0.0.1:{port}" for port in peers)
    shared = {
        "node": {"key_file": os.path.join(workdir, "node.key")},
        "cluster": {"seeds": seeds, "secret": secrets.token_hex(24)},
    }
    nodes = []
    for index, port in enumerate(peers):
        own = {"cluster": {"listen": f"tcp:{port}:interface=127.0.0.1", "node_id": f"node{index + 1}"}}
        layers = mergeSections(sections, shared, own)
        nodes.append(NodeProcess(os.path.join(workdir, f"node{index + 1}"), layers, profile if index == 0 else None))
    return nodes


async def waitForMesh(reactor: Any, nodes: list[NodeProcess], timeout: float = 60.0) -> float:
    """
    Wait until every node's saved view (C{cluster-members.json}, written at
    most once a second) holds all the nodes, alive.

    @return: seconds waited.
    """
    from twisted.internet.task import deferLater

    from timtx.cluster.membership import readMembers

    started = time.monotonic()
    wanted = {f"node{index + 1}" for index in range(len(nodes))}
    while time.monotonic() - started < timeout:
        formed = True
        for node in nodes:
            try:
                saved = readMembers(node.sections["node"]["data_dir"])
            except (OSError, ValueError):
                formed = False
                break
            alive = {m["nodeId"] for m in saved.get("members", []) if m.get("state") == "alive"}
            if alive != wanted:
                formed = False
                break
        if formed:
            return round(time.monotonic() - started, 2)
        await deferLater(reactor, 0.2, lambda: None)
    raise RuntimeError(f"the {len(nodes)} nodes formed no mesh within {timeout}s")


def renderProfile(session: str, out: str, variant: str) -> dict[str, str]:
    """
    Render a profile next to the results.  A pyinstrument session gives the
    call tree as text and HTML and the functions with the most time of
    their own; py-spy's collapsed stacks give time per thread and per
    function.
    """
    import subprocess

    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"profile-{variant}-{time.strftime('%Y%m%d-%H%M%S')}")
    if session.endswith(".pyspy"):
        paths = {"raw": f"{base}-pyspy.txt", "self": f"{base}-self.txt"}
        shutil.copyfile(session, paths["raw"])
        with open(paths["self"], "w", encoding="utf-8") as f:
            f.write(collapsedSelfTimes(session))
        return paths
    paths = {}
    for renderer, ext in (("text", "txt"), ("html", "html"), ("pstats", "pstats")):
        path = f"{base}.{ext}"
        command = [sys.executable, "-m", "pyinstrument", "--load", session, "-r", renderer, "-o", path]
        if renderer == "text":
            command.append("--no-color")
        subprocess.run(command, check=False)
        paths[ext] = path
    paths["self"] = f"{base}-self.txt"
    with open(paths["self"], "w", encoding="utf-8") as f:
        f.write(selfTimes(paths["pstats"]))
    return paths


def selfTimes(pstatsPath: str, top: int = 40) -> str:
    """
    The C{top} functions by time spent in themselves, from a pstats file.
    """
    import io
    import pstats

    text = io.StringIO()
    try:
        stats = pstats.Stats(pstatsPath, stream=text)
    except Exception as e:
        return f"no profile: {e}\n"
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def collapsedSelfTimes(path: str, top: int = 40) -> str:
    """
    Samples per thread, and the C{top} (thread, function) pairs by samples
    in the function itself, from py-spy's collapsed stacks.  Stacks of
    C{--subprocesses} start with a frame per process (the host of
    C{[node] processes}, then its child); a thread is then named by its
    node process, and functions are also summed over all of them.
    """
    from collections import Counter

    threads: Counter[str] = Counter()
    leaves: Counter[tuple[str, str]] = Counter()
    functions: Counter[str] = Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            thread = _sampledThread(frames)
            threads[thread] += int(count)
            leaves[(thread, frames[-1])] += int(count)
            functions[frames[-1]] += int(count)
    total = sum(threads.values()) or 1
    lines = [f"{total} samples (threads holding or waiting for the CPU)", ""]
    lines += [f"{100 * n / total:5.1f}%  {thread}" for thread, n in threads.most_common()]
    if any(thread.startswith("process ") for thread in threads):
        lines += ["", "Self samples by function, all processes:"]
        lines += [f"{100 * n / total:5.1f}%  {leaf}" for leaf, n in functions.most_common(top)]
    lines += ["", "Self samples by function:"]
    lines += [f"{100 * n / total:5.1f}%  {thread}: {leaf}" for (thread, leaf), n in leaves.most_common(top)]
    return "\n".join(lines) + "\n"


def _sampledThread(frames: list[str]) -> str:
    """
    The thread of one collapsed stack: its first frame, or with
    C{--subprocesses} the innermost process (C{process N} for a child
    started with C{--process N}) and the thread.
    """
    import re

    processes = 0
    while processes < len(frames) - 1 and frames[processes].startswith("process "):
        processes += 1
    if not processes:
        return frames[0]
    owner = frames[processes - 1]
    child = re.search(r" --process (\d+)", owner)
    name = f"process {child.group(1)}" if child else owner.split(":", 1)[0].replace("process ", "pid ")
    return f"{name} {frames[processes]}"
