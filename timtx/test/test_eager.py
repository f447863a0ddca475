"""
Tests for L{timtx.transports.eager}: fan-out writes on a real loopback
TCP connection.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from timtx.transports.eager import writeNow


class _Accepting(ServerFactory):
    def __init__(self) -> None:
        self.accepted: Deferred[Protocol] = Deferred()

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = Protocol()
        self.accepted.callback(protocol)
        return protocol


class WriteNowTests(TestCase):
    @inlineCallbacks
    def connection(self) -> Any:
        """
        A server-side TCP transport of this reactor and the blocking client
        socket at its other end.
        """
        factory = _Accepting()
        port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.setblocking(False)
        server = yield factory.accepted
        # Accepted, not yet connected: the transport is set after buildProtocol.
        yield deferLater(reactor, 0, lambda: None)
        self.addCleanup(server.transport.loseConnection)
        return server.transport, client

    @inlineCallbacks
    def test_sentAtOnce(self) -> Any:
        """
        On an idle connection the bytes are in the peer's socket before the
        reactor runs again, and nothing is left buffered.
        """
        transport, client = yield self.connection()
        writeNow(transport, b"frame")
        self.assertEqual(client.recv(100), b"frame")
        self.assertNotIn(transport, reactor.getWriters())

    @inlineCallbacks
    def test_behindBuffered(self) -> Any:
        """
        Behind bytes still buffered, the bytes wait their turn: the peer gets
        both in the order written.
        """
        transport, client = yield self.connection()
        transport.write(b"first ")
        writeNow(transport, b"second")
        self.assertRaises(BlockingIOError, client.recv, 100)
        received = b""
        for _ in range(50):
            yield deferLater(reactor, 0.01, lambda: None)
            try:
                received += client.recv(100)
            except BlockingIOError:
                continue
            if len(received) == 12:
                break
        self.assertEqual(received, b"first second")

    @inlineCallbacks
    def test_moreThanTheSocketTakes(self) -> Any:
        """
        What the socket does not take now is buffered and follows, in order.
        """
        transport, client = yield self.connection()
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096
        writeNow(transport, data)
        self.assertIn(transport, reactor.getWriters())
        received = bytearray()
        # Bounded: each round takes what the reactor wrote since the last.
        for _ in range(5000):
            try:
                received += client.recv(1 << 20)
            except BlockingIOError:
                yield deferLater(reactor, 0.001, lambda: None)
            if len(received) == len(data):
                break
        self.assertEqual(bytes(received), data)

    def test_otherTransports(self) -> None:
        """
        Any other transport is written to as usual.
        """
        transport = StringTransport()
        writeNow(transport, b"frame")
        self.assertEqual(transport.value(), b"frame")
