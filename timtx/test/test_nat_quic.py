# -*- test-case-name: timtx.test.test_nat_quic -*-
"""
Tests for L{timtx.nat.quic}: a protocol over a QUIC stream over a punched
path, between real sockets on loopback.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from timtx.nat import punch
from timtx.nat.client import NatSocket
from timtx.nat.coordination import PunchInitiator, PunchResponder
from timtx.nat.punch import PunchedPath
from timtx.nat.quic import NodeCertificate, NotAuthenticated, PathLost, QuicChannel

reactor: Any = _reactor


class Recorder(Protocol):
    """
    Keeps what arrives; echoes it back if C{echo}.
    """

    def __init__(self, echo: bool = False):
        self.echo = echo
        self.received = bytearray()
        self.lost: defer.Deferred = defer.Deferred()
        self.reasons: list = []
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reasons.append(reason)
        self.lost.callback(None)


def factoryOf(protocol: Protocol) -> Factory:
    return Factory.forProtocol(lambda: protocol)


class ChannelTests(TestCase):
    """
    A punched path on loopback, then a QUIC channel over it.
    """

    timeout = 30

    def socket(self, host: str) -> NatSocket:
        sock = NatSocket(reactor, None)
        port = reactor.listenUDP(0, sock, interface=host)
        self.ports.append(port)
        return sock

    def setUp(self) -> None:
        self.ports: list = []
        self.addCleanup(lambda: defer.gatherResults([p.stopListening() for p in self.ports if p.connected]))

    @defer.inlineCallbacks
    def punched(self, certificate: NodeCertificate):
        a, b = self.socket("127.0.0.1"), self.socket("127.0.0.2")
        initiator = PunchInitiator(b"secret", [a.address])
        responder = PunchResponder(b"secret", [b.address], certificate=certificate.der)
        now = reactor.seconds()
        early = responder.receive(initiator.start(now), now)
        assert early.send is not None
        step = initiator.receive(early.send, now)
        assert step.send is not None and step.plan is not None
        late = responder.receive(step.send, now)
        assert late.plan is not None
        paths = yield defer.gatherResults(
            [punch.punch(a, step.plan, reactor, linger=0.5), punch.punch(b, late.plan, reactor, linger=0.5)]
        )
        for path in paths:
            self.addCleanup(path.puncher.stop)
        return paths

    @defer.inlineCallbacks
    def channels(self, client: Protocol, server: Protocol, **kw):
        certificate = NodeCertificate.generate()
        pathA, pathB = yield self.punched(certificate)
        chA = QuicChannel.connect(pathA, factoryOf(client), reactor, NodeCertificate.generate(), **kw)
        chB = QuicChannel.connect(pathB, factoryOf(server), reactor, certificate, **kw)
        self.addCleanup(chA.close)
        self.addCleanup(chB.close)
        return chA, chB

    @defer.inlineCallbacks
    def test_bothWaysInOrder(self):
        """
        A protocol's writes reach the peer's protocol in order, and the
        echo comes back in order; the transport is an C{ITransport}.
        """
        client, server = Recorder(), Recorder(echo=True)
        chA, chB = yield self.channels(client, server)
        yield chA.ready
        self.assertTrue(verifyObject(ITransport, client.transport))
        chunks = [os.urandom(200) for _ in range(500)]
        for chunk in chunks[:250]:
            client.transport.write(chunk)
        client.transport.writeSequence(chunks[250:])
        expected = b"".join(chunks)
        for _ in range(100):
            if len(client.received) >= len(expected):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(bytes(server.received), expected)
        self.assertEqual(bytes(client.received), expected)
        self.assertEqual(client.transport.getPeer().port, chA.peer.port)
        self.assertEqual(server.transport.getPeer().host, "127.0.0.1")

    @defer.inlineCallbacks
    def test_loseConnection(self):
        """
        C{loseConnection} on one side ends both protocols cleanly.
        """
        client, server = Recorder(), Recorder()
        chA, chB = yield self.channels(client, server)
        yield chA.ready
        client.transport.write(b"bye")
        client.transport.loseConnection()
        yield server.lost
        yield client.lost
        self.assertEqual(bytes(server.received), b"bye")
        server.reasons[0].trap(ConnectionDone)
        client.reasons[0].trap(ConnectionDone)

    @defer.inlineCallbacks
    def test_pathLost(self):
        """
        When the peer stops answering (its socket closes), the protocol gets
        L{PathLost} within the consent timeout.
        """
        client, server = Recorder(), Recorder()
        chA, chB = yield self.channels(client, server, keepalive=0.2, consentTimeout=1.0)
        yield chA.ready
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertTrue(server.made)
        # Silence B without telling A: B's socket stops passing it packets.
        del chB.path.socket.quicHandlers[chB.peer]
        started = reactor.seconds()
        yield client.lost
        client.reasons[0].trap(PathLost)
        self.assertLess(reactor.seconds() - started, 3.0)
        self.assertGreater(chA.stats.pings, 0)

    @defer.inlineCallbacks
    def test_wrongClientProof(self):
        """
        A client that cannot prove it holds the session key is refused: the
        server's protocol is never connected.
        """
        client, server = Recorder(), Recorder()
        chA, chB = yield self.channels(client, server)
        chA._proof = b"x" * 32
        yield client.lost
        self.assertFalse(server.made)
        client.reasons[0].trap(NotAuthenticated)
        yield self.assertFailure(chB.ready, ConnectionLost)

    @defer.inlineCallbacks
    def test_wrongServerCertificate(self):
        """
        A server whose certificate is not the one the coordination named is
        refused by the client's TLS.
        """
        announced = NodeCertificate.generate()
        pathA, pathB = yield self.punched(announced)
        client, server = Recorder(), Recorder()
        chA = QuicChannel.connect(pathA, factoryOf(client), reactor, NodeCertificate.generate())
        chB = QuicChannel.connect(pathB, factoryOf(server), reactor, NodeCertificate.generate())
        self.addCleanup(chB.close)
        self.addCleanup(chA.close)
        chB.ready.addErrback(lambda _: None)
        error = yield self.assertFailure(chA.ready, ConnectionLost)
        self.assertIn("certificate", str(error))
        self.assertFalse(client.made)
        self.assertFalse(server.made)

    def test_pathRequired(self) -> None:
        """
        The initiator needs the responder's certificate.
        """
        from timtx.nat.coordination import PunchPlan
        from timtx.nat.stun import Address

        plan = PunchPlan(bytes(16), bytes(32), True, (Address("127.0.0.1", 1),), b"")
        path = PunchedPath(NatSocket(reactor, None), Address("127.0.0.1", 1), plan, 0.0)
        self.assertRaises(
            ValueError, QuicChannel.connect, path, factoryOf(Recorder()), reactor, NodeCertificate.generate()
        )
