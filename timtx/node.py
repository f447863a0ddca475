# -*- test-case-name: timtx.test.test_node -*-
"""
The composition root: a L{Node} builds every part of a timtx node from a
L{Config} and a reactor, and starts and stops them in order.

Nothing in timtx reaches for a global reactor or module-level state; each
part gets what it needs from here.  Tests build nodes the same way with
their own config and clock.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from timtx.chat.accounts import AccountService
from timtx.chat.bans import UserBans
from timtx.chat.bigpayloads import BigDataService
from timtx.chat.business import BusinessRouter
from timtx.chat.conversations import Conversations
from timtx.chat.dispatch import Dispatcher
from timtx.chat.duplicates import DuplicateFilter
from timtx.chat.groups.core import Groups
from timtx.chat.groups.directory import GroupDirectory
from timtx.chat.groups.membership import GroupMembership
from timtx.chat.groups.messages import GroupMessages
from timtx.chat.groups.moderation import GroupModeration
from timtx.chat.groups.profiles import GroupProfiles
from timtx.chat.history import History
from timtx.chat.inbound import InboundMessages
from timtx.chat.loginwebhook import LoginWebhook
from timtx.chat.messagerules import refusal
from timtx.chat.messaging import PersonalMessaging
from timtx.chat.permissions import MessagePermissions
from timtx.chat.presence import PresenceService
from timtx.chat.profiles import ProfileService
from timtx.chat.reseal import Resealer
from timtx.chat.roster import RelationCache, RosterService
from timtx.chat.vrooms.registry import VRoomRegistry
from timtx.chat.vrooms.service import StreamPush, VRoomService
from timtx.cluster.caches import CacheMirror
from timtx.cluster.directory import UserDirectory
from timtx.cluster.groups import ClusterGroups, GroupRouting
from timtx.cluster.membership import ClusterService
from timtx.cluster.messaging import HANDOVER_WINDOW, ClusterMessaging
from timtx.cluster.rooms import ClusterVRoomService
from timtx.cluster.router import ClusterRouter
from timtx.cluster.swim import ChangeKind, MemberChange
from timtx.config import Config
from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import KeyringError, StanzaVault, loadKeyring
from timtx.delivery.fanout import GroupFanout
from timtx.delivery.inbox import InboxDelivery
from timtx.delivery.notices import Notices
from timtx.delivery.registry import SessionRegistry
from timtx.delivery.router import LocalRouter
from timtx.delivery.sessions import AckIds, Session
from timtx.interfaces import IClientNode, IFrameSink, IRouter, Route
from timtx.nat.direct import DirectPaths
from timtx.persistence import makeStore
from timtx.persistence.errors import StoreUnavailable
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.timed import TimedStore
from timtx.preflight import privateDataDir
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.generations import login_generation
from timtx.protocols.structs import Generation, TimAuth, TimMessage, TimNodes, TimPresence, TimReq
from timtx.transports.admission import ConnectionGate, withBacklog
from timtx.transports.http import TimSite
from timtx.transports.registry import ProtocolRegistry, defaultRegistry, resolveProtocolPath
from timtx.transports.tcp import TimTcpServerFactory
from timtx.transports.websocket import TimWebSocketResource, TimWebSocketServerFactory
from timtx.util.histogram import StoreStats


class NodeStartError(Exception):
    """
    The node could not start; the message says why, for an operator.
    """


class Listener(Service):
    """
    Listens on one endpoint with one factory while running.

    @ivar port: the L{IListeningPort} once listening.
    @ivar listening: fires with the port, or fails with L{NodeStartError}.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, description: str, factory: Any, name: str):
        self.endpoint = endpoint
        self.description = description
        self.factory = factory
        self.setName(name)
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()
        self._failedAtOnce: Failure | None = None
        self._inStart = True
        try:
            self.endpoint.listen(self.factory).addCallbacks(self._listened, self._listenFailed)
        finally:
            self._inStart = False
        if self._failedAtOnce is not None:
            # A TCP or SSL endpoint answers at once; surface its error now
            # so that `twist tim` exits with a clear message instead of
            # running with a port missing.
            raise NodeStartError(self._cannotListen(self._failedAtOnce))

    def _listenFailed(self, failure: Failure) -> None:
        if self._inStart:
            self._failedAtOnce = failure
        else:
            # Other endpoints may answer later: the node's start fails then.
            self.listening.errback(NodeStartError(self._cannotListen(failure)))

    def _cannotListen(self, failure: Failure) -> str:
        return f"cannot listen on {self.description!r} ({self.name}): {failure.getErrorMessage()}"

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        host: Any = port.getHost()
        self.log.info("{name} listening on {host}:{port}", name=self.name, host=host.host, port=host.port)
        self.listening.callback(port)
        return port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return stopped


