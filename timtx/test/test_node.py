"""
Tests for L{timtx.node}: composition and lifecycle.
"""

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from timtx.admin.status import storeStatus
from timtx.crypto.ids import NodeKeys
from timtx.node import Node, NodeStartError
from timtx.persistence.errors import StoreUnavailable
from timtx.persistence.memory import MemoryStore
from timtx.persistence.sqlite import SQLiteStore
from timtx.protocols import codec
from timtx.testing import startNode, testConfig


class NodeTests(TestCase):
    @inlineCallbacks
    def test_storeFromConfig(self):
        """
        The store plugin named in the config is used, and the node secret
        file is created in the data directory.
        """
        directory = self.mktemp()
        node = Node(testConfig(directory, backend="sqlite"), reactor)
        node.startService()
        self.addCleanup(node.stopService)
        yield node.ready
        self.assertEqual(node.store.name, "sqlite")
        self.assertEqual(node.keys.accountId("a", ""), NodeKeys.fromFile(node.config.key_path).accountId("a", ""))
        # By default the SQLite work runs in a child process, which the
        # admin API names, and which ends with the node.
        pid = node.store.pid
        self.assertEqual(storeStatus(node)["process"], {"pid": pid, "restarts": 0})
        yield node.stopService()
        self.assertIsNone(node.store.pid)
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)

    @inlineCallbacks
    def test_sqliteInProcess(self):
        """
        With C{sqlite_process = false} the SQLite work runs in a thread of
        the node.
        """
        node = Node(testConfig(self.mktemp(), backend="sqlite", store={"sqlite_process": False}), reactor)
        node.startService()
        self.addCleanup(node.stopService)
        yield node.ready
        self.assertIsInstance(node.store.wrapped, SQLiteStore)
        self.assertNotIn("process", storeStatus(node))

    @inlineCallbacks
    def test_missingCCodecIsLoud(self):
        """
        Without thrift's C codec the node logs a critical message at start.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.patch(codec, "ACCELERATED", False)
        yield startNode(self, reactor, testConfig(self.mktemp()))
        critical = [e for e in observer if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn("fastbinary", critical[0]["log_format"])

    def test_portInUse(self):
        """
        A port that cannot be bound stops the start with a clear error, and
        nothing is left listening.
        """
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            config = testConfig(self.mktemp(), client={"tcp_listen": f"tcp:{port}:interface=127.0.0.1"})
            node = Node(config, reactor, store=MemoryStore(), keys=NodeKeys(b"k" * 32))
            error = self.assertRaises(NodeStartError, node.startService)
            self.assertIn(f"tcp:{port}", str(error))
            self.assertFalse(node.running)
            self.assertEqual([listener.port for listener in node._listeners.values()], [None, None])

    @inlineCallbacks
    def test_stopTwice(self):
        """
        A second stop is harmless: it fires at once, and the node stays
        stopped with nothing listening and its store closed.
        """
        store = _ClosingStore()
        node = yield startNode(self, reactor, testConfig(self.mktemp()), store=store)
        address = node.listeningAddress("client-tcp")
        yield node.stopService()
        second = node.stopService()
        self.assertIsNone(self.successResultOf(second))
        self.assertFalse(node.running)
        self.assertEqual([listener.port for listener in node._listeners.values()], [None, None])
        self.assertTrue(store.closed)
        refused = socket.socket()
        self.addCleanup(refused.close)
        self.assertNotEqual(refused.connect_ex((address.host, address.port)), 0)

    def test_lateListenFailure(self):
        """
        An endpoint whose listen fails after a while fails the node's start
        with a L{NodeStartError} naming it, and says so in the log.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        late = _LateEndpoint()
        node = _EndpointNode(
            late,
            testConfig(self.mktemp(), client={"tcp_listen": ""}),
            reactor,
            store=MemoryStore(),
            keys=NodeKeys(b"k" * 32),
        )
        node.startService()
        self.addCleanup(node.stopService)
        self.assertNoResult(node.ready)
        late.listening.errback(CannotListenError("127.0.0.1", 1, OSError("address in use")))
        failure = self.failureResultOf(node.ready, NodeStartError)
        self.assertIn("client-ws", failure.getErrorMessage())
        critical = [e for e in observer if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)

    def test_closingUsesTheNodesClock(self):
        """
        Connections that do not close when the node stops are aborted after
        two seconds of the node's clock.
        """
        clock = Clock()
        node = Node(
            testConfig(self.mktemp(), client={"listen": "", "tcp_listen": ""}),
            MemoryReactorClock(),
            store=MemoryStore(),
            keys=NodeKeys(b"k" * 32),
            clock=clock,
        )
        node.startService()
        stuck = _StuckConnection()
        self.assertTrue(node.connectionOpened(stuck))
        stopping = node.stopService()
        self.assertEqual(stuck.asked, 1)
        clock.advance(1.9)
        self.assertFalse(stuck.transport.aborted)
        clock.advance(0.2)
        self.assertTrue(stuck.transport.aborted)
        node.connectionClosed(stuck)
        self.successResultOf(stopping)

    def test_backgroundWork(self):
        """
        Background work that fails is logged, whether it fails at once or
        later; the node waits for what is still running when it stops.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        node = Node(
            testConfig(self.mktemp(), client={"listen": "", "tcp_listen": ""}),
            MemoryReactorClock(),
            store=MemoryStore(),
            keys=NodeKeys(b"k" * 32),
            clock=Clock(),
        )
        node.startService()
        node.runInBackground(lambda: 1 / 0)
        later = Deferred()
        node.runInBackground(lambda: later)
        stopping = node.stopService()
        self.assertNoResult(stopping)
        later.errback(ValueError("late"))
        self.successResultOf(stopping)
        logged = [e["log_failure"].type for e in observer if "log_failure" in e]
        self.assertEqual(logged, [ZeroDivisionError, ValueError])
        self.flushLoggedErrors(ZeroDivisionError, ValueError)


class StoreFirstTests(TestCase):
    """
    A node opens its store before it listens.
    """

    def test_storeFailsNothingListens(self):
        """
        A store that cannot be opened (a wrong DSN, a server down, a schema
        too new) fails the start with its one-line reason, and the node
        never listened.
        """
        store = _OpeningStore()
        node = Node(
            testConfig(self.mktemp(), client={"listen": "tcp:0:interface=127.0.0.1"}),
            reactor,
            store=store,
            keys=NodeKeys(b"k" * 32),
        )
        node.startService()
        self.assertEqual([listener.port for listener in node._listeners.values()], [None, None])
        store.opening.errback(StoreUnavailable("cannot connect to PostgreSQL at db:5432/timtx: refused"))
        failure = self.failureResultOf(node.ready, StoreUnavailable)
        self.assertIn("PostgreSQL at db:5432/timtx", failure.getErrorMessage())
        self.assertEqual([listener.port for listener in node._listeners.values()], [None, None])
        self.assertFalse(node.running)
        self.assertTrue(store.closed)
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_listensOnceOpen(self):
        """
        The listeners start once the store is open; the node reports the
        store's availability.
        """
        store = _OpeningStore()
        node = Node(testConfig(self.mktemp()), reactor, store=store, keys=NodeKeys(b"k" * 32))
        node.startService()
        self.addCleanup(node.stopService)
        self.assertEqual([listener.port for listener in node._listeners.values()], [None, None])
        store.opening.callback(None)
        yield node.ready
        self.assertNotIn(None, [listener.port for listener in node._listeners.values()])
        self.assertTrue(node.storeAvailable)
        store.available = False
        self.assertFalse(node.storeAvailable)

    def test_stoppedWhileOpening(self):
        """
        A node stopped before its store opened never listens.
        """
        store = _OpeningStore()
        node = Node(testConfig(self.mktemp()), reactor, store=store, keys=NodeKeys(b"k" * 32))
        node.startService()
        self.successResultOf(node.stopService())
        store.opening.callback(None)
        self.assertEqual([listener.port for listener in node._listeners.values()], [None, None])


class _OpeningStore(MemoryStore):
    closed = False

    def __init__(self):
        super().__init__()
        self.opening = Deferred()

    def open(self):
        return self.opening

    def close(self):
        self.closed = True
        return super().close()


class _ClosingStore(MemoryStore):
    closed = False

    def close(self):
        self.closed = True
        return super().close()


class _LateEndpoint:
    def __init__(self):
        self.listening = Deferred()

    def listen(self, factory):
        return self.listening


class _EndpointNode(Node):
    """
    A node whose client endpoint is given.
    """

    def __init__(self, endpoint, *args, **kwargs):
        self._endpoint = endpoint
        super().__init__(*args, **kwargs)

    def makeEndpoint(self, description):
        return self._endpoint


class _AbortRecorder:
    aborted = False

    def abortConnection(self):
        self.aborted = True


class _StuckConnection:
    """
    A connection that ignores being asked to close.
    """

    def __init__(self):
        self.asked = 0
        self.transport = _AbortRecorder()

    def closeConnection(self, reason):
        self.asked += 1
