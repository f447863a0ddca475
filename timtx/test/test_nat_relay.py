# -*- test-case-name: timtx.test.test_nat_relay -*-
"""
Tests for L{timtx.cluster.relay} and the mesh through it: nodes that
cannot be dialled join through a reachable member, and two of them get
their link through its relay.

L{RelayTests} drive the relay alone on a L{Clock} (its limits and
refusals); L{RelayedMeshTests} run whole services on L{FakeNetwork}
(in-memory links, simulated time), where a node that cannot be dialled has
no listener others can reach.
"""

from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.cluster.__main__ import formatMembers
from timtx.cluster.membership import META_REACH, META_RELAY, readMembers
from timtx.cluster.relay import (
    CHUNK_BYTES,
    CIRCUIT_ID_BYTES,
    RELAY_CLOSE,
    RELAY_CLOSED,
    RELAY_CONNECT,
    RELAY_DATA,
    RELAY_DELIVER,
    RELAY_INCOMING,
    Circuits,
    Relay,
    RelayedAddress,
    RelayedTransport,
    RelayLimits,
)
from timtx.cluster.swim import MemberState
from timtx.test.test_membership import FakeNetwork

ALIVE = MemberState.ALIVE


class FakeHost:
    """
    A relay's host: members, links (a list of what was sent on each) and
    a clock.
    """

    def __init__(self, nodeId="relay", members=("a", "b", "c"), links=("a", "b", "c")):
        self.nodeId = nodeId
        self.clock = Clock()
        self.members = set(members)
        self.links = set(links)
        self.sent = []

    def isLiveMember(self, nodeId):
        return nodeId in self.members

    def sendOnLink(self, nodeId, kind, payload):
        if nodeId not in self.links:
            return False
        self.sent.append((nodeId, kind, payload))
        return True

    def relayedResponderFactory(self):
        raise AssertionError("a relay alone answers no links")


CID = b"c" * CIRCUIT_ID_BYTES
CID2 = b"d" * CIRCUIT_ID_BYTES


