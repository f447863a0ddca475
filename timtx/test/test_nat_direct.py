# -*- test-case-name: timtx.test.test_nat_direct -*-
"""
Tests for L{timtx.nat.direct}: what decides whether two members punch, and
how coordination messages are answered, on a fake cluster and a
L{MemoryReactorClock} (no sockets).  The punch and the channel themselves
are tested in test_nat_punch, test_nat_quic and test_nat_netns, and the
whole in network namespaces in test_nat_mesh.
"""

import socket
from dataclasses import dataclass, field

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from timtx.config import NatConfig
from timtx.nat.coordination import PunchInitiator
from timtx.nat.direct import KIND, META_MAPPED, META_MAPPING, META_STUN, DirectPaths
from timtx.nat.discovery import Filtering, Mapping, NatReport
from timtx.nat.stun import Address

SECRET = b"cluster-secret-for-tests"
EIM = Mapping.ENDPOINT_INDEPENDENT.value


@dataclass
class FakeMember:
    nodeId: str
    meta: dict = field(default_factory=dict)
    live: bool = True


@dataclass
class FakeSettings:
    secret: bytes = SECRET


class FakeCluster:
    """
    The hooks L{DirectPaths} uses, recording what it does.
    """

    def __init__(self, nodeId="b", reachable=False):
        self.nodeId = nodeId
        self.reachable = reachable
        self.address = "127.0.0.1:7946"
        self.settings = FakeSettings()
        self.ready = succeed(None)
        self.members = {}
        self.paths = {}
        self.sent = []
        self.natMeta = {}
        self.handlers = {}

    def addHandler(self, kind, handler):
        self.handlers[kind] = handler

    def send(self, nodeId, kind, payload):
        self.sent.append((nodeId, kind, payload))
        return Deferred()

    def member(self, nodeId):
        return self.members.get(nodeId)

    def liveMembers(self):
        return [m for m in self.members.values() if m.live]

    def addObserver(self, observer):
        pass

    def addLinkObserver(self, observer):
        pass

    def addPathInfo(self, provider):
        pass

    def setNatMeta(self, entries):
        self.natMeta = dict(entries)

    def linkPath(self, nodeId):
        return {"path": self.paths.get(nodeId)}


class FakeUdpPort:
    """
    A UDP port and its transport: datagrams written are recorded; the
    handle is a real (unbound) socket, for the TTL of pre-open probes.
    """

    def __init__(self, port, interface):
        self.port, self.interface = port, interface
        self.written = []
        self.stopped = False
        self.handle = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def write(self, data, address):
        self.written.append((data, address))

    def getHandle(self):
        return self.handle

    def getHost(self):
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def stopListening(self):
        self.stopped = True
        self.handle.close()


class UdpReactor(MemoryReactorClock):
    """
    A memory reactor that records UDP listeners as (port, protocol,
    maxPacketSize, interface).
    """

    def __init__(self):
        super().__init__()
        self.udpServers = []
        self.udpPorts = []

    #: Ports that are taken: listening there fails.
    taken = ()

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if port in self.taken:
            raise CannotListenError(interface, port, OSError("taken"))
        self.udpServers.append((port, protocol, maxPacketSize, interface))
        udp = FakeUdpPort(port, interface)
        self.udpPorts.append(udp)
        protocol.makeConnection(udp)
        return udp


def report(mapping=Mapping.ENDPOINT_INDEPENDENT):
    return NatReport(
        Address.of("10.1.0.10", 5000),
        Address.of("198.18.1.2", 5000),
        mapping,
        Filtering.ADDRESS_AND_PORT_DEPENDENT,
        False,
    )


