# -*- test-case-name: timtx.test.test_node -*-
"""
The composition root: a L{Node} builds every part of a timtx node from a
L{Config} and a reactor, and starts and stops them in order.

Nothing in timtx reaches for a global reactor or module-level state; each
part gets what it needs from here.  Tests build nodes the same way with
their own config and clock.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from timtx.chat.accounts import AccountService
from timtx.chat.bigpayloads import BigDataService
from timtx.chat.business import BusinessRouter
from timtx.config import Config
from timtx.chat.conversations import Conversations
from timtx.delivery.inbox import Delivery
from timtx.chat.dispatch import Dispatcher
from timtx.chat.duplicates import DuplicateFilter
from timtx.delivery.fanout import GroupFanout
from timtx.chat.groups.service import GroupService
from timtx.crypto.ids import NodeKeys
from timtx.chat.messaging import MessagingService
from timtx.persistence import storeFactory
from timtx.chat.presence import PresenceService
from timtx.chat.profiles import ProfileService
from timtx.protocols import codec
from timtx.protocols.constants import Business, TimType
from timtx.transports.http import TimSite
from timtx.transports.registry import ProtocolRegistry, defaultRegistry, resolveProtocolPath
from timtx.protocols.structs import TimMessage, TimNodes, TimPresence, TimReq
from timtx.transports.tcp import TimTcpServerFactory
from timtx.transports.websocket import TimWebSocketResource, TimWebSocketServerFactory
from timtx.chat.roster import RelationCache, RosterService
from timtx.chat.groups.directory import GroupDirectory
from timtx.delivery.sessions import AckIds, Session, SessionRegistry
from timtx.crypto.vault import StanzaVault
from timtx.chat.vrooms.registry import VRoomRegistry
from timtx.chat.vrooms.service import StreamPush, VRoomService
from timtx.chat.loginwebhook import LoginWebhook


class NodeStartError(Exception):
    """
    The node could not start; the message says why, for an operator.
    """


class Listener(Service):
    """
    Listens on one endpoint string with one factory while running.

    @ivar port: the L{IListeningPort} once listening.
    """

    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any, name: str):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.setName(name)
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self.reactor, self.description).listen(self.factory)
        d.addCallback(self._listened)
        # A TCP or SSL endpoint answers at once; surface its error now so
        # that `twist tim` exits with a clear message instead of running
        # with a port missing.
        failures: list[Any] = []
        d.addErrback(failures.append)
        if failures:
            raise NodeStartError(
                f"cannot listen on {self.description!r} ({self.name}): {failures[0].getErrorMessage()}"
            )

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
        return maybeDeferred(port.stopListening)  # type: ignore[call-overload]


class Node(MultiService):
    """
    One timtx node.

    @param protocols: the protocol registry to serve connections with;
        C{[protocols]} in the config overrides its entries.
    @param store: an L{IMessageStore} to use instead of the configured one.
    @param keys: L{NodeKeys} to use instead of the configured key file.
    @param clock: the clock for timeouts and periodic work; the reactor by
        default, a L{twisted.internet.task.Clock} in tests.

    @ivar ready: a L{Deferred} that fires with the node once its store is
        open and it listens.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        protocols: ProtocolRegistry | None = None,
        store: Any = None,
        keys: NodeKeys | None = None,
        clock: Any = None,
    ):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.keys = keys if keys is not None else NodeKeys.fromFile(config.key_path)
        self.protocols = (protocols or defaultRegistry()).copy()
        for name, path in config.protocols.items():
            self.protocols.register(name, resolveProtocolPath(path))
        self.store = store if store is not None else storeFactory(config.store.backend).makeStore(config, reactor)
        self.threadPool = ThreadPool(0, config.node.worker_threads, "timtx-worker")
        webhook = None
        if config.accounts.login_webhook:
            webhook = LoginWebhook(reactor, config.accounts.login_webhook, config.accounts.login_webhook_timeout)
        self.accounts = AccountService(config.accounts, self.store, self.keys, self.clock, self.runInThread, webhook)
        self.sessions = SessionRegistry(config.devices)
        self.ackIds = AckIds()
        self.dispatcher = Dispatcher()
        self._buildMessaging()
        self._buildVrooms()
        self.connections: set[Any] = set()
        self._background: set[Deferred[Any]] = set()
        self.ready: Deferred[Node] = Deferred()
        self._tokenSweep = LoopingCall(self.accounts.purgeExpiredTokens)
        self._tokenSweep.clock = self.clock
        self._listeners: dict[str, Listener] = {}
        self._addListeners()

    def _buildMessaging(self) -> None:
        """
        Personal messaging: conversations, delivery, roster, presence and
        profiles, and the routes of their frame types.
        """
        config, store, clock = self.config, self.store, self.clock
        self.vault = StanzaVault(self.keys)
        self.relations = RelationCache(store)
        self.delivery = Delivery(config.messages, store, self.vault, self.sessions, self.ackIds, clock, self.reactor)
        self.conversations = Conversations(store, self.vault, clock, maxBatch=config.store.batch_max)
        self.duplicates = DuplicateFilter(store, clock, config.messages.dedupe_window)
        self.messaging = MessagingService(
            config.messages,
            store,
            self.vault,
            self.conversations,
            self.delivery,
            self.relations,
            self.duplicates,
            self.accounts,
            self.sessions,
            clock,
        )
        self.roster = RosterService(config.roster, self.relations, self.accounts, self.delivery, clock)
        self.presence = PresenceService(config.presence, store, self.relations, self.accounts, self.delivery)
        self.profiles = ProfileService(config.profiles, store, self.vault, self.relations, clock)
        self.business = BusinessRouter()
        self.roster.register(self.business)
        self.business.register(Business.MODIFYAUTH, self._changePassword)

        route = self.dispatcher.route
        for timType in (TimType.TIMMESSAGE, TimType.TIMREVOKEMESSAGE, TimType.TIMBURNMESSAGE):
            route(timType, TimMessage, self.messaging.handleMessage)
        route(TimType.TIMPULLMESSAGE, TimReq, self.messaging.handlePull)
        route(TimType.TIMOFFLINEMSG, None, lambda session, payload: self.delivery.drain(session))
        route(TimType.TIMPRESENCE, TimPresence, self.presence.handlePresence)
        route(TimType.TIMBROADPRESENCE, TimPresence, self.presence.handleBroadcast)
        route(TimType.TIMBUSINESS, TimReq, self.business)
        route(TimType.TIMNODES, TimNodes, self.profiles.handleNodes)
        self.sessions.onLastSession.append(self._lastSessionEnded)
        self._duplicateSweep = LoopingCall(self.duplicates.purge)
        self._duplicateSweep.clock = clock
        self._buildGroups()

    def _buildGroups(self) -> None:
        """
        Groups: the membership directory, fan-out with member cursors, and
        the group operations, messages and profiles.
        """
        config, store, clock = self.config, self.store, self.clock
        self.directory = GroupDirectory(store, maxGroups=config.groups.cache_groups)
        self.fanout = GroupFanout(
            self.directory,
            self.delivery,
            self.sessions,
            store,
            self.vault,
            self.ackIds,
            clock,
            batch=config.messages.offline_batch,
        )
        self.delivery.sources.append(self.fanout)
        self.groups = GroupService(
            config.groups,
            config.messages,
            store,
            self.vault,
            self.directory,
            self.fanout,
            self.conversations,
            self.delivery,
            self.duplicates,
            self.accounts,
            self.messaging,
            clock,
        )
        self.groups.register(self.business)
        self.messaging.roomMessages = self.groups
        self.profiles.roomNodes = self.groups.handleNodes
        self._cursorFlush = LoopingCall(self.fanout.flush)
        self._cursorFlush.clock = clock

    def _buildVrooms(self) -> None:
        """
        Virtual rooms for live streams and big payloads, and the routes of
        their frame types.
        """
        config = self.config
        registry = VRoomRegistry(config.vrooms, self.clock)
        self.vrooms = VRoomService(config.vrooms, registry, self.accounts, self.clock, config.client.max_output_bytes)
        self.vrooms.setServiceParent(self)
        self.bigData = BigDataService(
            config.vrooms, config.messages, self.sessions, self.relations, self.accounts, self.vrooms, self.clock
        )
        route = self.dispatcher.route
        route(TimType.TIMVROOM, TimReq, self.vrooms.handleRequest)
        route(TimType.TIMSTREAM, StreamPush, self.vrooms.handleStream)
        route(TimType.TIMBIGSTRING, None, self.bigData.handleBigString)
        route(TimType.TIMBIGBINARY, None, self.bigData.handleBigBinary)
        route(TimType.TIMBIGBINARYSTREAM, None, self.bigData.handleBigBinaryStream)
        self.sessions.onSessionRemoved.append(self.vrooms.sessionEnded)

    def _lastSessionEnded(self, session: Session) -> None:
        self.runInBackground(self.presence.announceOffline, session.uid, session.domain)

    def runInBackground(self, f: Callable[..., Any], *args: Any) -> None:
        """
        Run C{f(*args)} without anyone waiting for it; failures are logged,
        and the node waits for it before closing its store when it stops.
        """
        d = maybeDeferred(f, *args)
        if d.called and not isinstance(d.result, Exception):
            d.addErrback(self._backgroundFailed)
            return
        self._background.add(d)
        d.addErrback(self._backgroundFailed)
        d.addBoth(lambda _: self._background.discard(d))

    def _backgroundFailed(self, failure: Any) -> None:
        self.log.failure("background work failed", failure)

    def _changePassword(self, session: Session, request: TimReq) -> Deferred[None]:
        d = self.accounts.changePassword(session.uid, request.reqStr, request.reqStr2)
        d.addCallback(lambda _: session.sendAck(TimType.TIMBUSINESS, t=Business.MODIFYAUTH))
        return d

    def _addListeners(self) -> None:
        client = self.config.client
        if client.listen:
            wsFactory = TimWebSocketServerFactory(self, self.protocols.lookup("client-ws"))
            site = TimSite(self, TimWebSocketResource(wsFactory))
            self._addListener(Listener(self.reactor, client.listen, site, "client-ws"))
        if client.tcp_listen:
            tcpFactory = TimTcpServerFactory(self, self.protocols.lookup("client-tcp"))
            self._addListener(Listener(self.reactor, client.tcp_listen, tcpFactory, "client-tcp"))

    def _addListener(self, listener: Listener) -> None:
        self._listeners[str(listener.name)] = listener
        listener.setServiceParent(self)

    def runInThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} in the node's worker threads.
        """
        return deferToThreadPool(self.reactor, self.threadPool, f, *args)

    # Starting and stopping.

    def startService(self) -> None:
        if not codec.ACCELERATED:
            self.log.critical(
                "thrift's C codec (thrift.protocol.fastbinary) is missing: Thrift compact runs in pure "
                "Python, many times slower. Reinstall thrift where a C compiler is available."
            )
        self.threadPool.start()
        opened = self.store.open()
        try:
            super().startService()
        except BaseException:
            # Leave nothing half-started: stop the listeners that bound.
            for child in list(self):
                if child.running:
                    child.stopService()
            self.running = False
            self.threadPool.stop()
            self.store.close()
            raise
        self._tokenSweep.start(max(self.config.accounts.token_ttl, 1.0), now=False)
        if self.duplicates.enabled:
            self._duplicateSweep.start(max(self.config.messages.dedupe_window, 60.0), now=False)
        self._cursorFlush.start(self.config.groups.cursor_flush_interval, now=False)
        listening = [listener.listening for listener in self._listeners.values()]
        d = gatherResults([opened, *listening], consumeErrors=True)
        d.addCallbacks(self._started, self._failedToStart)

    def _started(self, _: object) -> None:
        self.log.info(
            "timtx node ready ({store} store, compact codec {codec})",
            store=self.store.name,
            codec="C" if codec.ACCELERATED else "pure Python",
        )
        self.ready.callback(self)

    def _failedToStart(self, failure: Any) -> None:
        error = getattr(failure.value, "subFailure", failure)
        self.log.critical("timtx node failed to start: {error}", error=error.getErrorMessage())
        self.ready.errback(error)

    #: Whether L{stopService} has begun.
    stopping = False

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        self.stopping = True
        for sweep in (self._tokenSweep, self._duplicateSweep, self._cursorFlush):
            if sweep.running:
                sweep.stop()
        d = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._closeConnections())
        d.addBoth(lambda _: DeferredList(list(self._background)))
        d.addBoth(lambda _: self.delivery.flushRemovals())
        d.addBoth(lambda _: self.fanout.flush())
        d.addBoth(lambda _: self.store.close())
        d.addBoth(lambda _: self.threadPool.stop())
        return d

    def _closeConnections(self) -> Deferred[Any]:
        waits = []
        for protocol in list(self.connections):
            closed: Deferred[None] = Deferred()
            protocol._nodeClosed = closed
            protocol.closeConnection("node shutting down")
            waits.append(closed)
        if not waits:
            return succeed(None)
        d = DeferredList(waits)
        timeout = self.reactor.callLater(2.0, self._abortConnections)
        d.addBoth(lambda r: timeout.cancel() if timeout.active() else None)
        return d

    def _abortConnections(self) -> None:
        for protocol in list(self.connections):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()

    # What protocols call.

    def canAcceptConnection(self) -> bool:
        limit = self.config.client.max_connections
        return not limit or len(self.connections) < limit

    def connectionOpened(self, protocol: Any) -> None:
        self.connections.add(protocol)

    def connectionClosed(self, protocol: Any) -> None:
        self.connections.discard(protocol)
        closed = getattr(protocol, "_nodeClosed", None)
        if closed is not None and not closed.called:
            closed.callback(None)

    def sessionStarted(self, session: Session) -> None:
        """
        A session logged in and got its ack.
        """
        self.delivery.sessionStarted(session)

    def sessionEnded(self, session: Session) -> None:
        """
        A session's connection closed.
        """
        self.delivery.sessionEnded(session)

    # For tests and tools.

    def listeningAddress(self, name: str) -> Any:
        """
        The address a listener is bound to: C{"client-ws"} (WebSocket and
        /tim2) or C{"client-tcp"}.
        """
        port = self._listeners[name].port
        if port is None:
            raise RuntimeError(f"{name} is not listening")
        return port.getHost()
