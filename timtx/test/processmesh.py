"""
A cluster of real node processes for tests: C{twist tim} on each host of a
L{timtx.test.netns.MeshTopology}, all sharing one PostgreSQL database, each
started, killed, cut off and let back in as an operator (or a failure)
would.

The database listens on this machine's loopback, which the hosts cannot
reach: the mesh forwards a port on this namespace's LAN address to it.  A
host cut off from the others (L{ProcessMesh.isolate}) still reaches the
database, as a node on the far side of a broken switch between racks
would: the interesting split, where both sides go on storing.

L{NodeProcess} is one such child process on its own, for tests with
another topology (L{timtx.test.test_nat_mesh}).

Needs root, C{ip}, C{nft} and PostgreSQL; skips without them (fails under
CI).
"""

from __future__ import annotations

import json
import re
import signal
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.protocols.portforward import ProxyFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from timtx.client import connect, register
from timtx.cluster.membership import MEMBERS_FILE
from timtx.crypto.ids import NodeKeys
from timtx.protocols.codec import Encoding
from timtx.test import netns
from timtx.test.base import waitUntil
from timtx.test.databases import _dsnWith, postgresqlDatabase
from timtx.test.test_tap import twistTim

PEER_PORT = 7946

CONFIG = """\
[node]
data_dir = node{n}-data
key_file = node.key

[client]
listen = tcp:0:interface={address}
tcp_listen =
max_connections_per_ip = 0
request_rate = 0

[accounts]
scrypt_n = 16
scrypt_r = 1
http_rate = 0

[admin]
listen =

[devices]
limit = 0
type_limit = 0

[store]
backend = postgresql
dsn = {dsn}

[cluster]
listen = tcp:{peerPort}:interface={address}
node_id = node{n}
seeds = {seeds}
secret = mesh test secret, 16 bytes or more
{extra}"""


def listeningPort(log: FilePath, listener: str = "client-ws") -> int:
    """
    The port a node's C{listener} got (nodes in tests listen on port 0),
    from the node's log: the last run's, for a node started again.

    @raise LookupError: if the log does not say yet.
    """
    found = re.findall(rb"%s listening on \S+:(\d+)" % listener.encode(), log.getContent() if log.exists() else b"")
    if not found:
        raise LookupError(f"{log.path} names no port for {listener} yet")
    return int(found[-1])


class NodeProcess(protocol.ProcessProtocol):
    """
    One C{twist tim} (or any) child process, stopped when the test ends.

    @ivar ended: fires when the process has exited.
    """

    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.transport: Any = None

    @classmethod
    def spawn(cls, testCase: TestCase, argv: list[str], directory: FilePath) -> NodeProcess:
        """
        Run C{argv} in C{directory} with L{netns.childEnvironment}; the
        test's cleanup stops it (L{stop}).
        """
        process = cls()
        reactor.spawnProcess(process, argv[0], argv, env=netns.childEnvironment(), path=directory.path)
        testCase.addCleanup(process.stop)
        return process

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    @defer.inlineCallbacks
    def kill(self) -> Any:
        """
        C{kill -9}, and wait until it is gone.
        """
        if not self.ended.called:
            self.transport.signalProcess("KILL")
        yield self.ended

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """
        Stop as an operator does: SIGTERM, SIGKILL after 10 s.
        """
        if self.ended.called:
            return
        try:
            self.transport.signalProcess(signal.SIGTERM)
        except error.ProcessExitedAlready:
            return
        timer = reactor.callLater(10, lambda: self.ended.called or self.transport.signalProcess("KILL"))
        yield self.ended
        if timer.active():
            timer.cancel()