class RelayTests(SynchronousTestCase):
    def relay(self, **limits):
        host = FakeHost()
        return host, Relay(host, RelayLimits(**limits))

    def test_forwards(self):
        """
        A circuit opened by a member to another carries bytes both ways,
        each end's counted, and a close reaches the other end.
        """
        host, relay = self.relay()
        relay.connectReceived("a", CID + b"b")
        self.assertEqual(host.sent, [("b", RELAY_INCOMING, CID + b"a")])
        relay.dataReceived("a", CID + b"hello")
        relay.dataReceived("b", CID + b"there")
        self.assertEqual(host.sent[1:], [("b", RELAY_DELIVER, CID + b"hello"), ("a", RELAY_DELIVER, CID + b"there")])
        self.assertEqual((relay.stats.node("a").bytesFrom, relay.stats.node("a").bytesTo), (5, 5))
        relay.closeReceived("b", CID + b"bye")
        self.assertEqual(host.sent[-1], ("a", RELAY_CLOSED, CID + b"bye"))
        self.assertEqual(relay.circuits(), 0)
        self.assertEqual(relay.stats.node("a").circuits, 0)

    def assertRefused(self, host, relay, source, payload, reason):
        before = list(host.sent)
        count, circuits = relay.stats.refused[reason], relay.circuits()
        relay.connectReceived(source, payload)
        self.assertEqual(relay.stats.refused[reason], count + 1, relay.stats.refused)
        self.assertEqual(relay.circuits(), circuits)
        # Nothing reaches the target; the asker is told why.
        new = host.sent[len(before) :]
        self.assertTrue(all(kind == RELAY_CLOSED and to == source for to, kind, _ in new), new)

    def test_refusals(self):
        """
        Requests from non-members, for non-members, for itself, with no
        link to the target, or with the relay off are refused, counted,
        and open nothing.
        """
        host, relay = self.relay()
        self.assertRefused(host, relay, "stranger", CID + b"b", "not a live member")
        self.assertRefused(host, relay, "a", CID + b"stranger", "the target is not a live member")
        self.assertRefused(host, relay, "a", CID + b"a", "no relaying to itself")
        self.assertRefused(host, relay, "a", CID + b"relay", "no relaying to itself")
        host.links.discard("c")
        self.assertRefused(host, relay, "a", CID + b"c", "no link to the target")
        relay.connectReceived("a", b"short")
        self.assertEqual(relay.stats.refused["malformed"], 1)
        host, relay = self.relay(enabled=False)
        self.assertRefused(host, relay, "a", CID + b"b", "this node does not relay")

    def test_strangerDataDropped(self):
        """
        Data or a close for a circuit the sender is not an end of is
        dropped and counted; the circuit carries on.
        """
        host, relay = self.relay()
        relay.connectReceived("a", CID + b"b")
        sent = len(host.sent)
        relay.dataReceived("c", CID + b"injected")
        relay.closeReceived("c", CID + b"")
        relay.dataReceived("a", CID2 + b"nowhere")
        relay.dataReceived("a", b"x")
        self.assertEqual(relay.stats.dropped, 4)
        self.assertEqual(len(host.sent), sent)
        self.assertEqual(relay.circuits(), 1)

    def test_circuitLimit(self):
        host, relay = self.relay(maxCircuits=1)
        relay.connectReceived("a", CID + b"b")
        self.assertRefused(host, relay, "a", CID2 + b"c", "node a has 1 circuits")
        self.assertRefused(host, relay, "c", CID2 + b"b", "node b has 1 circuits")
        self.assertRefused(host, relay, "b", b"e" * CIRCUIT_ID_BYTES + b"c", "node b has 1 circuits")
        self.assertRefused(host, relay, "c", CID + b"a", "circuit id in use")

    def test_rateDelaysInOrder(self):
        """
        Over its rate a node's bytes wait, in order, and go as the rate
        allows; a close waits behind them.
        """
        host, relay = self.relay(rate=100_000, burst=65536, maxQueuedBytes=1 << 20)
        relay.connectReceived("a", CID + b"b")
        chunk = b"x" * 40000
        for i in range(4):
            relay.dataReceived("a", CID + bytes([i]) + chunk)
        relay.closeReceived("a", CID + b"done")
        delivered = [p for to, kind, p in host.sent if kind == RELAY_DELIVER]
        self.assertEqual(len(delivered), 1)
        self.assertEqual(relay.stats.node("a").delayed, 3)
        host.clock.advance(0.5)
        host.clock.advance(0.5)
        host.clock.advance(1.0)
        delivered = [p[CIRCUIT_ID_BYTES] for to, kind, p in host.sent if kind == RELAY_DELIVER]
        self.assertEqual(delivered, [0, 1, 2, 3])
        self.assertEqual(host.sent[-1], ("b", RELAY_CLOSED, CID + b"done"))
        self.assertEqual(relay.circuits(), 0)

    def test_queueOverflowCloses(self):
        """
        Past the queue bound the overflowing circuit is closed at both
        ends and counted as limited; other nodes are not affected.
        """
        host, relay = self.relay(rate=1000, burst=65536, maxQueuedBytes=100_000)
        relay.connectReceived("a", CID + b"b")
        relay.connectReceived("c", CID2 + b"b")
        for _ in range(3):
            relay.dataReceived("a", CID + b"x" * 60000)
        self.assertEqual(relay.stats.node("a").limited, 1)
        closed = [to for to, kind, p in host.sent if kind == RELAY_CLOSED and p.startswith(CID)]
        self.assertEqual(sorted(closed), ["a", "b"])
        relay.dataReceived("c", CID2 + b"fine")
        self.assertEqual(host.sent[-1], ("b", RELAY_DELIVER, CID2 + b"fine"))
        host.clock.advance(200)
        self.assertEqual(relay.circuits(), 1)

    def test_nodeGone(self):
        """
        When the link to an end is lost, its circuits close and the other
        end is told.
        """
        host, relay = self.relay()
        relay.connectReceived("a", CID + b"b")
        relay.nodeGone("b")
        self.assertEqual(host.sent[-1][:2], ("a", RELAY_CLOSED))
        self.assertEqual(relay.circuits(), 0)


class Recorder(Protocol):
    def __init__(self):
        self.data = []
        self.lost = None

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason=None):
        self.lost = reason


