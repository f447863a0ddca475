# -*- test-case-name: timtx.test.test_wsspeed -*-
"""
Tests for L{timtx.transports.wsspeed}: the speed-ups give autobahn's
bytes, touch no other autobahn protocol, and still fit the autobahn
installed.
"""

import os
import pprint
import random

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket import protocol as autobahnProtocol
from autobahn.websocket import xormasker
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from timtx.transports import wsspeed
from timtx.transports.websocket import binaryFrameHeader
from timtx.transports.wsspeed import SMALL_FRAME, FastUnmasking, QuietReads, QuietSettings, SmallXorMasker, maskerFor


class SmallXorMaskerTests(SynchronousTestCase):
    def test_sameAsAutobahn(self):
        """
        For random masks, lengths and chunkings, the small masker unmasks
        exactly as autobahn's own.
        """
        rng = random.Random(7)
        for _ in range(300):
            mask = os.urandom(4)
            data = os.urandom(rng.randrange(0, 300))
            ours = SmallXorMasker(mask)
            theirs = xormasker.create_xor_masker(mask, len(data))
            position = 0
            while position < len(data):
                step = rng.randrange(1, 40)
                chunk = data[position : position + step]
                self.assertEqual(ours.process(chunk), bytes(theirs.process(chunk)))
                self.assertEqual(ours.pointer(), theirs.pointer())
                position += step

    def test_largeFramesKeepAutobahns(self):
        """
        Frames over L{SMALL_FRAME} bytes are unmasked by autobahn's masker.
        """
        self.assertNotIsInstance(maskerFor(b"abcd", SMALL_FRAME + 1), SmallXorMasker)
        self.assertIsInstance(maskerFor(b"abcd", 10), SmallXorMasker)


class _TunedServer(FastUnmasking, QuietReads, QuietSettings, WebSocketServerProtocol):  # type: ignore[misc]
    """
    The speed-ups on a plain autobahn server that records what it gets.
    """

    def onOpen(self):
        self.factory.received = []

    def onMessage(self, payload, isBinary):
        self.factory.received.append(payload)


class _Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.append(self)


def _connect(serverFactory):
    """
    An autobahn client connected to C{serverFactory} over an in-memory
    wire; returns the client protocol and the pump.
    """
    clock = Clock()
    serverFactory.reactor = clock
    # autobahn's factories time a closing handshake on the global reactor,
    # whatever their reactor: a test that closes would leave that timer to
    # the tests after it.  These wires close by being pumped.
    serverFactory.setProtocolOptions(closeHandshakeTimeout=0)
    clientFactory = WebSocketClientFactory("ws://localhost/tim", reactor=clock)
    clientFactory.protocol = _Client
    clientFactory.opened = []
    client, server, pump = iosim.connectedServerAndClient(
        lambda: serverFactory.buildProtocol(None), lambda: clientFactory.buildProtocol(None)
    )
    pump.flush()
    return client, server, pump


class AutobahnStillFitsTests(SynchronousTestCase):
    """
    What the speed-ups rely on in autobahn.  If an autobahn release changes
    it, these fail.
    """

    def serverFactory(self):
        factory = WebSocketServerFactory("ws://localhost/tim")
        factory.protocol = _TunedServer
        factory.setProtocolOptions(applyMask=False, maxMessagePayloadSize=1 << 20)
        return factory

    def test_framesArriveWhole(self):
        """
        With autobahn's unmasking off and L{FastUnmasking} on, masked client
        frames of every size, whole and fragmented, arrive as sent.
        """
        factory = self.serverFactory()
        client, server, pump = _connect(factory)
        self.assertEqual(client.factory.opened, [client])
        sizes = [0, 1, 3, 125, 126, 4000, SMALL_FRAME, SMALL_FRAME + 1, 70000]
        sent = [os.urandom(n) for n in sizes]
        for payload in sent:
            client.sendMessage(payload, isBinary=True)
        client.sendMessage(b"fragmented " * 1000, isBinary=True, fragmentSize=777)
        sent.append(b"fragmented " * 1000)
        pump.flush()
        self.assertEqual(factory.received, sent)

    def test_maskerReplacedAtFrameBegin(self):
        """
        autobahn installs its null masker when C{applyMask} is off and calls
        C{onFrameBegin} before any payload is unmasked.
        """
        factory = self.serverFactory()
        client, server, pump = _connect(factory)
        seen = []
        original = server.onFrameBegin

        def spy():
            seen.append(type(server.current_frame_masker))
            original()
            seen.append(type(server.current_frame_masker))

        server.onFrameBegin = spy
        # A fragmented message: its frames go through autobahn's parser
        # (whole single frames are read by QuietReads).
        client.sendMessage(b"hello", isBinary=True, fragmentSize=3)
        pump.flush()
        self.assertEqual(seen, [xormasker.XorMaskerNull, SmallXorMasker] * 2)
        self.assertEqual(factory.received, [b"hello"])

    def test_readsWithoutDebugText(self):
        """
        With L{QuietReads}, frames arrive as with autobahn's own reader, and
        the adapter's per-read debug arguments are never formatted.
        """
        import autobahn.twisted.websocket as adapter

        styled = []

        def counting(value, *args, **kwargs):
            styled.append(value)
            return str(value)

        factory = self.serverFactory()
        client, server, pump = _connect(factory)
        self.patch(adapter, "hlval", counting)
        self.patch(adapter, "hltype", counting)
        client.sendMessage(b"quiet", isBinary=True)
        pump.flush()
        self.assertEqual(factory.received, [b"quiet"])
        self.assertEqual(styled, [])

    def test_settingsCopied(self):
        """
        L{QuietSettings} copies every setting autobahn would, and autobahn
        itself copies none for its classes.
        """
        self.assertEqual(QuietSettings.SETTINGS, tuple(WebSocketServerProtocol.CONFIG_ATTRS))
        self.assertEqual(_TunedServer.CONFIG_ATTRS, ())
        factory = self.serverFactory()
        client, server, pump = _connect(factory)
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            self.assertEqual(getattr(server, name), getattr(factory, name), name)
        self.assertEqual(server.maxMessagePayloadSize, 1 << 20)


