# -*- test-case-name: timtx.test.test_cluster_netns -*-
"""
Three node processes on three "hosts" (network namespaces on one LAN,
L{timtx.test.netns.MeshTopology}) sharing one PostgreSQL database, each
started with C{twist tim} as an operator would; clients on each host.

The database listens on this machine's loopback, which the hosts cannot
reach: the test forwards a port on its own LAN address to it.

Needs root, C{ip} and PostgreSQL; skips without them (fails under CI).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.protocols.portforward import ProxyFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from timtx.client import connect, register
from timtx.crypto.ids import NodeKeys
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, TimType
from timtx.test import netns
from timtx.test.base import waitUntil
from timtx.test.databases import _dsnWith, postgresqlDatabase
from timtx.test.test_tap import twistTim

NODES = 3
MESSAGES = 1000

CONFIG = """\
[node]
data_dir = node{n}-data
key_file = node.key

[client]
listen = tcp:5120:interface={address}
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
listen = tcp:7946:interface={address}
node_id = node{n}
seeds = {seeds}
secret = mesh test secret, 16 bytes or more
"""


class _Node(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def isMessage(incoming: Any) -> bool:
    return bool(incoming.timType == TimType.TIMMESSAGE and incoming.body.dataString)


class MeshInNamespacesTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_thousandMessagesAcrossHosts(self) -> Any:
        """
        1,000 1:1 messages from a user on the first host to a user on the
        second arrive complete and in order on every device of both, the
        third host holding a device of each.
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
        logs = []
        for n in range(1, NODES + 1):
            address = topology.host(n).address
            config = directory.child(f"node{n}.ini")
            config.setContent(CONFIG.format(n=n, address=address, dsn=nodeDsn, seeds=seeds).encode())
            log = directory.child(f"node{n}.log")
            logs.append(log)
            self.spawn(topology, n, directory, config, log)
        for log in logs:
            yield waitUntil(lambda log=log: log.exists() and b"timtx node ready" in log.getContent(), 30)
        for log in logs:
            yield waitUntil(lambda log=log: log.getContent().count(b"joined") >= NODES - 1, 30)

        def url(n: int, path: str = "/tim") -> str:
            scheme = "ws" if path == "/tim" else "http"
            return f"{scheme}://{topology.host(n).address}:5120{path}"

        alice, bob = f"alice{os.getpid()}", f"bob{os.getpid()}"
        yield register(reactor, url(1, "/tim2"), alice, "secret")
        yield register(reactor, url(2, "/tim2"), bob, "secret")
        devices = []
        for name, n, encoding in [
            (alice, 1, Encoding.COMPACT),
            (bob, 2, Encoding.JSON),
            (alice, 3, Encoding.JSON),
            (bob, 3, Encoding.COMPACT),
        ]:
            client = yield connect(reactor, url(n), encoding)
            self.addCleanup(client.disconnect)
            yield client.login(name, "secret")
            devices.append(client)
        sender, recipient = devices[0], devices[1]
        yield sender.business(Business.ADDROSTER, node=recipient.uid)
        yield recipient.business(Business.ADDROSTER, node=sender.uid)
        texts = [f"n{i}" for i in range(MESSAGES)]
        for text in texts:
            sender.sendMessage(recipient.uid, text)
        for device in devices:
            got: list[Any] = []
            while len(got) < MESSAGES:
                got.append((yield device.next(isMessage, timeout=60)).body)
            self.assertEqual([m.dataString for m in got], texts)
            self.assertEqual([m.seq for m in got], list(range(1, MESSAGES + 1)))
        for log in logs:
            self.assertNotIn(b"Traceback", log.getContent())

    def spawn(self, topology: netns.MeshTopology, n: int, directory: FilePath, config: FilePath, log: FilePath) -> None:
        node = _Node()
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
                transport.signalProcess(signal.SIGTERM)
            except error.ProcessExitedAlready:
                return
            timer = reactor.callLater(10, kill)
            yield node.ended
            if timer.active():
                timer.cancel()

        self.addCleanup(stop)