class CircuitTests(SynchronousTestCase):
    """
    The endpoint role: circuit ends as transports, on a clock.
    """

    def setUp(self):
        self.host = FakeHost(nodeId="a", members=("relay", "b"), links=("relay",))
        self.responder = Recorder()
        self.host.relayedResponderFactory = lambda: Factory.forProtocol(lambda: self.responder)
        self.circuits = Circuits(self.host)

    def open(self):
        protocol = self.successResultOf(self.circuits.connect("relay", "b", Factory.forProtocol(Recorder)))
        ((to, kind, payload),) = self.host.sent
        self.assertEqual((to, kind, payload[CIRCUIT_ID_BYTES:]), ("relay", RELAY_CONNECT, b"b"))
        return protocol, payload[:CIRCUIT_ID_BYTES]

    def test_writeChunked(self):
        """
        Writes go to the relay in chunks small enough for any peer frame
        limit, in order; what the relay delivers reaches the protocol.
        """
        protocol, cid = self.open()
        self.assertEqual(protocol.transport.getPeer(), RelayedAddress("b", "relay"))
        protocol.transport.write(b"x" * (CHUNK_BYTES * 2 + 5))
        sent = [p for _, kind, p in self.host.sent if kind == RELAY_DATA]
        self.assertEqual([len(p) - CIRCUIT_ID_BYTES for p in sent], [CHUNK_BYTES, CHUNK_BYTES, 5])
        self.assertTrue(all(p.startswith(cid) for p in sent))
        self.circuits.deliverReceived("relay", cid + b"hello")
        self.assertEqual(protocol.data, [b"hello"])
        # Another relay, or another circuit id, reaches nothing.
        self.circuits.deliverReceived("other", cid + b"no")
        self.circuits.deliverReceived("relay", b"z" * CIRCUIT_ID_BYTES + b"no")
        self.assertEqual((protocol.data, self.circuits.dropped), ([b"hello"], 2))

    def test_closedByRelay(self):
        """
        The relay's close ends the protocol's connection on the next turn,
        with the reason.
        """
        protocol, cid = self.open()
        self.circuits.closedReceived("relay", cid + b"relay refused: not a live member")
        self.assertIsNone(protocol.lost)
        self.host.clock.advance(0)
        self.assertIn("not a live member", protocol.lost.getErrorMessage())
        self.assertEqual(self.circuits.ends(), [])

    def test_loseConnection(self):
        """
        The protocol closing its transport tells the relay and ends its
        connection; writes after are dropped.
        """
        protocol, cid = self.open()
        protocol.transport.loseConnection()
        self.assertEqual(self.host.sent[-1][:2], ("relay", RELAY_CLOSE))
        protocol.transport.write(b"late")
        self.assertNotIn(RELAY_DATA, [kind for _, kind, _ in self.host.sent])
        self.host.clock.advance(0)
        self.assertIsNotNone(protocol.lost)

    def test_relayLinkLost(self):
        """
        When the link to the relay is lost, every circuit through it ends;
        a write with no link to the relay ends its circuit too.
        """
        protocol, cid = self.open()
        self.circuits.linkLost("relay")
        self.host.clock.advance(0)
        self.assertIn("link to the relay", protocol.lost.getErrorMessage())
        self.host.sent.clear()
        protocol = self.successResultOf(self.circuits.connect("relay", "b", Factory.forProtocol(Recorder)))
        self.host.links.discard("relay")
        protocol.transport.write(b"x")
        self.host.clock.advance(0)
        self.assertIsNotNone(protocol.lost)
        self.failureResultOf(self.circuits.connect("relay", "b", Factory.forProtocol(Recorder)), ConnectError)

    def test_incoming(self):
        """
        A circuit the relay announces gets a protocol from the responder
        factory; a malformed announcement is ignored.
        """
        self.circuits.incomingReceived("relay", CID + b"b")
        self.assertEqual(self.responder.transport.peerNodeId, "b")
        self.assertFalse(self.responder.transport.initiator)
        self.circuits.incomingReceived("relay", b"short")
        self.assertEqual(len(self.circuits.ends()), 1)


class NatNetwork(FakeNetwork):
    """
    L{FakeNetwork} where a node may be unreachable: it listens, but no
    other node can dial it.
    """

    def natService(self, name, seeds=(), reachable=True, dialable=None, **relay):
        return self.service(
            name,
            seeds,
            dialable=reachable if dialable is None else dialable,
            serviceArgs={"reachable": reachable, "relayLimits": RelayLimits(**relay)},
        )


