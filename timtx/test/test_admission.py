# -*- test-case-name: timtx.test.test_admission -*-
"""
Tests for L{timtx.transports.admission}: every accepted socket counts, per
address and against the descriptors left, and HTTP requests have a deadline
however slowly they are written.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.frames import LengthPrefixedDecoder, client_frame, parse_server_frame
from timtx.protocols.structs import TimAck
from timtx.test.base import NodeTestCase, waitUntil, within
from timtx.transports.admission import ConnectionGate, openDescriptors, withBacklog


class GateTests(SynchronousTestCase):
    def gate(self, **kwargs):
        settings = {"maxConnections": 3, "maxPerHost": 2, "fdReserve": 10, "fdLimit": 1000, "fdBaseline": 20}
        settings.update(kwargs)
        return ConnectionGate(**settings)

    def test_caps(self):
        """
        Sockets are refused past the total and the per-address caps, and
        their places come back when released, once.
        """
        gate = self.gate()
        a1, a2 = gate.admit("a"), gate.admit("a")
        self.assertIsNone(gate.admit("a"))
        b1 = gate.admit("b")
        self.assertIsNone(gate.admit("c"))
        self.assertEqual(gate.refused, {"connections": 1, "per-ip": 1, "descriptors": 0})
        a1.release()
        a1.release()
        self.assertEqual(len(gate), 2)
        self.assertIsNotNone(gate.admit("a"))
        for ticket in (a2, b1):
            ticket.release()
        self.assertEqual(len(gate), 1)

    def test_noCaps(self):
        """
        0 disables the total and per-address caps.
        """
        gate = self.gate(maxConnections=0, maxPerHost=0, fdLimit=10**6)
        tickets = [gate.admit("a") for _ in range(500)]
        self.assertNotIn(None, tickets)

    def test_descriptors(self):
        """
        A socket that would leave fewer than C{fdReserve} descriptors free is
        refused, whatever the caps.
        """
        gate = self.gate(maxConnections=0, maxPerHost=0, fdLimit=40, fdBaseline=20, fdReserve=10)
        admitted = [gate.admit("a") for _ in range(15)]
        self.assertEqual(sum(t is not None for t in admitted), 10)
        self.assertEqual(gate.refused["descriptors"], 5)

    def test_openDescriptors(self):
        """
        The process's open descriptors are counted.
        """
        before = openDescriptors()
        with socket.socket():
            self.assertEqual(openDescriptors(), before + 1)

    def test_backlog(self):
        """
        TCP and SSL endpoint strings get the backlog unless they set one.
        """
        self.assertEqual(withBacklog("tcp:5120:interface=127.0.0.1", 1024), "tcp:5120:interface=127.0.0.1:backlog=1024")
        self.assertEqual(withBacklog("tcp:0:backlog=7", 1024), "tcp:0:backlog=7")
        self.assertEqual(withBacklog("ssl:443:privateKey=k", 9), "ssl:443:privateKey=k:backlog=9")
        self.assertEqual(withBacklog("unix:/tmp/s", 9), "unix:/tmp/s")


def rawSocket(address):
    sock = socket.create_connection((address.host, address.port))
    sock.setblocking(False)
    return sock


def closedByPeer(sock):
    """
    Whether the peer closed C{sock}: reading gives end of file or a reset.
    """
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


class SocketAdmissionTests(NodeTestCase):
    """
    Over real sockets: what the gate and the HTTP deadline do to clients.
    """

    @inlineCallbacks
    def test_silentSocketsCount(self):
        """
        Sockets that never send a byte count against C{max_connections}: the
        next one is closed at once, and a place comes back when one goes.
        """
        node = yield self.node(client={"max_connections": 3, "request_timeout": 0})
        address = node.listeningAddress("client-ws")
        silent = [rawSocket(address) for _ in range(3)]
        self.addCleanup(lambda: [s.close() for s in silent])
        yield waitUntil(lambda: len(node.gate) == 3)
        extra = rawSocket(address)
        self.addCleanup(extra.close)
        yield waitUntil(lambda: closedByPeer(extra))
        self.assertEqual(node.gate.refused["connections"], 1)
        # The TCP port shares the count.
        tcp = rawSocket(node.listeningAddress("client-tcp"))
        self.addCleanup(tcp.close)
        yield waitUntil(lambda: closedByPeer(tcp))
        silent.pop().close()
        yield waitUntil(lambda: len(node.gate) == 2)
        # A place is free again: a WebSocket client gets through.
        yield self.client(node)
        self.assertEqual(len(node.gate), 3)

    @inlineCallbacks
    def test_perAddress(self):
        """
        One address may hold C{max_connections_per_ip} sockets.
        """
        node = yield self.node(client={"max_connections_per_ip": 2})
        address = node.listeningAddress("client-tcp")
        held = [rawSocket(address) for _ in range(2)]
        self.addCleanup(lambda: [s.close() for s in held])
        yield waitUntil(lambda: len(node.gate) == 2)
        third = rawSocket(address)
        self.addCleanup(third.close)
        yield waitUntil(lambda: closedByPeer(third))
        self.assertEqual(node.gate.refused["per-ip"], 1)

    @inlineCallbacks
    def test_slowloris(self):
        """
        An HTTP request written one byte at a time is cut off after
        C{request_timeout} seconds, however often a byte arrives.
        """
        node = yield self.node(client={"request_timeout": 0.5})
        sock = rawSocket(node.listeningAddress("client-ws"))
        self.addCleanup(sock.close)
        head = b"GET /tim HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        sent = 0
        while not closedByPeer(sock):
            self.assertLess(sent, len(head), "still open after a whole second of trickling")
            try:
                sock.send(head[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(node._listeners["client-ws"].factory.slowRequests, 1)
        yield waitUntil(lambda: len(node.gate) == 0)

    @inlineCallbacks
    def test_upgradeKeepsItsPlace(self):
        """
        A socket that upgrades to WebSocket keeps the one place it took as an
        HTTP connection, outlives C{request_timeout}, and gives the place back
        when it closes.
        """
        node = yield self.node(client={"request_timeout": 0.2})
        client = yield self.user(node)
        self.assertEqual(len(node.gate), 1)
        yield deferLater(reactor, 0.5, lambda: None)
        yield client.ping()
        yield client.disconnect()
        yield waitUntil(lambda: len(node.gate) == 0)

    @inlineCallbacks
    def test_tim2KeepAlive(self):
        """
        /tim2 requests still work with a request deadline (they are whole
        long before it).
        """
        node = yield self.node(client={"request_timeout": 5})
        yield self.user(node)
        yield waitUntil(lambda: len(node.gate) == 1)

    @inlineCallbacks
    def test_frameLimitBeforeLogin(self):
        """
        Before login a frame may be no larger than
        C{max_frame_bytes_before_login}: a raw TCP client announcing a
        larger one gets 4114 and a close before it sends the frame; over
        WebSocket such a message closes with 1009.  After login, frames up
        to C{max_frame_bytes} pass.
        """
        node = yield self.node(client={"max_frame_bytes_before_login": 1024})
        sock = rawSocket(node.listeningAddress("client-tcp"))
        self.addCleanup(sock.close)
        sock.send((1 << 20).to_bytes(4, "big") + b"\x0c")
        yield waitUntil(lambda: closedByPeer(sock) or _peek(sock))
        ws = yield self.client(node)
        ws.sendRaw(client_frame(TimType.TIMPING, b"x" * 2000))
        yield within(ws.closed)
        client = yield self.user(node)
        client.sendRaw(client_frame(TimType.TIMPING, b"x" * 2000))
        yield client.ping()

    @inlineCallbacks
    def test_descriptorsRunShort(self):
        """
        When taking more sockets would leave fewer than C{fd_reserve}
        descriptors, new sockets are refused while logged-in clients keep
        working.
        """
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        # Leave room for no more than what the node holds now.
        node.gate.fdReserve = soft - node.gate.fdBaseline - len(node.gate)
        flood = [rawSocket(node.listeningAddress("client-tcp")) for _ in range(20)]
        self.addCleanup(lambda: [s.close() for s in flood])
        yield waitUntil(lambda: node.gate.refused["descriptors"] == 20)
        yield alice.sendMessage(bob.uid, "still here")
        got = yield bob.next(TimType.TIMMESSAGE)
        self.assertEqual(got.body.dataString, "still here")
        yield self.assertFailure(self.client(node), ConnectionDone)


def _peek(sock):
    """
    Whether an error ack 4114 is waiting on C{sock}.
    """
    try:
        data = sock.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    decoder = LengthPrefixedDecoder(1 << 20)
    decoder.feed(data)
    frame = decoder.next_frame()
    if frame is None:
        return False
    ack = codec.decode(TimAck, parse_server_frame(frame).payload, Encoding.COMPACT)
    assert ack.error.code == ErrorCode.ERR_BIGDATA, ack
    return True
