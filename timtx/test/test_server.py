# -*- test-case-name: timtx.test.test_server -*-
"""
Tests for L{timtx.transports.server} on a L{StringTransport} with a fake
clock: no sockets, no sleeps.  The same behaviour through a listening node
is tested in L{timtx.test.test_login}.
"""

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from timtx.interfaces import IClientNode, IFrameSink, ISession
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.frames import LengthPrefixedDecoder, client_frame, length_prefixed, parse_server_frame
from timtx.protocols.structs import TimAck, TimAuth, TimMessage
from timtx.testing import MemoryClientNode
from timtx.transports.tcp import TimTcpServerProtocol


class _Wire:
    """
    A raw TCP client's view of a protocol on a L{StringTransport}.
    """

    def __init__(self, protocolClass=TimTcpServerProtocol, **sections):
        self.node = MemoryClientNode(**sections)
        self.transport = StringTransport()
        self.protocol = self.node.connect(protocolClass, self.transport)
        self._decoder = LengthPrefixedDecoder(1 << 24)

    def send(self, timType, body=None, encoding=Encoding.COMPACT):
        payload = b"" if body is None else codec.encode(body, encoding)
        self.protocol.dataReceived(length_prefixed(client_frame(timType, payload, encoding)))

    def login(self, name="ann"):
        self.send(TimType.TIMAUTH, TimAuth(name=name, pwd="secret"))
        (ack,) = self.acks()
        assert ack.ok, ack
        return self.protocol.session

    def frames(self):
        self._decoder.feed(self.transport.value())
        self.transport.clear()
        frames = []
        while (frame := self._decoder.next_frame()) is not None:
            frames.append(parse_server_frame(frame))
        return frames

    def acks(self):
        return [codec.decode(TimAck, f.payload, Encoding.COMPACT) for f in self.frames() if f.timType == TimType.TIMACK]

    @property
    def closed(self):
        return self.transport.disconnecting


class SeamTests(SynchronousTestCase):
    def test_providers(self):
        """
        The memory node, a connection and its session provide the seams
        they stand for.
        """
        wire = _Wire()
        session = wire.login()
        self.assertTrue(verifyObject(IClientNode, wire.node))
        self.assertTrue(verifyObject(IFrameSink, wire.protocol))
        self.assertTrue(verifyObject(ISession, session))
        self.assertEqual(wire.node.ready, [session])


class OrderTests(SynchronousTestCase):
    def test_framesHandledInOrder(self):
        """
        Frames of one connection are handled in arrival order even when the
        handlers' work completes in reverse order: a frame's handler starts
        only after the previous one's L{Deferred} fired.
        """
        wire = _Wire()
        wire.login()
        work = {i: Deferred() for i in range(10)}
        started = []

        def slow(session, message):
            started.append(message.id)
            d = work[message.id]
            d.addCallback(lambda _: session.sendAck(TimType.TIMMESSAGE, t=message.id))
            return d

        wire.node.route(TimType.TIMMESSAGE, TimMessage, slow)
        for i in range(10):
            wire.send(TimType.TIMMESSAGE, TimMessage(msType=2, odType=1, id=i))
        for i in reversed(range(1, 10)):
            work[i].callback(None)
        self.assertEqual((started, wire.acks()), ([0], []))
        work[0].callback(None)
        self.assertEqual(started, list(range(10)))
        self.assertEqual([ack.t for ack in wire.acks()], list(range(10)))

    def test_pingsDoNotWait(self):
        """
        A ping is answered at once even while a handler is busy.
        """
        wire = _Wire()
        wire.login()
        wire.node.route(TimType.TIMMESSAGE, TimMessage, lambda session, message: Deferred())
        wire.send(TimType.TIMMESSAGE, TimMessage(msType=2, odType=1, id=1))
        wire.send(TimType.TIMPING)
        self.assertEqual([f.timType for f in wire.frames()], [TimType.TIMPING])