def _clientFrame(payload, opcode=2, fin=True, mask=None, masked=True, rsv=0):
    """
    The bytes of one client frame, built by hand so that tests can send
    what autobahn's client would not (unmasked, long length encodings).
    """
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    maskBit = 0x80 if masked else 0
    if size < 126:
        header = bytes((first, maskBit | size))
    elif size < 65536:
        header = bytes((first, maskBit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, maskBit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return header + payload
    mask = os.urandom(4) if mask is None else mask
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class _Recording(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.factory.received.append((payload, isBinary))


class _TunedRecording(FastUnmasking, QuietReads, QuietSettings, _Recording):  # type: ignore[misc]
    pass


_STATS = (
    "incomingOctetsWireLevel",
    "incomingOctetsWebSocketLevel",
    "incomingOctetsAppLevel",
    "incomingWebSocketFrames",
    "incomingWebSocketMessages",
)


class FastReadsTests(SynchronousTestCase):
    """
    L{QuietReads} takes whole binary frames itself; whatever the bytes, a
    server with it receives, answers and counts exactly what autobahn's
    own reader does.
    """

    def servers(self, **options):
        """
        An open tuned server and an open plain autobahn one, each with the
        same options, on in-memory wires.
        """
        pair = []
        for protocol, extra in ((_TunedRecording, {"applyMask": False}), (_Recording, {})):
            factory = WebSocketServerFactory("ws://localhost/tim")
            factory.protocol = protocol
            factory.setProtocolOptions(**{**options, **extra})
            client, server, pump = _connect(factory)
            factory.received = []
            pair.append((server, pump))
        return pair

    def assertSameReading(self, chunks, **options):
        (tuned, _), (plain, _) = self.servers(**options)
        written = []
        for server in (tuned, plain):
            for chunk in chunks:
                server.dataReceived(chunk)
            written.append(b"".join(server.transport.stream))
        self.assertEqual(tuned.factory.received, plain.factory.received)
        self.assertEqual(tuned.state, plain.state)
        for name in _STATS:
            self.assertEqual(getattr(tuned.trafficStats, name), getattr(plain.trafficStats, name), name)
        self.assertEqual(written[0], written[1])
        return tuned

    def test_wholeFramesTaken(self):
        """
        Whole small binary frames, many in one read, arrive without
        autobahn's frame parser.
        """
        (tuned, pump), _ = self.servers()
        tuned.processData = lambda: self.fail("autobahn's parser ran")
        sent = [os.urandom(n) for n in (0, 1, 5, 125, 126, 300, SMALL_FRAME)]
        tuned.dataReceived(b"".join(_clientFrame(p) for p in sent) + _clientFrame(b"zero", mask=b"\0\0\0\0"))
        self.assertEqual(tuned.factory.received, [(p, True) for p in sent] + [(b"zero", True)])

    def test_randomStreams(self):
        """
        Random mixes of frames (binary, text, fragments, pings, empty,
        larger than L{SMALL_FRAME}), cut at random places, read the same.
        """
        rng = random.Random(11)
        for _ in range(60):
            frames = []
            for _ in range(rng.randrange(1, 12)):
                kind = rng.randrange(6)
                payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 7, 125, 126, 200))))
                if kind == 0:
                    frames.append(_clientFrame("text é".encode(), opcode=1))
                elif kind == 1:
                    frames.append(_clientFrame(payload[:50], opcode=2, fin=False))
                    frames.append(_clientFrame(payload[50:], opcode=0))
                elif kind == 2:
                    frames.append(_clientFrame(b"ping", opcode=9))
                elif kind == 3:
                    frames.append(_clientFrame(os.urandom(SMALL_FRAME + rng.randrange(1, 100))))
                else:
                    frames.append(_clientFrame(payload))
            stream = b"".join(frames)
            cuts = sorted(rng.sample(range(1, len(stream)), min(rng.randrange(0, 6), len(stream) - 1)))
            chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
            self.assertSameReading(chunks)

    def test_refusedAsAutobahnRefuses(self):
        """
        Frames autobahn refuses (unmasked, over the size limit, a 16-bit
        length that fits in 7 bits, reserved bits) after good ones in the
        same read: the good ones arrive, and autobahn refuses the rest
        with the same close frame.
        """
        good = _clientFrame(b"good")
        for bad in (
            _clientFrame(b"unmasked", masked=False),
            _clientFrame(b"x" * 2000),
            bytes((0x82, 0x80 | 126)) + (5).to_bytes(2, "big") + b"\0\0\0\0" + b"short",
            _clientFrame(b"rsv", rsv=1),
        ):
            tuned = self.assertSameReading([good + bad + good], maxFramePayloadSize=1000)
            self.assertEqual(tuned.factory.received, [(b"good", True)])

    def test_closedByTheMessage(self):
        """
        A message whose handler closes the connection: the frames after it
        are read by autobahn in its closing state, as without the fast path.
        """

        class Closing(_TunedRecording):
            def onMessage(self, payload, isBinary):
                super().onMessage(payload, isBinary)
                if payload == b"close":
                    self.sendClose(1000)

        factory = WebSocketServerFactory("ws://localhost/tim")
        factory.protocol = Closing
        factory.setProtocolOptions(applyMask=False)
        client, server, pump = _connect(factory)
        factory.received = []
        server.dataReceived(_clientFrame(b"one") + _clientFrame(b"close") + _clientFrame(b"after"))
        self.assertEqual(server.state, server.STATE_CLOSING)
        self.assertEqual([p for p, _ in factory.received], [b"one", b"close", b"after"])


