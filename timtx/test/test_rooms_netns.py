# -*- test-case-name: timtx.test.test_rooms_netns -*-
"""
A stream room across three node processes on three "hosts" (network
namespaces, as in L{timtx.test.test_cluster_netns}), sharing one PostgreSQL
database: subscribers on every host, and the node holding the room killed
with SIGKILL while frames flow.

Needs root, C{ip} and PostgreSQL; skips without them (fails under CI).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.protocols.portforward import ProxyFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from timtx.client import connect, register
from timtx.crypto.ids import NodeKeys
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.test import netns
from timtx.test import test_cluster_netns as mesh
from timtx.test.base import waitUntil
from timtx.test.databases import _dsnWith, postgresqlDatabase
from timtx.test.test_tap import twistTim

NODES = 3


class RoomInNamespacesTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_holderKilledMidStream(self) -> Any:
        """
        The node holding a private stream room is killed (SIGKILL) while a
        publisher on another host pushes 50 frames a second: once the
        others declare it dead, the subscribers on the surviving hosts get
        the frames again, each once and in order, and the room's rules (a
        private room, a granted publisher) held.
        """
        dsn = yield postgresqlDatabase(self)
        topology = netns.buildMesh(self, NODES)
        forward: Any = ProxyFactory("127.0.0.1", 5432)
        proxy = reactor.listenTCP(0, forward, interface=topology.root)
        self.addCleanup(proxy.stopListening)
        proxied: Any = proxy.getHost()
        nodeDsn = _dsnWith(dsn, host=topology.root, port=proxied.port)
        directory = FilePath(self.mktemp())
        directory.makedirs()
        NodeKeys.fromFile(directory.child("node.key").path)
        seeds = ", ".join(f"{topology.host(i).address}:7946" for i in range(1, NODES + 1))
        logs, kills = [], []
        for n in range(1, NODES + 1):
            address = topology.host(n).address
            config = directory.child(f"node{n}.ini")
            config.setContent(mesh.CONFIG.format(n=n, address=address, dsn=nodeDsn, seeds=seeds).encode())
            log = directory.child(f"node{n}.log")
            logs.append(log)
            kills.append(self.spawn(topology, n, directory, config, log))
        for log in logs:
            yield waitUntil(lambda log=log: log.exists() and b"timtx node ready" in log.getContent(), 30)
        for log in logs:
            yield waitUntil(lambda log=log: log.getContent().count(b"joined") >= NODES - 1, 30)

        def url(n: int, path: str = "/tim") -> str:
            scheme = "ws" if path == "/tim" else "http"
            return f"{scheme}://{topology.host(n).address}:5120{path}"

        @defer.inlineCallbacks
        def user(name: str, n: int, encoding: Encoding = Encoding.COMPACT) -> Any:
            yield register(reactor, url(n, "/tim2"), name, "secret")
            client = yield connect(reactor, url(n), encoding)
            self.addCleanup(client.disconnect)
            yield client.login(name, "secret")
            return client

        tag = os.getpid()
        # The founder's node (host 3) draws a room id it holds itself.
        host = yield user(f"host{tag}", 3)
        vnode = yield host.vroomRegister(private=True)
        publisher = yield user(f"pub{tag}", 1)
        yield host.vroomGrant(vnode, publisher.uid)
        viewers = []
        for i, n in enumerate((1, 2, 2, 3)):
            viewer = yield user(f"viewer{i}{tag}", n, Encoding.JSON if i % 2 else Encoding.COMPACT)
            yield host.vroomAllow(vnode, viewer.uid)
            yield viewer.vroomSubscribe(vnode)
            viewers.append(viewer)
        body = [b"before"]
        pushes = LoopingCall(lambda: publisher.pushStream(vnode, body[0]))
        pushes.start(0.02)
        self.addCleanup(lambda: pushes.stop() if pushes.running else None)
        survivors = viewers[:3]
        yield defer.gatherResults([viewer.next(TimType.TIMSTREAM) for viewer in survivors])
        kills[2]()
        yield waitUntil(lambda: b"node3 died" in logs[0].getContent() and b"node3 died" in logs[1].getContent(), 30)
        body[0] = b"after"
        for viewer in survivors:
            frames: list[Any] = []
            while len([f for f in frames if f.body == b"after"]) < 50:
                frames.append((yield viewer.next(TimType.TIMSTREAM, timeout=30)).body)
            ids = [f.id for f in frames]
            self.assertEqual(ids, sorted(set(ids)))
        pushes.stop()
        for log in logs[:2]:
            self.assertNotIn(b"Traceback", log.getContent())

    def spawn(self, topology: netns.MeshTopology, n: int, directory: FilePath, config: FilePath, log: FilePath) -> Any:
        """
        Start node C{n}, stopped when the test ends; return what kills it
        with SIGKILL.
        """
        node = mesh._Node()
        argv = topology.run(n, *twistTim(config.path, log.path))
        transport = reactor.spawnProcess(node, argv[0], argv, env=netns.childEnvironment(), path=directory.path)

        def kill() -> None:
            if not node.ended.called:
                transport.signalProcess("KILL")

        @defer.inlineCallbacks
        def stop() -> Any:
            if node.ended.called:
                return
            try:
                transport.signalProcess("TERM")
            except Exception:
                return
            timer = reactor.callLater(10, kill)
            yield node.ended
            if timer.active():
                timer.cancel()

        self.addCleanup(stop)
        return kill
