# -*- test-case-name: timtx.test.test_peerprotocol -*-
"""
Tests for L{timtx.transports.peer}: the peer protocol on Twisted, over
L{twisted.test.iosim} and L{StringTransport} with a L{Clock}.
"""

import dataclasses
import struct

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from timtx.protocols.peer import DEFAULT_MAX_FRAME_BYTES, CloseCode, PeerConnection, ResponseStatus
from timtx.transports.peer import IPeerHandler, LinkLimits, PeerFactory, PeerProtocol, PeerSettings

SECRET = b"k" * 32


@implementer(IPeerHandler)
class Recorder:
    def __init__(self):
        self.events = []
        self.links = []

    def peerEstablished(self, link):
        self.links.append(link)
        self.events.append(("established", link.peerId))

    def peerMessageReceived(self, link, kind, payload):
        self.events.append(("message", kind, payload))

    def peerRequestReceived(self, link, requestId, kind, payload):
        self.events.append(("request", requestId, kind, payload))
        link.sendResponse(requestId, ResponseStatus.OK, payload.upper())

    def peerResponseReceived(self, link, requestId, status, payload):
        self.events.append(("response", requestId, status, payload))

    def peerLinkLost(self, link, reason):
        self.events.append(("lost", reason))


def settings(nodeId, secret=SECRET, **kwargs):
    return PeerSettings(nodeId, secret, **kwargs)


class Pair:
    """
    Two nodes' links joined by an in-memory wire.
    """

    def __init__(self, serverSettings=None, clientSettings=None, protocol=PeerProtocol):
        self.clock = Clock()
        self.serverHandler, self.clientHandler = Recorder(), Recorder()
        serverFactory = PeerFactory(
            self.serverHandler, serverSettings or settings("server"), self.clock, initiator=False, protocol=protocol
        )
        clientFactory = PeerFactory(
            self.clientHandler, clientSettings or settings("client"), self.clock, initiator=True, protocol=protocol
        )
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: serverFactory.buildProtocol(None), lambda: clientFactory.buildProtocol(None), clock=self.clock
        )
        self.pump.flush()


