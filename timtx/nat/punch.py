# -*- test-case-name: timtx.test.test_nat_punch -*-
"""
UDP hole punching between two NAT'd nodes, coordinated over a link they
already share (the relay), as libp2p's DCUtR does.

Coordination (sans-IO, carried by the mesh as opaque bytes):

 1. the initiator sends L{Connect}: a session id, a nonce, the addresses
    peers can reach it at (its STUN-mapped address) and, for the QUIC channel,
    nothing; it notes the time;
 2. the responder answers with its own L{Connect} (nonce, addresses, and its
    QUIC certificate), and can pre-open at once;
 3. the initiator measures the round trip, sends L{Sync}, pre-opens, and
    starts probing RTT/2 later; the responder starts probing when L{Sync}
    arrives, so both start at about the same moment without synchronised
    clocks.

Every coordination message carries an HMAC keyed from the cluster secret,
so the addresses and the certificate are authentic whatever carried them.
Both nonces key the session (L{PunchPlan.sessionKey}).

Punching (L{Puncher}): first a few probes with a small IP TTL (2 by
default) that leave the node's own NAT, creating its mapping, and die before
the peer's NAT; a Linux NAT that sees a packet for which it has no mapping
records the flow and then cannot map its own host's packet to the same
five-tuple, which is why plain simultaneous open fails there (docs/nat.md).
Then full probes at the agreed moment until one is acknowledged.  Probes and
acknowledgements are authenticated (HMAC-SHA256 with the session key, over a
fresh nonce) and accepted only from the peer's announced addresses; an
acknowledgement must echo a nonce this node sent.  A spoofed or replayed
packet is counted and has no effect.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from timtx.nat.client import NatSocket
from timtx.nat.stun import Address, StunError


class PunchError(Exception):
    """
    A coordination message is malformed, not authentic, or out of turn.
    """


class PunchFailed(Exception):
    """
    No probe was acknowledged in time: stay on the relay.
    """


_MAGIC = b"TXPC"
_VERSION = 1
_CONNECT = 1
_SYNC = 2
_TAG = 32
MAX_ADDRESSES = 8
MAX_CERTIFICATE_BYTES = 4096
MAX_MESSAGE_BYTES = 64 + MAX_ADDRESSES * 19 + MAX_CERTIFICATE_BYTES + _TAG


def coordinationKey(secret: bytes) -> bytes:
    return hmac.new(secret, b"timtx nat punch coordination v1", hashlib.sha256).digest()


@dataclass(frozen=True)
class Connect:
    sessionId: bytes
    nonce: bytes
    addresses: tuple[Address, ...]
    certificate: bytes = b""


@dataclass(frozen=True)
class Sync:
    sessionId: bytes


def encodeMessage(message: Connect | Sync, key: bytes) -> bytes:
    """
    Serialise and authenticate a coordination message with the
    coordination key (L{coordinationKey}).
    """
    if isinstance(message, Sync):
        body = _MAGIC + struct.pack("!BB", _VERSION, _SYNC) + message.sessionId
    else:
        if len(message.addresses) > MAX_ADDRESSES or len(message.certificate) > MAX_CERTIFICATE_BYTES:
            raise PunchError("too many addresses or too large a certificate")
        parts = [_MAGIC, struct.pack("!BB", _VERSION, _CONNECT), message.sessionId, message.nonce]
        parts.append(struct.pack("!B", len(message.addresses)))
        for address in message.addresses:
            packed = address.packed()
            parts.append(struct.pack("!B", len(packed)) + packed + struct.pack("!H", address.port))
        parts.append(struct.pack("!H", len(message.certificate)) + message.certificate)
        body = b"".join(parts)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decodeMessage(data: bytes, key: bytes) -> Connect | Sync:
    """
    Check and parse a coordination message.

    @raise PunchError: if it is malformed, too large, of an unknown version
        or not authenticated by C{key}.
    """
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
        raise PunchError("coordination message too large")
    if len(data) < 6 + 16 + _TAG or data[:4] != _MAGIC:
        raise PunchError("not a punch coordination message")
    body, tag = data[:-_TAG], data[-_TAG:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise PunchError("coordination message not authenticated by the cluster secret")
    version, kind = body[4], body[5]
    if version != _VERSION:
        raise PunchError(f"unknown coordination version {version}")
    sessionId = body[6:22]
    if kind == _SYNC:
        if len(body) != 22:
            raise PunchError("malformed Sync")
        return Sync(sessionId)
    if kind != _CONNECT:
        raise PunchError(f"unknown coordination message {kind}")
    try:
        pos = 22
        nonce = body[pos : pos + 16]
        pos += 16
        count = body[pos]
        pos += 1
        if count > MAX_ADDRESSES:
            raise PunchError("too many addresses")
        addresses = []
        for _ in range(count):
            size = body[pos]
            if size not in (4, 16):
                raise PunchError("bad address length")
            host = str(ipaddress.ip_address(body[pos + 1 : pos + 1 + size]))
            port = struct.unpack("!H", body[pos + 1 + size : pos + 3 + size])[0]
            addresses.append(Address.of(host, port))
            pos += 3 + size
        (certLength,) = struct.unpack("!H", body[pos : pos + 2])
        certificate = body[pos + 2 : pos + 2 + certLength]
        if len(certificate) != certLength or pos + 2 + certLength != len(body) or len(nonce) != 16:
            raise PunchError("malformed Connect")
    except (IndexError, struct.error, ValueError, StunError) as e:
        raise PunchError(f"malformed Connect ({e})") from None
    return Connect(sessionId, nonce, tuple(addresses), certificate)


@dataclass(frozen=True)
class PunchPlan:
    """
    What both sides agreed: who the peer is, the session's key, and when to
    start probing (C{at}, in this node's clock; C{None} until known).
    """

    sessionId: bytes
    sessionKey: bytes
    initiator: bool
    peerAddresses: tuple[Address, ...]
    peerCertificate: bytes
    at: float | None = None
    rtt: float | None = None


def _sessionKey(key: bytes, sessionId: bytes, initiatorNonce: bytes, responderNonce: bytes) -> bytes:
    return hmac.new(key, b"session" + sessionId + initiatorNonce + responderNonce, hashlib.sha256).digest()


@dataclass(frozen=True)
class Step:
    """
    What to do after a coordination message: bytes to send back over the
    relay (if any) and the plan as far as known.
    """

    send: bytes | None
    plan: PunchPlan | None


class PunchInitiator:
    """
    The side that asks for a direct path; it becomes the QUIC client.
    """

    def __init__(self, secret: bytes, addresses: Sequence[Address], *, sessionId: bytes | None = None):
        self._key = coordinationKey(secret)
        self.sessionId = sessionId or os.urandom(16)
        self._nonce = os.urandom(16)
        self._addresses = tuple(addresses)
        self._sentAt: float | None = None
        self.plan: PunchPlan | None = None

    def start(self, now: float) -> bytes:
        self._sentAt = now
        return encodeMessage(Connect(self.sessionId, self._nonce, self._addresses), self._key)

    def receive(self, data: bytes, now: float) -> Step:
        """
        Take the responder's L{Connect}: measure the round trip, plan to
        probe in half of it, and send L{Sync}.

        @raise PunchError: for a bad message or one out of turn.
        """
        message = decodeMessage(data, self._key)
        if self._sentAt is None or self.plan is not None or not isinstance(message, Connect):
            raise PunchError("unexpected coordination message")
        if message.sessionId != self.sessionId:
            raise PunchError("coordination message of another session")
        rtt = max(0.0, now - self._sentAt)
        self.plan = PunchPlan(
            self.sessionId,
            _sessionKey(self._key, self.sessionId, self._nonce, message.nonce),
            True,
            message.addresses,
            message.certificate,
            at=now + rtt / 2,
            rtt=rtt,
        )
        return Step(encodeMessage(Sync(self.sessionId), self._key), self.plan)


class PunchResponder:
    """
    The side asked for a direct path; it becomes the QUIC server and sends
    its certificate.
    """

    def __init__(self, secret: bytes, addresses: Sequence[Address], certificate: bytes = b""):
        self._key = coordinationKey(secret)
        self._nonce = os.urandom(16)
        self._addresses = tuple(addresses)
        self._certificate = certificate
        self.plan: PunchPlan | None = None
        self._synced = False

    def receive(self, data: bytes, now: float) -> Step:
        """
        A L{Connect} gets our L{Connect} back and a plan without a start
        time (pre-open now); the L{Sync} that follows sets the start: now.

        @raise PunchError: for a bad message or one out of turn.
        """
        message = decodeMessage(data, self._key)
        if isinstance(message, Connect):
            if self.plan is not None:
                raise PunchError("second Connect in one session")
            self.plan = PunchPlan(
                message.sessionId,
                _sessionKey(self._key, message.sessionId, message.nonce, self._nonce),
                False,
                message.addresses,
                b"",
            )
            reply = Connect(message.sessionId, self._nonce, self._addresses, self._certificate)
            return Step(encodeMessage(reply, self._key), self.plan)
        if self.plan is None or self._synced or message.sessionId != self.plan.sessionId:
            raise PunchError("unexpected Sync")
        self._synced = True
        self.plan = PunchPlan(
            self.plan.sessionId, self.plan.sessionKey, False, self.plan.peerAddresses, b"", at=now, rtt=None
        )
        return Step(None, self.plan)


# Punch packets: kind (1) | session id (16) | nonce (16) | tag (16).
PROBE = 0x11
ACK = 0x12
PACKET_BYTES = 49


def packet(kind: int, sessionId: bytes, nonce: bytes, key: bytes) -> bytes:
    head = bytes([kind]) + sessionId + nonce
    return head + hmac.new(key, head, hashlib.sha256).digest()[:16]


@dataclass
class PunchStats:
    probesSent: int = 0
    acksSent: int = 0
    #: Punch packets with a wrong HMAC (spoofed, or another cluster's).
    badTag: int = 0
    #: Authentic packets from an address the peer did not announce.
    unexpectedSource: int = 0
    #: Acknowledgements echoing no nonce this node sent (replays).
    unknownNonce: int = 0


@dataclass(frozen=True)
class PunchedPath:
    """
    A direct UDP path: C{socket} reaches the peer at C{peer}.
    """

    socket: NatSocket
    peer: Address
    plan: PunchPlan
    elapsed: float
    stats: PunchStats = field(compare=False, default_factory=PunchStats)
    #: The session, still answering the peer's probes for its C{linger}
    #: time; C{stop()} it to end that early.
    puncher: Puncher | None = field(compare=False, default=None)


class Puncher:
    """
    One punch session on a L{NatSocket}: answers the peer's probes from the
    moment it exists, L{preopen} sends TTL-limited probes, L{start} probes in
    earnest until acknowledged.

    @ivar interval: seconds between probe rounds.
    @ivar timeout: seconds after the start before giving up.
    @ivar linger: seconds to keep answering the peer's probes after success,
        so that the peer confirms too.
    """

    log = Logger()
    maxNonces = 256

    def __init__(
        self,
        sock: NatSocket,
        plan: PunchPlan,
        clock: IReactorTime,
        *,
        ttl: int = 2,
        preopenCount: int = 2,
        interval: float = 0.05,
        timeout: float = 5.0,
        linger: float = 5.0,
    ):
        self.sock = sock
        self.plan = plan
        self.clock = clock
        self.ttl = ttl
        self.preopenCount = preopenCount
        self.interval = interval
        self.timeout = timeout
        self.linger = linger
        self.stats = PunchStats()
        self.deferred: Deferred[PunchedPath] = Deferred(lambda _: self.stop())
        self._nonces: set[bytes] = set()
        self._startedAt: float | None = None
        self._calls: list[IDelayedCall] = []
        self._done = False
        sock.punchHandlers[plan.sessionId] = self._received

    def _probe(self, target: Address) -> None:
        nonce = os.urandom(16)
        if len(self._nonces) >= self.maxNonces:
            self._nonces.pop()
        self._nonces.add(nonce)
        self.stats.probesSent += 1
        self.sock.send(packet(PROBE, self.plan.sessionId, nonce, self.plan.sessionKey), target)

    def preopen(self) -> None:
        """
        Send C{preopenCount} probes per peer address with IP TTL C{ttl}:
        enough to open this side's NAT, too few hops to reach the peer's.
        """
        if self.ttl <= 0:
            return
        try:
            with self.sock.hopLimit(self.ttl):
                for _ in range(self.preopenCount):
                    for address in self.plan.peerAddresses:
                        self._probe(address)
        except OSError as e:  # pragma: no cover: setsockopt refused
            self.log.warn("punch pre-open without TTL limit failed: {error}", error=e)

    def start(self, at: float | None = None) -> Deferred[PunchedPath]:
        """
        Probe every C{interval} from C{at} (this clock's seconds; now if
        C{None} or past) until acknowledged or C{timeout} after.
        """
        now = self.clock.seconds()
        at = now if at is None else at
        self._startedAt = now
        self._calls.append(self.clock.callLater(max(0.0, at - now), self._round))
        self._calls.append(self.clock.callLater(max(0.0, at - now) + self.timeout, self._fail))
        return self.deferred

    def _round(self) -> None:
        if self._done:
            return
        for address in self.plan.peerAddresses:
            self._probe(address)
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(self.clock.callLater(self.interval, self._round))

    def _fail(self) -> None:
        if not self._done:
            self._done = True
            self.stop()
            self.deferred.errback(PunchFailed(f"no answer from {', '.join(map(str, self.plan.peerAddresses))}"))

    def _received(self, data: bytes, source: Address) -> None:
        if len(data) != PACKET_BYTES:
            self.stats.badTag += 1
            return
        expected = hmac.new(self.plan.sessionKey, data[:33], hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(expected, data[33:]):
            self.stats.badTag += 1
            return
        if source not in self.plan.peerAddresses:
            self.stats.unexpectedSource += 1
            return
        nonce = data[17:33]
        if data[0] == PROBE:
            self.stats.acksSent += 1
            self.sock.send(packet(ACK, self.plan.sessionId, nonce, self.plan.sessionKey), source)
            return
        if nonce not in self._nonces:
            self.stats.unknownNonce += 1
            return
        if self._done:
            return
        self._done = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = [self.clock.callLater(self.linger, self.stop)]
        elapsed = self.clock.seconds() - (self._startedAt if self._startedAt is not None else self.clock.seconds())
        self.deferred.callback(PunchedPath(self.sock, source, self.plan, elapsed, self.stats, self))

    def stop(self) -> None:
        """
        Stop probing and answering; the socket forgets the session.
        """
        self._done = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        if self.sock.punchHandlers.get(self.plan.sessionId) == self._received:
            del self.sock.punchHandlers[self.plan.sessionId]


def punch(sock: NatSocket, plan: PunchPlan, clock: IReactorTime, **options: Any) -> Deferred[PunchedPath]:
    """
    Pre-open, then probe from C{plan.at}: the whole punch for a side whose
    plan is complete.  C{options} are L{Puncher}'s.

    @return: fires with a L{PunchedPath}, or fails with L{PunchFailed}.
    """
    puncher = Puncher(sock, plan, clock, **options)
    puncher.preopen()
    return puncher.start(plan.at)
