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
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.protocols.portforward import ProxyFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from timtx.client import connect, register
from timtx.crypto.ids import NodeKeys
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, GroupType, TimType
from timtx.protocols.structs import Tid, TimPresence
from timtx.test import netns
from timtx.test.base import waitUntil
from timtx.test.databases import _dsnWith, postgresqlDatabase
from timtx.test.processmesh import NodeProcess, listeningPort
from timtx.test.test_tap import twistTim
from timtx.testing import requireOrSkip, sourceRoot

NODES = ("pub", "h1", "h2")
#: STUN retransmissions for a test: discovery's last probe (does the NAT
#: let in an answer from another port?) times out in seconds, not the 20 of
#: the defaults.
FAST_STUN = {"stun_rto": "0.2", "stun_max_rto": "1.0", "stun_retransmissions": "4"}


def nodeConfig(name: str, dsn: str, dataDir: str) -> bytes:
    """
    The example configuration of node C{name}, with the test's store and
    directories.
    """
    root = sourceRoot()
    if root is None:
        requireOrSkip("no source checkout (examples/ is not installed)")
    text = root.child("examples").child("nat").child(f"{name}.ini").getContent().decode()
    text = re.sub(r"(?m)^dsn = .*$", lambda m: f"dsn = {dsn}", text)
    text = re.sub(r"(?m)^data_dir = .*$", lambda m: f"data_dir = {dataDir}", text)
    # Clients' port chosen by the OS (the test reads it from the log).
    text = re.sub(r"(?m)^(listen = tcp:)\d+:", r"\g<1>0:", text, count=1)
    return text.encode()


class NatMeshTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def startMesh(self, kinds: list[str], cluster: str = "", **natOverrides: str) -> Any:
        """
        Build the topology with NATs of C{kinds}, start the three nodes
        (C{natOverrides} replace keys of the NAT'd nodes' C{[nat]}, and
        every node's C{[cluster]} gets the lines C{cluster}), wait
        until every node sees all three alive with a link to each other,
        and log a user in on each NAT'd node.

        @return: the directory of the nodes' files, and the two clients.
        """
        dsn = yield postgresqlDatabase(self)
        topology = netns.build(self, kinds)
        self.topology = topology
        router = topology.linkRoot()

        # The store through a Unix socket, which every namespace can reach.
        socketDir = tempfile.mkdtemp(prefix="txpg")
        self.addCleanup(shutil.rmtree, socketDir, True)
        unix: Any = reactor
        proxy = unix.listenUNIX(os.path.join(socketDir, ".s.PGSQL.5432"), ProxyFactory("127.0.0.1", 5432))
        self.addCleanup(proxy.stopListening)
        nodeDsn = _dsnWith(dsn, host=socketDir, port=5432)

        directory = self.directory = FilePath(self.mktemp())
        directory.makedirs()
        NodeKeys.fromFile(directory.child("nat-node.key").path)
        hosts = {"pub": topology.public, "h1": topology.host(1), "h2": topology.host(2)}
        self.logs = {}
        for name in NODES:
            config = directory.child(f"{name}.ini")
            text = nodeConfig(name, nodeDsn, directory.child(f"{name}-data").path)
            text = text.replace(b"[cluster]\n", b"[cluster]\n" + cluster.encode())
            if name != "pub":
                # [nat] is the last section: drop the keys, then add them.
                overrides = {**FAST_STUN, **natOverrides}
                for key in overrides:
                    text = re.sub(rf"(?m)^{key} = .*\n".encode(), b"", text)
                text += "".join(f"{key} = {value}\n" for key, value in overrides.items()).encode()
            config.setContent(text)
            self.logs[name] = directory.child(f"{name}.log")
            argv = ["ip", "netns", "exec", hosts[name].namespace, *twistTim(config.path, self.logs[name].path)]
            NodeProcess.spawn(self, argv, directory)

        def meshed() -> bool:
            for name in NODES:
                seen = self.members(name)
                if {n for n, m in seen.items() if m["state"] == "alive"} != set(NODES):
                    return False
                if any(seen[other].get("path") is None for other in NODES if other != name):
                    return False
            return True

        yield waitUntil(meshed, 45)

        # Each node's client port, through its NAT to the router's
        # root-side address (under a port of its own there).
        exposed: dict[str, int] = {}
        for i, name in enumerate(NODES):
            port = listeningPort(self.logs[name])
            if i:
                topology.forwardTcp(i, port)
            outside = port
            while outside in exposed.values():
                outside += 1
            topology.exposeTcp(outside, topology.nat(i).address if i else topology.public.address, port)
            exposed[name] = outside

        def url(name: str, path: str = "/tim") -> str:
            scheme = "ws" if path == "/tim" else "http"
            return f"{scheme}://{router}:{exposed[name]}{path}"

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
        return sender, recipient

    def members(self, name: str) -> dict[str, Any]:
        """
        The members file of node C{name}, by node id.
        """
        path = self.directory.child(f"{name}-data").child("cluster-members.json")
        if not path.exists():
            return {}
        try:
            return {m["nodeId"]: m for m in json.loads(path.getContent())["members"]}
        except ValueError:
            return {}

    def assertNoTraceback(self) -> None:
        for name in NODES:
            self.assertNotIn(b"Traceback", self.logs[name].getContent())

    @defer.inlineCallbacks
    def test_joinThroughRelay(self) -> Any:
        """
        Behind an endpoint-independent and an endpoint-dependent NAT, two
        nodes join through the public one; every node sees all three alive;
        each learns its NAT's mapping; they reach each other through the
        relay and stay there (no punch with an endpoint-dependent side),
        and a 1:1 message, presence, a group message and a live room's
        frames between their users arrive.
        """
        # The sender's node stores and routes (over the relayed link), not
        # a conversation owner that may be the public node.
        sender, recipient = yield self.startMesh(["eim", "edm"], cluster="conversation_owner = false\n")
        yield waitUntil(lambda: all("nat.mapping" in self.members("pub")[n]["meta"] for n in ("h1", "h2")), 20)
        mappings = {name: self.members("pub")[name]["meta"].get("nat.mapping") for name in ("h1", "h2")}
        self.assertEqual(mappings, {"h1": "endpoint-independent", "h2": "endpoint-dependent"})
        for a, b in (("h1", "h2"), ("h2", "h1")):
            self.assertEqual(self.members(a)[b]["path"], "relayed")
            self.assertEqual(self.members(a)[b]["via"], "pub")
            self.assertEqual(self.members(a)["pub"]["path"], "tcp")
            self.assertEqual(self.members(a)[b].get("punch", {}).get("attempts", 0), 0)
        self.assertEqual(self.members("pub")["h1"]["reach"], "relay")

        def relayedFromH1() -> int:
            return int(self.members("pub")["h1"].get("relayedFor", {}).get("bytesFrom", 0))

        before = relayedFromH1()
        sender.sendMessage(recipient.uid, "through the relay " + "x" * 2000)
        got = yield recipient.next(lambda i: i.timType == TimType.TIMMESSAGE and bool(i.body.dataString), timeout=30)
        self.assertEqual(got.body.dataString, "through the relay " + "x" * 2000)
        self.assertEqual(got.body.fromTid.node, sender.uid)
        # It crossed the relay (whose members file is rewritten every 5 s).
        yield waitUntil(lambda: relayedFromH1() >= before + 2000, 15)

        sender.send(TimType.TIMPRESENCE, TimPresence(toTid=Tid(node=recipient.uid), status="behind a NAT"))
        got = yield recipient.next(lambda i: i.timType == TimType.TIMPRESENCE, timeout=30)
        self.assertEqual((got.body.status, got.body.fromTid.node), ("behind a NAT", sender.uid))

        # A group with a member on each NAT'd node: a message from one
        # reaches the other.
        gid = (yield sender.business(Business.NEWROOM, node="behind NATs", reqInt=GroupType.OPEN)).n
        yield sender.business(Business.PULLROOM, node=gid, node2=recipient.uid)
        sender.sendMessage(None, "to the group", msType=3, roomTid=Tid(node=gid))
        got = yield recipient.next(
            lambda i: i.timType == TimType.TIMMESSAGE and i.body.dataString == "to the group", 30
        )
        self.assertEqual(got.body.roomTid.node, gid)

        # A live room founded on one NAT'd node, watched from the other.
        vnode = yield sender.vroomRegister()
        yield recipient.vroomSubscribe(vnode)
        for i in range(5):
            sender.pushStream(vnode, b"frame %d" % i)
        frames = []
        for _ in range(5):
            frames.append((yield recipient.next(TimType.TIMSTREAM, timeout=30)).body.body)
        self.assertEqual(frames, [b"frame %d" % i for i in range(5)])
        self.assertNoTraceback()

    @defer.inlineCallbacks
    def test_directPathThenFallback(self) -> Any:
        """
        Behind two endpoint-independent NATs the two nodes punch a direct
        path and their link moves onto it; when NAT 1 starts dropping UDP
        mid-traffic, the link moves back to the relay within the consent
        timeout, and every message the server confirmed arrives: live, or,
        for the pushes lost with the direct path, when the recipient's node
        reads its live sessions' inboxes again as the link comes back.
        """
        # The sender's node stores and routes each message (one link: the
        # one between the two NAT'd nodes), not a conversation owner that
        # may be the public node.
        sender, recipient = yield self.startMesh(
            ["eim", "eim"], cluster="conversation_owner = false\n", keepalive="1", consent_timeout="3"
        )
        # Each node rewrites its members file within a second of a change.
        yield waitUntil(lambda: self.members("h1")["h2"]["path"] == self.members("h2")["h1"]["path"] == "direct", 30)
        punch = self.members("h1")["h2"]["punch"]
        self.assertGreaterEqual(punch["successes"], 1)
        self.assertIsNotNone(punch["timeToDirect"])

        confirmed: list[str] = []
        received: list[str] = []
        # Pushed one by one, or (what a push lost with a link left in the
        # inbox) read again in offline lists.
        wanted = (TimType.TIMMESSAGE, TimType.TIMOFFLINEMSG)

        @defer.inlineCallbacks
        def receive() -> Any:
            while True:
                got = yield recipient.next(lambda i: i.timType in wanted, timeout=60)
                if got.timType == TimType.TIMOFFLINEMSG:
                    received.extend(m.dataString for m in got.body.messageList or () if m.dataString)
                elif got.body.dataString:
                    received.append(got.body.dataString)

        receiving = receive()
        receiving.addErrback(lambda f: None)
        self.addCleanup(receiving.cancel)

        def datagramsOut() -> int:
            return int(self.members("h1")["h2"].get("direct", {}).get("datagramsOut", 0))

        before = datagramsOut()
        for i in range(20):
            yield sender.postMessage(recipient.uid, f"direct {i}")
            confirmed.append(f"direct {i}")
        yield waitUntil(lambda: len(received) >= len(confirmed), 15)
        # They crossed the direct path (the file is rewritten every 5 s).
        yield waitUntil(lambda: datagramsOut() >= before + 20, 15)

        self.topology.dropUdp(1)
        moved = []
        for i in range(60):
            try:
                yield sender.postMessage(recipient.uid, f"during {i}", timeout=15)
            except Exception:
                continue
            confirmed.append(f"during {i}")
            if self.members("h1")["h2"]["path"] == "relayed":
                moved.append(i)
                if len(moved) >= 5:
                    break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(moved, "the link never moved to the relay")
        self.assertGreaterEqual(self.members("h1")["h2"]["punch"]["fallbacks"], 1)
        try:
            yield waitUntil(lambda: set(confirmed) <= set(received), 30)
        except AssertionError:
            missing = [text for text in confirmed if text not in received]
            raise AssertionError(f"confirmed and never received: {missing}") from None
        self.assertNoTraceback()
