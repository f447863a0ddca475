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
        client.sendMessage(b"hello", isBinary=True)
        pump.flush()
        self.assertEqual(seen, [xormasker.XorMaskerNull, SmallXorMasker])
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