class FramedSendsTests(SynchronousTestCase):
    """
    A single session's frames are framed by timtx, byte for byte as
    autobahn frames them.
    """

    def test_headerAsAutobahns(self):
        factory = WebSocketServerFactory("ws://localhost/tim")
        for size in (0, 1, 125, 126, 127, 65535, 65536, 70000):
            payload = os.urandom(size)
            self.assertEqual(
                binaryFrameHeader(size) + payload, factory.prepareMessage(payload, isBinary=True).payloadHybi, size
            )

    def test_sendBytes(self):
        """
        L{TimWebSocketServerProtocol.sendBytes} writes the parts as one
        frame, as autobahn's C{sendMessage} would.
        """
        from collections import deque

        from twisted.internet.testing import StringTransport

        from timtx.transports.websocket import TimWebSocketServerProtocol

        protocol = TimWebSocketServerProtocol.__new__(TimWebSocketServerProtocol)
        protocol.state = protocol.STATE_OPEN
        protocol._perMessageCompress = None
        protocol.send_queue = deque()
        protocol.transport = StringTransport()
        protocol.sendBytes([b"\x82head", b"payload" * 30])
        factory = WebSocketServerFactory("ws://localhost/tim")
        expected = factory.prepareMessage(b"\x82head" + b"payload" * 30, isBinary=True).payloadHybi
        self.assertEqual(protocol.transport.value(), expected)


class NoProcessWideChangeTests(SynchronousTestCase):
    """
    timtx changes nothing inside autobahn for anyone else.
    """

    def test_autobahnModuleUntouched(self):
        """
        After timtx's WebSocket protocol has been imported and used, autobahn's
        module-level names are its own and C{str(Timings())} works.
        """
        from timtx.transports.websocket import TimWebSocketServerProtocol

        factory = WebSocketServerFactory("ws://localhost/tim")
        factory.protocol = _TunedServer
        _connect(factory)
        self.assertTrue(issubclass(TimWebSocketServerProtocol, FastUnmasking))
        self.assertIs(autobahnProtocol.create_xor_masker, xormasker.create_xor_masker)
        self.assertIs(autobahnProtocol.pformat, pprint.pformat)
        self.assertIsInstance(str(autobahnProtocol.Timings()), str)
        self.assertFalse(hasattr(wsspeed, "tune"))

    def test_plainProtocolUntouched(self):
        """
        A plain autobahn server protocol in the same process keeps autobahn's
        settings list and unmasks with autobahn's maskers.
        """
        self.assertTrue(WebSocketServerProtocol.CONFIG_ATTRS)
        factory = WebSocketServerFactory("ws://localhost/tim")
        received = []

        class Plain(WebSocketServerProtocol):
            def onMessage(self, payload, isBinary):
                received.append((payload, type(self.current_frame_masker)))

        factory.protocol = Plain
        client, server, pump = _connect(factory)
        self.assertTrue(server.applyMask)
        client.sendMessage(b"plain", isBinary=True)
        pump.flush()
        self.assertEqual(received[0][0], b"plain")
        self.assertNotEqual(received[0][1], SmallXorMasker)