class ProcessMesh:
    """
    C{count} node processes on their own hosts; see the module docstring.
    Everything it starts or changes is undone when the test ends.

    @ivar directory: where the configs, logs and data directories are.
    """

    def __init__(self, testCase: TestCase, topology: netns.MeshTopology, directory: FilePath, dsn: str, extra: str):
        self.testCase = testCase
        self.topology = topology
        self.directory = directory
        self.dsn = dsn
        self.extra = extra
        self.count = topology.hosts
        self._processes: dict[int, NodeProcess] = {}
        self._isolated: set[int] = set()

    @classmethod
    @defer.inlineCallbacks
    def start(cls, testCase: TestCase, count: int, extra: str = "") -> Any:
        """
        Start C{count} nodes, with C{extra} appended to each config (more
        sections), and wait until each is ready and sees all the others.
        """
        dsn = yield postgresqlDatabase(testCase)
        topology = netns.buildMesh(testCase, count)
        forward: Any = ProxyFactory("127.0.0.1", 5432)
        proxy = reactor.listenTCP(0, forward, interface=topology.root)
        testCase.addCleanup(proxy.stopListening)
        proxied: Any = proxy.getHost()
        directory = FilePath(testCase.mktemp())
        directory.makedirs()
        NodeKeys.fromFile(directory.child("node.key").path)
        mesh = cls(testCase, topology, directory, _dsnWith(dsn, host=topology.root, port=proxied.port), extra)
        for n in mesh.nodes:
            mesh.spawn(n)
        for n in mesh.nodes:
            yield mesh.untilReady(n)
        for n in mesh.nodes:
            yield mesh.untilLive(n, count)
        return mesh

    @property
    def nodes(self) -> range:
        return range(1, self.count + 1)

    def address(self, n: int) -> str:
        return self.topology.host(n).address

    def url(self, n: int, path: str = "/tim") -> str:
        """
        Where clients of node C{n} connect: C{/tim} (WebSocket) or C{/tim2}.
        """
        scheme = "ws" if path == "/tim" else "http"
        return f"{scheme}://{self.address(n)}:{listeningPort(self.log(n))}{path}"

    def log(self, n: int) -> FilePath:
        return self.directory.child(f"node{n}.log")

    def config(self, n: int) -> FilePath:
        return self.directory.child(f"node{n}.ini")

    # Processes.

    def spawn(self, n: int) -> None:
        """
        Start node C{n} (again, after L{kill}: same id, data and config).
        """
        seeds = ", ".join(f"{self.address(i)}:{PEER_PORT}" for i in self.nodes)
        text = CONFIG.format(
            n=n,
            address=self.address(n),
            peerPort=PEER_PORT,
            dsn=self.dsn,
            seeds=seeds,
            extra=self.extra,
        )
        self.config(n).setContent(text.encode())
        argv = self.topology.run(n, *twistTim(self.config(n).path, self.log(n).path))
        self._processes[n] = NodeProcess.spawn(self.testCase, argv, self.directory)

    def untilReady(self, n: int) -> defer.Deferred[None]:
        log = self.log(n)
        return waitUntil(lambda: log.exists() and b"timtx node ready" in log.getContent(), 30)

    def kill(self, n: int) -> defer.Deferred[None]:
        """
        C{kill -9} node C{n}; fires when it is gone.
        """
        return self._processes[n].kill()

    def stop(self, n: int) -> defer.Deferred[None]:
        """
        Stop node C{n} as an operator does (SIGTERM, SIGKILL after 10 s).
        """
        return self._processes[n].stop()

    # The network.

    def isolate(self, n: int) -> None:
        """
        Cut node C{n}'s host off from the other hosts (both ways); it still
        reaches the database and its clients (this namespace).
        """
        if n not in self._isolated:
            self.topology.isolate(n)
            self._isolated.add(n)
            self.testCase.addCleanup(self.heal, n)

    def heal(self, n: int) -> None:
        """
        Undo L{isolate}.
        """
        if n in self._isolated:
            self._isolated.discard(n)
            self.topology.reconnect(n)

    # What a node sees, as C{python -m timtx cluster members} prints it.

    def members(self, n: int) -> dict[str, str]:
        """
        Node C{n}'s last saved view: each member's state.
        """
        path = self.directory.child(f"node{n}-data").child(MEMBERS_FILE)
        try:
            saved = json.loads(path.getContent())
        except (OSError, ValueError):
            return {}
        return {member["nodeId"]: member["state"] for member in saved.get("members", [])}

    def live(self, n: int) -> set[str]:
        return {node for node, state in self.members(n).items() if state in ("alive", "suspect")}

    def untilLive(self, n: int, count: int, seconds: float = 30) -> defer.Deferred[None]:
        """
        Wait until node C{n} holds C{count} members live (itself included).
        """
        return waitUntil(lambda: len(self.live(n)) == count, seconds)

    def allSee(self, nodes: list[int], state: str) -> bool:
        """
        Whether every node of C{nodes} sees every node of C{nodes} (itself
        included) in C{state}.
        """
        return all(self.members(n).get(f"node{m}") == state for n in nodes for m in nodes)

    # Clients.

    @defer.inlineCallbacks
    def register(self, *names: str) -> Any:
        """
        Register users C{names} (password C{secret}) through node 1.
        """
        for name in names:
            yield register(reactor, self.url(1, "/tim2"), name, "secret")

    @defer.inlineCallbacks
    def login(self, n: int, name: str, encoding: Encoding = Encoding.COMPACT) -> Any:
        """
        A client of user C{name} logged in on node C{n}, disconnected when
        the test ends.
        """
        client = yield connect(reactor, self.url(n), encoding)
        self.testCase.addCleanup(client.disconnect)
        yield client.login(name, "secret")
        return client

    # After the test.

    def assertNoTracebacks(self) -> None:
        """
        Fail the test, showing the first one, if any node logged a
        traceback.
        """
        for n in self.nodes:
            content = self.log(n).getContent() if self.log(n).exists() else b""
            if b"Traceback" in content:
                start = content.index(b"Traceback")
                self.testCase.fail(
                    f"node{n} logged a traceback:\n{content[start : start + 3000].decode(errors='replace')}"
                )
