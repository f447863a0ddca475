# -*- test-case-name: timtx.test.test_nat_punch -*-
"""
UDP hole punching between two NAT'd nodes, coordinated over a link they
already share (the relay), as libp2p's DCUtR does.

Coordination (sans-IO, in L{timtx.nat.coordination}; the mesh carries it as
opaque bytes):

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
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from timtx.nat.client import NatSocket
from timtx.nat.coordination import ACK, PACKET_BYTES, PROBE, PunchPlan, packet
from timtx.nat.stun import Address


class PunchFailed(Exception):
    """
    No probe was acknowledged in time: stay on the relay.
    """


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
