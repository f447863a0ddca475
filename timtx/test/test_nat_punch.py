# -*- test-case-name: timtx.test.test_nat_punch -*-
"""
Tests for L{timtx.nat.punch}: the coordination exchange on a fake clock, and
punching between real sockets on loopback (no NAT: the logic, the
authentication and the counters; the NAT cases are in
L{timtx.test.test_nat_netns}).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.nat import coordination, punch
from timtx.nat.client import NatSocket
from timtx.nat.coordination import (
    Connect,
    PunchError,
    PunchInitiator,
    PunchPlan,
    PunchResponder,
    Sync,
)
from timtx.nat.punch import Puncher, PunchFailed
from timtx.nat.stun import Address

reactor: Any = _reactor

SECRET = b"cluster secret"
A = Address("198.51.100.1", 4000)
B = Address("203.0.113.2", 5000)


def coordinate(now: float = 10.0, rtt: float = 0.2) -> tuple[PunchPlan, PunchPlan, PunchPlan]:
    """
    Run the exchange; return the initiator's plan, the responder's plan
    after Connect (no start time) and after Sync.
    """
    initiator = PunchInitiator(SECRET, [A])
    responder = PunchResponder(SECRET, [B], certificate=b"cert")
    connect = initiator.start(now)
    early = responder.receive(connect, now + rtt / 2)
    assert early.send is not None and early.plan is not None
    step = initiator.receive(early.send, now + rtt)
    assert step.send is not None and step.plan is not None
    late = responder.receive(step.send, now + rtt * 1.5)
    assert late.plan is not None
    return step.plan, early.plan, late.plan


class CoordinationTests(SynchronousTestCase):
    """
    The sans-IO exchange: Connect, Connect, Sync.
    """

    def test_exchange(self) -> None:
        """
        Both sides get each other's addresses and one session key; the
        initiator starts half a round trip after it sends Sync, the
        responder when Sync arrives: the same moment on a symmetric link.
        """
        mine, early, theirs = coordinate(now=10.0, rtt=0.2)
        self.assertEqual(mine.peerAddresses, (B,))
        self.assertEqual(theirs.peerAddresses, (A,))
        self.assertEqual(mine.peerCertificate, b"cert")
        self.assertEqual(mine.sessionKey, theirs.sessionKey)
        self.assertEqual(early.sessionKey, theirs.sessionKey)
        self.assertIsNone(early.at)
        self.assertAlmostEqual(mine.rtt, 0.2)
        self.assertAlmostEqual(mine.at, 10.3)
        self.assertAlmostEqual(theirs.at, 10.3)
        self.assertTrue(mine.initiator)
        self.assertFalse(theirs.initiator)

    def test_codec(self) -> None:
        """
        Messages round-trip, IPv6 addresses included.
        """
        key = coordination.coordinationKey(SECRET)
        message = Connect(os.urandom(16), os.urandom(16), (A, Address("2001:db8::5", 9)), b"x" * 500)
        self.assertEqual(coordination.decodeMessage(coordination.encodeMessage(message, key), key), message)
        sync = Sync(os.urandom(16))
        self.assertEqual(coordination.decodeMessage(coordination.encodeMessage(sync, key), key), sync)

    def test_refused(self) -> None:
        """
        A message keyed with another secret, tampered with, truncated, of
        another version, or out of turn raises L{PunchError}.
        """
        key = coordination.coordinationKey(SECRET)
        data = coordination.encodeMessage(Connect(os.urandom(16), os.urandom(16), (A,)), key)
        self.assertRaises(PunchError, coordination.decodeMessage, data, coordination.coordinationKey(b"other"))
        self.assertRaises(PunchError, coordination.decodeMessage, data[:-1] + bytes([data[-1] ^ 1]), key)
        self.assertRaises(PunchError, coordination.decodeMessage, data[:30], key)
        self.assertRaises(PunchError, coordination.decodeMessage, b"x" * 10000, key)
        responder = PunchResponder(SECRET, [B])
        self.assertRaises(PunchError, responder.receive, coordination.encodeMessage(Sync(os.urandom(16)), key), 0)
        initiator = PunchInitiator(SECRET, [A])
        self.assertRaises(PunchError, initiator.receive, data, 0)

    def test_randomBytes(self) -> None:
        """
        Random and mutated input raises L{PunchError} and nothing else,
        including input with a valid tag (as from a member with a bug).
        """
        import hashlib
        import hmac
        import random

        key = coordination.coordinationKey(SECRET)
        rng = random.Random(14)
        good = coordination.encodeMessage(Connect(bytes(16), bytes(16), (A, B), b"c"), key)
        for _ in range(2000):
            body = bytearray(good[:-32])
            for _ in range(rng.randrange(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = body[: rng.randrange(6, len(body) + 1)]
            data = bytes(body) + hmac.new(key, bytes(body), hashlib.sha256).digest()
            try:
                coordination.decodeMessage(data, key)
            except PunchError:
                pass


class LoopbackPunchTests(TestCase):
    """
    Two L{NatSocket}s on loopback punch to each other.
    """

    def socket(self, host: str) -> NatSocket:
        sock = NatSocket(reactor, None)
        port = reactor.listenUDP(0, sock, interface=host)
        self.addCleanup(port.stopListening)
        return sock

    def plans(self, a: NatSocket, b: NatSocket) -> tuple[PunchPlan, PunchPlan]:
        initiator = PunchInitiator(SECRET, [a.address])
        responder = PunchResponder(SECRET, [b.address], certificate=b"c")
        now = reactor.seconds()
        early = responder.receive(initiator.start(now), now)
        step = initiator.receive(early.send, now)  # type: ignore[arg-type]
        late = responder.receive(step.send, now)  # type: ignore[arg-type]
        return step.plan, late.plan  # type: ignore[return-value]

    @defer.inlineCallbacks
    def test_punch(self):
        """
        Both sides confirm a path to the other's address, pre-open packets
        (TTL 2 on loopback still arrive) included.
        """
        a, b = self.socket("127.0.0.1"), self.socket("127.0.0.2")
        planA, planB = self.plans(a, b)
        dA = punch.punch(a, planA, reactor, timeout=3, linger=0.5)
        dB = punch.punch(b, planB, reactor, timeout=3, linger=0.5)
        pathA, pathB = yield defer.gatherResults([dA, dB])
        self.assertEqual(pathA.peer, b.address)
        self.assertEqual(pathB.peer, a.address)
        self.assertGreater(pathA.stats.probesSent, 0)
        yield task.deferLater(reactor, 0.6, lambda: None)
        self.assertEqual(a.punchHandlers, {})

    @defer.inlineCallbacks
    def test_ttlRestored(self):
        """
        The pre-open sets the socket's TTL and restores it.
        """
        a, b = self.socket("127.0.0.1"), self.socket("127.0.0.2")
        planA, _ = self.plans(a, b)
        handle = a.transport.getHandle()
        before = handle.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
        with a.hopLimit(2):
            self.assertEqual(handle.getsockopt(socket.IPPROTO_IP, socket.IP_TTL), 2)
        self.assertEqual(handle.getsockopt(socket.IPPROTO_IP, socket.IP_TTL), before)
        puncher = Puncher(a, planA, reactor)
        puncher.preopen()
        self.assertEqual(handle.getsockopt(socket.IPPROTO_IP, socket.IP_TTL), before)
        puncher.stop()
        yield None

    @defer.inlineCallbacks
    def test_silentPeer(self):
        """
        A peer that never answers fails the punch with L{PunchFailed} and
        the session is forgotten.
        """
        a, b = self.socket("127.0.0.1"), self.socket("127.0.0.2")
        planA, _ = self.plans(a, b)
        yield self.assertFailure(punch.punch(a, planA, reactor, timeout=0.3), PunchFailed)
        self.assertEqual(a.punchHandlers, {})

    @defer.inlineCallbacks
    def test_spoofed(self):
        """
        Punch packets with a bad HMAC, from an address the peer did not
        announce, or acknowledging a nonce never sent are counted and have
        no effect: the punch still waits, and then fails.
        """
        a, b = self.socket("127.0.0.1"), self.socket("127.0.0.2")
        planA, planB = self.plans(a, b)
        puncher = Puncher(a, planA, reactor, timeout=0.5)
        d = puncher.start()
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.3", 0))
        self.addCleanup(raw.close)
        target = (a.address.host, a.address.port)
        sid = planA.sessionId
        raw.sendto(coordination.packet(coordination.ACK, sid, os.urandom(16), b"wrong key"), target)
        raw.sendto(coordination.packet(coordination.ACK, sid, os.urandom(16), planA.sessionKey), target)
        # From the announced address (b's socket) but echoing no nonce of a.
        b.send(coordination.packet(coordination.ACK, sid, os.urandom(16), planB.sessionKey), a.address)
        b.send(coordination.packet(coordination.ACK, sid, os.urandom(16), b"wrong key"), a.address)
        yield self.assertFailure(d, PunchFailed)
        self.assertEqual(puncher.stats.badTag, 2)
        self.assertEqual(puncher.stats.unexpectedSource, 1)
        self.assertEqual(puncher.stats.unknownNonce, 1)