class RelayedMeshTests(SynchronousTestCase):
    def setUp(self):
        self.network = NatNetwork(self)

    def mesh(self, **relay):
        net = self.network
        pub = net.natService("pub", **relay)
        x = net.natService("x", seeds=["pub:7946"], reachable=False)
        y = net.natService("y", seeds=["pub:7946"], reachable=False)
        self.assertIsNotNone(net.run(15, until=lambda: net.converged() and self.linked()), "no full mesh")
        return pub, x, y

    def linked(self):
        services = self.network.services
        return all(set(self.network.links(s)) == set(services) - {name} for name, s in services.items())

    def test_joinThroughRelay(self):
        """
        Two nodes that cannot be dialled join through the reachable one,
        name it as their relay, and link to each other through it,
        authenticated end to end; requests cross the relayed link.
        """
        pub, x, y = self.mesh()
        self.assertEqual((x.relayId, y.relayId), ("pub", "pub"))
        self.assertEqual(pub.member("x").meta[META_REACH], "relay")
        self.assertEqual(y.member("x").meta[META_RELAY], "pub")
        for a, b in ((x, y), (y, x)):
            self.assertEqual(a.linkPath(b.nodeId)["path"], "relayed")
            self.assertIsInstance(self.network.links(a)[b.nodeId].transport, RelayedTransport)
        self.assertEqual(x.linkPath("pub"), {"path": "tcp"})
        self.assertEqual(pub.relay.stats.opened, 1)

        y.addHandler("echo", lambda node, payload: node.encode() + b":" + payload)
        d = x.request("y", "echo", b"through the relay" * 5000)
        self.network.run(2, until=lambda: d.called)
        self.assertEqual(self.successResultOf(d), b"x:" + b"through the relay" * 5000)
        got = []
        x.addHandler("note", lambda node, payload: got.append((node, payload)))
        y.send("x", "note", b"one-way")
        self.network.run(1, until=lambda: got)
        self.assertEqual(got, [("y", b"one-way")])
        stats = pub.relay.stats.node("x")
        self.assertGreater(stats.bytesFrom, 85000)

        # The members file says how each peer is reached.
        x._save()
        saved = {m["nodeId"]: m for m in readMembers(x.dataDir)["members"]}
        self.assertEqual(saved["y"]["path"], "relayed")
        self.assertEqual(saved["y"]["via"], "pub")
        self.assertEqual(saved["pub"]["path"], "tcp")
        self.assertEqual(saved["y"]["reach"], "relay")
        pub._save()
        saved = readMembers(pub.dataDir)
        self.assertEqual(saved["relay"]["opened"], 1)
        self.assertGreater({m["nodeId"]: m for m in saved["members"]}["x"]["relayedFor"]["bytesFrom"], 85000)

        # python -m timtx cluster members shows the paths and counters.
        table = formatMembers(readMembers(x.dataDir)).splitlines()
        self.assertEqual(table[0].split()[-3:], ["PATH", "NAT", "COUNTERS"])
        rows = {line.split()[0]: line for line in table[1:4] if not line.startswith("*")}
        self.assertIn("relayed via pub", rows["y"])
        self.assertIn("behind NAT", rows["y"])
        self.assertRegex(rows["y"], r"relay \d+B out/\d+B in")
        self.assertIn("tcp", rows["pub"])
        self.assertIn("this node cannot be dialled; its relay: pub", table)
        table = formatMembers(saved)
        self.assertIn("relay: 1 circuits open, 1 opened, 0 requests refused", table)
        self.assertRegex(table, r"relayed for it \d+B/\d+B")

    def test_relayLinkLostRecovers(self):
        """
        When the link to the relay breaks, the relayed link goes with it,
        and both come back.
        """
        pub, x, y = self.mesh()
        relayed = self.network.links(y)["x"]
        self.network.links(y)["pub"].transport.abortConnection()
        self.network.run(0.1)
        self.assertIn("link to the relay", relayed.closeReason)
        self.assertIsNot(self.network.links(y).get("x"), relayed)
        self.assertIsNotNone(self.network.run(30, until=self.linked), "mesh not restored")
        self.assertTrue(self.network.allSee("y", ALIVE) and self.network.allSee("x", ALIVE))
        self.assertEqual(y.linkPath("x")["path"], "relayed")

    def test_relayOffStaysApart(self):
        """
        With the relay off, the two unreachable nodes cannot link, and the
        relay counts the refusals.
        """
        net = self.network
        pub = net.natService("pub", enabled=False)
        net.natService("x", seeds=["pub:7946"], reachable=False)
        y = net.natService("y", seeds=["pub:7946"], reachable=False)
        net.run(10)
        self.assertNotIn("x", net.links(y))
        self.assertGreater(pub.relay.stats.refused["this node does not relay"], 0)
        self.assertEqual(pub.relay.circuits(), 0)

    def test_autoReachable(self):
        """
        With reachable = auto a node starts as one that cannot be dialled
        and asks the first reachable member to dial it back: where that
        arrives it becomes reachable (and drops its relay); where it
        cannot, it stays relayed, and the mesh forms either way.
        """
        net = self.network
        pub = net.natService("pub")
        open_ = net.natService("open", seeds=["pub:7946"], reachable=None, dialable=True)
        hidden = net.natService("hidden", seeds=["pub:7946"], reachable=None, dialable=False)
        self.assertFalse(open_.reachable)
        self.assertIsNotNone(net.run(15, until=lambda: net.converged() and self.linked()), "no full mesh")
        self.assertIsNotNone(net.run(5, until=lambda: open_.reachable), "never dialled back")
        self.assertNotIn(META_REACH, pub.member("open").meta)
        self.assertIsNone(open_.relayId)
        self.assertFalse(hidden.reachable)
        self.assertEqual(pub.member("hidden").meta[META_RELAY], "pub")
        # The hidden node's link to the open one is TCP (it dials a
        # reachable node), once the open one says it is reachable.
        self.assertIsNotNone(
            net.run(10, until=lambda: hidden.linkPath("open")["path"] == "tcp" and self.linked()), "not direct TCP"
        )
