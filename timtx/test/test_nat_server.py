# -*- test-case-name: timtx.test.test_nat_server -*-
"""
Tests for L{timtx.nat.server}, L{timtx.nat.client} and
L{timtx.nat.discovery}: retransmission on a fake clock, then a real server and
client on loopback sockets.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.nat import stun
from timtx.nat.client import NatSocket, StunClient, StunTimeout, StunTransactionError
from timtx.nat.discovery import Filtering, Mapping, NatReport, discover
from timtx.nat.server import listenStun
from timtx.nat.stun import Address, MessageClass

reactor: Any = _reactor

KEY = stun.clusterKey(b"cluster secret")
SERVER = Address("192.0.2.1", 3478)


class RetransmissionTests(SynchronousTestCase):
    """
    L{StunClient} retransmits as RFC 8489 section 6.2.1 says, on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.sent: list[tuple[float, bytes, Address]] = []
        self.client = StunClient(
            self.clock, lambda data, to: self.sent.append((self.clock.seconds(), data, to)), KEY, maxRto=100
        )

    def test_schedule(self) -> None:
        """
        Sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s, then fails at 39.5 s
        (16 * RTO after the last send).
        """
        d = self.client.request(SERVER)
        failures: list[object] = []
        d.addErrback(failures.append)
        self.clock.pump([0.5] * 100)
        self.assertEqual([t for t, _, _ in self.sent], [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        self.assertEqual(len(failures), 1)
        self.assertEqual(self.client.stats.timeouts, 1)
        self.assertEqual(self.client.stats.retransmissions, 6)

    def test_boundedRto(self) -> None:
        """
        Each interval is capped at C{maxRto}, and the final wait with it.
        """
        self.client.maxRto = 1.0
        self.client.request(SERVER).addErrback(lambda _: None)
        self.clock.pump([0.5] * 100)
        self.assertEqual([t for t, _, _ in self.sent], [0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5])

    def test_answered(self) -> None:
        """
        An authenticated response from the server ends the transaction;
        retransmission stops.
        """
        d = self.client.request(SERVER)
        request = stun.decode(self.sent[0][1])
        self.assertTrue(request.verify(KEY))
        response = stun.decode(stun.bindingSuccess(request.transactionId, Address("198.51.100.1", 9), key=KEY))
        self.assertTrue(self.client.handle(response, SERVER))
        self.assertEqual(self.successResultOf(d).xorMappedAddress, Address("198.51.100.1", 9))
        self.clock.advance(100)
        self.assertEqual(len(self.sent), 1)

    def test_forgedResponse(self) -> None:
        """
        A response with a wrong key, or from another host, is ignored and
        counted; the transaction keeps waiting.
        """
        d = self.client.request(SERVER)
        txid = stun.decode(self.sent[0][1]).transactionId
        forged = stun.decode(stun.bindingSuccess(txid, Address("6.6.6.6", 6), key=b"wrong"))
        self.assertFalse(self.client.handle(forged, SERVER))
        unkeyed = stun.decode(stun.bindingSuccess(txid, Address("6.6.6.6", 6)))
        self.assertFalse(self.client.handle(unkeyed, Address("203.0.113.66", 3478)))
        self.assertNoResult(d)
        self.assertEqual(self.client.stats.ignored, 2)
        d.cancel()
        self.failureResultOf(d)

    def test_errorResponse(self) -> None:
        """
        An error response fails the transaction with its code; an
        unauthenticated 401 is taken as "wrong secret".
        """
        d = self.client.request(SERVER)
        txid = stun.decode(self.sent[0][1]).transactionId
        self.client.handle(stun.decode(stun.bindingError(txid, 401, "Unauthorized")), SERVER)
        self.assertEqual(self.failureResultOf(d, StunTransactionError).value.code, 401)

    def test_pendingBound(self) -> None:
        """
        At most C{maxPending} transactions are open at once.
        """
        self.client.maxPending = 2
        for _ in range(2):
            self.client.request(SERVER).addErrback(lambda _: None)
        self.assertRaises(stun.StunError, self.client.request, SERVER)
        self.client.cancelAll()


class Loopback:
    """
    Real UDP sockets on loopback addresses, closed at the end of the test.
    """

    def listen(self, case: TestCase, host: str = "127.0.0.1", key: bytes | None = KEY, **kw: object) -> NatSocket:
        sock = NatSocket(reactor, key, rto=0.1, maxRto=0.2, retransmissions=3, finalWait=2)
        port = reactor.listenUDP(0, sock, interface=host)
        case.addCleanup(port.stopListening)
        return sock

    def server(self, case: TestCase, host: str = "127.0.0.1", **kw: object):
        service = listenStun(reactor, reactor, kw.pop("key", KEY), interface=host, **kw)  # type: ignore[arg-type]
        case.addCleanup(service.stopListening)
        return service


class ServerTests(TestCase, Loopback):
    """
    A real L{listenStun} server answering a real L{NatSocket} on loopback.
    """

    @defer.inlineCallbacks
    def test_binding(self):
        """
        A member's request gets its own address back, with integrity,
        OTHER-ADDRESS and RESPONSE-ORIGIN.
        """
        service = self.server(self)
        sock = self.listen(self)
        answer = yield sock.stun.request(service.address)
        self.assertEqual(answer.xorMappedAddress, sock.address)
        self.assertEqual(answer.otherAddress, service.alternateAddress)
        self.assertEqual(answer.responseOrigin, service.address)
        self.assertTrue(answer.verify(KEY))
        self.assertEqual(service.responder.stats.answered, 1)

    @defer.inlineCallbacks
    def test_changePort(self):
        """
        CHANGE-REQUEST(port) is answered from the alternate port; without an
        alternate port it is refused with 420.
        """
        service = self.server(self)
        sock = self.listen(self)
        answer = yield sock.stun.request(service.address, changePort=True)
        self.assertEqual(answer.responseOrigin, service.alternateAddress)
        single = self.server(self, alternatePort=None)
        failure = yield self.assertFailure(sock.stun.request(single.address, changePort=True), StunTransactionError)
        self.assertEqual(failure.code, 420)

    @defer.inlineCallbacks
    def test_nonMember(self):
        """
        A request keyed with another secret gets 401, nothing else: no
        mapped address and no dial-back, and it is counted.
        """
        service = self.server(self)
        outsider = NatSocket(reactor, stun.clusterKey(b"other"), rto=0.1, retransmissions=2, finalWait=2)
        self.addCleanup(reactor.listenUDP(0, outsider, interface="127.0.0.1").stopListening)
        target = self.listen(self)
        d = outsider.stun.request(service.address, dialBack=target.address)
        failure = yield self.assertFailure(d, StunTransactionError)
        self.assertEqual(failure.code, 401)
        self.assertEqual(service.responder.stats.unauthorized, 1)
        self.assertEqual(service.responder.stats.dialBacks, 0)
        self.assertEqual(target.stats.received, 0)

    @defer.inlineCallbacks
    def test_malformedAndUnknown(self):
        """
        Garbage and truncated messages are dropped and counted; a request
        with an unknown comprehension-required attribute gets 420.
        """
        service = self.server(self)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(raw.close)
        target = (service.address.host, service.address.port)
        raw.sendto(b"\x00\x01garbage", target)
        raw.sendto(stun.bindingRequest(os.urandom(12), key=KEY)[:-3], target)
        raw.sendto(stun.encode(1, MessageClass.INDICATION, os.urandom(12), key=KEY), target)
        sock = self.listen(self)
        txid = os.urandom(12)
        raw.sendto(stun.encode(stun.Method.BINDING, MessageClass.REQUEST, txid, [(0x7777, b"?")], key=KEY), target)
        yield sock.stun.request(service.address)
        stats = service.responder.stats
        self.assertEqual((stats.malformed, stats.ignored, stats.refused, stats.answered), (2, 1, 1, 1))
        raw.settimeout(2)
        response = stun.decode(raw.recv(2048))
        self.assertEqual(response.errorCode.code, 420)
        self.assertEqual(response.get(stun.Attr.UNKNOWN_ATTRIBUTES), b"\x77\x77")

    @defer.inlineCallbacks
    def test_rateLimited(self):
        """
        Past its burst, a source's requests are dropped and counted.
        """
        service = self.server(self, rate=0.001, burst=2)
        sock = self.listen(self)
        yield sock.stun.request(service.address)
        yield sock.stun.request(service.address)
        yield self.assertFailure(sock.stun.request(service.address), StunTimeout)
        self.assertGreaterEqual(service.responder.stats.limited, 1)
        self.assertEqual(service.responder.stats.answered, 2)

    @defer.inlineCallbacks
    def test_strayDatagrams(self):
        """
        A L{NatSocket} drops and counts what is not for it: unsolicited
        STUN responses, punch packets of no session, QUIC from unknown
        peers, malformed STUN, other bytes.
        """
        sock = self.listen(self)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(raw.close)
        target = (sock.address.host, sock.address.port)
        for data in (
            stun.bindingSuccess(os.urandom(12), Address("1.2.3.4", 5), key=KEY),
            b"\x11" + os.urandom(48),
            b"\xc0" + os.urandom(100),
            b"\x00\x01\x00\x00" + os.urandom(16),
            b"\x20hello",
        ):
            raw.sendto(data, target)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(sock.stats.received, 5)
        self.assertEqual((sock.stats.dropped, sock.stats.malformed), (4, 1))


class DiscoveryTests(TestCase, Loopback):
    """
    L{discover} against real servers on loopback: no NAT in the way.
    """

    @defer.inlineCallbacks
    def test_noNat(self):
        """
        With two servers on other loopback addresses the socket is found
        not NAT'd, endpoint-independent and reachable.
        """
        first = self.server(self, host="127.0.0.2")
        second = self.server(self, host="127.0.0.3")
        sock = self.listen(self)
        report = yield discover(reactor, sock, [first.address, second.address], dialBackWait=0.5)
        self.assertIsInstance(report, NatReport)
        self.assertEqual(report.mapped, sock.address)
        self.assertFalse(report.behindNat)
        self.assertEqual(report.mapping, Mapping.ENDPOINT_INDEPENDENT)
        self.assertEqual(report.filtering, Filtering.ENDPOINT_INDEPENDENT)
        self.assertTrue(report.reachable)
        self.assertTrue(report.punchable)
        self.assertEqual(second.responder.stats.dialBacks, 1)

    @defer.inlineCallbacks
    def test_oneServer(self):
        """
        One server tells the mapped address and filtering; mapping stays
        unknown, so the node is not offered for punching.
        """
        first = self.server(self, host="127.0.0.2")
        sock = self.listen(self)
        report = yield discover(reactor, sock, [first.address])
        self.assertEqual(report.mapped, sock.address)
        self.assertEqual(report.mapping, Mapping.UNKNOWN)
        self.assertEqual(report.filtering, Filtering.ADDRESS_DEPENDENT)
        self.assertFalse(report.punchable)

    @defer.inlineCallbacks
    def test_noServer(self):
        """
        Servers that do not answer give a report that knows nothing, not an
        error.
        """
        silent = self.listen(self, host="127.0.0.2")
        sock = self.listen(self)
        report = yield discover(reactor, sock, [silent.address, silent.address])
        self.assertIsNone(report.mapped)
        self.assertEqual((report.mapping, report.reachable), (Mapping.UNKNOWN, False))

    @defer.inlineCallbacks
    def test_wrongSecret(self):
        """
        Against servers of another cluster, discovery learns nothing.
        """
        first = self.server(self, host="127.0.0.2", key=stun.clusterKey(b"other"))
        sock = self.listen(self)
        report = yield discover(reactor, sock, [first.address])
        self.assertIsNone(report.mapped)


class NatConfigTests(SynchronousTestCase):
    """
    The C{[nat]} section's bounds.
    """

    def test_keepaliveBounds(self) -> None:
        """
        Keepalives must stay under NAT UDP timeouts (25 s at most) and below
        the consent timeout.
        """
        from timtx.config import ConfigError, from_sections

        self.assertEqual(from_sections({"nat": {"keepalive": "25"}}).nat.keepalive, 25.0)
        self.assertRaises(ConfigError, from_sections, {"nat": {"keepalive": "26"}})
        self.assertRaises(ConfigError, from_sections, {"nat": {"keepalive": "20", "consent_timeout": "20"}})
        self.assertRaises(ConfigError, from_sections, {"nat": {"punch_ttl": "65"}})
