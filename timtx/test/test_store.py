"""
Tests for the storage plugins: one conformance suite, run against each.
"""

import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from timtx.persistence import BUILTIN_STORES, IMessageStore, storeFactory
from timtx.persistence.memory import MemoryStore
from timtx.persistence.records import Account, TokenGrant
from timtx.persistence.sqlite import MIGRATIONS, SchemaTooNew, SQLiteStore
from timtx.persistence.worker import SerialWorker, WorkerStopped


class MessageStoreTestsMixin:
    """
    Behaviour every L{IMessageStore} must have.  A subclass provides
    C{makeStore()}, returning a L{Deferred} of an opened store.
    """

    @inlineCallbacks
    def store(self):
        store = yield self.makeStore()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_interface(self):
        store = yield self.store()
        self.assertTrue(verifyObject(IMessageStore, store))

    @inlineCallbacks
    def test_accounts(self):
        """
        An account is created once, read back, and its password hash
        changed.
        """
        store = yield self.store()
        account = Account("uid1", "dom", "hash1", 1.5)
        self.assertIs((yield store.createAccount(account)), True)
        self.assertIs((yield store.createAccount(Account("uid1", "x", "y", 2.0))), False)
        self.assertEqual((yield store.getAccount("uid1")), account)
        self.assertIsNone((yield store.getAccount("uid2")))
        self.assertIs((yield store.setPasswordHash("uid1", "hash2")), True)
        self.assertIs((yield store.setPasswordHash("uid2", "hash2")), False)
        self.assertEqual((yield store.getAccount("uid1")).passwordHash, "hash2")

    @inlineCallbacks
    def test_tokens(self):
        """
        A token is taken once, never after it expires, and purged when
        expired.
        """
        store = yield self.store()
        grant = TokenGrant("uid1", "dom")
        yield store.addToken(b"k1", grant, 100.0)
        yield store.addToken(b"k2", grant, 50.0)
        yield store.addToken(b"k3", grant, 10.0)
        self.assertEqual((yield store.takeToken(b"k1", 99.0)), grant)
        self.assertIsNone((yield store.takeToken(b"k1", 99.0)))
        self.assertIsNone((yield store.takeToken(b"k2", 60.0)))
        self.assertEqual((yield store.purgeTokens(60.0)), 1)
        self.assertIsNone((yield store.takeToken(b"k3", 5.0)))

    @inlineCallbacks
    def test_callsAnswerInOrder(self):
        """
        Results arrive in the order calls were made: a read issued after a
        write sees it.
        """
        store = yield self.store()
        order = []
        calls = []
        for i in range(20):
            d = store.createAccount(Account(f"u{i}", "", "h", 0.0))
            d.addCallback(lambda _, i=i: order.append(("w", i)))
            calls.append(d)
            d = store.getAccount(f"u{i}")
            d.addCallback(lambda a, i=i: order.append(("r", i, a is not None)))
            calls.append(d)
        yield gatherResults(calls)
        self.assertEqual(order, [x for i in range(20) for x in (("w", i), ("r", i, True))])


class MemoryStoreTests(MessageStoreTestsMixin, TestCase):
    def makeStore(self):
        store = MemoryStore()
        return store.open().addCallback(lambda _: store)


class SQLiteStoreTests(MessageStoreTestsMixin, TestCase):
    def makeStore(self):
        self.path = os.path.join(self.mktemp(), "sub", "tim.db")
        store = SQLiteStore(reactor, self.path, "full")
        return store.open().addCallback(lambda _: store)

    @inlineCallbacks
    def test_durableAcrossReopen(self):
        """
        What was written is there after the store is closed and reopened;
        the database uses WAL and the current schema version.
        """
        store = yield self.makeStore()
        yield store.createAccount(Account("u", "d", "h", 1.0))
        yield store.close()
        connection = sqlite3.connect(self.path)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))
        connection.close()
        again = SQLiteStore(reactor, self.path)
        yield again.open()
        self.addCleanup(again.close)
        self.assertEqual((yield again.getAccount("u")), Account("u", "d", "h", 1.0))

    @inlineCallbacks
    def test_refusesNewerSchema(self):
        """
        A database written by a newer timtx is not touched.
        """
        path = os.path.join(self.mktemp(), "tim.db")
        os.makedirs(os.path.dirname(path))
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
        connection.close()
        store = SQLiteStore(reactor, path)
        yield self.assertFailure(store.open(), SchemaTooNew)

    @inlineCallbacks
    def test_groupCommit(self):
        """
        Operations queued together are committed together: many writes,
        few transactions.
        """
        store = yield self.store()
        yield gatherResults([store.createAccount(Account(f"u{i}", "", "h", 0.0)) for i in range(200)])
        self.assertLess(store._worker.batches, 50)


class SerialWorkerTests(TestCase):
    """
    The worker's transaction rules, on a SQLite connection.
    """

    @inlineCallbacks
    def makeWorker(self):
        path = os.path.join(self.mktemp(), "w.db")
        os.makedirs(os.path.dirname(path))

        def connect():
            c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            c.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            return c

        worker = SerialWorker(
            reactor,
            connect,
            begin=lambda c: c.execute("BEGIN"),
            commit=lambda c: c.execute("COMMIT"),
            rollback=lambda c: c.execute("ROLLBACK"),
            savepoint=lambda c, n: c.execute(f"SAVEPOINT {n}"),
            release=lambda c, n: c.execute(f"RELEASE {n}"),
            rollbackTo=lambda c, n: c.execute(f"ROLLBACK TO {n}"),
            close=lambda c: c.close(),
        )
        yield worker.start()
        return worker

    @inlineCallbacks
    def test_failingOperationAlone(self):
        """
        An operation that fails is undone alone; the others of its batch
        commit.
        """
        worker = yield self.makeWorker()
        ok1 = worker.submit(lambda c: c.execute("INSERT INTO t VALUES (1)").rowcount)
        bad = worker.submit(lambda c: c.execute("INSERT INTO t VALUES (1)"))
        ok2 = worker.submit(lambda c: c.execute("INSERT INTO t VALUES (2)").rowcount)
        self.assertEqual((yield ok1), 1)
        yield self.assertFailure(bad, sqlite3.IntegrityError)
        self.assertEqual((yield ok2), 1)
        rows = yield worker.submit(lambda c: c.execute("SELECT x FROM t ORDER BY x").fetchall())
        self.assertEqual(rows, [(1,), (2,)])
        yield worker.stop()
        yield self.assertFailure(worker.submit(lambda c: None), WorkerStopped)

    @inlineCallbacks
    def test_stopRunsQueued(self):
        """
        Stopping runs what was queued first.
        """
        worker = yield self.makeWorker()
        results = [worker.submit(lambda c, i=i: i) for i in range(10)]
        yield worker.stop()
        self.assertEqual([r.result for r in results], list(range(10)))


class PluginLookupTests(SynchronousTestCase):
    def test_builtins(self):
        self.assertEqual(sorted(BUILTIN_STORES), ["memory", "sqlite"])
        self.assertIs(storeFactory("memory"), BUILTIN_STORES["memory"])

    def test_unknown(self):
        error = self.assertRaises(KeyError, storeFactory, "nosuchdb")
        self.assertIn("memory", str(error))