class TimeoutTests(SynchronousTestCase):
    def test_authTimeout(self):
        """
        A connection that does not log in within C{auth_timeout} seconds is
        closed.
        """
        wire = _Wire(client={"auth_timeout": 5.0})
        wire.node.clock.advance(4.9)
        self.assertFalse(wire.closed)
        wire.node.clock.advance(0.2)
        self.assertTrue(wire.closed)

    def test_idleTimeout(self):
        """
        A logged-in connection without a frame for C{idle_timeout} seconds is
        closed; each frame starts the wait again.
        """
        wire = _Wire(client={"idle_timeout": 10.0})
        wire.login()
        wire.node.clock.advance(9)
        wire.send(TimType.TIMPING)
        wire.node.clock.advance(9)
        self.assertFalse(wire.closed)
        wire.node.clock.advance(1.1)
        self.assertTrue(wire.closed)

    def test_rateLimit(self):
        """
        Frames over C{request_rate} get 5105, and pass again once the clock
        has refilled the bucket.
        """
        wire = _Wire(client={"request_rate": 1.0, "request_burst": 3})
        wire.login()
        for _ in range(3):
            wire.send(TimType.TIMPING)
        frames = wire.frames()
        self.assertEqual([f.timType for f in frames], [TimType.TIMPING, TimType.TIMPING, TimType.TIMACK])
        refused = codec.decode(TimAck, frames[2].payload, Encoding.COMPACT)
        self.assertEqual(refused.error.code, ErrorCode.ERR_OVERHZ)
        wire.node.clock.advance(1.0)
        wire.send(TimType.TIMPING)
        self.assertEqual([f.timType for f in wire.frames()], [TimType.TIMPING])

    def test_rateLimitNamesTheMessage(self):
        """
        A message refused for the rate carries its id in C{t}, in both
        encodings, so that the client knows which one to send again.
        """
        for encoding in Encoding:
            wire = _Wire(client={"request_rate": 1.0, "request_burst": 1})
            wire.login()
            wire.node.route(TimType.TIMMESSAGE, TimMessage, lambda session, message: None)
            wire.send(TimType.TIMMESSAGE, TimMessage(msType=2, odType=1, id=77, dataString="hi"), encoding)
            (frame,) = wire.frames()
            refused = codec.decode(TimAck, frame.payload, Encoding.COMPACT)
            self.assertEqual((refused.error.code, refused.t), (ErrorCode.ERR_OVERHZ, 77))


class _SmallFrames(TimTcpServerProtocol):
    maxFrameBytes = 64
    maxBadFrames = 2
    maxOutputBytes = 100


class _Dropping(TimTcpServerProtocol):
    """
    Overrides what happens at the output limit.
    """

    maxOutputBytes = 100
    over = 0

    def outputLimitExceeded(self):
        self.over += 1


class SubclassLimitTests(SynchronousTestCase):
    """
    Limits are class attributes a subclass overrides, with the node's
    C{[client]} settings as defaults, and hooks say what happens at each.
    """

    def test_defaultsFromConfig(self):
        """
        Without overrides, a connection's limits are the node's settings.
        """
        wire = _Wire(client={"max_frame_bytes": 1000, "max_bad_frames": 7})
        self.assertEqual((wire.protocol.limits.maxFrameBytes, wire.protocol.limits.maxBadFrames), (1000, 7))

    def test_frameLimit(self):
        """
        A frame over the subclass's C{maxFrameBytes} gets 4112 and a close,
        though the node's limit is larger.
        """
        wire = _Wire(_SmallFrames)
        wire.login()
        wire.send(TimType.TIMMESSAGE, TimMessage(msType=2, odType=1, dataString="x" * 100))
        (ack,) = wire.acks()
        self.assertEqual(ack.error.code, ErrorCode.ERR_BIGDATA)
        self.assertTrue(wire.closed)

    def test_badFrames(self):
        """
        The subclass's C{maxBadFrames} closes the connection.
        """
        wire = _Wire(_SmallFrames)
        wire.login()
        wire.protocol.dataReceived(length_prefixed(bytes([TimType.TIMMESSAGE]) + b"\xff\xff"))
        self.assertFalse(wire.closed)
        wire.protocol.dataReceived(length_prefixed(bytes([TimType.TIMMESSAGE]) + b"\xff\xff"))
        self.assertTrue(wire.closed)

    def test_outputLimitHook(self):
        """
        Past C{maxOutputBytes} unread, L{outputLimitExceeded} runs; the
        default drops the connection.
        """
        wire = _Wire(_Dropping)
        session = wire.login()
        wire.protocol.pauseProducing()
        for _ in range(30):
            session.sendAck(TimType.TIMPING)
        self.assertGreater(wire.protocol.over, 0)
        self.assertFalse(wire.closed)

        dropping = _Wire(_SmallFrames)
        session = dropping.login()
        dropping.protocol.pauseProducing()
        for _ in range(30):
            session.sendAck(TimType.TIMPING)
        self.assertTrue(dropping.closed)
