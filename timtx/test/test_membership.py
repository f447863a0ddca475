# -*- test-case-name: timtx.test.test_membership -*-
"""
Tests for L{timtx.cluster.membership}: the cluster service.

L{FakeNetworkTests} run several services on one L{MemoryReactorClock}
joined by in-memory links (L{twisted.test.iosim}): deterministic, no
sockets, simulated time.  L{LoopbackTests} run them over real TCP on
127.0.0.1 (ports chosen by the OS), with and without TLS.
"""

import dataclasses
import json
import os
import random
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.cluster.membership import (
    MEMBERS_FILE,
    ClusterService,
    PeerBusy,
    PeerRequestError,
    PeerRequestFailed,
    PeerTimeout,
    PeerUnavailable,
    _Pending,
    checkClusterConfig,
    loadNodeId,
    loadSecret,
    readMembers,
)
from timtx.cluster.ownership import Ownership
from timtx.cluster.swim import ChangeKind, MemberState
from timtx.cluster.testing import clusterCertificates
from timtx.config import ClusterConfig, Config, ConfigError, load, replace
from timtx.protocols.peer import CloseCode
from timtx.transports.peer import PeerTLS

SECRET = b"cluster-secret-for-tests"
ALIVE, SUSPECT, DEAD, LEFT = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


class FakeEndpoint:
    def __init__(self, network, address):
        self.network = network
        self.address = address

    def connect(self, factory):
        return self.network.connect(self.address, factory)


class IteratingClock(MemoryReactorClock):
    """
    A clock whose L{advance} is one reactor iteration's timer phase: it
    runs only the calls due when it starts; calls they add for now wait for
    the next one, after the I/O in between (L{FakeNetwork.flush}), as on a
    real reactor.
    """

    def advance(self, amount):
        self.rightNow += amount
        self._sortCalls()
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


class FakeNetwork:
    """
    Services on one clock, linked in memory.  A crashed address accepts no
    dial and its links go silent.
    """

    def __init__(self, testCase, clock=None):
        self.testCase = testCase
        self.clock = clock or MemoryReactorClock()
        self.listeners = {}
        self.pumps = []
        self.silent = set()
        self.crashed = set()
        self.services = {}

    def connect(self, address, factory):
        listener = self.listeners.get(address)
        if listener is None or address in self.silent:
            return fail(ConnectionRefusedError(address))
        server = listener.buildProtocol(None)
        client = factory.buildProtocol(None)
        serverTransport = iosim.FakeTransport(server, isServer=True)
        clientTransport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, serverTransport, client, clientTransport, greet=False, clock=self.clock)
        pump.address = address
        pump.source = factory.settings.nodeId
        self.pumps.append(pump)
        return succeed(client)

    def service(self, name, seeds=(), dataDir=None, dialable=True, serviceArgs=None, features=(), **cluster):
        """
        Start node C{name}; C{dialable} false keeps others from dialling it,
        C{serviceArgs} go to L{ClusterService} as they are, C{features}
        are offered before it starts.
        """
        config = ClusterConfig(
            listen="tcp:0:interface=127.0.0.1",
            advertise=f"{name}:7946",
            seeds=tuple(seeds),
            **cluster,
        )
        network = self

        class Service(ClusterService):
            def endpointFor(self, address):
                return FakeEndpoint(network, address)

        service = Service(
            config,
            self.clock,
            nodeId=name,
            secret=cluster.pop("secret", SECRET) if "secret" in cluster else SECRET,
            dataDir=dataDir or self.testCase.mktemp(),
            rng=random.Random(name),
            **(serviceArgs or {}),
        )
        for feature in features:
            service.offer(feature)
        service.startService()
        if dialable:
            self.listeners[config.advertise] = self.clock.tcpServers[-1][1]
        self.silent.discard(config.advertise)
        self.crashed.discard(name)
        self.services[name] = service
        self.testCase.assertIsNone(self.testCase.successResultOf(service.ready))
        return service

    def flush(self):
        for _ in range(1000):
            moved = False
            for pump in list(self.pumps):
                if pump.address in self.silent or pump.source in self.crashed:
                    continue
                if pump.pump(advanceClock=False):
                    moved = True
            if not moved:
                return
        raise AssertionError("the network never went quiet")

    def run(self, seconds, step=0.02, until=None):
        """
        Advance time in steps, moving data after each; stop early when
        C{until()} holds and return the time taken (or C{None}).
        """
        elapsed = 0.0
        self.flush()
        while elapsed < seconds - 1e-9:
            if until is not None and until():
                return elapsed
            self.clock.advance(step)
            elapsed += step
            self.flush()
        return elapsed if until is not None and until() else None

    def crash(self, name):
        """
        The node stops answering: its links go silent and dials to it fail.
        """
        service = self.services.pop(name)
        self.silent.add(service.address)
        self.crashed.add(name)
        service._stopping = True
        if service._timer is not None and service._timer.active():
            service._timer.cancel()

    def stop(self, name):
        service = self.services.pop(name)
        d = service.stopService()
        self.flush()
        self.testCase.successResultOf(d)
        self.listeners.pop(service.address, None)

    def links(self, service):
        return {nodeId: peer.link for nodeId, peer in service._peers.items() if peer.link is not None}

    def allSee(self, nodeId, state):
        return all(
            (s.member(nodeId).state if s.member(nodeId) else None) is state
            for name, s in self.services.items()
            if name != nodeId
        )

    def converged(self):
        names = set(self.services)
        return all({m.nodeId for m in s.liveMembers()} == names for s in self.services.values())


