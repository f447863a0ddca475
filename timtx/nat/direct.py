# -*- test-case-name: timtx.test.test_nat_direct -*-
"""
Direct paths between NAT'd members, in the mesh: L{DirectPaths} runs the
pieces of this package for a node's cluster service.

On a reachable node it runs the STUN server (C{[nat] stun_port}, on each
address of C{stun_interface}) and advertises those addresses to the
members (metadata L{META_STUN}).

On a node that cannot be dialled it keeps one UDP socket (L{NatSocket}),
learns its NAT's behaviour from the advertised STUN servers
(L{discover}) and advertises it (L{META_MAPPING}, L{META_MAPPED}).  When
its link to another NAT'd member is relayed and both NATs map
endpoint-independently, the node with the smaller id coordinates a punch
with the other over that relayed link (messages of kind L{KIND}: DCUtR's
Connect, Connect, Sync), punches (L{Puncher}, TTL-limited pre-open) and
runs the peer protocol over a QUIC channel on the punched path
(L{QuicChannel}).  The mesh then keeps that direct link and drops the
relayed one (a direct link ranks before a relayed one).  When the direct
path stops answering (no packet for C{consent_timeout}, keepalives every
C{keepalive}), the channel closes with L{PathLost}, the link is lost, and
the mesh dials the peer through the relay again; a new punch is tried
after L{RETRY_AFTER}.  With an endpoint-dependent NAT on either side no
punch is tried: the pair stays relayed, by design.

The cluster service is reached only through the hooks it offers (this
package does not import the mesh): C{addHandler}, C{send}, C{member},
C{liveMembers}, C{addObserver}, C{addLinkObserver}, C{addPathInfo},
C{setNatMeta}, C{directLinkFactory}, C{linkPath}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.config import splitHostPort
from timtx.nat import stun
from timtx.nat.client import NatSocket
from timtx.nat.coordination import PunchError, PunchInitiator, PunchResponder
from timtx.nat.discovery import Mapping, NatReport, discover
from timtx.nat.punch import PunchedPath, Puncher
from timtx.nat.quic import NodeCertificate, PathLost, QuicChannel
from timtx.nat.server import StunService, listenStun
from timtx.nat.stun import Address, StunError

#: The message kind of punch coordination between two members.
KIND = "nat.punch"
#: Metadata of a reachable node: its STUN servers, ADDRESS:PORT, comma-separated.
META_STUN = "nat.stun"
#: Metadata of a NAT'd node: its NAT's mapping (a L{Mapping} value).
META_MAPPING = "nat.mapping"
#: Metadata of a NAT'd node: its socket's mapped address, ADDRESS:PORT.
META_MAPPED = "nat.mapped"
#: Seconds before another try for a direct path once every attempt of a
#: round failed or the direct path was lost.
RETRY_AFTER = 60.0
#: Seconds between the attempts of one round.
PAUSE_BETWEEN_ATTEMPTS = 1.0
#: Seconds the QUIC channel may take to come up on a punched path.
CHANNEL_TIMEOUT = 10.0
#: Seconds between discoveries while no STUN server answered.
REDISCOVER_AFTER = 10.0
#: Seconds the channels get to close when the node stops.
CLOSE_WAIT = 3.0

# The kind byte of a coordination message (after "TXPC" and the version).
_CONNECT = 1
_SYNC = 2


def formatAddress(address: Address) -> str:
    return f"[{address.host}]:{address.port}" if address.family == 6 else f"{address.host}:{address.port}"


def parseAddress(text: str) -> Address:
    """
    @raise ValueError: if C{text} is not IP:PORT.
    """
    host, port = splitHostPort(text)
    try:
        return Address.of(host, port)
    except StunError as e:
        raise ValueError(str(e)) from None


@dataclass
class PunchCounters:
    """
    The direct-path history with one peer, for the members file.

    @ivar attempts: punches started (as initiator or responder).
    @ivar successes: punches that gave a direct link.
    @ivar fallbacks: direct paths lost, the peer moved back to the relay.
    @ivar timeToDirect: seconds from the start of the last successful
        attempt to its channel being up.
    """

    attempts: int = 0
    successes: int = 0
    failures: int = 0
    fallbacks: int = 0
    timeToDirect: float | None = None
    lastError: str | None = None


class _PeerState:
    def __init__(self) -> None:
        self.counters = PunchCounters()
        self.busy = False
        self.notBefore = 0.0
        self.retry: IDelayedCall | None = None
        self.reply: tuple[bytes, Deferred[bytes]] | None = None
        self.responder: PunchResponder | None = None
        self.puncher: Puncher | None = None
        self.channel: QuicChannel | None = None


class DirectPaths(Service):
    """
    STUN, discovery and direct paths for one node's cluster service (see
    the module's description).
    """

    log = Logger()

    def __init__(self, cluster: Any, reactor: Any, nat: Any):
        self.cluster = cluster
        self.reactor = reactor
        self.nat = nat
        self.secret: bytes = cluster.settings.secret
        self.key = stun.clusterKey(self.secret)
        self.stunServices: list[StunService] = []
        self.sock: NatSocket | None = None
        self.udp: Any = None
        self.report: NatReport | None = None
        self.mapped: Address | None = None
        self.certificate: NodeCertificate | None = None
        self._discovering = False
        self._rediscover: IDelayedCall | None = None
        self._peers: dict[str, _PeerState] = {}

    # Lifecycle.

    def startService(self) -> None:
        super().startService()
        self.cluster.ready.addCallback(self._clusterReady)

    def _clusterReady(self, result: object) -> object:
        if not self.running:
            return result
        try:
            if self.cluster.reachable:
                self._startStun()
            elif self.nat.direct:
                self._startSocket()
        except Exception:
            self.log.failure("cannot start NAT traversal; peers stay on TCP and relays")
        return result

    def _startStun(self) -> None:
        nat = self.nat
        if not nat.stun_port:
            return
        hosts = [h.strip() for h in nat.stun_interface.split(",") if h.strip()]
        if not hosts:
            hosts = [splitHostPort(self.cluster.address)[0]]
        advertised = []
        for host in hosts:
            try:
                service = listenStun(
                    self.reactor,
                    self.reactor,
                    self.key,
                    port=nat.stun_port,
                    alternatePort=nat.stun_alternate_port or None,
                    interface=host,
                    rate=nat.stun_rate,
                    burst=nat.stun_burst,
                )
            except CannotListenError as e:
                # Another node on this host has the port, say: NAT'd
                # members learn from the others.
                self.log.warn("no STUN server on {host}: {error}", host=host, error=e)
                continue
            self.stunServices.append(service)
            advertised.append(formatAddress(Address.of(host, nat.stun_port)))
        if not advertised:
            return
        self.log.info("STUN server on {addresses}", addresses=", ".join(advertised))
        self.cluster.setNatMeta({META_STUN: ",".join(advertised)})

    def _startSocket(self) -> None:
        nat = self.nat
        self.certificate = NodeCertificate.generate()
        self.sock = NatSocket(
            self.reactor, self.key, rto=nat.stun_rto, maxRto=nat.stun_max_rto, retransmissions=nat.stun_retransmissions
        )
        self.udp = self.reactor.listenUDP(nat.udp_port, self.sock)
        self.cluster.addHandler(KIND, self._received)
        self.cluster.addObserver(self._memberChanged)
        self.cluster.addLinkObserver(self._linkChanged)
        self.cluster.addPathInfo(self.pathInfo)
        self._maybeDiscover()

    def stopService(self) -> Deferred[Any]:
        """
        Let the mesh close the direct links (it stops at the same time),
        then close what is left and the sockets.
        """
        super().stopService()
        for timer in [self._rediscover, *(state.retry for state in self._peers.values())]:
            if timer is not None and timer.active():
                timer.cancel()
        channels = [state.channel for state in self._peers.values() if state.channel is not None]
        waits = [channel.lost for channel in channels]
        d: Deferred[Any] = DeferredList(waits) if waits else Deferred()
        if waits:
            d.addTimeout(CLOSE_WAIT, self.reactor)
            d.addErrback(lambda _: None)
        else:
            d.callback(None)

        def close(_: object) -> Deferred[Any]:
            for state in self._peers.values():
                if state.puncher is not None:
                    state.puncher.stop()
                if state.channel is not None:
                    state.channel.close(0, "node stopping")
            stops = [maybeDeferred(service.stopListening) for service in self.stunServices]
            if self.udp is not None:
                stops.append(maybeDeferred(self.udp.stopListening))
            return DeferredList(stops)

        return d.addCallback(close)

    # Discovery.

    def servers(self) -> list[Address]:
        """
        The STUN servers the members advertise, the first two distinct
        ones in node id order.
        """
        found: list[Address] = []
        for member in sorted(self.cluster.liveMembers(), key=lambda m: m.nodeId):
            text = member.meta.get(META_STUN)
            if member.nodeId == self.cluster.nodeId or not text:
                continue
            for item in text.split(","):
                try:
                    address = parseAddress(item)
                except ValueError:
                    continue
                if address not in found:
                    found.append(address)
        return found[:2]

    def _maybeDiscover(self) -> None:
        if self._discovering or self.sock is None or not self.running:
            return
        if self._rediscover is not None and self._rediscover.active():
            return
        servers = self.servers()
        if not servers:
            return
        report = self.report
        if report is not None and report.mapped is not None:
            if report.mapping is not Mapping.UNKNOWN or len(servers) < 2:
                return
        self._discovering = True
        d = discover(self.reactor, self.sock, servers, dialBackWait=self.nat.dialback_wait)
        d.addCallback(self._discovered)
        d.addErrback(self._discoveryFailed)

    def _discovered(self, report: NatReport) -> None:
        self._discovering = False
        if not self.running:
            return
        self.report = report
        self.mapped = report.mapped
        meta = {META_MAPPING: report.mapping.value}
        if report.mapped is not None:
            meta[META_MAPPED] = formatAddress(report.mapped)
        self.log.info(
            "NAT discovery: mapped {mapped}, mapping {mapping}, filtering {filtering}",
            mapped=str(report.mapped),
            mapping=report.mapping.value,
            filtering=report.filtering.value,
        )
        self.cluster.setNatMeta(meta)
        if report.mapped is None:
            self._rediscover = self.reactor.callLater(REDISCOVER_AFTER, self._maybeDiscover)
        self._considerAll()

    def _discoveryFailed(self, failure: Failure) -> None:
        self._discovering = False
        self.log.failure("NAT discovery failed", failure)
        if self.running:
            self._rediscover = self.reactor.callLater(REDISCOVER_AFTER, self._maybeDiscover)

    # What the mesh tells.

    def _memberChanged(self, change: Any) -> None:
        member = change.member
        if member.meta.get(META_STUN):
            self._maybeDiscover()
        if member.nodeId != self.cluster.nodeId:
            self._consider(member.nodeId)

    def _linkChanged(self, nodeId: str, path: str | None) -> None:
        if path == "relayed":
            self._consider(nodeId)

    def pathInfo(self, nodeId: str) -> dict[str, Any]:
        """
        The punch counters for C{nodeId}, for the members file.
        """
        state = self._peers.get(nodeId)
        if state is None:
            return {}
        counters = state.counters
        info: dict[str, Any] = {}
        if state.channel is not None:
            stats = state.channel.stats
            info["direct"] = {"datagramsIn": stats.datagramsIn, "datagramsOut": stats.datagramsOut}
        return {
            **info,
            "punch": {
                "attempts": counters.attempts,
                "successes": counters.successes,
                "failures": counters.failures,
                "fallbacks": counters.fallbacks,
                "timeToDirect": counters.timeToDirect,
                "lastError": counters.lastError,
            },
        }

    # Deciding.

    def whyNot(self, nodeId: str) -> str | None:
        """
        Why no punch to C{nodeId} makes sense now, or C{None}.
        """
        report = self.report
        if self.sock is None or not self.running:
            return "no UDP socket"
        if report is None or not report.punchable:
            return "this node's NAT does not map endpoint-independently"
        member = self.cluster.member(nodeId)
        if member is None or not member.live:
            return "not a live member"
        if member.meta.get(META_MAPPING) != Mapping.ENDPOINT_INDEPENDENT.value or not member.meta.get(META_MAPPED):
            return "its NAT does not map endpoint-independently"
        if self.cluster.linkPath(nodeId).get("path") != "relayed":
            return "not relayed"
        return None

    def _state(self, nodeId: str) -> _PeerState:
        state = self._peers.get(nodeId)
        if state is None:
            state = self._peers[nodeId] = _PeerState()
        return state

    def _considerAll(self) -> None:
        for member in self.cluster.liveMembers():
            if member.nodeId != self.cluster.nodeId:
                self._consider(member.nodeId)

    def _consider(self, nodeId: str) -> None:
        # The node with the smaller id starts; the other answers.
        if not self.running or self.sock is None or not self.cluster.nodeId < nodeId:
            return
        if self.whyNot(nodeId) is not None:
            return
        state = self._state(nodeId)
        if state.busy or (state.retry is not None and state.retry.active()):
            return
        wait = state.notBefore - self.reactor.seconds()
        if wait > 0:
            state.retry = self.reactor.callLater(wait, self._consider, nodeId)
            return
        state.busy = True

        def done(result: object) -> None:
            state.busy = False
            if isinstance(result, Failure):
                self.log.failure("punching to node {node}", result, node=nodeId)

        self._initiate(nodeId, state).addBoth(done)

    # The initiator.

    @inlineCallbacks
    def _initiate(self, nodeId: str, state: _PeerState) -> Any:
        for attempt in range(1, self.nat.punch_attempts + 1):
            if self.whyNot(nodeId) is not None or not self.running:
                return
            state.counters.attempts += 1
            try:
                yield self._attempt(nodeId, state)
            except Exception as e:
                state.counters.failures += 1
                state.counters.lastError = f"{type(e).__name__}: {e}"
                self.log.info(
                    "punch to node {node} failed (attempt {n}): {error}", node=nodeId, n=attempt, error=str(e) or e
                )
                if state.puncher is not None:
                    state.puncher.stop()
                    state.puncher = None
                yield deferLater(self.reactor, PAUSE_BETWEEN_ATTEMPTS, lambda: None)
                continue
            return
        state.notBefore = self.reactor.seconds() + RETRY_AFTER
        self.log.info("node {node} stays relayed; next punch in {seconds:g}s", node=nodeId, seconds=RETRY_AFTER)
        self._consider(nodeId)

    @inlineCallbacks
    def _attempt(self, nodeId: str, state: _PeerState) -> Any:
        assert self.sock is not None
        started = self.reactor.seconds()
        mapped = yield self._freshMapped()
        session = PunchInitiator(self.secret, [mapped])
        reply: Deferred[bytes] = Deferred()
        state.reply = (session.sessionId, reply)
        reply.addTimeout(self.nat.punch_timeout, self.reactor)

        def unsent(failure: Failure) -> None:
            if not reply.called:
                reply.errback(failure)

        try:
            self.cluster.send(nodeId, KIND, session.start(self.reactor.seconds())).addErrback(unsent)
            data = yield reply
        finally:
            state.reply = None
        step = session.receive(data, self.reactor.seconds())
        assert step.plan is not None and step.send is not None
        yield self.cluster.send(nodeId, KIND, step.send)
        puncher = state.puncher = self._puncher(step.plan)
        puncher.preopen()
        path = yield puncher.start(step.plan.at)
        yield self._openChannel(nodeId, state, path, started)

    @inlineCallbacks
    def _freshMapped(self) -> Any:
        """
        The socket's mapped address now (a binding to the first server
        refreshes the NAT's mapping too); the last known if none answers.
        """
        assert self.sock is not None
        servers = self.servers()
        if servers:
            try:
                answer = yield self.sock.stun.request(servers[0])
            except Exception as e:
                self.log.info("STUN binding before a punch failed: {error}", error=e)
            else:
                if answer.xorMappedAddress is not None:
                    self.mapped = answer.xorMappedAddress
        if self.mapped is None:
            raise PunchError("no mapped address")
        return self.mapped

    def _puncher(self, plan: Any) -> Puncher:
        assert self.sock is not None
        nat = self.nat
        return Puncher(
            self.sock,
            plan,
            self.reactor,
            ttl=nat.punch_ttl,
            interval=nat.punch_interval,
            timeout=nat.punch_timeout,
            linger=nat.punch_timeout,
        )

    # Both.

    @inlineCallbacks
    def _openChannel(self, nodeId: str, state: _PeerState, path: PunchedPath, started: float) -> Any:
        assert self.certificate is not None
        factory = self.cluster.directLinkFactory(path.plan.initiator)
        channel = QuicChannel.connect(
            path,
            factory,
            self.reactor,
            self.certificate,
            keepalive=self.nat.keepalive,
            consentTimeout=self.nat.consent_timeout,
        )
        # The link must authenticate as the node punched to.
        channel.transport.peerNodeId = nodeId
        state.channel = channel
        channel.lost.addCallback(self._channelLost, nodeId, state, channel, path)
        ready = channel.ready
        ready.addTimeout(CHANNEL_TIMEOUT, self.reactor)
        try:
            yield ready
        except Exception:
            channel.close(0, "channel did not come up")
            raise
        counters = state.counters
        counters.successes += 1
        counters.timeToDirect = self.reactor.seconds() - started
        self.log.info(
            "direct path to node {node} at {peer} in {seconds:.3f}s",
            node=nodeId,
            peer=formatAddress(path.peer),
            seconds=counters.timeToDirect,
        )

    def _channelLost(
        self, reason: BaseException, nodeId: str, state: _PeerState, channel: QuicChannel, path: PunchedPath
    ) -> None:
        if state.channel is channel:
            state.channel = None
        if path.puncher is not None:
            path.puncher.stop()
        if isinstance(reason, PathLost) and self.running:
            state.counters.fallbacks += 1
            state.notBefore = self.reactor.seconds() + RETRY_AFTER
            self.log.info("direct path to node {node} lost ({reason}): back to the relay", node=nodeId, reason=reason)

    # Coordination messages.

    def _received(self, nodeId: str, payload: bytes) -> None:
        if self.sock is None or not self.running:
            return
        state = self._state(nodeId)
        if self.cluster.nodeId < nodeId:
            # This node initiated: the answer to its Connect.
            if state.reply is not None and not state.reply[1].called:
                state.reply[1].callback(payload)
            return
        kind = payload[5] if len(payload) > 5 else None
        if kind == _CONNECT:
            self._connectReceived(nodeId, state, payload)
        elif kind == _SYNC:
            self._syncReceived(nodeId, state, payload)

    def _connectReceived(self, nodeId: str, state: _PeerState, payload: bytes) -> None:
        assert self.certificate is not None
        report = self.report
        if report is None or not report.punchable or self.mapped is None:
            # No answer: the initiator's attempt times out.
            self.log.info("punch from node {node} not answered: this NAT is not punchable", node=nodeId)
            return
        if state.puncher is not None:
            state.puncher.stop()
        responder = PunchResponder(self.secret, [self.mapped], self.certificate.der)
        try:
            step = responder.receive(payload, self.reactor.seconds())
        except PunchError as e:
            self.log.warn("bad punch request from node {node}: {error}", node=nodeId, error=e)
            return
        assert step.plan is not None and step.send is not None
        state.responder = responder
        state.puncher = self._puncher(step.plan)
        state.puncher.preopen()
        self.cluster.send(nodeId, KIND, step.send).addErrback(lambda f: None)

    def _syncReceived(self, nodeId: str, state: _PeerState, payload: bytes) -> None:
        responder, puncher = state.responder, state.puncher
        if responder is None or puncher is None:
            return
        try:
            step = responder.receive(payload, self.reactor.seconds())
        except PunchError as e:
            self.log.warn("bad punch sync from node {node}: {error}", node=nodeId, error=e)
            return
        assert step.plan is not None
        state.responder = None
        state.counters.attempts += 1
        started = self.reactor.seconds()
        d = puncher.start(step.plan.at)
        d.addCallback(lambda path: self._openChannel(nodeId, state, path, started))

        def failed(failure: Failure) -> None:
            state.counters.failures += 1
            state.counters.lastError = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
            self.log.info("punch from node {node} failed: {error}", node=nodeId, error=failure.getErrorMessage())

        d.addErrback(failed)
