# -*- test-case-name: timtx.test.test_membership -*-
"""
The cluster on Twisted: L{ClusterService} runs SWIM (L{timtx.cluster.swim})
over authenticated peer links (L{timtx.transports.peer}), keeps the view and
the ownership of keys (L{timtx.cluster.ownership}) current, and carries
application messages and requests between nodes.

Links.  Nodes keep a full mesh of TCP links, one per pair.  A node dials
its seeds until it has joined, then every live member it has no link with
(the node with the smaller id at once, the other after a short delay, so
that two nodes rarely dial each other at the same moment), again with
backoff while the member stays live (the model is
L{twisted.application.internet.ClientService}).  When two links to the same
node exist anyway, both ends keep the same one: the one dialled by the
smaller node id (a tie broken by the link id both ends share), or the newer
if the peer restarted.  A broken link is a hint to SWIM (the member is
probed next), not a verdict; SWIM's verdict of dead or left closes the link.

Nodes behind NAT.  A node that cannot be dialled (C{[nat] reachable =
false}) dials every reachable member at once, and names one of them, its
relay, in its metadata (L{META_RELAY}); no reachable node dials it.  Two
such nodes get their link through the relay of the one dialled
(L{timtx.cluster.relay}): the same peer protocol, authenticated end to end,
with the relay forwarding bytes.  Where both a direct (TCP, or a punched
path the NAT layer opened) and a relayed link exist, both ends keep the
direct one.  L{ClusterService.dialPlan} is the one place that decides how
to reach a member.  With C{reachable = auto} a node starts as one that
cannot be dialled, and asks the first reachable member it links with to
dial it back (L{DIALBACK_KIND}); once that link arrives it is reachable.

Messages.  L{ClusterService.send} carries one-way messages and
L{ClusterService.request} requests, each under a I{kind} whose handler
(L{ClusterService.addHandler}) runs on the receiving node; a request's
answer is what the handler returns.  Requests wait at most a timeout, at
most C{max_inflight_requests} of them per peer in each direction; when the
link to a peer is lost, its pending requests fail at once
(L{PeerUnavailable}): the caller decides whether to retry, knowing a request
may or may not have been handled.  Messages to a node being dialled wait,
bounded by C{max_peer_output_bytes}, and fail if the dial does.

State on disk.  The members last seen and this node's incarnation are kept
in C{data_dir/cluster-members.json} (rewritten at most once a second, and at
stop): a restarted node dials them as well as its seeds, and starts with a
higher incarnation than any claim about its previous run.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.cluster.ownership import Ownership
from timtx.cluster.relay import (
    RELAY_CLOSE,
    RELAY_CLOSED,
    RELAY_CONNECT,
    RELAY_DATA,
    RELAY_DELIVER,
    RELAY_INCOMING,
    Circuits,
    Relay,
    RelayedTransport,
    RelayEndpoint,
    RelayLimits,
)
from timtx.cluster.swim import (
    ChangeKind,
    Member,
    MemberChange,
    Swim,
    SwimConfig,
    SwimDecodeError,
    decodeMessage,
    encodeMessage,
)
from timtx.config import ClusterConfig, Config, ConfigError, splitHostPort
from timtx.protocols.peer import KIND_PATTERN, MAX_REQUEST_ID, MIN_SECRET_BYTES, CloseCode, ResponseStatus
from timtx.transports.peer import IPeerHandler, PeerFactory, PeerProtocol, PeerSettings, PeerTLS, PeerTraffic

#: The message kind SWIM uses; not available to applications.
SWIM_KIND = "swim"
#: The file in the data directory holding the last members seen.
MEMBERS_FILE = "cluster-members.json"
#: The file in the data directory holding the node id made on first start.
NODE_ID_FILE = "node-id"
#: Metadata of a node that cannot be dialled: "relay" (reach it through
#: the relay named by META_RELAY).
META_REACH = "nat.reach"
#: Metadata naming the node id of the relay of a node that cannot be dialled.
META_RELAY = "nat.relay"
#: The request a node with [nat] reachable = auto sends a reachable member:
#: dial me back at this address (the payload).
DIALBACK_KIND = "nat.dialback"
#: How a dialer's address names a link through a relay: relay:RELAY/TARGET.
RELAY_ADDRESS = "relay:"
#: Seconds between rewrites of the members file while relayed or direct
#: links carry traffic (their counters change without a membership change).
COUNTERS_SAVE_INTERVAL = 5.0
#: SWIM messages queued for a node being dialled; more are dropped (SWIM
#: copes with loss).
MAX_QUEUED_SWIM = 64
#: Seconds between log lines saying the event loop lags (one at most).
LAG_LOG_INTERVAL = 30.0


class PeerUnavailable(Exception):
    """
    The node cannot be reached: unknown, dead, the dial failed or the link
    was lost while a request waited.
    """

    def __init__(self, nodeId: str, reason: str):
        super().__init__(nodeId, reason)
        self.nodeId = nodeId
        self.reason = reason

    def __str__(self) -> str:
        return f"node {self.nodeId} unavailable: {self.reason}"


class PeerBusy(Exception):
    """
    Too many requests in flight to or at the node.
    """


class PeerTimeout(Exception):
    """
    A request got no answer in time; it may or may not have been handled.
    """


class PeerRequestFailed(Exception):
    """
    The other node answered with an error: its handler failed, or it has no
    handler for the kind.

    @ivar reason: the other node's short reason (never a traceback).
    """

    def __init__(self, nodeId: str, reason: str):
        super().__init__(nodeId, reason)
        self.nodeId = nodeId
        self.reason = reason


class PeerRequestError(Exception):
    """
    Raise from a request handler to answer with this message as the error
    (other exceptions answer "internal error" and are logged here).
    """


#: A handler: called with the sending node's id and the payload; for a
#: request, its result (bytes, C{None} for empty, or a Deferred of either)
#: is the answer.
Handler = Callable[[str, bytes], Any]
Observer = Callable[[MemberChange], None]


def swimConfig(cluster: ClusterConfig) -> SwimConfig:
    """
    The SWIM settings of a C{[cluster]} section.
    """
    return SwimConfig(
        probeInterval=cluster.probe_interval,
        probeTimeout=cluster.probe_timeout,
        indirectChecks=cluster.indirect_probes,
        suspicionMult=cluster.suspicion_mult,
        suspicionMaxMult=cluster.suspicion_max_mult,
        retransmitMult=cluster.retransmit_mult,
        maxPiggyback=cluster.max_piggyback,
        gossipInterval=cluster.gossip_interval,
        gossipNodes=cluster.gossip_nodes,
        pushPullInterval=cluster.push_pull_interval,
        reconnectInterval=cluster.reconnect_interval,
        deadMemberTTL=cluster.dead_member_ttl,
    )


def loadNodeId(dataDir: str) -> str:
    """
    The node id kept in C{dataDir}, made (random) and kept on first use.
    """
    path = os.path.join(dataDir, NODE_ID_FILE)
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    nodeId = secrets.token_hex(8)
    os.makedirs(dataDir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(nodeId + "\n")
    os.replace(tmp, path)
    return nodeId


def checkClusterConfig(config: Config) -> None:
    """
    Check what one key cannot check alone.

    @raise ConfigError: naming the key at fault.
    """
    cluster = config.cluster
    if not cluster.listen:
        return

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(message, config.path, "cluster", key)

    if not cluster.probe_timeout < cluster.probe_interval:
        raise error("probe_timeout", "must be shorter than probe_interval")
    if not cluster.secret and not cluster.secret_file:
        raise error("secret", "a cluster needs secret or secret_file")
    if cluster.secret and cluster.secret_file:
        raise error("secret", "set secret or secret_file, not both")
    tls = (cluster.tls_cert, cluster.tls_key, cluster.tls_ca)
    if any(tls) and not all(tls):
        raise error("tls_cert", "TLS needs tls_cert, tls_key and tls_ca together")
    if not cluster.advertise and "interface=" not in cluster.listen:
        raise error("advertise", "required when listen names no interface (which address should others dial?)")
    if not cluster.listen.startswith("tcp:"):
        raise error("listen", "use a tcp: endpoint (for TLS, set tls_cert, tls_key and tls_ca)")


def loadSecret(config: Config) -> bytes:
    """
    The cluster secret, from C{secret} or C{secret_file}.

    @raise ConfigError: if it is missing, unreadable or too short.
    """
    cluster = config.cluster
    if cluster.secret_file:
        path = config.resolve(cluster.secret_file)
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read {path} ({e.strerror})", config.path, "cluster", "secret_file") from None
        key = "secret_file"
    else:
        secret = cluster.secret.encode("utf-8")
        key = "secret"
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the secret must have at least {MIN_SECRET_BYTES} bytes", config.path, "cluster", key)
    return secret


def loadTLS(config: Config) -> PeerTLS | None:
    """
    The peer TLS settings, or C{None} without TLS.

    @raise ConfigError: if a file cannot be read or used.
    """
    cluster = config.cluster
    if not cluster.tls_cert:
        return None
    try:
        return PeerTLS.fromFiles(
            config.resolve(cluster.tls_cert), config.resolve(cluster.tls_key), config.resolve(cluster.tls_ca)
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the TLS files ({e})", config.path, "cluster", "tls_cert") from None


@dataclass
class _Pending:
    deferred: Deferred[bytes]
    timer: IDelayedCall


@dataclass
class _Queued:
    """
    A frame waiting for a link: a message, or a request (with its id).
    """

    kind: str
    payload: bytes
    deferred: Deferred[None] | None = None
    requestId: int | None = None


@dataclass
class _Peer:
    nodeId: str
    link: PeerProtocol | None = None
    dialer: _Dialer | None = None
    queue: list[_Queued] = field(default_factory=list)
    queuedBytes: int = 0
    requests: dict[int, _Pending] = field(default_factory=dict)
    nextRequestId: int = 0
    serving: int = 0
    #: What the last link established with it offered (see
    #: L{ClusterService.peerFeatures}).
    features: frozenset[str] = frozenset()
    #: The run (the session id of its handshake) the last link reached.
    run: bytes | None = None

    def newRequestId(self) -> int:
        self.nextRequestId = (self.nextRequestId + 1) & MAX_REQUEST_ID
        while self.nextRequestId in self.requests:
            self.nextRequestId = (self.nextRequestId + 1) & MAX_REQUEST_ID
        return self.nextRequestId


class _LinkFactory(PeerFactory):
    """
    Builds the service's links and keeps track of each from the start, so
    the service can close them all when it stops; none while it stops.
    """

    service: ClusterService

    def buildProtocol(self, addr: Any) -> PeerProtocol | None:  # type: ignore[override]
        if self.service._stopping:
            return None
        link = super().buildProtocol(addr)
        self.service._links.add(link)
        return link


class _DialFactory(_LinkFactory):
    dialer: _Dialer


class _Dialer:
    """
    Dials one address until a link is established there or it is stopped,
    with backoff on the service's clock.

    @ivar nodeId: the node expected there, or C{None} for a seed.
    @ivar persistent: whether to keep trying after a failure.
    """

    def __init__(self, service: ClusterService, address: str, nodeId: str | None, persistent: bool):
        self.service = service
        self.address = address
        self.nodeId = nodeId
        self.persistent = persistent
        self.failures = 0
        self.stopped = False
        self._attempt: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._link: PeerProtocol | None = None

    def start(self, delay: float = 0.0) -> None:
        if self._timer is None and self._attempt is None and self._link is None:
            self._timer = self.service.clock.callLater(delay, self._dial)

    def hurry(self) -> None:
        """
        Dial now if waiting for a delayed start.
        """
        if self._timer is not None and self.failures == 0:
            self._timer.cancel()
            self._timer = None
            self._dial()

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()

    def retryNow(self) -> None:
        """
        Dial now if waiting for a retry (the relay it needs came up).
        """
        if self._timer is not None and not self.stopped:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._dial()

    def _dial(self) -> None:
        self._timer = None
        if self.stopped:
            return
        service = self.service
        factory = service.makeClientFactory()
        factory.dialer = self
        try:
            endpoint = service.dialEndpoint(self.address)
        except ValueError as e:
            self._failed(str(e))
            return
        attempt = self._attempt = endpoint.connect(factory)
        attempt.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, link: PeerProtocol) -> None:
        self._attempt = None
        self._link = link

    def _connectFailed(self, failure: Failure) -> None:
        self._attempt = None
        if not self.stopped:
            self._failed(failure.getErrorMessage())

    def linkEnded(self, link: PeerProtocol) -> None:
        """
        A link this dialer made closed before it was established.
        """
        if link is self._link:
            self._link = None
        if self.stopped:
            return
        if link.closeCode == CloseCode.SELF_CONNECTION:
            self.stopped = True
            self.service.dialerFinished(self, link.closeReason or "connected to itself", permanent=True)
            return
        self._failed(link.closeReason or "link lost")

    def linkEstablished(self, link: PeerProtocol) -> None:
        self._link = None
        self.stopped = True

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.service.dialFailed(self, reason)
        if self.persistent and not self.stopped:
            self._timer = self.service.clock.callLater(self.service.retryPolicy(self.failures), self._dial)
        else:
            self.stopped = True
            self.service.dialerFinished(self, reason, permanent=False)


@implementer(IPeerHandler)
class ClusterService(Service):
    """
    This node's part in the cluster.

    @ivar nodeId: this node's id.
    @ivar ready: fires once the node listens and takes part (with C{None}),
        or fails if it cannot listen.
    @ivar swim: the membership core once started.
    """

    log = Logger()

    def __init__(
        self,
        config: ClusterConfig,
        reactor: Any,
        *,
        nodeId: str,
        secret: bytes,
        dataDir: str,
        clientAddresses: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        tls: PeerTLS | None = None,
        rng: random.Random | None = None,
        protocol: type[PeerProtocol] = PeerProtocol,
        reachable: bool | None = True,
        relayLimits: RelayLimits | None = None,
    ):
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.nodeId = nodeId
        self.dataDir = dataDir
        self.tls = tls
        self.rng = rng or random.Random()
        self.protocol = protocol
        self.swimConfig = swimConfig(config)
        self.settings = PeerSettings(
            nodeId,
            secret,
            maxFrameBytes=config.max_peer_frame_bytes,
            maxOutputBytes=config.max_peer_output_bytes,
            handshakeTimeout=config.handshake_timeout,
            linkTimeout=config.link_timeout,
        )
        #: The delay before the n-th retry of a dial, as L{ClientService}'s.
        self.retryPolicy = backoffPolicy(0.25, 10.0, 2.0, jitter=lambda: self.rng.uniform(0, 0.1))
        self.ready: Deferred[None] = Deferred()
        self.swim: Swim | None = None
        self.address: str | None = None
        self._clientAddresses = tuple(clientAddresses)
        self._meta = dict(meta or {})
        #: Whether other nodes can dial this one ([nat] reachable); with
        #: auto (C{None}), not until a dial-back proves it.
        self.reachable = bool(reachable)
        self.autoReachable = reachable is None
        #: The reachable nodes asked to dial this one back.
        self._dialBackAsked: set[str] = set()
        #: One-off dials beside a peer's link (a dial-back, a relayed peer
        #: that turned out reachable), one per node at a time.
        self._sideDialers: dict[str, _Dialer] = {}
        #: This node's relay while it cannot be dialled.
        self.relayId: str | None = None
        self.relay = Relay(self, relayLimits or RelayLimits())
        self.circuits = Circuits(self)
        self._responderFactory: _LinkFactory | None = None
        #: Metadata the NAT layer advertises (its mapping, STUN servers).
        self._natMeta: dict[str, str] = {}
        self._linkObservers: list[Callable[[str, str | None], None]] = []
        self._restartObservers: list[Callable[[str], None]] = []
        self._pathInfo: list[Callable[[str], Mapping[str, Any]]] = []
        self._peers: dict[str, _Peer] = {}
        self._seedDialers: dict[str, _Dialer] = {}
        self._unwanted: set[str] = set()
        self._handlers: dict[str, Handler] = {}
        self._observers: list[Observer] = []
        self._ownership = Ownership([nodeId])
        self._port: Any = None
        # The call that next runs the SWIM core's timers, for the deadline it
        # asked for; while _awaitingIO, the reactor's I/O pass before them.
        self._timer: IDelayedCall | None = None
        self._deadline = 0.0
        self._awaitingIO = False
        self._lagLoggedAt = -LAG_LOG_INTERVAL
        self._saveTimer: IDelayedCall | None = None
        self._links: set[PeerProtocol] = set()
        #: Links given up for a duplicate, read until they close (L{_adopt}).
        self._retiring: dict[PeerProtocol, IDelayedCall] = {}
        self._closed: dict[PeerProtocol, Deferred[None]] = {}
        self._incarnation = 0
        self._remembered: list[str] = []
        self._stopping = False
        #: Where to listen for peers instead of C{config.listen}: a socket
        #: handed down by a parent process (L{timtx.processes}).
        self.listenEndpoint: IStreamServerEndpoint | None = None
        for kind, handler in (
            (RELAY_CONNECT, self.relay.connectReceived),
            (RELAY_DATA, self.relay.dataReceived),
            (RELAY_CLOSE, self.relay.closeReceived),
            (RELAY_INCOMING, self.circuits.incomingReceived),
            (RELAY_DELIVER, self.circuits.deliverReceived),
            (RELAY_CLOSED, self.circuits.closedReceived),
            (DIALBACK_KIND, self._dialBackRequested),
        ):
            self.addHandler(kind, handler)

    @classmethod
    def fromConfig(
        cls,
        config: Config,
        reactor: Any,
        *,
        clientAddresses: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        protocol: type[PeerProtocol] = PeerProtocol,
        rng: random.Random | None = None,
    ) -> ClusterService:
        """
        The service for a node's configuration, with the secret, node id
        and TLS files loaded.

        @raise ConfigError: if C{[cluster]} cannot be used (or is off: an
            empty C{listen}).
        """
        cluster = config.cluster
        if not cluster.listen:
            raise ConfigError("the cluster is off (listen is empty)", config.path, "cluster", "listen")
        checkClusterConfig(config)
        dataDir = config.resolve(config.node.data_dir)
        return cls(
            cluster,
            reactor,
            nodeId=cluster.node_id or loadNodeId(dataDir),
            secret=loadSecret(config),
            dataDir=dataDir,
            clientAddresses=clientAddresses,
            meta=meta,
            tls=loadTLS(config),
            rng=rng,
            protocol=protocol,
            reachable={"true": True, "false": False}.get(config.nat.reachable),
            relayLimits=RelayLimits.fromConfig(config.nat),
        )

    # The view.

    def members(self) -> list[Member]:
        """
        Every member known, this node included, with its state.
        """
        return self.swim.members() if self.swim is not None else []

    def liveMembers(self) -> list[Member]:
        return self.swim.liveMembers() if self.swim is not None else []

    def member(self, nodeId: str) -> Member | None:
        return self.swim.member(nodeId) if self.swim is not None else None

    @property
    def ownership(self) -> Ownership:
        """
        Who owns what among the live members (alive or suspect), as this
        node sees them now.
        """
        return self._ownership

    @property
    def traffic(self) -> PeerTraffic:
        """
        The bytes this node's peer links carried, both ways, since it started.
        """
        return self.settings.traffic

    def offer(self, feature: str) -> None:
        """
        Offer C{feature} in the handshake of every link made from now on
        (call it before the service starts): a service that adds an
        optional field to its messages sends it only to the nodes that
        offer it too (L{peerFeatures}), so a node that does not know it
        is sent what it reads.

        @raise ValueError: for a name that is not a valid kind.
        """
        self._checkKind(feature)
        if feature not in self.settings.features:
            self.settings = replace(self.settings, features=(*self.settings.features, feature))

    def peerFeatures(self, nodeId: str) -> frozenset[str]:
        """
        The features both this node and C{nodeId} offered on the last link
        established between them (kept while it is down: what waits for it
        goes on the next one, to the same process as a rule); none before
        the first.
        """
        peer = self._peers.get(nodeId)
        return frozenset() if peer is None else peer.features

    def addObserver(self, observer: Observer) -> None:
        """
        Call C{observer} with each L{MemberChange}, after the view and
        L{ownership} reflect it.
        """
        self._observers.append(observer)

    def removeObserver(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def advertise(self, *, clientAddresses: Sequence[str] | None = None, meta: Mapping[str, str] | None = None) -> None:
        """
        Change the client addresses or metadata this node advertises (for
        example once its client listeners have ports).
        """
        if clientAddresses is not None:
            self._clientAddresses = tuple(clientAddresses)
        if meta is not None:
            self._meta = dict(meta)
        if self.swim is not None and not self.swim.left:
            merged = None if meta is None else self._advertisedMeta()
            self.swim.update(self.clock.seconds(), clientAddresses=clientAddresses, meta=merged)
            self._pump()

    def _advertisedMeta(self) -> dict[str, str]:
        """
        The application's metadata with this node's NAT entries.
        """
        meta = dict(self._meta)
        meta.pop(META_REACH, None)
        meta.pop(META_RELAY, None)
        meta.update(self._natMeta)
        if not self.reachable:
            meta[META_REACH] = "relay"
            if self.relayId is not None:
                meta[META_RELAY] = self.relayId
        return meta

    # Hooks for the NAT layer (timtx.nat.direct), which the node wires in.

    def setNatMeta(self, entries: Mapping[str, str]) -> None:
        """
        Advertise C{entries} (keys starting with C{nat.}) beside the
        application's metadata, replacing those set before.
        """
        if dict(entries) == self._natMeta:
            return
        self._natMeta = {key: value for key, value in entries.items() if key.startswith("nat.")}
        if self.swim is not None and not self.swim.left:
            self.swim.update(self.clock.seconds(), meta=self._advertisedMeta())
            self._pump()

    def addLinkObserver(self, observer: Callable[[str, str | None], None]) -> None:
        """
        Call C{observer(nodeId, path)} when the link to a node changes:
        C{path} is C{tcp}, C{relayed} or C{direct}, or C{None} when lost.
        """
        self._linkObservers.append(observer)

    def addRestartObserver(self, observer: Callable[[str], None]) -> None:
        """
        Call C{observer(nodeId)} when a link is made to another run of a
        node than its last link reached: the node was started again,
        perhaps before any member held it dead, and keeps nothing of its
        last run (sessions, lookups, subscriptions).  Called before the
        new link carries anything either way, so that what the new run
        sends is never taken for what the old one left.
        """
        self._restartObservers.append(observer)

    def addPathInfo(self, provider: Callable[[str], Mapping[str, Any]]) -> None:
        """
        Add what C{provider(nodeId)} returns to that member's entry in the
        members file (punch counters, say).
        """
        self._pathInfo.append(provider)

    def directLinkFactory(self, initiator: bool) -> PeerFactory:
        """
        A factory of peer links for a channel the NAT layer opened (the
        punch initiator's side initiates the link).  The service tracks
        such a link once established; until then its channel's owner
        closes it.
        """
        return PeerFactory(self, self.settings, self.clock, initiator=initiator, protocol=self.protocol)

    def _linkChanged(self, nodeId: str, path: str | None) -> None:
        for observer in list(self._linkObservers):
            try:
                observer(nodeId, path)
            except Exception:
                self.log.failure("link observer {observer} failed", observer=observer)

    # Application messages.

    def addHandler(self, kind: str, handler: Handler) -> None:
        """
        Handle messages and requests of C{kind} from other nodes.

        @raise ValueError: for an invalid or reserved kind, or one already
            handled.
        """
        self._checkKind(kind)
        if kind in self._handlers:
            raise ValueError(f"kind {kind!r} already has a handler")
        self._handlers[kind] = handler

    def removeHandler(self, kind: str) -> None:
        self._handlers.pop(kind, None)

    @property
    def kinds(self) -> frozenset[str]:
        """
        The kinds this node handles.
        """
        return frozenset(self._handlers)

    def _checkKind(self, kind: str) -> None:
        if not KIND_PATTERN.match(kind):
            raise ValueError(f"invalid kind {kind!r}: 1 to 64 letters, digits, '.', '_' or '-'")
        if kind == SWIM_KIND:
            raise ValueError(f"kind {kind!r} is reserved")

    def send(self, nodeId: str, kind: str, payload: bytes) -> Deferred[None]:
        """
        Send a one-way message to C{nodeId} (this node included).

        @return: fires when the message is written to a link (not when it
            is handled); fails with L{PeerUnavailable} if it cannot be.
        """
        self._checkKind(kind)
        if nodeId == self.nodeId:
            self.clock.callLater(0, self._handleMessage, nodeId, kind, payload)
            return succeed(None)
        try:
            peer = self._reachable(nodeId)
        except PeerUnavailable as e:
            return fail(e)
        if peer.link is not None and peer.link.sendMessage(kind, payload):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._enqueue(peer, _Queued(kind, payload, d))
        return d

    def request(self, nodeId: str, kind: str, payload: bytes, timeout: float | None = None) -> Deferred[bytes]:
        """
        Ask C{nodeId} (this node included) and wait for its answer.

        @param timeout: seconds; C{None} means C{[cluster] request_timeout}.
        @return: the answer; or fails with L{PeerUnavailable},
            L{PeerBusy}, L{PeerTimeout} or L{PeerRequestFailed}.
        """
        self._checkKind(kind)
        if nodeId == self.nodeId:
            return self._answerLocally(kind, payload)
        try:
            peer = self._reachable(nodeId)
        except PeerUnavailable as e:
            return fail(e)
        if len(peer.requests) >= self.config.max_inflight_requests:
            return fail(PeerBusy(f"{len(peer.requests)} requests already wait on node {nodeId}"))
        requestId = peer.newRequestId()
        seconds = self.config.request_timeout if timeout is None else timeout

        def cancel(d: Deferred[bytes]) -> None:
            pending = peer.requests.pop(requestId, None)
            if pending is not None and pending.timer.active():
                pending.timer.cancel()

        d: Deferred[bytes] = Deferred(cancel)

        def expire() -> None:
            if peer.requests.pop(requestId, None) is not None:
                d.errback(PeerTimeout(f"no answer from node {nodeId} to {kind!r} within {seconds:g}s"))

        peer.requests[requestId] = _Pending(d, self.clock.callLater(seconds, expire))
        if peer.link is None or not peer.link.sendRequest(requestId, kind, payload):
            self._enqueue(peer, _Queued(kind, payload, requestId=requestId))
        return d

    def waiting(self, nodeId: str) -> int | None:
        """
        Bytes waiting to go to C{nodeId} beyond what its link takes at
        once (queued for a link, or written since the link became
        congested), or C{None} while nothing has to wait.  For traffic
        that is worthless late (stream frames): its sender drops it past a
        bound of its own instead of letting the link be dropped.
        """
        peer = self._peers.get(nodeId)
        if peer is None:
            return None
        link = peer.link
        congested = link is not None and link.congested
        if not congested and not peer.queue:
            return None
        return peer.queuedBytes + (link.backlog if link is not None and congested else 0)

    def _answerLocally(self, kind: str, payload: bytes) -> Deferred[bytes]:
        handler = self._handlers.get(kind)
        if handler is None:
            return fail(PeerRequestFailed(self.nodeId, f"no handler for {kind!r}"))
        d = maybeDeferred(handler, self.nodeId, payload)
        return d.addCallback(lambda answer: b"" if answer is None else bytes(answer))

    def _reachable(self, nodeId: str) -> _Peer:
        if self._stopping:
            # Links are closing: nothing sent now would be answered.
            raise PeerUnavailable(nodeId, "this node is stopping")
        peer = self._peers.get(nodeId)
        if peer is not None and peer.link is not None:
            return peer
        member = self.member(nodeId)
        if member is None or not member.live:
            state = "unknown" if member is None else member.state.value
            raise PeerUnavailable(nodeId, f"not a live member ({state})")
        return self._peer(nodeId)

    def _enqueue(self, peer: _Peer, item: _Queued) -> None:
        size = len(item.payload)
        if peer.queuedBytes + size > self.config.max_peer_output_bytes:
            self._failQueued(item, PeerUnavailable(peer.nodeId, "too much waiting for the link"), peer)
            return
        peer.queue.append(item)
        peer.queuedBytes += size
        self._ensureLink(peer, hurry=True)

    def _failQueued(self, item: _Queued, error: Exception, peer: _Peer) -> None:
        if item.deferred is not None:
            item.deferred.errback(error)
        elif item.requestId is not None:
            pending = peer.requests.pop(item.requestId, None)
            if pending is not None:
                pending.timer.cancel()
                pending.deferred.errback(error)

    def _flushQueue(self, peer: _Peer) -> None:
        link = peer.link
        queue, peer.queue, peer.queuedBytes = peer.queue, [], 0
        for item in queue:
            if link is None:
                self._failQueued(item, PeerUnavailable(peer.nodeId, "no link"), peer)
            elif item.requestId is not None:
                if item.requestId in peer.requests:
                    link.sendRequest(item.requestId, item.kind, item.payload)
            elif link.sendMessage(item.kind, item.payload):
                if item.deferred is not None:
                    item.deferred.callback(None)
            elif item.deferred is not None:
                item.deferred.errback(PeerUnavailable(peer.nodeId, "link closed"))

    def _failPeer(self, peer: _Peer, reason: str) -> None:
        """
        Fail what waits on C{peer}: queued frames and pending requests.
        """
        error = PeerUnavailable(peer.nodeId, reason)
        queue, peer.queue, peer.queuedBytes = peer.queue, [], 0
        for item in queue:
            if item.kind != SWIM_KIND:
                self._failQueued(item, error, peer)
        requests, peer.requests = peer.requests, {}
        for pending in requests.values():
            if pending.timer.active():
                pending.timer.cancel()
            pending.deferred.errback(error)

    # Lifecycle.

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loadMembers()
        factory = _LinkFactory(self, self.settings, self.clock, initiator=False, protocol=self.protocol)
        factory.service = self
        self._responderFactory = factory
        wrapped = self.tls.wrapServerFactory(factory) if self.tls is not None else factory
        endpoint = self.listenEndpoint or serverFromString(self.reactor, self.config.listen)
        d = endpoint.listen(wrapped)
        d.addCallbacks(self._listening, self._listenFailed)

    def _listenFailed(self, failure: Failure) -> None:
        self.log.critical(
            "cannot listen for peers on {endpoint}: {error}",
            endpoint=self.config.listen,
            error=failure.getErrorMessage(),
        )
        self.ready.errback(failure)

    def _listening(self, port: Any) -> None:
        self._port = port
        if self._stopping:
            port.stopListening()
            return
        host = port.getHost()
        address = self.config.advertise or f"{host.host}:{host.port}"
        if host.host in ("0.0.0.0", "::") and not self.config.advertise:
            port.stopListening()
            self._port = None
            self.ready.errback(ConfigError("set it: listening on every interface", None, "cluster", "advertise"))
            return
        self.address = address
        now = self.clock.seconds()
        self.swim = Swim(
            self.nodeId,
            address,
            now=now,
            config=self.swimConfig,
            rng=random.Random(self.rng.getrandbits(64)),
            clientAddresses=self._clientAddresses,
            meta=self._advertisedMeta(),
            incarnation=self._incarnation,
        )
        self.log.info("node {node} takes part in the cluster at {address}", node=self.nodeId, address=address)
        self._dialSeeds()
        self._pump()
        self.ready.callback(None)

    def stopService(self) -> Deferred[Any]:
        """
        Leave (unless C{leave_on_stop} is off), close every link, stop
        listening and save the members.  Fires once all is closed.
        """
        super().stopService()
        self._stopping = True
        swim = self.swim
        if swim is not None and self.config.leave_on_stop and not swim.left:
            swim.leave(self.clock.seconds())
            self._pump()
        for timer in (self._timer, self._saveTimer, *self._retiring.values()):
            if timer is not None and timer.active():
                timer.cancel()
        self._retiring.clear()
        self._timer = self._saveTimer = None
        self._awaitingIO = False
        self._save()
        for dialer in [*self._seedDialers.values(), *self._sideDialers.values()]:
            dialer.stop()
        self._seedDialers.clear()
        self._sideDialers.clear()
        waits: list[Deferred[Any]] = []
        for peer in list(self._peers.values()):
            if peer.dialer is not None:
                peer.dialer.stop()
                peer.dialer = None
            self._failPeer(peer, "this node is stopping")
        links = list(self._links)
        for link in links:
            waits.append(self._whenClosed(link))
            link.close(CloseCode.SHUTTING_DOWN, "node stopping")
        if links:
            # A peer that does not close its end in time is cut off.
            abort = self.clock.callLater(self.config.handshake_timeout, self._abortLinks)
            waits.append(self._closingDone(abort))
        if self._port is not None:
            waits.append(maybeDeferred(self._port.stopListening))
            self._port = None
        self.swim = None
        self.relay.stop()
        return gatherResults(waits)

    def _abortLinks(self) -> None:
        for link in list(self._links):
            if link.transport is not None:
                link.transport.abortConnection()

    def _closingDone(self, abort: IDelayedCall) -> Deferred[None]:
        d = gatherResults([self._whenClosed(link) for link in self._links])

        def done(result: object) -> None:
            if abort.active():
                abort.cancel()

        return d.addBoth(done)

    def _whenClosed(self, link: PeerProtocol) -> Deferred[None]:
        d = self._closed.get(link)
        if d is None:
            d = self._closed[link] = Deferred()
        return d

    # Dialling.

    def endpointFor(self, address: str) -> IStreamClientEndpoint:
        """
        The endpoint that reaches C{address} (C{host:port}), with TLS when
        configured.  Override to dial another way.

        @raise ValueError: if C{address} is not C{host:port}.
        """
        host, port = splitHostPort(address)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, port, timeout=self.config.handshake_timeout
        )
        if self.tls is not None:
            endpoint = self.tls.wrapClientEndpoint(endpoint, host)
        return endpoint

    def makeClientFactory(self) -> _DialFactory:
        factory = _DialFactory(self, self.settings, self.clock, initiator=True, protocol=self.protocol)
        factory.service = self
        return factory

    def _dialSeeds(self) -> None:
        for address in dict.fromkeys([*self.config.seeds, *self._remembered]):
            if address == self.address or address in self._unwanted or address in self._seedDialers:
                continue
            dialer = self._seedDialers[address] = _Dialer(self, address, None, persistent=True)
            dialer.start()

    def _stopSeedDialers(self) -> None:
        for dialer in self._seedDialers.values():
            dialer.stop()
        self._seedDialers.clear()

    def _ensureLink(self, peer: _Peer, hurry: bool = False) -> None:
        if peer.link is not None or self._stopping or self.swim is None:
            return
        if peer.dialer is not None and not peer.dialer.stopped:
            if hurry:
                peer.dialer.hurry()
            return
        member = self.swim.member(peer.nodeId)
        if member is None:
            return
        plan = self.dialPlan(member)
        if plan is None:
            return
        address, delay = plan
        peer.dialer = _Dialer(self, address, peer.nodeId, persistent=member.live)
        peer.dialer.start(0.0 if hurry else delay)

    def dialPlan(self, member: Member) -> tuple[str, float] | None:
        """
        How and when to dial C{member}: the address (C{host:port}, or
        C{relay:RELAY/NODE} through a relay) and the delay before the first
        attempt; or C{None} to wait for it to dial.
        """
        later = 2 * self.swimConfig.probeInterval
        # The node with the smaller id dials first; the other waits a
        # little for it, so two links are rarely made at once.
        first = 0.0 if self.nodeId < member.nodeId else later
        if member.meta.get(META_REACH) != "relay":
            # A node that cannot be dialled dials the reachable ones at once.
            return member.address, (first if self.reachable else 0.0)
        relay = member.meta.get(META_RELAY)
        if relay is None or relay == self.nodeId or not self.isLiveMember(relay):
            # It dials this node (its relay, or a reachable member) itself.
            return None
        # A reachable node waits for the member to dial it, and goes
        # through its relay only if that does not come.
        return f"{RELAY_ADDRESS}{relay}/{member.nodeId}", (later if self.reachable else first)

    def dialEndpoint(self, address: str) -> IStreamClientEndpoint:
        """
        The endpoint for a dialer's address: through a relay, or
        L{endpointFor}.

        @raise ValueError: if C{address} is not C{host:port}.
        """
        if address.startswith(RELAY_ADDRESS):
            relay, _, target = address[len(RELAY_ADDRESS) :].partition("/")
            return RelayEndpoint(self.circuits, relay, target)
        return self.endpointFor(address)

    # What the relay needs (timtx.cluster.relay.RelayHost).

    def isLiveMember(self, nodeId: str) -> bool:
        member = self.member(nodeId)
        return member is not None and member.live

    def sendOnLink(self, nodeId: str, kind: str, payload: bytes) -> bool:
        peer = self._peers.get(nodeId)
        return peer is not None and peer.link is not None and peer.link.sendMessage(kind, payload)

    def relayedResponderFactory(self) -> _LinkFactory:
        assert self._responderFactory is not None, "not started"
        return self._responderFactory

    # Paths to peers, for the members file and the admin API.

    def links(self) -> list[dict[str, Any]]:
        """
        Each other live member and whether a link to it is up now (the
        admin API's C{GET /api/cluster}).
        """
        return [
            {"node": member.nodeId, "up": self._linkUp(member.nodeId)}
            for member in self.liveMembers()
            if member.nodeId != self.nodeId
        ]

    def paths(self) -> list[dict[str, Any]]:
        """
        How this node reaches each other live member now, as
        L{linkPath} says, with the member's id (the admin API's
        C{GET /api/cluster}; C{timtx_cluster_paths} counts them).
        """
        return [
            {"node": member.nodeId, **self.linkPath(member.nodeId)}
            for member in self.liveMembers()
            if member.nodeId != self.nodeId
        ]

    def _linkUp(self, nodeId: str) -> bool:
        peer = self._peers.get(nodeId)
        return peer is not None and peer.link is not None

    def linkPath(self, nodeId: str) -> dict[str, Any]:
        """
        How this node reaches C{nodeId} now: C{path} is C{tcp},
        C{relayed} (with the relay and the bytes sent and received on it)
        or C{None} (no link).
        """
        peer = self._peers.get(nodeId)
        link = peer.link if peer is not None else None
        info: dict[str, Any] = {"path": None if link is None else pathOf(link)}
        if link is not None and isinstance(link.transport, RelayedTransport):
            transport = link.transport
            info.update(
                via=transport.relay, relayBytesSent=transport.bytesSent, relayBytesReceived=transport.bytesReceived
            )
        for provider in self._pathInfo:
            try:
                info.update(provider(nodeId))
            except Exception:
                self.log.failure("path information for node {node}", node=nodeId)
        return info

    def _chooseRelay(self) -> None:
        """
        A node that cannot be dialled keeps a relay: a reachable live
        member it has a direct link with.
        """
        if self.reachable or self._stopping or self.swim is None:
            return
        current = self.relayId
        if current is not None:
            peer = self._peers.get(current)
            if peer is not None and peer.link is not None and not self._isRelayed(peer.link):
                return
        chosen = None
        for peer in self._peers.values():
            if peer.link is None or self._isRelayed(peer.link):
                continue
            member = self.swim.member(peer.nodeId)
            if member is None or (member.live and member.meta.get(META_REACH) != "relay"):
                chosen = peer.nodeId
                break
        if chosen == current:
            return
        self.relayId = chosen
        self.log.info("reachable through relay {relay}", relay=chosen or "(none)")
        if not self.swim.left:
            self.swim.update(self.clock.seconds(), meta=self._advertisedMeta())
            self._pump()

    @staticmethod
    def _isRelayed(link: PeerProtocol) -> bool:
        return pathOf(link) == "relayed"

    def dialFailed(self, dialer: _Dialer, reason: str) -> None:
        """
        Called by a dialer after each failed attempt.
        """
        if dialer.failures == 1 or dialer.failures % 10 == 0:
            self.log.info(
                "cannot reach {target} at {address} (attempt {n}): {reason}",
                target=f"node {dialer.nodeId}" if dialer.nodeId else "seed",
                address=dialer.address,
                n=dialer.failures,
                reason=reason,
            )
        if dialer.nodeId is not None:
            peer = self._peers.get(dialer.nodeId)
            if peer is not None and peer.dialer is dialer:
                self._failPeer(peer, f"cannot reach it at {dialer.address}: {reason}")

    def dialerFinished(self, dialer: _Dialer, reason: str, permanent: bool) -> None:
        """
        Called by a dialer that gives up.
        """
        if dialer.nodeId is None:
            if self._seedDialers.get(dialer.address) is dialer:
                del self._seedDialers[dialer.address]
            if permanent:
                self._unwanted.add(dialer.address)
        else:
            peer = self._peers.get(dialer.nodeId)
            if peer is not None and peer.dialer is dialer:
                peer.dialer = None

    # IPeerHandler.

    def _peer(self, nodeId: str) -> _Peer:
        peer = self._peers.get(nodeId)
        if peer is None:
            peer = self._peers[nodeId] = _Peer(nodeId)
        return peer

    def peerEstablished(self, link: PeerProtocol) -> None:
        assert link.peerId is not None
        if self._stopping or self.swim is None:
            link.close(CloseCode.SHUTTING_DOWN, "node stopping")
            return
        self._links.add(link)
        expected = getattr(link.transport, "peerNodeId", None)
        if expected is not None and expected != link.peerId:
            # A relayed or direct link is made for one node; another answered.
            self.log.warn(
                "{path} link to node {expected} answered by node {node}: closed",
                path=pathOf(link),
                expected=expected,
                node=link.peerId,
            )
            link.close(CloseCode.AUTHENTICATION_FAILED, "not the node this link was made for")
            return
        if link.peerId in self._dialBackAsked and not link.initiator and pathOf(link) == "tcp":
            self._dialedBack(link.peerId)
        dialer: _Dialer | None = getattr(link.factory, "dialer", None)
        peer = self._peer(link.peerId)
        if dialer is not None:
            dialer.linkEstablished(link)
            if dialer.nodeId is None:
                self._seedDialers.pop(dialer.address, None)
            elif peer.dialer is dialer:
                peer.dialer = None
        adopted = self._adopt(peer, link)
        if peer.link is not None:
            peer.features = peer.link.features
        if not adopted:
            return
        self._noteRun(peer, link)
        if peer.dialer is not None:
            peer.dialer.stop()
            peer.dialer = None
        self.log.debug("link to node {node} established", node=peer.nodeId)
        self._flushQueue(peer)
        if not self._isRelayed(link):
            self._relayUp(peer.nodeId)
        self._scheduleSave()
        self._linkChanged(peer.nodeId, pathOf(link))
        if (dialer is not None and dialer.nodeId is None) or not self.swim.joined:
            self.swim.join(peer.nodeId, self.clock.seconds())
            self._pump()

    def _noteRun(self, peer: _Peer, link: PeerProtocol) -> None:
        previous, peer.run = peer.run, link.peerSession
        if previous is None or previous == peer.run:
            return
        self.log.info("node {node} was started again: what its last run held is gone", node=peer.nodeId)
        for observer in list(self._restartObservers):
            observer(peer.nodeId)

    def _relayUp(self, nodeId: str) -> None:
        """
        A direct link to C{nodeId} is up: it may become this node's relay,
        and links waiting to go through it are dialled now.
        """
        self._chooseRelay()
        self._askDialBack(nodeId)
        prefix = f"{RELAY_ADDRESS}{nodeId}/"
        for peer in list(self._peers.values()):
            if peer.dialer is not None and peer.dialer.address.startswith(prefix):
                peer.dialer.retryNow()

    def _tryDirectTcp(self, nodeId: str, address: str) -> None:
        """
        A relayed peer can now be dialled (it found it is reachable): dial
        it once beside the relayed link, which gives way if the dial works
        (a TCP link ranks first) and carries on if not.
        """
        if address.startswith(RELAY_ADDRESS):
            return
        self._dialOnce(nodeId, address)

    def _dialOnce(self, nodeId: str, address: str) -> None:
        """
        Dial C{nodeId} at C{address} once, beside whatever link it has,
        unless such a dial is under way.
        """
        dialer = self._sideDialers.get(nodeId)
        if dialer is not None and not dialer.stopped:
            return
        dialer = self._sideDialers[nodeId] = _Dialer(self, address, nodeId, persistent=False)
        dialer.start()

    # Finding out whether this node can be dialled ([nat] reachable = auto).

    def _askDialBack(self, nodeId: str) -> None:
        """
        Ask C{nodeId}, a reachable member this node has a direct link with,
        to dial it back, once.
        """
        if not self.autoReachable or self.reachable or self._dialBackAsked or self.address is None:
            return
        member = self.member(nodeId)
        if member is not None and member.meta.get(META_REACH) == "relay":
            return
        self._dialBackAsked.add(nodeId)
        self.log.info("asking node {node} to dial this node back at {address}", node=nodeId, address=self.address)
        self.send(nodeId, DIALBACK_KIND, self.address.encode("utf-8")).addErrback(lambda f: None)

    def _dialBackRequested(self, nodeId: str, payload: bytes) -> None:
        """
        Dial C{nodeId} at the address it gives; the link, if it comes,
        tells it that it can be dialled.
        """
        if not self.reachable or self._stopping or self.swim is None:
            # A node that cannot be dialled proves nothing by dialling.
            return
        try:
            address = payload.decode("utf-8")
            splitHostPort(address)
        except ValueError as e:
            self.log.warn("bad dial-back request from node {node}: {error}", node=nodeId, error=e)
            return
        self._dialOnce(nodeId, address)

    def _dialedBack(self, nodeId: str) -> None:
        self.reachable = True
        self.relayId = None
        self.log.info("node {node} dialled this node back: it is reachable", node=nodeId)
        if self.swim is not None and not self.swim.left:
            self.swim.update(self.clock.seconds(), meta=self._advertisedMeta())
            self._pump()

    def _adopt(self, peer: _Peer, link: PeerProtocol) -> bool:
        """
        Make C{link} the peer's link, or close it if the one it has wins;
        both ends choose alike.

        @return: whether C{link} is now the peer's link.
        """
        current = peer.link
        if current is None or current is link:
            peer.link = link
            return True
        if current.peerSession != link.peerSession:
            keep, drop = link, current
            peer.link = keep
            drop.close(CloseCode.DUPLICATE_LINK, "the peer restarted: keeping the other link")
            return keep is link
        keep, drop = sorted((current, link), key=self._linkRank)
        peer.link = keep
        # The peer may have written requests on the link given up before
        # it chose alike (it may not even have the other one yet): read
        # them for a while, answering on the one kept, then close it.
        # Closed at once, its requests would be lost and wait their whole
        # timeout (a login's registration, a room's).
        if drop not in self._retiring:
            self._retiring[drop] = self.clock.callLater(
                self.config.handshake_timeout,
                self._retire,
                drop,
            )
        return keep is link

    def _retire(self, link: PeerProtocol) -> None:
        self._retiring.pop(link, None)
        link.close(CloseCode.DUPLICATE_LINK, "two links to one node: keeping the other link")

    def _linkRank(self, link: PeerProtocol) -> tuple[bool, str, bytes]:
        # A direct link before a relayed one; both ends know which is which.
        initiator = self.nodeId if link.initiator else link.peerId
        return (self._isRelayed(link), initiator or "", link.linkId)

    def peerLinkLost(self, link: PeerProtocol, reason: str) -> None:
        self._links.discard(link)
        retiring = self._retiring.pop(link, None)
        if retiring is not None and retiring.active():
            retiring.cancel()
        closed = self._closed.pop(link, None)
        if closed is not None:
            closed.callback(None)
        if not link.established:
            dialer: _Dialer | None = getattr(link.factory, "dialer", None)
            if dialer is not None:
                dialer.linkEnded(link)
            return
        assert link.peerId is not None
        peer = self._peers.get(link.peerId)
        if peer is None or peer.link is not link:
            return
        peer.link = None
        if not self._isRelayed(link):
            # Circuits through the lost link end with it (a relayed link
            # carries none).
            self.relay.nodeGone(peer.nodeId)
            self.circuits.linkLost(peer.nodeId)
        if self._stopping:
            return
        if peer.nodeId == self.relayId:
            self._chooseRelay()
        self._scheduleSave()
        self._linkChanged(peer.nodeId, None)
        if link.closeCode != CloseCode.DUPLICATE_LINK:
            # Requests sent on a link given up for a duplicate are answered
            # on the other one; on a lost link they may never be.
            self.log.info("link to node {node} lost: {reason}", node=peer.nodeId, reason=reason)
            self._failPeer(peer, f"link lost: {reason}")
        if self.swim is not None:
            self.swim.linkLost(peer.nodeId, self.clock.seconds())
            member = self.swim.member(peer.nodeId)
            if member is not None and member.live:
                self._ensureLink(peer, hurry=True)
            self._pump()

    def peerMessageReceived(self, link: PeerProtocol, kind: str, payload: bytes) -> None:
        assert link.peerId is not None
        if kind == SWIM_KIND:
            self._swimReceived(link.peerId, payload)
        else:
            self._handleMessage(link.peerId, kind, payload)

    def _handleMessage(self, nodeId: str, kind: str, payload: bytes) -> None:
        handler = self._handlers.get(kind)
        if handler is None:
            self.log.debug("no handler for {kind!r} from node {node}", kind=kind, node=nodeId)
            return
        d = maybeDeferred(handler, nodeId, payload)
        d.addErrback(lambda f: self.log.failure("handling {kind!r} from node {node}", f, kind=kind, node=nodeId))

    def peerRequestReceived(self, link: PeerProtocol, requestId: int, kind: str, payload: bytes) -> None:
        assert link.peerId is not None
        peer = self._peer(link.peerId)
        handler = self._handlers.get(kind)
        if handler is None:
            link.sendResponse(requestId, ResponseStatus.UNKNOWN_KIND, f"no handler for {kind!r}".encode())
            return
        if peer.serving >= self.config.max_inflight_requests:
            link.sendResponse(requestId, ResponseStatus.BUSY, b"too many requests in progress")
            return
        peer.serving += 1
        d = maybeDeferred(handler, peer.nodeId, payload)

        def answered(answer: Any) -> None:
            peer.serving -= 1
            if answer is None:
                answer = b""
            if not isinstance(answer, bytes | bytearray | memoryview):
                self.log.error("handler for {kind!r} answered {type}, not bytes", kind=kind, type=type(answer))
                self._respond(peer, link, requestId, ResponseStatus.ERROR, b"internal error")
                return
            self._respond(peer, link, requestId, ResponseStatus.OK, bytes(answer))

        def failed(failure: Failure) -> None:
            peer.serving -= 1
            if failure.check(PeerRequestError):
                text = str(failure.value)
            else:
                self.log.failure("handling request {kind!r} from node {node}", failure, kind=kind, node=peer.nodeId)
                text = "internal error"
            self._respond(peer, link, requestId, ResponseStatus.ERROR, text.encode("utf-8")[:512])

        d.addCallbacks(answered, failed)

    def _respond(self, peer: _Peer, link: PeerProtocol, requestId: int, status: ResponseStatus, payload: bytes) -> None:
        # The link the request came on may have given way to another (and
        # be closing): the one kept first.
        for candidate in (peer.link, link):
            if candidate is not None and candidate.sendResponse(requestId, status, payload):
                return

    def peerResponseReceived(self, link: PeerProtocol, requestId: int, status: ResponseStatus, payload: bytes) -> None:
        assert link.peerId is not None
        peer = self._peers.get(link.peerId)
        pending = peer.requests.pop(requestId, None) if peer is not None else None
        if pending is None:
            return
        if pending.timer.active():
            pending.timer.cancel()
        if status is ResponseStatus.OK:
            pending.deferred.callback(payload)
        elif status is ResponseStatus.BUSY:
            pending.deferred.errback(PeerBusy(f"node {link.peerId}: {payload.decode('utf-8', 'replace')}"))
        else:
            pending.deferred.errback(PeerRequestFailed(link.peerId, payload.decode("utf-8", "replace")))

    # SWIM.

    def _swimReceived(self, nodeId: str, payload: bytes) -> None:
        swim = self.swim
        if swim is None:
            return
        try:
            message = decodeMessage(payload)
        except SwimDecodeError as e:
            self.log.warn("bad membership message from node {node}: {error}", node=nodeId, error=e)
            return
        swim.receive(nodeId, message, self.clock.seconds())
        self._pump()

    def _tick(self) -> None:
        # The deadline has come, but on a busy reactor the answers that came
        # in time may still wait unread in the sockets: Twisted runs due
        # timers before it reads.  A verdict now would accuse a node for
        # this node's own slowness, so the reactor gets one I/O pass first
        # (a call in 0 s runs after it).
        self._awaitingIO = True
        self._timer = self.clock.callLater(0, self._tickAfterIO)

    def _tickAfterIO(self) -> None:
        self._timer = None
        self._awaitingIO = False
        swim = self.swim
        if swim is None:
            return
        now = self.clock.seconds()
        # How late the event loop came round (timer lateness and the I/O
        # pass): Lifeguard's local health, counted by the core.
        lag = now - self._deadline
        swim.observeLag(lag, now)
        if lag > self.swimConfig.probeTimeout and now - self._lagLoggedAt >= LAG_LOG_INTERVAL:
            self._lagLoggedAt = now
            self.log.info(
                "event loop {lag:.3f} s late: the failure detector waits longer (awareness {awareness})",
                lag=lag,
                awareness=swim.awareness,
            )
        swim.tick(now)
        self._pump()

    def _pump(self) -> None:
        swim = self.swim
        if swim is None:
            return
        for target, message in swim.messagesToSend():
            self._sendSwim(target, encodeMessage(message))
        changes = swim.takeChanges()
        if changes:
            self._membershipChanged(changes)
        if self._stopping or self._awaitingIO:
            # (After the I/O pass the tick runs whatever is due then.)
            return
        deadline = swim.nextTimer()
        if self._timer is not None:
            if deadline is not None and abs(self._deadline - deadline) < 1e-9:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._deadline = deadline
            self._timer = self.clock.callLater(max(deadline - self.clock.seconds(), 0.0), self._tick)

    def _sendSwim(self, nodeId: str, data: bytes) -> None:
        peer = self._peers.get(nodeId)
        if peer is not None and peer.link is not None and peer.link.sendMessage(SWIM_KIND, data):
            return
        if self._stopping or self.swim is None:
            return
        member = self.swim.member(nodeId)
        if member is None and peer is None:
            return
        peer = self._peer(nodeId)
        if len(peer.queue) < MAX_QUEUED_SWIM:
            peer.queue.append(_Queued(SWIM_KIND, data))
            peer.queuedBytes += len(data)
        self._ensureLink(peer)

    def _membershipChanged(self, changes: list[MemberChange]) -> None:
        assert self.swim is not None
        live = {member.nodeId for member in self.swim.liveMembers()}
        if set(self._ownership.nodes) != live:
            self._ownership = Ownership(live)
        for change in changes:
            member = change.member
            self.log.info(
                "member {node} {kind} (incarnation {incarnation}, {address})",
                node=member.nodeId,
                kind=change.kind.value,
                incarnation=member.incarnation,
                address=member.address,
            )
            if member.nodeId != self.nodeId:
                self._linkFollowsMember(change)
        for change in changes:
            for observer in list(self._observers):
                try:
                    observer(change)
                except Exception:
                    self.log.failure("membership observer {observer} failed", observer=observer)
        if self.swim.joined:
            self._stopSeedDialers()
        elif not self._stopping and not self.swim.left:
            self._dialSeeds()
        self._scheduleSave()

    def _linkFollowsMember(self, change: MemberChange) -> None:
        member = change.member
        if change.kind in (ChangeKind.JOINED, ChangeKind.RECOVERED, ChangeKind.UPDATED):
            peer = self._peer(member.nodeId)
            plan = self.dialPlan(member)
            if peer.dialer is not None and (plan is None or peer.dialer.address != plan[0]):
                peer.dialer.stop()
                peer.dialer = None
            self._ensureLink(peer)
            if peer.link is not None and self._isRelayed(peer.link) and plan is not None:
                self._tryDirectTcp(peer.nodeId, plan[0])
        elif change.kind in (ChangeKind.DIED, ChangeKind.LEFT, ChangeKind.FORGOTTEN):
            gone = self._peers.get(member.nodeId)
            if gone is None:
                return
            if gone.dialer is not None:
                gone.dialer.stop()
                gone.dialer = None
            self._failPeer(gone, f"it {change.kind.value}")
            if gone.link is not None:
                link, gone.link = gone.link, None
                link.close(CloseCode.NORMAL, f"declared {member.state.value}")
            if change.kind is ChangeKind.FORGOTTEN:
                del self._peers[member.nodeId]

    # The members file.

    def _relayedFor(self, nodeId: str) -> dict[str, Any]:
        stats = self.relay.stats.nodes.get(nodeId)
        if stats is None:
            return {}
        return {
            "relayedFor": {
                "bytesFrom": stats.bytesFrom,
                "bytesTo": stats.bytesTo,
                "circuits": stats.circuits,
                "delayed": stats.delayed,
                "limited": stats.limited,
            }
        }

    def _membersPath(self) -> str:
        return os.path.join(self.dataDir, MEMBERS_FILE)

    def _loadMembers(self) -> None:
        path = self._membersPath()
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("nodeId") == self.nodeId:
                self._incarnation = max(self._incarnation, int(saved.get("incarnation", 0)) + 1)
            self._remembered = [
                str(entry["address"])
                for entry in saved.get("members", [])
                if entry.get("nodeId") != self.nodeId and entry.get("state") != "left" and entry.get("address")
            ]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            self.log.warn("ignoring {path}: {error}", path=path, error=e)

    def _scheduleSave(self) -> None:
        if self._saveTimer is None and not self._stopping:
            self._saveTimer = self.clock.callLater(1.0, self._save)

    def _save(self) -> None:
        self._saveTimer = None
        swim = self.swim
        if swim is None:
            return
        relayStats = self.relay.stats
        direct = any(peer.link is not None and pathOf(peer.link) == "direct" for peer in self._peers.values())
        saved = {
            "version": 1,
            "nodeId": self.nodeId,
            "incarnation": swim.incarnation,
            "savedAt": self.clock.seconds(),
            "reachable": self.reachable,
            "relayId": self.relayId,
            "relay": {
                "opened": relayStats.opened,
                "open": self.relay.circuits(),
                "refused": dict(relayStats.refused),
                "dropped": relayStats.dropped,
            },
            "members": [
                {
                    "nodeId": member.nodeId,
                    "state": member.state.value,
                    "incarnation": member.incarnation,
                    "address": member.address,
                    "clientAddresses": list(member.clientAddresses),
                    "meta": dict(member.meta),
                    "reach": member.meta.get(META_REACH) or "dial",
                    **({} if member.nodeId == self.nodeId else self.linkPath(member.nodeId)),
                    **self._relayedFor(member.nodeId),
                }
                for member in swim.members()
            ],
        }
        path = self._membersPath()
        try:
            os.makedirs(self.dataDir, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(saved, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            self.log.warn("cannot save the members to {path}: {error}", path=path, error=e)
        if self._saveTimer is None and not self._stopping and (self.circuits.ends() or self.relay.circuits() or direct):
            # Relayed and direct traffic move the counters without a
            # membership change.
            self._saveTimer = self.clock.callLater(COUNTERS_SAVE_INTERVAL, self._save)


def pathOf(link: PeerProtocol) -> str:
    """
    How a link goes: C{tcp}, C{relayed} (L{RelayedTransport}) or
    C{direct} (a punched UDP path), as its transport says.
    """
    return str(getattr(link.transport, "linkPath", "tcp"))


def readMembers(dataDir: str) -> dict[str, Any]:
    """
    The members file a node keeps in C{dataDir}, as written (for
    C{python -m timtx.cluster members}).

    @raise OSError: if it cannot be read.
    @raise ValueError: if it is not JSON.
    """
    with open(os.path.join(dataDir, MEMBERS_FILE), encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data