class FakeNetworkTests(SynchronousTestCase):
    def setUp(self):
        self.net = FakeNetwork(self)

    def mesh(self, n=3, **cluster):
        names = [f"node{i}" for i in range(n)]
        for name in names:
            self.net.service(name, seeds=[f"{names[0]}:7946"], **cluster)
        took = self.net.run(5.0, until=self.net.converged)
        self.assertIsNotNone(took, "the cluster never converged")
        # Links to members learnt last are being dialled: let them form.
        self.net.run(1.0)
        return [self.net.services[name] for name in names]

    def test_mesh(self):
        """
        Nodes started with one seed form a full mesh: each sees all alive,
        keeps exactly one link to each other node, the same link at both
        ends, and computes the same ownership.
        """
        services = self.mesh(4)
        for service in services:
            links = self.net.links(service)
            self.assertEqual(set(links), {s.nodeId for s in services} - {service.nodeId})
            for nodeId, link in links.items():
                other = self.net.links(self.net.services[nodeId])[service.nodeId]
                self.assertEqual(link.linkId, other.linkId)
                self.assertTrue(link.established)
        self.assertEqual({s.ownership for s in services}, {Ownership(s.nodeId for s in services)})
        member = services[0].member("node2")
        self.assertEqual((member.address, member.state), ("node2:7946", ALIVE))

    def test_seedIsSelf(self):
        """
        A node whose seeds include its own address does not dial itself.
        """
        a = self.net.service("a", seeds=["a:7946"])
        b = self.net.service("b", seeds=["a:7946", "b:7946"])
        self.assertIsNotNone(self.net.run(3.0, until=self.net.converged))
        self.assertEqual((a._seedDialers, b._seedDialers), ({}, {}))

    def test_silentCrashDetected(self):
        """
        A node that stops answering is declared dead by all within 5 s, and
        the links to it are closed.
        """
        services = self.mesh(5)
        observed = []
        services[0].addObserver(observed.append)
        self.net.crash("node3")
        took = self.net.run(10.0, until=lambda: self.net.allSee("node3", DEAD))
        self.assertIsNotNone(took)
        self.assertLess(took, 5.0)
        self.assertEqual([c.kind for c in observed if c.member.nodeId == "node3"][-1], ChangeKind.DIED)
        self.net.flush()
        for service in self.net.services.values():
            self.assertNotIn("node3", self.net.links(service))
            self.assertNotIn("node3", service.ownership)

    def test_restartSeen(self):
        """
        A node killed and started again before anyone held it dead is
        reported to restart observers once its new run links up, before
        anything of that run is handled; a link that merely drops and
        comes back to the same run is not a restart.
        """
        node0, node1 = self.mesh(2, leave_on_stop=False)
        restarted = []
        node0.addRestartObserver(restarted.append)
        self.net.links(node0)["node1"].transport.loseConnection()
        self.assertIsNotNone(self.net.run(3.0, until=lambda: "node1" in self.net.links(node0)))
        self.assertEqual(restarted, [])
        dataDir = node1.dataDir
        self.net.crash("node1")
        handled = []
        node0.addHandler("hello", lambda node, payload: handled.append(list(restarted)))
        new = self.net.service("node1", seeds=["node0:7946"], dataDir=dataDir)
        self.assertIsNotNone(self.net.run(3.0, until=lambda: "node0" in new.ownership))
        new.send("node0", "hello", b"")
        self.assertIsNotNone(self.net.run(3.0, until=lambda: handled))
        self.assertEqual((restarted, handled), (["node1"], [["node1"]]))
        self.assertTrue(self.net.allSee("node1", ALIVE))

    def test_gracefulStop(self):
        """
        A node that stops tells the others, who see it left at once.
        """
        self.mesh(3)
        self.net.stop("node2")
        self.net.run(0.1)
        self.assertTrue(self.net.allSee("node2", LEFT))

    def test_restartRemembersMembers(self):
        """
        A node restarted with no seeds rejoins through the members it saved,
        with a higher incarnation.
        """
        self.mesh(3, leave_on_stop=False)
        old = self.net.services["node1"]
        incarnation = old.swim.incarnation
        dataDir = old.dataDir
        self.net.stop("node1")
        saved = json.load(open(os.path.join(dataDir, MEMBERS_FILE)))
        self.assertEqual({m["nodeId"] for m in saved["members"]}, {"node0", "node1", "node2"})
        self.assertEqual(readMembers(dataDir), saved)
        new = self.net.service("node1", seeds=(), dataDir=dataDir)
        took = self.net.run(5.0, until=self.net.converged)
        self.assertIsNotNone(took)
        self.assertGreater(new.swim.incarnation, incarnation)

    def test_request(self):
        """
        A request reaches the handler of its kind on the other node, and the
        handler's result comes back.
        """
        a, b, c = self.mesh(3)
        c.addHandler("reverse", lambda nodeId, payload: nodeId.encode() + b":" + payload[::-1])
        d = a.request("node2", "reverse", b"abc")
        self.net.flush()
        self.assertEqual(self.successResultOf(d), b"node0:cba")

    def test_requestDeferredAnswer(self):
        a, b = self.mesh(2)
        answers = []

        def later(nodeId, payload):
            answers.append(Deferred())
            return answers[-1]

        b.addHandler("later", later)
        d = a.request("node1", "later", b"")
        self.net.flush()
        self.assertNoResult(d)
        answers[0].callback(None)
        self.net.flush()
        self.assertEqual(self.successResultOf(d), b"")

    def test_requestErrors(self):
        """
        No handler, a handler's own error and a handler crash each fail the
        request with a short reason; the crash is logged where it happened.
        """
        a, b = self.mesh(2)

        def refuse(nodeId, payload):
            raise PeerRequestError("not today")

        def crash(nodeId, payload):
            raise ZeroDivisionError("secret internals")

        b.addHandler("refuse", refuse)
        b.addHandler("crash", crash)
        results = [a.request("node1", kind, b"") for kind in ("nothing", "refuse", "crash")]
        self.net.flush()
        reasons = [self.failureResultOf(d, PeerRequestFailed).value.reason for d in results]
        self.assertEqual(reasons, ["no handler for 'nothing'", "not today", "internal error"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_requestTimeout(self):
        a, b = self.mesh(2)
        b.addHandler("never", lambda nodeId, payload: Deferred())
        d = a.request("node1", "never", b"", timeout=2.0)
        self.net.run(1.9)
        self.assertNoResult(d)
        self.net.run(0.2)
        self.failureResultOf(d, PeerTimeout)
        self.assertEqual(a._peers["node1"].requests, {})

    def test_inflightBound(self):
        """
        Past C{max_inflight_requests} waiting on one peer, a request fails
        at once as busy; the responder applies the same bound.
        """
        a, b = self.mesh(2, max_inflight_requests=2)
        b.addHandler("never", lambda nodeId, payload: Deferred())
        first = [a.request("node1", "never", b"") for _ in range(2)]
        self.failureResultOf(a.request("node1", "never", b""), PeerBusy)
        self.net.flush()
        for d in first:
            self.assertNoResult(d)
        # The responder's own bound: requests from b's other link would be
        # refused; here b serving 2 already answers a third as busy.
        b._peers["node0"].serving = 2
        a._peers["node1"].requests.clear()
        d = a.request("node1", "never", b"")
        self.net.flush()
        self.failureResultOf(d, PeerBusy)

    def test_linkLostFailsRequests(self):
        """
        When the link to a peer is lost, requests waiting on it fail at
        once: they may or may not have been handled.
        """
        a, b = self.mesh(2)
        b.addHandler("never", lambda nodeId, payload: Deferred())
        d = a.request("node1", "never", b"")
        self.net.flush()
        self.net.links(a)["node1"].transport.loseConnection()
        self.net.flush()
        self.assertIn("link lost", self.failureResultOf(d, PeerUnavailable).value.reason)

    def test_send(self):
        """
        One-way messages reach the handler; to this node too; to an unknown
        node they fail.
        """
        a, b = self.mesh(2)
        got = []
        for service in (a, b):
            service.addHandler("note", lambda nodeId, payload, s=service: got.append((s.nodeId, nodeId, payload)))
        self.successResultOf(a.send("node1", "note", b"hi"))
        self.successResultOf(a.send("node0", "note", b"me"))
        self.net.run(0.1)
        self.assertEqual(sorted(got), [("node0", "node0", b"me"), ("node1", "node0", b"hi")])
        self.failureResultOf(a.send("nobody", "note", b""), PeerUnavailable)
        self.failureResultOf(a.request("nobody", "note", b""), PeerUnavailable)

    def test_requestToSelf(self):
        a, b = self.mesh(2)
        a.addHandler("upper", lambda nodeId, payload: payload.upper())
        self.assertEqual(self.successResultOf(a.request("node0", "upper", b"x")), b"X")
        self.failureResultOf(a.request("node0", "none", b"x"), PeerRequestFailed)

    def test_features(self):
        """
        Each node learns the features it and a peer both offered on their
        link (none from a node never linked); a feature is named as a kind.
        """
        seed = "a:7946"
        a = self.net.service("a", features=("room.order", "only.a"))
        b = self.net.service("b", seeds=[seed], features=("room.order", "only.b"))
        c = self.net.service("c", seeds=[seed])
        self.assertIsNotNone(self.net.run(5.0, until=self.net.converged))
        self.net.run(1.0)
        self.assertEqual(a.peerFeatures("b"), frozenset({"room.order"}))
        self.assertEqual(b.peerFeatures("a"), frozenset({"room.order"}))
        self.assertEqual(a.peerFeatures("c"), frozenset())
        self.assertEqual(c.peerFeatures("a"), frozenset())
        self.assertEqual(a.peerFeatures("nobody"), frozenset())
        self.assertRaises(ValueError, a.offer, "bad feature")

    def test_kinds(self):
        a = self.net.service("a")
        self.assertRaises(ValueError, a.addHandler, "swim", lambda *args: None)
        self.assertRaises(ValueError, a.addHandler, "bad kind", lambda *args: None)
        a.addHandler("x", lambda *args: None)
        self.assertRaises(ValueError, a.addHandler, "x", lambda *args: None)
        a.removeHandler("x")
        a.addHandler("x", lambda *args: None)
        self.assertRaises(ValueError, a.send, "b", "swim", b"")

    def test_duplicateLinksResolved(self):
        """
        Two nodes that dial each other at once end with one link, the same
        at both ends.
        """
        a = self.net.service("a")
        b = self.net.service("b")
        # Make each know the other, so both dial at once.
        a._remembered = ["b:7946"]
        b._remembered = ["a:7946"]
        a._dialSeeds()
        b._dialSeeds()
        self.assertIsNotNone(self.net.run(3.0, until=self.net.converged))
        # The link given up is read a while longer (see the next test).
        self.net.run(a.config.handshake_timeout + 1.0)
        linkA, linkB = self.net.links(a)["b"], self.net.links(b)["a"]
        self.assertEqual(linkA.linkId, linkB.linkId)
        open_ = [p for p in self.net.pumps if not p.clientIO.disconnected]
        self.assertEqual(len(open_), 1)

    def test_requestOnLinkGivenUp(self):
        """
        A request a node wrote on the link its peer gives up for a
        duplicate, before it chose alike, is still read and answered (on
        the link kept): the peer reads the link it gave up until
        C{handshake_timeout} has passed.  Closed at once, the request was
        lost and waited its whole timeout (found by the group simulation:
        a login's registration and a room's, after a node restarted).
        """
        a = self.net.service("a")
        b = self.net.service("b")
        b.addHandler("upper", lambda node, payload: payload.upper())
        a._remembered = ["b:7946"]
        b._remembered = ["a:7946"]
        a._dialSeeds()
        b._dialSeeds()
        self.assertIsNotNone(self.net.run(3.0, until=self.net.converged))
        self.assertEqual(len(a._retiring), 1)
        [givenUp] = a._retiring
        peer = a._peers["b"]
        self.assertIsNot(givenUp, peer.link)
        # What a would have written on it before it had the other link.
        requestId = peer.newRequestId()
        answered = Deferred()
        peer.requests[requestId] = _Pending(answered, self.net.clock.callLater(10.0, lambda: None))
        givenUp.sendRequest(requestId, "upper", b"still read")
        self.net.run(0.5)
        self.assertEqual(self.successResultOf(answered), b"STILL READ")

    def test_wrongSecretNeverJoins(self):
        """
        A node with another secret is refused by every node, with a log
        line, and keeps trying with backoff.
        """
        self.mesh(2)
        intruder = self.net.service("intruder", seeds=["node0:7946"], secret=b"another-secret-entirely")
        self.net.run(3.0)
        self.assertEqual([m.nodeId for m in intruder.liveMembers()], ["intruder"])
        for service in (self.net.services["node0"], self.net.services["node1"]):
            self.assertIsNone(service.member("intruder"))
        self.assertGreater(intruder._seedDialers["node0:7946"].failures, 2)

    def test_observersAndAdvertise(self):
        """
        Observers see members change; advertised client addresses reach the
        other nodes.
        """
        a, b = self.mesh(2)
        seen = []
        a.addObserver(seen.append)
        b.advertise(clientAddresses=["ws://b/tim"], meta={"region": "eu"})
        self.net.run(1.0)
        member = a.member("node1")
        self.assertEqual((member.clientAddresses, dict(member.meta)), (("ws://b/tim",), {"region": "eu"}))
        self.assertEqual([c.kind for c in seen], [ChangeKind.UPDATED])
        a.removeObserver(seen.append)

    def test_failingObserver(self):
        a, b = self.mesh(2)

        def broken(change):
            raise RuntimeError("observer bug")

        a.addObserver(broken)
        b.advertise(meta={"x": "y"})
        self.net.run(1.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(a.member("node1").meta, {"x": "y"})

    def test_badSwimMessage(self):
        """
        A malformed membership message from an authenticated peer is logged
        and dropped; the link stays.
        """
        a, b = self.mesh(2)
        self.net.links(a)["node1"].sendMessage("swim", b"{not json")
        self.net.run(1.0)
        self.assertIn("node0", self.net.links(b))
        self.assertTrue(self.net.converged())

    def test_lateTimerReadsFirstAndCountsLag(self):
        """
        When the reactor comes round to a probe's deadlines late, with the
        ack already waiting unread, the service lets it read first (Twisted
        runs due timers before I/O): no suspicion.  The lateness is reported
        to the core as lag, which pads its timeouts.
        """
        self.net = FakeNetwork(self, IteratingClock())
        a, b = self.mesh(2)
        self.net.silent.add(b.address)
        probes = []
        while not probes:
            self.net.clock.advance(0.01)
            probes = [p for p in a.swim._acks.values() if getattr(p, "target", None) == "node1"]
        # a's reactor is busy for a whole probe period: the probe's timeout
        # and end are both due when it comes round, and b's ack arrives
        # meanwhile.
        self.net.clock.advance(a.swimConfig.probeInterval + 0.1)
        self.net.silent.discard(b.address)
        self.net.flush()
        self.net.clock.advance(0)
        self.net.flush()
        self.assertTrue(probes[0].acked)
        self.assertIs(a.member("node1").state, ALIVE)
        self.assertGreater(a.swim.localLag(self.net.clock.seconds()), a.swimConfig.probeTimeout)
        self.assertEqual(b.member("node0").state, ALIVE)


class ConfigTests(SynchronousTestCase):
    def config(self, **cluster):
        base = dataclasses.replace(Config(), base_dir=self.mktemp())
        os.makedirs(base.base_dir)
        values = {"listen": "tcp:7946:interface=10.0.0.1", "secret": "s" * 16}
        values.update(cluster)
        return replace(base, cluster=values)

    def test_iniSection(self):
        """
        The [cluster] section parses with its types.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[cluster]\nlisten = tcp:7946:interface=10.0.0.1\nseeds = 10.0.0.2:7946, [fd00::3]:7946\n")
            f.write("probe_interval = 0.5\nnode_id = eu-1\n")
        config = load(path)
        self.assertEqual(config.cluster.seeds, ("10.0.0.2:7946", "[fd00::3]:7946"))
        self.assertEqual((config.cluster.probe_interval, config.cluster.node_id), (0.5, "eu-1"))
        self.assertEqual(Config().cluster.listen, "")

    def test_iniErrors(self):
        for text, fragment in [
            ("seeds = nohost", "host:port"),
            ("seeds = h:0", "host:port"),
            ("node_id = has space", "letters, digits"),
            ("indirect_probes = 99", "from 0 to 16"),
        ]:
            path = self.mktemp()
            with open(path, "w") as f:
                f.write(f"[cluster]\n{text}\n")
            error = self.assertRaises(ConfigError, load, path)
            self.assertIn(fragment, str(error))
            self.assertEqual(error.section, "cluster")

    def test_crossChecks(self):
        """
        Keys that depend on each other are checked together, naming the key.
        """
        cases = [
            ({"probe_timeout": 0.5}, "probe_timeout"),
            ({"secret": ""}, "secret"),
            ({"secret_file": "x"}, "secret"),
            ({"tls_cert": "c.pem"}, "tls_cert"),
            ({"listen": "tcp:7946"}, "advertise"),
            ({"listen": "ssl:7946:interface=1.2.3.4"}, "listen"),
        ]
        for values, key in cases:
            error = self.assertRaises(ConfigError, checkClusterConfig, self.config(**values))
            self.assertEqual(error.key, key)
        checkClusterConfig(self.config(listen="tcp:7946", advertise="node.example:7946"))
        checkClusterConfig(self.config(listen=""))

    def test_secrets(self):
        config = self.config()
        self.assertEqual(loadSecret(config), b"s" * 16)
        self.assertRaises(ConfigError, loadSecret, self.config(secret="short"))
        path = os.path.join(config.base_dir, "secret")
        with open(path, "wb") as f:
            f.write(b"  from-a-file-0123456789\n")
        fromFile = replace(config, cluster={"secret": "", "secret_file": "secret"})
        self.assertEqual(loadSecret(fromFile), b"from-a-file-0123456789")
        error = self.assertRaises(ConfigError, loadSecret, self.config(secret="", secret_file="missing"))
        self.assertEqual(error.key, "secret_file")

    def test_nodeIdKept(self):
        directory = self.mktemp()
        first = loadNodeId(directory)
        self.assertEqual(loadNodeId(directory), first)
        self.assertEqual(len(first), 16)

    def test_fromConfig(self):
        config = self.config()
        self.assertRaises(ConfigError, ClusterService.fromConfig, self.config(listen=""), MemoryReactorClock())
        service = ClusterService.fromConfig(config, MemoryReactorClock())
        self.assertEqual(service.nodeId, loadNodeId(config.data_path()))
        self.assertEqual(ClusterService.fromConfig(self.config(node_id="n-1"), MemoryReactorClock()).nodeId, "n-1")
        error = self.assertRaises(
            ConfigError, ClusterService.fromConfig, self.config(tls_cert="a", tls_key="b", tls_ca="c"), reactor
        )
        self.assertEqual(error.key, "tls_cert")


def noDelay(link):
    """
    Whether the socket under a link has C{TCP_NODELAY} set.
    """
    transport = link.transport
    if isinstance(transport, TLSMemoryBIOProtocol):
        # Its handle is the TLS connection; the socket is one floor down.
        transport = transport.transport
    return bool(transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class LoopbackTests(TestCase):
    """
    Real services over TCP on 127.0.0.1.
    """

    timeout = 60

    @inlineCallbacks
    def start(self, name, seeds=(), dataDir=None, tls=None, **cluster):
        config = ClusterConfig(listen="tcp:0:interface=127.0.0.1", seeds=tuple(seeds), **cluster)
        service = ClusterService(
            config,
            reactor,
            nodeId=name,
            secret=SECRET,
            dataDir=dataDir or self.mktemp(),
            tls=tls,
        )
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        yield service.ready
        return service

    @inlineCallbacks
    def waitFor(self, predicate, seconds=15.0):
        for _ in range(int(seconds / 0.02)):
            if predicate():
                return
            d = Deferred()
            reactor.callLater(0.02, d.callback, None)
            yield d
        self.fail(f"{predicate} stayed false for {seconds}s")

    def converged(self, services):
        names = {s.nodeId for s in services}
        return lambda: all({m.nodeId for m in s.liveMembers()} == names for s in services)

    @inlineCallbacks
    def mesh(self, tls=None, **cluster):
        first = yield self.start("a", tls=tls and tls("a"), **cluster)
        others = []
        for name in "bc":
            service = yield self.start(name, seeds=[first.address], tls=tls and tls(name), **cluster)
            others.append(service)
        services = [first, *others]
        yield self.waitFor(self.converged(services))
        return services

    @inlineCallbacks
    def test_meshKillRestartRequest(self):
        """
        Three nodes on real TCP form a mesh, answer each other's requests,
        detect a killed one (its links dropped without a word), and take it
        back when it restarts with only its saved members to go on.
        """
        a, b, c = yield self.mesh(leave_on_stop=False)
        c.addHandler("echo", lambda nodeId, payload: payload + b" from " + nodeId.encode())
        answer = yield a.request("c", "echo", b"hello")
        self.assertEqual(answer, b"hello from a")

        dataDir = c.dataDir
        start = reactor.seconds()
        yield c.stopService()
        yield self.waitFor(lambda: all(s.member("c").state is DEAD for s in (a, b)))
        # Generous: the simulated bound is 5 s; this is a real machine.
        self.assertLess(reactor.seconds() - start, 10.0)

        c2 = yield self.start("c", dataDir=dataDir, leave_on_stop=False)
        yield self.waitFor(self.converged([a, b, c2]))
        self.assertNotEqual(c2.address, c.address)
        self.assertEqual(a.member("c").address, c2.address)
        c2.addHandler("echo", lambda nodeId, payload: payload)
        answer = yield b.request("c", "echo", b"back")
        self.assertEqual(answer, b"back")

    @inlineCallbacks
    def test_leave(self):
        a, b, c = yield self.mesh()
        yield c.stopService()
        yield self.waitFor(lambda: all(s.member("c").state is LEFT for s in (a, b)))

    @inlineCallbacks
    def test_tls(self):
        """
        With mutual TLS each node presents a certificate from the cluster CA
        and the mesh forms as without.
        """
        caPath, issued = clusterCertificates(self.mktemp(), ["a", "b", "c"])

        def tls(name):
            return PeerTLS.fromFiles(issued[name][0], issued[name][1], caPath)

        a, b, c = yield self.mesh(tls=tls)
        c.addHandler("echo", lambda nodeId, payload: payload)
        answer = yield a.request("c", "echo", b"over tls")
        self.assertEqual(answer, b"over tls")
        link = a._peers["c"].link
        self.assertIsNotNone(link.transport.getPeerCertificate())
        self.assertTrue(noDelay(link), "Nagle's algorithm still on under TLS")

    @inlineCallbacks
    def test_linksSendSmallWritesAtOnce(self):
        """
        Links between nodes turn Nagle's algorithm off, on both sides: a
        small answer is not held back behind the previous one's
        acknowledgement.
        """
        a, b, c = yield self.mesh()

        def linksOf(service):
            return [peer.link for peer in service._peers.values() if peer.link is not None]

        # Members agree before every link is up (a duplicate pair of links
        # may still be being resolved).
        yield self.waitFor(lambda: all(len(linksOf(service)) == 2 for service in (a, b, c)))
        for service in (a, b, c):
            for link in linksOf(service):
                self.assertTrue(noDelay(link), f"{service.nodeId}: Nagle's algorithm still on")

    @inlineCallbacks
    def test_tlsForeignCA(self):
        """
        A node whose certificate another CA issued is refused by TLS, before
        the peer handshake.
        """
        caPath, issued = clusterCertificates(self.mktemp(), ["a"])
        otherCA, otherIssued = clusterCertificates(self.mktemp(), ["b"], ca="other CA")
        a = yield self.start("a", tls=PeerTLS.fromFiles(issued["a"][0], issued["a"][1], caPath))
        b = yield self.start(
            "b", seeds=[a.address], tls=PeerTLS.fromFiles(otherIssued["b"][0], otherIssued["b"][1], caPath)
        )
        yield self.waitFor(
            lambda: b._seedDialers.get(a.address) is not None and b._seedDialers[a.address].failures >= 2
        )
        self.assertIsNone(a.member("b"))
        self.assertEqual([m.nodeId for m in b.liveMembers()], ["b"])


class CloseCodeTests(SynchronousTestCase):
    def test_closeCodesKnown(self):
        self.assertEqual(CloseCode.DUPLICATE_LINK, 6)


class MembersCommandTests(SynchronousTestCase):
    def test_members(self):
        """
        C{python -m timtx.cluster members} prints the view a node saved.
        """
        import io

        from timtx.cluster.__main__ import main

        net = FakeNetwork(self)
        dataDir = self.mktemp()
        a = net.service("a", dataDir=dataDir)
        net.service("b", seeds=["a:7946"])
        net.run(3.0, until=net.converged)
        net.stop("a")
        ini = os.path.join(self.mktemp())
        with open(ini, "w") as f:
            f.write(f"[node]\ndata_dir = {os.path.abspath(dataDir)}\n")
        out = io.StringIO()
        self.assertEqual(main(["members", "--config", ini], out), 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(
            lines[0].split()[:7], ["NODE", "STATE", "INCARNATION", "PEER", "ADDRESS", "CLIENT", "ADDRESSES"]
        )
        self.assertEqual(lines[1].split()[:3], ["*", "a", "left"])
        self.assertEqual(lines[2].split()[:2], ["b", "alive"])
        self.assertIn("as saved by node a", lines[-1])
        out = io.StringIO()
        main(["members", "--config", ini, "--json"], out)
        self.assertEqual(json.loads(out.getvalue())["nodeId"], a.nodeId)

    def test_fromTimtxCommand(self):
        """
        C{python -m timtx cluster members} is the same command.
        """
        import io
        import sys

        from timtx.__main__ import main

        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write(f"[node]\ndata_dir = {os.path.abspath(self.mktemp())}\n")
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["cluster", "members", "--config", ini]), 1)
        self.assertIn("has not taken part in a cluster", err.getvalue())

    def test_noView(self):
        from timtx.cluster.__main__ import main

        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write(f"[node]\ndata_dir = {os.path.abspath(self.mktemp())}\n")
        import io

        err = io.StringIO()
        self.assertEqual(main(["members", "--config", ini], err=err), 1)
        self.assertIn("has not taken part in a cluster", err.getvalue())
        self.assertEqual(main(["members", "--config", ini + ".missing"], err=err), 2)
        self.assertIn("cannot read the file", err.getvalue())