class PeerProtocolTests(SynchronousTestCase):
    def test_handler(self):
        verifyObject(IPeerHandler, Recorder())

    def test_established(self):
        """
        Both ends authenticate each other and tell their handler.
        """
        pair = Pair()
        self.assertEqual(pair.serverHandler.events, [("established", "client")])
        self.assertEqual(pair.clientHandler.events, [("established", "server")])
        self.assertTrue(pair.client.established and pair.server.established)
        self.assertEqual((pair.client.version, pair.client.initiator, pair.server.initiator), (1, True, False))
        self.assertEqual(pair.server.peerSession, pair.client.settings.session)

    def test_messagesAndRequests(self):
        pair = Pair()
        self.assertTrue(pair.client.sendMessage("note", b"hello"))
        pair.client.sendRequest(9, "shout", b"abc")
        pair.pump.flush()
        self.assertEqual(
            pair.serverHandler.events[1:], [("message", "note", b"hello"), ("request", 9, "shout", b"abc")]
        )
        self.assertEqual(pair.clientHandler.events[1:], [("response", 9, ResponseStatus.OK, b"ABC")])

    def test_wrongSecret(self):
        """
        A peer with another secret is refused with a log line naming it,
        and never established.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pair = Pair(clientSettings=settings("client", secret=b"x" * 32))
        for handler in (pair.serverHandler, pair.clientHandler):
            self.assertEqual([e[0] for e in handler.events], ["lost"])
        self.assertIn("authentication failed", pair.server.closeReason)
        self.assertEqual(pair.server.closeCode, CloseCode.AUTHENTICATION_FAILED)
        texts = [e["reason"] for e in logged if "reason" in e]
        self.assertTrue(any("node client failed authentication" in text for text in texts), texts)

    def test_sendBeforeEstablished(self):
        """
        Nothing is sent before the peer has proved itself.
        """
        link = PeerFactory(Recorder(), settings("a"), Clock(), initiator=True).buildProtocol(None)
        link.makeConnection(StringTransport())
        self.assertFalse(link.sendMessage("m", b"x"))

    def test_closeTellsReason(self):
        pair = Pair()
        pair.client.close(CloseCode.DUPLICATE_LINK, "keeping the other link")
        pair.pump.flush()
        self.assertEqual(pair.server.closeCode, CloseCode.DUPLICATE_LINK)
        self.assertIn("node client closed the link (duplicate link): keeping the other link", pair.server.closeReason)
        self.assertEqual(pair.serverHandler.events[-1][0], "lost")
        self.assertIn("closed by this node", pair.client.closeReason)


class StringTransportTests(SynchronousTestCase):
    """
    One link on a L{StringTransport}, its peer played by a sans-IO
    L{PeerConnection}.
    """

    def connect(self, protocol=PeerProtocol, **kwargs):
        self.clock = Clock()
        self.handler = Recorder()
        factory = PeerFactory(self.handler, settings("local", **kwargs), self.clock, initiator=False, protocol=protocol)
        self.link = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.peer = PeerConnection("remote", SECRET, initiator=True)

    def establish(self):
        self.exchange()
        self.exchange()
        self.assertTrue(self.link.established)

    def exchange(self):
        data = b"".join(self.peer.dataToSend())
        if data:
            self.link.dataReceived(data)
        self.peer.receiveData(self.transport.value())
        self.transport.clear()
        events = []
        while (event := self.peer.nextEvent()) is not None:
            events.append(event)
        return events

    def test_handshakeTimeout(self):
        """
        A peer that never completes the handshake is told why and cut off
        after C{handshakeTimeout}.
        """
        self.connect(handshakeTimeout=3.0)
        self.clock.advance(2.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn(b"no handshake within 3s", self.transport.value())
        self.assertEqual(self.link.closeCode, CloseCode.HANDSHAKE_TIMEOUT)

    def test_handshakeInTimeCancelsTimer(self):
        self.connect(handshakeTimeout=3.0)
        self.establish()
        self.clock.advance(10)
        self.assertFalse(self.transport.disconnecting)

    def test_outputBound(self):
        """
        While the transport is full, what is written is counted; past
        C{maxOutputBytes} the link is dropped.
        """
        self.connect(maxOutputBytes=100000)
        self.establish()
        self.link.pauseProducing()
        for _ in range(9):
            self.assertTrue(self.link.sendMessage("m", b"x" * 10000))
        self.assertFalse(self.transport.disconnecting)
        self.assertFalse(self.link.sendMessage("m", b"x" * 20000))
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.link.closeCode, CloseCode.OVERLOADED)
        self.assertFalse(self.link.sendMessage("m", b"more"))

    def test_trafficCounted(self):
        """
        The settings' L{PeerTraffic} counts every byte the link wrote and
        read, the handshake included, and the links of one node share it.
        """
        self.connect()
        wrote = read = 0
        for _ in range(2):
            incoming = b"".join(self.peer.dataToSend())
            read += len(incoming)
            self.link.dataReceived(incoming)
            wrote += len(self.transport.value())
            self.peer.receiveData(self.transport.value())
            self.transport.clear()
            while self.peer.nextEvent() is not None:
                pass
        self.assertTrue(self.link.established)
        self.link.sendMessage("m", b"x" * 1000)
        wrote += len(self.transport.value())
        self.peer.sendMessage("n", b"y" * 500)
        incoming = b"".join(self.peer.dataToSend())
        read += len(incoming)
        self.link.dataReceived(incoming)
        traffic = self.link.settings.traffic
        self.assertEqual((traffic.sent, traffic.received), (wrote, read))
        self.assertGreater(wrote, 1000)
        other = self.link.factory.buildProtocol(None)
        self.assertIs(other.settings.traffic, traffic)

    def test_resumeResetsBacklog(self):
        self.connect(maxOutputBytes=100000)
        self.establish()
        for _ in range(3):
            self.link.pauseProducing()
            for _ in range(9):
                self.link.sendMessage("m", b"x" * 10000)
            self.link.resumeProducing()
        self.assertFalse(self.transport.disconnected)

    def test_oversizeFrame(self):
        """
        A frame over C{maxFrameBytes} closes the link with the reason sent
        and logged.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.connect(maxFrameBytes=5000)
        self.establish()
        self.link.dataReceived(struct.pack(">I", 5001))
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("exceeds the limit of 5000", self.link.closeReason)
        self.assertIn("refused node remote", logged[-1]["reason"])
        self.peer.receiveData(self.transport.value())
        close = self.peer.nextEvent()
        self.assertEqual(close.code, CloseCode.FRAME_TOO_LARGE)

    def test_malformedBeforeHandshake(self):
        self.connect()
        self.link.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("refused peer", self.link.closeReason)
        self.link.connectionLost(None)
        self.assertEqual(self.handler.events, [("lost", self.link.closeReason)])

    def test_subclassLimits(self):
        """
        A subclass's limits win over the settings, and its hooks run.
        """
        hits = []

        class Small(PeerProtocol):
            maxFrameBytes = 4096
            maxOutputBytes = 1000

            def outputLimitExceeded(self, backlog):
                hits.append(backlog)

        self.connect(protocol=Small, maxFrameBytes=1 << 20, maxOutputBytes=1 << 20)
        self.establish()
        self.link.pauseProducing()
        self.link.sendMessage("m", b"x" * 2000)
        self.assertEqual(len(hits), 1)
        self.peer.sendMessage("m", b"y" * 5000)
        self.link.dataReceived(b"".join(self.peer.dataToSend()))
        self.assertIn("exceeds the limit of 4096", self.link.closeReason)

    def test_linkLimitsPerLink(self):
        """
        L{PeerProtocol.linkLimits} decides a link's limits; by default each
        unset class attribute takes the settings' value.
        """

        class Strict(PeerProtocol):
            handshakeTimeout = 1.0

            def linkLimits(self):
                return dataclasses.replace(super().linkLimits(), linkTimeout=0.5)

        self.connect(protocol=Strict, handshakeTimeout=9.0, maxOutputBytes=12345)
        self.assertEqual(self.link.limits, LinkLimits(DEFAULT_MAX_FRAME_BYTES, 12345, 1.0, 0.5))

    def test_livenessPing(self):
        """
        Output with no input back for C{linkTimeout} brings a PING; still
        nothing for as long again closes the link.
        """
        self.connect(linkTimeout=4.0)
        self.establish()
        self.link.sendMessage("m", b"x")
        self.exchange()
        self.clock.advance(4.0)
        self.assertIn(b"alive?", self.transport.value())
        self.clock.advance(4.0)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.link.closeCode, CloseCode.NOT_RESPONDING)

    def test_livenessAnswered(self):
        """
        A PONG (or anything) from the peer keeps the link.
        """
        self.connect(linkTimeout=4.0)
        self.establish()
        self.link.sendMessage("m", b"x")
        self.exchange()
        self.clock.advance(4.0)
        events = self.exchange()
        self.assertEqual(type(events[-1]).__name__, "PingReceived")
        self.peer.sendPong(events[-1].data)
        self.exchange()
        self.clock.advance(20.0)
        self.assertFalse(self.transport.disconnecting)

    def test_pingAnswered(self):
        self.connect()
        self.establish()
        self.peer.sendPing(b"hi")
        events = self.exchange()
        self.assertEqual(type(events[-1]).__name__, "PongReceived")
        self.assertEqual(events[-1].data, b"hi")
