# -*- test-case-name: timtx.test.test_nat_mesh -*-
"""
NAT'd nodes join the mesh, for real: three C{twist tim} processes in the
NAT topology of docs/nat.md (L{timtx.test.netns.Topology}), started with
the example configurations (C{examples/nat/*.ini}): a reachable node on the
public segment, one node behind an endpoint-independent NAT and one behind
an endpoint-dependent NAT.  Neither NAT'd node can be dialled; both join
through the public node, and their link to each other goes through it as
a relay.  Users on the two NAT'd nodes exchange a 1:1 message and
presence.

The store is this machine's PostgreSQL, reached from every namespace
through a Unix socket the test forwards (namespaces share the file
system); the test reaches each node's client port through a link of its
own to the topology's router (L{Topology.linkRoot}).

Needs root, C{ip}, C{nft} and PostgreSQL; skips without them (fails under
CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.protocols.portforward import ProxyFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from timtx.client import connect, register
from timtx.crypto.ids import NodeKeys
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, TimType
from timtx.protocols.structs import Tid, TimPresence
from timtx.test import netns
from timtx.test.base import waitUntil
from timtx.test.databases import _dsnWith, postgresqlDatabase
from timtx.test.test_tap import twistTim

EXAMPLES = FilePath(__file__).parent().parent().parent().child("examples").child("nat")
NODES = ("pub", "h1", "h2")
CLIENT_PORT = 5120


class _Node(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def nodeConfig(name: str, dsn: str, dataDir: str) -> bytes:
    """
    The example configuration of node C{name}, with the test's store and
    directories.
    """
    text = EXAMPLES.child(f"{name}.ini").getContent().decode()
    text = re.sub(r"(?m)^dsn = .*$", lambda m: f"dsn = {dsn}", text)
    text = re.sub(r"(?m)^data_dir = .*$", lambda m: f"data_dir = {dataDir}", text)
    return text.encode()


class NatMeshTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_joinThroughRelay(self) -> Any:
        """
        Behind an endpoint-independent and an endpoint-dependent NAT, two
        nodes join through the public one; every node sees all three alive;
        the NAT'd nodes reach each other through the relay, and a 1:1
        message and presence between their users arrive.
        """
        dsn = yield postgresqlDatabase(self)
        topology = netns.build(self, ["eim", "edm"])
        router = topology.linkRoot()
        topology.exposeTcp(CLIENT_PORT, topology.public.address, CLIENT_PORT)
        for i in (1, 2):
            topology.forwardTcp(i, CLIENT_PORT)
            topology.exposeTcp(CLIENT_PORT + i, topology.nat(i).address, CLIENT_PORT)

        # The store through a Unix socket, which every namespace can reach.
        socketDir = tempfile.mkdtemp(prefix="txpg")
        self.addCleanup(shutil.rmtree, socketDir, True)
        proxy = reactor.listenUNIX(os.path.join(socketDir, ".s.PGSQL.5432"), ProxyFactory("127.0.0.1", 5432))
        self.addCleanup(proxy.stopListening)
        nodeDsn = _dsnWith(dsn, host=socketDir, port=5432)

        directory = FilePath(self.mktemp())
        directory.makedirs()
        NodeKeys.fromFile(directory.child("nat-node.key").path)
        hosts = {"pub": topology.public, "h1": topology.host(1), "h2": topology.host(2)}
        logs = {}
        for name in NODES:
            config = directory.child(f"{name}.ini")
            config.setContent(nodeConfig(name, nodeDsn, directory.child(f"{name}-data").path))
            logs[name] = directory.child(f"{name}.log")
            self.spawn(hosts[name].namespace, directory, config, logs[name])

        def members(name: str) -> dict[str, Any]:
            path = directory.child(f"{name}-data").child("cluster-members.json")
            if not path.exists():
                return {}
            try:
                return {m["nodeId"]: m for m in json.loads(path.getContent())["members"]}
            except ValueError:
                return {}

        def meshed() -> bool:
            for name in NODES:
                seen = members(name)
                if {n for n, m in seen.items() if m["state"] == "alive"} != set(NODES):
                    return False
                if any(seen[other].get("path") is None for other in NODES if other != name):
                    return False
            return True

        yield waitUntil(meshed, 45)
        for a, b in (("h1", "h2"), ("h2", "h1")):
            self.assertEqual(members(a)[b]["path"], "relayed")
            self.assertEqual(members(a)[b]["via"], "pub")
            self.assertEqual(members(a)["pub"]["path"], "tcp")
        self.assertEqual(members("pub")["h1"]["reach"], "relay")

        def url(name: str, path: str = "/tim") -> str:
            scheme = "ws" if path == "/tim" else "http"
            port = CLIENT_PORT + NODES.index(name)
            return f"{scheme}://{router}:{port}{path}"

        alice, bob = f"alice{os.getpid()}", f"bob{os.getpid()}"
        yield register(reactor, url("h1", "/tim2"), alice, "secret")
        yield register(reactor, url("h2", "/tim2"), bob, "secret")
        sender = yield connect(reactor, url("h1"), Encoding.COMPACT)
        self.addCleanup(sender.disconnect)
        yield sender.login(alice, "secret")
        recipient = yield connect(reactor, url("h2"), Encoding.JSON)
        self.addCleanup(recipient.disconnect)
        yield recipient.login(bob, "secret")
        yield sender.business(Business.ADDROSTER, node=recipient.uid)
        yield recipient.business(Business.ADDROSTER, node=sender.uid)

        sender.sendMessage(recipient.uid, "through the relay")
        got = yield recipient.next(lambda i: i.timType == TimType.TIMMESSAGE and bool(i.body.dataString), timeout=30)
        self.assertEqual(got.body.dataString, "through the relay")
        self.assertEqual(got.body.fromTid.node, sender.uid)

        sender.send(TimType.TIMPRESENCE, TimPresence(toTid=Tid(node=recipient.uid), status="behind a NAT"))
        got = yield recipient.next(lambda i: i.timType == TimType.TIMPRESENCE, timeout=30)
        self.assertEqual((got.body.status, got.body.fromTid.node), ("behind a NAT", sender.uid))

        for name in NODES:
            self.assertNotIn(b"Traceback", logs[name].getContent())

    def spawn(self, namespace: str, directory: FilePath, config: FilePath, log: FilePath) -> None:
        node = _Node()
        argv = ["ip", "netns", "exec", namespace, *twistTim(config.path, log.path)]
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