class DirectPathsTests(SynchronousTestCase):
    def start(self, nodeId="b", reachable=False, **nat):
        self.reactor = UdpReactor()
        self.cluster = FakeCluster(nodeId, reachable)
        self.paths = DirectPaths(self.cluster, self.reactor, NatConfig(**nat))
        self.paths.startService()
        return self.paths

    def test_reachableRunsStun(self):
        """
        A reachable node with a STUN port runs a server on each of its
        STUN addresses and advertises them; without one it runs none.
        """
        self.start(reachable=True, stun_port=3478, stun_interface="203.0.113.10, 203.0.113.20")
        self.assertEqual(self.cluster.natMeta, {META_STUN: "203.0.113.10:3478,203.0.113.20:3478"})
        self.assertEqual(
            sorted((port, interface) for port, _, _, interface in self.reactor.udpServers),
            [(3478, "203.0.113.10"), (3478, "203.0.113.20"), (3479, "203.0.113.10"), (3479, "203.0.113.20")],
        )
        self.start(reachable=True)
        self.assertEqual((self.cluster.natMeta, self.reactor.udpServers), ({}, []))

    def test_stunPortTaken(self):
        """
        A STUN port already taken is a warning: no half server stays open
        (its primary port is closed if the alternate cannot be had), and
        nothing is advertised.
        """
        self.reactor = UdpReactor()
        self.reactor.taken = (3479,)
        self.cluster = FakeCluster(reachable=True)
        paths = DirectPaths(self.cluster, self.reactor, NatConfig(stun_port=3478, stun_interface="203.0.113.10"))
        paths.startService()
        self.assertEqual([udp.stopped for udp in self.reactor.udpPorts], [True])
        self.assertEqual(self.cluster.natMeta, {})
        self.assertEqual(paths.stunServices, [])

    def test_natdNodeDiscovers(self):
        """
        A NAT'd node opens its UDP socket and takes the first two STUN
        addresses its members advertise for discovery.
        """
        paths = self.start(udp_port=4000)
        self.assertEqual(self.reactor.udpServers[0][0], 4000)
        self.assertIn(KIND, self.cluster.handlers)
        self.cluster.members["pub"] = FakeMember("pub", {META_STUN: "203.0.113.20:3478,203.0.113.10:3478,bad"})
        self.cluster.members["other"] = FakeMember("other", {META_STUN: "203.0.113.30:3478"})
        self.assertEqual(paths.servers(), [Address.of("203.0.113.30", 3478), Address.of("203.0.113.20", 3478)])

    def test_whyNot(self):
        """
        A punch is tried only with a live member whose NAT, like this
        node's, maps endpoint-independently, and only over a relayed link.
        """
        paths = self.start()
        self.cluster.members["c"] = peer = FakeMember("c", {})
        self.assertEqual(paths.whyNot("c"), "this node's NAT does not map endpoint-independently")
        paths.report = report(Mapping.ENDPOINT_DEPENDENT)
        self.assertEqual(paths.whyNot("c"), "this node's NAT does not map endpoint-independently")
        paths.report = report()
        self.assertEqual(paths.whyNot("c"), "its NAT does not map endpoint-independently")
        peer.meta = {META_MAPPING: Mapping.ENDPOINT_DEPENDENT.value, META_MAPPED: "198.18.2.2:5000"}
        self.assertEqual(paths.whyNot("c"), "its NAT does not map endpoint-independently")
        peer.meta = {META_MAPPING: EIM, META_MAPPED: "198.18.2.2:5000"}
        self.assertEqual(paths.whyNot("c"), "not relayed")
        self.cluster.paths["c"] = "direct"
        self.assertEqual(paths.whyNot("c"), "not relayed")
        self.cluster.paths["c"] = "relayed"
        self.assertIsNone(paths.whyNot("c"))
        peer.live = False
        self.assertEqual(paths.whyNot("c"), "not a live member")

    def test_smallerIdStarts(self):
        """
        Of two eligible nodes the one with the smaller id starts (a STUN
        binding first, then Connect over the relayed link); the other
        waits to be asked.
        """
        paths = self.start(nodeId="b")
        paths.report, paths.mapped = report(), report().mapped
        for name in ("a", "c"):
            self.cluster.members[name] = FakeMember(name, {META_MAPPING: EIM, META_MAPPED: "198.18.2.2:5000"})
            self.cluster.paths[name] = "relayed"
        paths._considerAll()
        self.assertEqual([to for to, kind, _ in self.cluster.sent], ["c"])
        self.assertEqual(paths.pathInfo("c")["punch"]["attempts"], 1)
        self.assertEqual(paths.pathInfo("a"), {})
        # No answer: the attempt times out, and the next follows.
        self.reactor.advance(paths.nat.punch_timeout)
        self.assertEqual(paths.pathInfo("c")["punch"]["failures"], 1)
        self.assertIn("TimeoutError", paths.pathInfo("c")["punch"]["lastError"])
        self.reactor.advance(1.0)
        self.assertEqual(paths.pathInfo("c")["punch"]["attempts"], 2)
        paths.stopService()

    def test_unpunchableDoesNotAnswer(self):
        """
        A node whose NAT maps endpoint-dependently does not answer a
        Connect (the initiator's attempt times out); a forged one is
        refused; an eligible one answers with its own Connect.
        """
        paths = self.start(nodeId="b")
        connect = PunchInitiator(SECRET, [Address.of("198.18.1.2", 5000)]).start(0)
        paths.report, paths.mapped = report(Mapping.ENDPOINT_DEPENDENT), report().mapped
        self.cluster.handlers[KIND]("a", connect)
        self.assertEqual(self.cluster.sent, [])
        paths.report = report()
        forged = PunchInitiator(b"another cluster's secret", [Address.of("198.18.1.2", 5000)]).start(0)
        self.cluster.handlers[KIND]("a", forged)
        self.assertEqual(self.cluster.sent, [])
        self.cluster.handlers[KIND]("a", connect)
        self.assertEqual([(to, kind) for to, kind, _ in self.cluster.sent], [("a", KIND)])
        # It pre-opened towards the initiator's address.
        udp = paths.udp
        self.assertTrue(udp.written)
        self.assertEqual({address for _, address in udp.written}, {("198.18.1.2", 5000)})
        paths.stopService()