@implementer(IClientNode)
class Node(MultiService):
    """
    One timtx node.

    Its parts are built here, each once, in the order of the floors (see
    C{docs/architecture.md}): the store, then sessions and delivery, then the
    chat services, then the listeners.  Each part gets what it needs as
    keyword arguments; none is patched after it is made.  A subclass
    replaces a part by overriding its C{make...} method (the cluster
    replaces L{makeRouter}).

    @param protocols: the protocol registry to serve connections with;
        C{[protocols]} in the config overrides its entries.
    @param store: an L{IMessageStore} to use instead of the configured one.
    @param keys: L{NodeKeys} to use instead of the configured key file.
    @param clock: the clock for timeouts and periodic work; the reactor by
        default, a L{twisted.internet.task.Clock} in tests.

    @ivar ready: a L{Deferred} that fires with the node once its store is
        open and it listens.
    @ivar storeStats: the latency and outcomes of every store operation
        (L{StoreStats}).
    @ivar logins: sessions started.
    @ivar loginFailures: logins refused, by reason.
    @ivar logouts: sessions ended.
    @ivar framesReceived: frames handled after login, by frame type
        (acks and pings are not routed, so not counted here).
    @ivar slowReadersDropped: connections dropped for leaving more than
        C{[client] max_output_bytes} unread.
    @ivar startedAt: when the node became ready (its clock), or C{None}.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        protocols: ProtocolRegistry | None = None,
        store: IMessageStore | None = None,
        keys: NodeKeys | None = None,
        clock: IReactorTime | None = None,
    ):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        privateDataDir(config)
        self.keys = keys if keys is not None else NodeKeys.fromFile(config.key_path)
        self.protocols = (protocols or defaultRegistry()).copy()
        for name, path in config.protocols.items():
            self.protocols.register(name, resolveProtocolPath(path))
        self.storeStats = StoreStats()
        self.store: IMessageStore = TimedStore(
            store if store is not None else makeStore(config, reactor),
            self.storeStats.observe,
        )
        self.logins = self.logouts = self.slowReadersDropped = 0
        self.loginFailures: dict[str, int] = {}
        self.framesReceived: dict[int, int] = {}
        self.startedAt: float | None = None
        self.threadPool = ThreadPool(0, config.node.worker_threads, "timtx-worker")
        #: Why the node cannot start, found while it was built.
        self._startProblem: str | None = None
        try:
            ring = loadKeyring(self.keys, config.data_key_paths, config.store.data_key, config.store.retired_keys)
        except KeyringError as e:
            self._startProblem = f"[store] data_keys: {e}"
            ring = None
        self.vault = StanzaVault(self.keys, ring)
        self.connections: set[IFrameSink] = set()
        #: Connections the node is closing as it stops, and what fires once
        #: each has closed.
        self._closing: dict[IFrameSink, Deferred[None]] = {}
        self._background: set[Deferred[Any]] = set()
        self.ready: Deferred[Node] = Deferred()
        #: This node's part in the cluster, or C{None} without C{[cluster]
        #: listen}: the node then serves alone, as it always did.
        self.cluster: ClusterService | None = None
        self.directPaths: DirectPaths | None = None
        #: Nodes whose link was lost and has not come back.
        self._linksLost: set[str] = set()
        #: Which nodes hold each user's sessions (with a cluster).
        self.userDirectory: UserDirectory | None = None
        if config.cluster.listen:
            self.cluster = self.makeCluster()
            # STUN and direct paths to NAT'd peers (docs/nat.md); it stops
            # after the mesh has closed its links, so is added first.
            self.directPaths = DirectPaths(self.cluster, reactor, config.nat)
            self.directPaths.setServiceParent(self)
            self.cluster.setServiceParent(self)
            self.cluster.addLinkObserver(self._peerLinkChanged)
        self._buildDelivery()
        self._buildChat()
        self._sweeps = self._periodicWork()
        self._listeners: dict[str, Listener] = {}
        self._addListeners()

    # Building.

    def makeCluster(self) -> ClusterService:
        """
        This node's part in the cluster, from C{[cluster]}; a subclass
        overrides it to link its peers another way (the deterministic
        simulation, L{timtx.test.groupsim}, links them in memory).
        """
        return ClusterService.fromConfig(self.config, self.reactor, protocol=self.protocols.lookup("peer"))

    def _buildDelivery(self) -> None:
        """
        Sessions, and getting what users must receive to them: inboxes,
        group fan-out, the router.
        """
        config, store, clock = self.config, self.store, self.clock
        self.ackIds = AckIds()
        # In a cluster the device limits count a user's sessions on every
        # node: its owner applies them (L{UserDirectory}), not each node.
        devices = config.devices if self.cluster is None else dataclasses.replace(config.devices, limit=0, type_limit=0)
        self.sessions = SessionRegistry(devices)
        self.directory = GroupDirectory(store, maxGroups=config.groups.cache_groups)
        self.inbox = InboxDelivery(
            config.messages,
            store=store,
            vault=self.vault,
            sessions=self.sessions,
            ackIds=self.ackIds,
            clock=clock,
            soon=self.reactor,
        )
        self.fanout = GroupFanout(
            store=store,
            vault=self.vault,
            sessions=self.sessions,
            flow=self.inbox.flow,
            ackIds=self.ackIds,
            groupsOf=self.directory.groupsOf,
            batch=config.messages.offline_batch,
        )
        self.inbox.addSource(self.fanout)
        self.router = self.makeRouter()
        self.notices = Notices(store=store, vault=self.vault, router=self.router, clock=clock)
        self.sessions.onLastSession.append(self._lastSessionEnded)

    def makeRouter(self) -> IRouter:
        """
        The L{IRouter} the chat services deliver through: this node's
        sessions, and with a cluster the nodes holding a user's other
        sessions, found in the user directory.
        """
        local = LocalRouter(self.sessions, self.inbox, self.fanout)
        if self.cluster is None:
            return local
        directory = self.userDirectory = UserDirectory(
            self.cluster,
            self.sessions,
            devices=self.config.devices,
            kick=self._kickSession,
            lastSessionEnded=self._lastSessionInCluster,
            registeringAgain=self._registeringAgain,
            unknownToOwner=self._unknownToOwner,
        )
        self.sessions.onSessionRemoved.append(self._sessionLeft)
        return ClusterRouter(local, directory, self.cluster)

    def _buildChat(self) -> None:
        """
        The chat services, and the routes of the frame types they handle.
        """
        config, store, clock, vault, router = self.config, self.store, self.clock, self.vault, self.router
        webhook = None
        if config.accounts.login_webhook:
            webhook = LoginWebhook(self.reactor, config.accounts.login_webhook, config.accounts.login_webhook_timeout)
        self.accounts = AccountService(
            config.accounts, store=store, keys=self.keys, clock=clock, runInThread=self.runInThread, webhook=webhook
        )
        #: Accounts an operator blocked from logging in.
        self.bans = UserBans(config.data_path("blocked-accounts.json"), clock)
        self.relations = RelationCache(store)
        permissions = MessagePermissions(self.relations, self.accounts, config.messages.noauth)
        self.conversations = Conversations(store=store, vault=vault, clock=clock, maxBatch=config.store.batch_max)
        if self.cluster is not None:
            # Other nodes number conversations too: a batch right after one
            # of theirs must not overtake their pushes.
            self.conversations.handoverWindow = HANDOVER_WINDOW
        self.duplicates = DuplicateFilter(
            store=store,
            vault=vault,
            clock=clock,
            window=config.messages.dedupe_window,
            maxKeys=config.messages.dedupe_memory_keys,
        )
        self.roster = RosterService(
            config.roster, relations=self.relations, accounts=self.accounts, notices=self.notices, clock=clock
        )
        self.presence = PresenceService(
            config.presence, store=store, relations=self.relations, accounts=self.accounts, router=router
        )
        # In a cluster a 1:1 conversation is stored and routed by its owner.
        messaging: Any = PersonalMessaging
        if self.cluster is not None and config.cluster.conversation_owner:
            messaging = partial(ClusterMessaging, cluster=self.cluster)
        self.messaging = messaging(
            config.messages,
            store=store,
            vault=vault,
            clock=clock,
            conversations=self.conversations,
            router=router,
            permissions=permissions,
            duplicates=self.duplicates,
        )
        # In a cluster a group is stored and routed by its owner, and its
        # messages cross once to each node holding members.
        groupsClass: Any = Groups
        if isinstance(router, ClusterRouter):
            self.groupRouting = GroupRouting(
                router,
                directory=self.directory,
                fanout=self.fanout,
                store=store,
                vault=vault,
                maxLocates=config.cluster.group_locates,
                maxGroups=config.groups.cache_groups,
            )
            groupsClass = partial(
                ClusterGroups, cluster=router.cluster, routing=self.groupRouting, duplicates=self.duplicates
            )
        self.groups = groupsClass(
            config.groups,
            store=store,
            vault=vault,
            clock=clock,
            directory=self.directory,
            fanout=self.fanout,
            conversations=self.conversations,
            router=router,
            notices=self.notices,
        )
        self.groupMessages = GroupMessages(
            self.groups, messages=config.messages, personal=self.messaging, duplicates=self.duplicates
        )
        groupProfiles = GroupProfiles(self.groups)
        self.inbound = InboundMessages(
            personal=self.messaging,
            groups=self.groupMessages,
            history=History(store=store, vault=vault, limit=config.messages.history_limit),
            maxBodyBytes=config.messages.max_body_bytes,
        )
        self.resealer = Resealer(store=store, vault=vault, clock=clock, rate=config.store.reseal_rate)
        self.profiles = ProfileService(
            config.profiles, store=store, vault=vault, relations=self.relations, clock=clock, rooms=groupProfiles
        )
        # In a cluster a room is held by its owner node and mirrored on the
        # nodes of its subscribers.
        vrooms: Any = VRoomService
        if self.cluster is not None:
            assert self.userDirectory is not None
            vrooms = partial(
                ClusterVRoomService,
                cluster=self.cluster,
                directory=self.userDirectory,
                peerOutputBytes=config.cluster.max_peer_output_bytes,
            )
        self.vrooms = vrooms(
            config.vrooms,
            registry=VRoomRegistry(config.vrooms, clock),
            accounts=self.accounts,
            clock=clock,
            maxOutputBytes=config.client.max_output_bytes,
        )
        self.vrooms.setServiceParent(self)
        self.bigData = BigDataService(permissions=permissions, router=router, vrooms=self.vrooms)
        self.sessions.onSessionRemoved.append(self.vrooms.sessionEnded)

        self.business = BusinessRouter()
        self.roster.register(self.business)
        GroupMembership(self.groups, accounts=self.accounts).register(self.business)
        GroupModeration(self.groups).register(self.business)
        self.business.register(Business.MODIFYAUTH, self._changePassword)

        if self.cluster is not None:
            #: Mirrors this node's cache changes on the other nodes.
            self.cacheMirror = CacheMirror(
                self.cluster, relations=self.relations, presence=self.presence, groups=self.directory
            )
            self.cluster.addObserver(self._memberBack)
            self.cluster.addObserver(self._memberDied)

        self.dispatcher = Dispatcher()
        route = self.dispatcher.route
        for timType in (TimType.TIMMESSAGE, TimType.TIMREVOKEMESSAGE, TimType.TIMBURNMESSAGE):
            route(timType, TimMessage, self.inbound.handleMessage)
        route(TimType.TIMPULLMESSAGE, TimReq, self.inbound.handlePull)
        route(TimType.TIMOFFLINEMSG, None, lambda session, payload: self.inbox.drain(session))
        route(TimType.TIMPRESENCE, TimPresence, self.presence.handlePresence)
        route(TimType.TIMBROADPRESENCE, TimPresence, self.presence.handleBroadcast)
        route(TimType.TIMBUSINESS, TimReq, self.business)
        route(TimType.TIMNODES, TimNodes, self.profiles.handleNodes)
        route(TimType.TIMVROOM, TimReq, self.vrooms.handleRequest)
        route(TimType.TIMSTREAM, StreamPush, self.vrooms.handleStream)
        route(TimType.TIMBIGSTRING, None, self.bigData.handleBigString)
        route(TimType.TIMBIGBINARY, None, self.bigData.handleBigBinary)
        route(TimType.TIMBIGBINARYSTREAM, None, self.bigData.handleBigBinaryStream)

    def _periodicWork(self) -> list[tuple[LoopingCall, float]]:
        """
        What runs on a timer while the node runs, with its interval.
        """
        config = self.config
        work = [
            (self._watchStore, self.storeWatchInterval),
            (self.accounts.purgeExpiredTokens, max(config.accounts.token_ttl, 1.0)),
            (self.fanout.flush, config.groups.cursor_flush_interval),
        ]
        if self.duplicates.enabled:
            # Keys live a window and at most a minute more, in memory and in
            # the store: a sender's keys are what it sent in that time.
            work.append((self.duplicates.purge, min(max(config.messages.dedupe_window / 4, 1.0), 60.0)))
        sweeps = []
        for f, interval in work:
            loop = LoopingCall(f)
            loop.clock = self.clock
            sweeps.append((loop, interval))
        return sweeps

    #: Seconds between two looks at the store's health.
    storeWatchInterval = 0.5
    _incidents = 0

    def _watchStore(self) -> None:
        """
        Once the store is back after an outage, or after it could not say
        whether a write was committed, re-read what live sessions may have
        missed (L{InboxDelivery.recheckLive}).
        """
        incidents = getattr(self.store, "incidents", 0)
        if incidents == self._incidents or not self.store.available:
            return
        self._incidents = incidents
        count = self.inbox.recheckLive()
        self.log.info("store available again: reading the inboxes of {count} live sessions again", count=count)

    def _peerLinkChanged(self, nodeId: str, path: str | None) -> None:
        """
        Pushes another node wrote to a link as it broke are lost with it,
        though their entries are in the inboxes (a direct path that went
        silent, say, and the peer moved back to the relay).  Once a link to
        that node is back, re-read what live sessions may have missed
        (L{InboxDelivery.recheckLive}), as after a store outage.
        """
        if path is None:
            self._linksLost.add(nodeId)
            return
        if nodeId not in self._linksLost or self.stopping:
            return
        self._linksLost.discard(nodeId)
        count = self.inbox.recheckLive()
        self.log.info(
            "link to node {node} back ({path}): reading the inboxes of {count} live sessions again",
            node=nodeId,
            path=path,
            count=count,
        )

    #: Seconds after the last node came back before the inboxes of live
    #: sessions are read once more: the views of the nodes converge
    #: meanwhile, and what a node stored while it still held a recipient
    #: offline (its own view not yet healed) is found then.
    healSettle = 3.0
    _healTimer: IDelayedCall | None = None

    def _memberDied(self, change: MemberChange) -> None:
        """
        A node was declared dead: pushes it wrote to its links just before
        it died (a SIGKILL between a commit and the socket's flush) may
        never have left it, with no one left to know.  Every live session
        here looks in its inbox (L{InboxDelivery.lookLive}): one that
        missed nothing sees nothing of it.
        """
        if change.kind is not ChangeKind.DIED or self.stopping:
            return
        count = self.inbox.lookLive()
        self.log.info(
            "node {node} died: {count} users with live sessions here look in their inboxes",
            node=change.member.nodeId,
            count=count,
        )

    def _memberBack(self, change: MemberChange) -> None:
        """
        A node declared dead (or gone) is back: a partition healed.  While
        the two sides could not reach each other, what one side stored for
        users here stayed in their inboxes; read them again now, so that it
        arrives without a new login and before what is pushed from now on,
        and once more when the views have settled.
        """
        if change.kind is not ChangeKind.JOINED or change.previous is None:
            return
        if self.cluster is None or change.member.nodeId == self.cluster.nodeId or self.stopping:
            return
        count = self.inbox.recheckLive()
        self.log.info(
            "node {node} is back: reading the inboxes of {count} live sessions again",
            node=change.member.nodeId,
            count=count,
        )
        if self._healTimer is not None and self._healTimer.active():
            self._healTimer.reset(self.healSettle)
        else:
            self._healTimer = self.clock.callLater(self.healSettle, self._healSettled)

    def _healSettled(self) -> None:
        self._healTimer = None
        if self.stopping:
            return
        count = self.inbox.recheckLive()
        self.log.info("the cluster settled: reading the inboxes of {count} live sessions once more", count=count)

    def _registeringAgain(self, uid: str, registered: Deferred[bool]) -> None:
        """
        C{uid}'s sessions here are registered again after a membership
        change, and the owner may never have had them (it was dying as they
        were registered, say): what was stored for the user meanwhile was
        pushed to its other nodes, or nowhere, and waits in its inbox.
        Hold pushes to the sessions until the owner has them, then have
        them read the inbox: what waited comes first, in order, and nothing
        stays there while they are online.
        """
        held = self.inbox.hold(uid)
        self.log.info(
            "registering the sessions of {uid} again, unconfirmed before: {count} read the inbox once the owner has them",
            uid=uid,
            count=len(held),
        )

        def reread(result: object) -> object:
            self.inbox.reread(held)
            return result

        registered.addBoth(reread)

    def _unknownToOwner(self, uid: str) -> None:
        """
        C{uid}'s sessions here were registered again with an owner that did
        not know of them: what it answered lookups meanwhile routed
        nowhere here.  Have them look in the inbox (a session that missed
        nothing sees nothing of it).
        """
        count = self.inbox.recheck(uid)
        self.log.info(
            "the owner of {uid} did not know of its {count} sessions here: they look in the inbox", uid=uid, count=count
        )

    def _lastSessionEnded(self, session: Session) -> None:
        if self.cluster is None:
            self.runInBackground(self.presence.announceOffline, session.uid, session.domain)
        # In a cluster the user's owner announces it, once its last session
        # anywhere has ended (L{_lastSessionInCluster}).

    def _lastSessionInCluster(self, uid: str, domain: str) -> None:
        self.runInBackground(self.presence.announceOffline, uid, domain)

    def _sessionLeft(self, session: Session) -> None:
        directory = self.userDirectory
        assert directory is not None
        directory.forgetSession(session)
        if not self.stopping:
            # A node that stops leaves the cluster: the owners drop its
            # sessions all at once.
            self.runInBackground(directory.register, session.uid, session.domain)

    def runInBackground(self, f: Callable[..., Any], *args: Any) -> None:
        """
        Run C{f(*args)} without anyone waiting for it; failures are logged,
        and the node waits for what is still under way before closing its
        store when it stops.
        """
        d = maybeDeferred(f, *args)
        d.addErrback(self._backgroundFailed)
        if d.called:
            return
        self._background.add(d)
        d.addBoth(lambda _: self._background.discard(d))

    def _backgroundFailed(self, failure: Any) -> None:
        if failure.check(StoreUnavailable):
            self.log.warn("background work failed: {why}", why=failure.getErrorMessage())
            return
        self.log.failure("background work failed", failure)

    def _changePassword(self, session: Session, request: TimReq) -> Deferred[None]:
        d = self.accounts.changePassword(session.uid, request.reqStr, request.reqStr2)
        d.addCallback(lambda _: session.sendAck(TimType.TIMBUSINESS, t=Business.MODIFYAUTH))
        return d

    def _addListeners(self) -> None:
        client = self.config.client
        #: Admits every socket of the client ports (see
        #: L{timtx.transports.admission}).
        self.gate = ConnectionGate(client.max_connections, client.max_connections_per_ip, client.fd_reserve)
        if client.listen:
            wsFactory = TimWebSocketServerFactory(self, self.protocols.lookup("client-ws"))
            site = TimSite(self, TimWebSocketResource(wsFactory), self.gate)
            self.addListener(withBacklog(client.listen, client.listen_backlog), site, "client-ws")
        if client.tcp_listen:
            tcpFactory = TimTcpServerFactory(self, self.protocols.lookup("client-tcp"), self.gate)
            self.addListener(withBacklog(client.tcp_listen, client.listen_backlog), tcpFactory, "client-tcp")

    def addListener(self, description: str, factory: Any, name: str) -> Listener:
        """
        Listen on the endpoint C{description} with C{factory} while the node
        runs.
        """
        listener = Listener(self.makeEndpoint(description), description, factory, name)
        self._listeners[name] = listener
        listener.setServiceParent(self)
        return listener

    def makeEndpoint(self, description: str) -> IStreamServerEndpoint:
        """
        The server endpoint for an endpoint string of the config.
        """
        endpoint: IStreamServerEndpoint = serverFromString(self.reactor, description)
        return endpoint

    def runInThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} in the node's worker threads.
        """
        return deferToThreadPool(self.reactor, self.threadPool, f, *args)

    def _clientAddresses(self) -> list[str]:
        addresses = []
        for name, scheme, path in (("client-ws", "ws", "/tim"), ("client-tcp", "tcp", "")):
            listener = self._listeners.get(name)
            if listener is not None and listener.port is not None:
                host = listener.port.getHost()
                addresses.append(f"{scheme}://{getattr(host, 'host', '')}:{getattr(host, 'port', '')}{path}")
        return addresses

    # Starting and stopping.

    def startService(self) -> None:
        """
        Open the store, and only then listen: a node whose database cannot
        be reached (a wrong DSN, a server down, a schema newer than this
        code) fails to start with nothing listening.  A listener that fails
        at once raises L{NodeStartError} from here, as before; anything
        that fails later fails L{ready}.
        """
        if not codec.ACCELERATED:
            self.log.critical(
                "thrift's C codec (thrift.protocol.fastbinary) is missing: Thrift compact runs in pure "
                "Python, many times slower. Reinstall thrift where a C compiler is available."
            )
        if self._startProblem is not None:
            raise NodeStartError(self._startProblem)
        self.threadPool.start()
        Service.startService(self)
        self._startError: NodeStartError | None = None
        self._inStart = True
        try:
            self.store.open().addCallbacks(self._storeOpened, self._storeFailed)
        finally:
            self._inStart = False
        if self._startError is not None:
            raise self._startError

    def _storeOpened(self, _: object) -> None:
        if not self.running:
            # Stopped while the store opened.
            return
        try:
            for child in self:
                child.startService()
        except NodeStartError as e:
            # Leave nothing half-started: stop the listeners that bound.
            self._abandonStart()
            if self._inStart:
                self._startError = e
            else:
                self._failedToStart(Failure(e))
            return
        for sweep, interval in self._sweeps:
            sweep.start(interval, now=False).addErrback(self._backgroundFailed)
        if len(self.vault.keyIds) > 1 and self.config.store.reseal_rate > 0:
            # Data may be sealed with an older key: move it to the new one.
            self.resealer.start()
        waits: list[Deferred[Any]] = [listener.listening for listener in self._listeners.values()]
        if self.cluster is not None:
            waits.append(self.cluster.ready)
        d = gatherResults(waits, consumeErrors=True)
        d.addCallbacks(self._started, self._failedToStart)

    def _storeFailed(self, failure: Failure) -> None:
        self._abandonStart()
        self._failedToStart(failure)

    def _abandonStart(self) -> None:
        for child in list(self):
            if child.running:
                child.stopService()
        self.running = False
        self.threadPool.stop()
        self.store.close()

    def _started(self, _: object) -> None:
        self.startedAt = self.clock.seconds()
        if self.cluster is not None:
            # Where this node's clients connect, for other nodes and
            # `python -m timtx.cluster members`.
            self.cluster.advertise(clientAddresses=self._clientAddresses())
        self.log.info(
            "timtx node ready ({store} store, compact codec {codec})",
            store=self.store.name,
            codec="C" if codec.ACCELERATED else "pure Python",
        )
        self.ready.callback(self)

    def _failedToStart(self, failure: Any) -> None:
        error = getattr(failure.value, "subFailure", failure)
        self.log.critical("timtx node failed to start: {error}", error=error.getErrorMessage())
        if not self.ready.called:
            self.ready.errback(error)

    @property
    def storeAvailable(self) -> bool:
        """
        Whether the store can be reached now.  While it cannot, sends are
        answered with a retryable error (C{ERR_DATABASE}, "try again"),
        clients stay connected, and the store reconnects by itself; the
        store logs each change.  For the admin API and metrics.
        """
        return bool(self.store.available)

    #: Whether L{stopService} has begun.
    stopping = False

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        self.stopping = True
        self.resealer.stop()
        if isinstance(self.router, ClusterRouter):
            self.router.stop()
        if self.userDirectory is not None:
            self.userDirectory.stop()
        if self._healTimer is not None and self._healTimer.active():
            self._healTimer.cancel()
        for sweep, _ in self._sweeps:
            if sweep.running:
                sweep.stop()
        d = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._closeConnections())
        d.addBoth(lambda _: DeferredList(list(self._background)))
        d.addBoth(lambda _: self.inbox.stop())
        d.addBoth(lambda _: self.fanout.flush())
        d.addBoth(lambda _: self.store.close())
        d.addBoth(lambda _: self.threadPool.stop())
        return d

    def _closeConnections(self) -> Deferred[Any]:
        waits = []
        for connection in list(self.connections):
            closed: Deferred[None] = Deferred()
            self._closing[connection] = closed
            connection.closeConnection("node shutting down")
            waits.append(closed)
        if not waits:
            return succeed(None)
        d = DeferredList(waits)
        timeout = self.clock.callLater(2.0, self._abortConnections)
        d.addBoth(lambda r: timeout.cancel() if timeout.active() else None)
        return d

    def _abortConnections(self) -> None:
        for protocol in list(self.connections):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()

    # IClientNode: what client connections call.

    def connectionOpened(self, connection: IFrameSink) -> bool:
        # How many sockets may be open is the gate's business; the node only
        # refuses while it stops.
        if self.stopping:
            return False
        self.connections.add(connection)
        return True

    def connectionClosed(self, connection: IFrameSink) -> None:
        self.connections.discard(connection)
        if getattr(connection, "droppedUnread", False):
            self.slowReadersDropped += 1
        closed = self._closing.pop(connection, None)
        if closed is not None and not closed.called:
            closed.callback(None)

    def login(self, sink: IFrameSink, auth: TimAuth, encoding: Encoding) -> Deferred[Session]:
        d = self.accounts.authenticate(auth, sink.peerAddress)
        d.addCallback(self._startSession, sink, auth, encoding)
        if self.userDirectory is not None:
            d.addCallback(self._registerSession, self.userDirectory)
        d.addErrback(_outageRefused)
        d.addErrback(self._loginFailed)
        return d

    def _loginFailed(self, failure: Failure) -> Failure:
        # Counted here, whatever refused it; the accounts log wrong
        # passwords and tokens, _startSession what it refuses.
        error, reason = failure.value, "error"
        if isinstance(error, TimProtocolError) and error.code in ErrorCode._value2member_map_:
            reason = ErrorCode(error.code).name.lower()
        self.loginFailures[reason] = self.loginFailures.get(reason, 0) + 1
        return failure

    def _startSession(self, grant: Any, sink: IFrameSink, auth: TimAuth, encoding: Encoding) -> Session:
        if self.bans.blockedUntil(grant.uid) is not None:
            self.log.info("login of {uid} refused: the account is blocked", uid=grant.uid)
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "account blocked")
        session = Session(
            sink,
            grant.uid,
            grant.domain,
            auth.resource,
            auth.termtyp or 0,
            encoding,
            self.clock.seconds(),
            self.ackIds,
            auth.extend,
            login_generation(auth, Generation(self.config.client.default_generation)),
        )
        try:
            self.sessions.admit(session)
        except TimProtocolError as e:
            self.log.info("login of {uid} refused: {why}", uid=grant.uid, why=e.text)
            raise
        self.logins += 1
        self.log.info(
            "login {uid} termtyp={termtyp} tim {generation}",
            uid=session.uid,
            termtyp=session.termtyp,
            generation=session.generation.value,
        )
        return session

    def _registerSession(self, session: Session, directory: UserDirectory) -> Deferred[Session]:
        """
        Tell the user's owner that the session is here before the client
        has its TIMAUTH ack: its inbox is read after that, once every node
        routing to the user knows (see L{timtx.cluster.directory}), so
        nothing stored meanwhile is missed, and a message sent to it after
        the ack is pushed live as on a single node.
        """
        # What it sent through another node may be a resend's original.
        self.duplicates.forget(session.uid)
        d = directory.register(session.uid, session.domain, admit=session)
        return d.addCallback(self._admitted, session)

    def _admitted(self, admitted: bool, session: Session) -> Session:
        if not admitted:
            self.log.info("login of {uid} refused: too many sessions in the cluster", uid=session.uid)
            self.sessions.remove(session)
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "too many sessions for this account")
        return session

    def _kickSession(self, uid: str, sid: int) -> None:
        """
        A login on another node pushed this session out (C{kick-oldest}).
        """
        assert self.userDirectory is not None
        session = self.userDirectory.sessionFor(uid, sid)
        if session is not None:
            self.log.info("kicking {victim} to admit a session on another node", victim=session)
            self.sessions.remove(session)
            session.kick()

    def sessionReady(self, session: Session) -> None:
        self.inbox.sessionStarted(session)

    def sessionEnded(self, session: Session) -> None:
        self.sessions.remove(session)
        self.inbox.sessionEnded(session)
        self.logouts += 1
        self.log.info(
            "logout {uid} termtyp={termtyp} after {seconds:.0f}s",
            uid=session.uid,
            termtyp=session.termtyp,
            seconds=self.clock.seconds() - session.loginTime,
        )

    def routeFor(self, timType: int) -> Route | None:
        frames = self.framesReceived
        frames[timType] = frames.get(timType, 0) + 1
        return self.dispatcher.lookup(timType)

    def register(self, auth: TimAuth) -> Deferred[str]:
        return self.accounts.register(auth)

    def issueToken(self, auth: TimAuth, peer: str) -> Deferred[int]:
        return self.accounts.issueToken(auth, peer)

    # For tests and tools.

    def listener(self, name: str) -> Listener | None:
        """
        The listener called C{name} (C{"client-ws"}, C{"client-tcp"}, or
        what L{addListener} was given), or C{None}.
        """
        return self._listeners.get(name)

    def listeningAddress(self, name: str) -> Any:
        """
        The address a listener is bound to: C{"client-ws"} (WebSocket and
        /tim2) or C{"client-tcp"}.
        """
        port = self._listeners[name].port
        if port is None:
            raise RuntimeError(f"{name} is not listening")
        return port.getHost()


def _outageRefused(failure: Failure) -> Failure:
    """
    A login the store could not answer: a retryable error, not an internal
    one.
    """
    if failure.check(StoreUnavailable):
        return Failure(refusal(failure))
    return failure
