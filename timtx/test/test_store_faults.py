# -*- test-case-name: timtx.test.test_store_faults -*-
"""
The server stores when the database misbehaves: wrong DSN, server down at
start, a schema newer than the code, connections killed, a server killed
-9 or restarted in the middle of writes, a server that stops answering.

The tests that kill a server run their own PostgreSQL (L{privateServer});
the others use this machine's servers.  Slow-ish: about 15 seconds in all.
"""

import os
import signal
import time

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from timtx.persistence.errors import SchemaTooNew, StoreOutcomeUnknown, StoreUnavailable
from timtx.persistence.records import NewMessage
from timtx.test.databases import (
    assertReactorWatchesOnlyLive,
    freePort,
    mariadbDatabase,
    mariadbExecute,
    pgExecute,
    postgresqlDatabase,
    privateServer,
    uniqueName,
)


def postgresqlStore(dsn, **kwargs):
    from timtx.persistence.postgresql import PostgreSQLStore

    kwargs.setdefault("reconnectInitial", 0.05)
    kwargs.setdefault("reconnectMax", 0.2)
    return PostgreSQLStore(reactor, dsn, **kwargs)


def mariadbStore(url, **kwargs):
    from timtx.persistence.mariadb import MariaDBStore

    kwargs.setdefault("reconnectInitial", 0.05)
    kwargs.setdefault("reconnectMax", 0.2)
    return MariaDBStore(reactor, url, driver="pymysql", **kwargs)


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


class OpenFailureTests(TestCase):
    """
    C{open()} fails with one clear message; a node turns it into a
    non-zero exit (L{timtx.tap.NodeRunner}).
    """

    @inlineCallbacks
    def assertOpenFails(self, store, error, *words):
        failure = yield self.assertFailure(store.open(), error)
        message = str(failure)
        for word in words:
            self.assertIn(word, message)
        self.assertNotIn("Traceback", message)
        self.assertEqual(len(message.splitlines()), 1, message)
        yield store.close()

    def test_postgresqlBadDSN(self):
        return self.assertOpenFails(postgresqlStore("hostx=1 = 2"), StoreUnavailable, "[store] dsn")

    def test_postgresqlEmptyDSN(self):
        return self.assertOpenFails(postgresqlStore(""), StoreUnavailable, "dsn is empty")

    def test_postgresqlDown(self):
        """
        No server on the port: refused, named.
        """
        port = freePort()
        store = postgresqlStore(f"postgresql://postgres@127.0.0.1:{port}/test")
        return self.assertOpenFails(store, StoreUnavailable, f"PostgreSQL at 127.0.0.1:{port}/test", "refused")

    @inlineCallbacks
    def test_postgresqlNoDatabase(self):
        dsn = yield postgresqlDatabase(self)
        yield self.assertOpenFails(
            postgresqlStore(dsn.replace("dbname=", "dbname=missing")), StoreUnavailable, "does not exist"
        )

    @inlineCallbacks
    def test_postgresqlSchemaTooNew(self):
        dsn = yield postgresqlDatabase(self)
        yield pgExecute(
            dsn, "CREATE TABLE schema_version (version integer NOT NULL); INSERT INTO schema_version VALUES (99)"
        )
        yield self.assertOpenFails(postgresqlStore(dsn), SchemaTooNew, "schema 99 is newer")

    @inlineCallbacks
    def test_postgresqlNoPermission(self):
        """
        A user that may not create tables (PostgreSQL 15 and later give
        nobody but the owner CREATE in schema public): one line saying so.
        """
        dsn = yield postgresqlDatabase(self)
        role = uniqueName()
        yield pgExecute(dsn, f"CREATE ROLE {role} LOGIN")
        self.addCleanup(pgExecute, dsn.replace(dsn.split("dbname=")[1].split()[0], "postgres"), f"DROP ROLE {role}")
        yield self.assertOpenFails(
            postgresqlStore(f"{dsn} user={role}"), StoreUnavailable, "cannot create the schema", "permission denied"
        )

    def test_mariadbBadDSN(self):
        return self.assertOpenFails(mariadbStore("mariadb://root@127.0.0.1"), StoreUnavailable, "[store] dsn")

    def test_mariadbDown(self):
        port = freePort()
        store = mariadbStore(f"mariadb://root@127.0.0.1:{port}/test")
        return self.assertOpenFails(store, StoreUnavailable, f"MariaDB at 127.0.0.1:{port}/test", "connect")

    @inlineCallbacks
    def test_mariadbSchemaTooNew(self):
        url = yield mariadbDatabase(self)
        yield mariadbExecute(url, "CREATE TABLE schema_version (version INT NOT NULL)")
        yield mariadbExecute(url, "INSERT INTO schema_version VALUES (99)")
        yield self.assertOpenFails(mariadbStore(url), SchemaTooNew, "schema 99 is newer")

    @inlineCallbacks
    def test_postgresqlMigratesOnce(self):
        """
        Two stores opening one empty database together create the schema
        once (the second waits on the advisory lock).
        """
        dsn = yield postgresqlDatabase(self)
        stores = [postgresqlStore(dsn, poolSize=1) for _ in range(3)]
        for store in stores:
            self.addCleanup(store.close)
        yield gatherResults([store.open() for store in stores])
        self.assertEqual((yield stores[0].lastMessage("c")), (0, 0))


class KilledConnectionTests(TestCase):
    """
    The server ends the store's connections (an administrator, a proxy, an
    idle timeout): the store reconnects and nothing is lost.
    """

    @inlineCallbacks
    def test_postgresql(self):
        dsn = yield postgresqlDatabase(self)
        store = postgresqlStore(dsn, poolSize=3)
        yield store.open()
        self.addCleanup(store.close)
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"one", 0.0)])
        name = dsn.split("dbname=")[1].split()[0]
        yield pgExecute(
            dsn.replace(f"dbname={name}", "dbname=postgres"),
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )
        # The idle connections learn it at once; wait for the pool to
        # replace them, then use it.
        for _ in range(100):
            if not store.pool.down and len(store.pool._idle) == 3:
                break
            yield sleep(0.02)
        yield store.appendMessages([NewMessage("c", 2, 2, "a", b"two", 0.0)])
        self.assertEqual([m.stanza for m in (yield store.messagesAfter("c", 0, 10))], [b"one", b"two"])

    @inlineCallbacks
    def test_postgresqlSocketClosedUnderTheReactor(self):
        """
        libpq closes its socket as soon as it finds the server gone, even
        inside a call txpostgres makes while the reactor watches the
        connection (a statement started as the server dies).  The reactor
        watches a duplicate the store owns, so closing the connection then
        takes it out of the reactor cleanly: nothing is left that a later
        socket reusing the number would trip over.
        """
        from timtx.persistence.postgresql import _Connection

        dsn = yield postgresqlDatabase(self)
        connection = _Connection(reactor)
        yield connection.connect(dsn)
        watched = connection.fileno()
        libpq = connection._connection.fileno()
        self.assertNotEqual(watched, libpq)
        self.assertEqual(os.fstat(watched).st_ino, os.fstat(libpq).st_ino)
        self.assertIn(watched, reactor._reads)  # idle: watched for NOTIFY
        connection._connection.close()  # what libpq does, under the reactor
        connection.close()
        self.assertNotIn(watched, reactor._reads)
        self.assertEqual(connection.fileno(), -1)
        assertReactorWatchesOnlyLive(self)

    @inlineCallbacks
    def test_mariadb(self):
        """
        MariaDB connections learn it on first use: the call runs again on a
        new connection.
        """
        url = yield mariadbDatabase(self)
        store = mariadbStore(url, poolSize=2)
        yield store.open()
        self.addCleanup(store.close)
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"one", 0.0)])
        name = url.rsplit("/", 1)[1]
        for _ in range(100):
            if len(store.pool._idle) == 2:
                break
            yield sleep(0.02)

        def killAll():
            import pymysql

            from timtx.persistence.mariadb import parseDSN

            connection = pymysql.connect(**parseDSN(url), autocommit=True)
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()", (name,)
                )
                for (pid,) in cursor.fetchall():
                    cursor.execute(f"KILL CONNECTION {pid}")
            connection.close()

        yield deferToThread(killAll)
        yield store.appendMessages([NewMessage("c", 2, 2, "a", b"two", 0.0)])
        self.assertEqual([m.stanza for m in (yield store.messagesAfter("c", 0, 10))], [b"one", b"two"])


class ServerCrashTests(TestCase):
    """
    A private PostgreSQL killed -9, restarted, or frozen while the store
    writes: calls fail fast with L{StoreUnavailable} (or
    L{StoreOutcomeUnknown} when the commit was under way), the store
    reconnects by itself, and every write it confirmed is there.
    """

    timeout = 120

    @inlineCallbacks
    def writeThrough(self, store, fault, recover, after=150):
        """
        Write messages, each in its own conversation, a few at a time;
        after C{after} confirmed, run C{fault()}; when calls fail, run
        C{recover()}; go on until C{after} more are confirmed.

        @return: the conversations confirmed, failed as unavailable, and of
            unknown outcome.
        """
        confirmed, unavailable, unknown = set(), set(), set()
        state = {"faulted": False, "faultDone": False, "recovered": False, "next": 0, "after": 0}
        deadline = time.monotonic() + 60

        @inlineCallbacks
        def writer():
            while time.monotonic() < deadline:
                i = state["next"]
                state["next"] += 1
                conv = f"c{i}"
                d = store.appendMessages([NewMessage(conv, 1, i + 1, "a", b"m%d" % i, 0.0, inbox=(("bob", None),))])
                try:
                    yield d.addTimeout(30, reactor)
                except StoreOutcomeUnknown:
                    unknown.add(conv)
                except StoreUnavailable:
                    unavailable.add(conv)
                    # Fail fast, but do not spin while the server is down.
                    yield sleep(0.01)
                else:
                    confirmed.add(conv)
                    if state["recovered"]:
                        state["after"] += 1
                if not state["faulted"] and len(confirmed) >= after:
                    state["faulted"] = True
                    yield fault()
                    state["faultDone"] = True
                if state["faultDone"] and not state["recovered"] and unavailable:
                    state["recovered"] = True
                    yield recover()
                if state["after"] >= after:
                    return

        yield gatherResults([writer() for _ in range(8)])
        self.assertTrue(state["recovered"], "the fault never showed")
        self.assertGreaterEqual(state["after"], after, "the store did not recover in time")
        return confirmed, unavailable, unknown

    @inlineCallbacks
    def check(self, dsn, confirmed, unavailable, unknown):
        """
        Every confirmed write is stored with its inbox entry; none that
        failed as unavailable is.
        """

        def stored():
            import psycopg2

            connection = psycopg2.connect(dsn)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT conv FROM messages")
                    convs = {row[0] for row in cursor.fetchall()}
                    cursor.execute("SELECT conv FROM inbox")
                    inboxed = [row[0] for row in cursor.fetchall()]
            finally:
                connection.close()
            return convs, inboxed

        convs, inboxed = yield deferToThread(stored)
        self.assertEqual(confirmed - convs, set(), "confirmed writes lost")
        self.assertEqual(unavailable & convs, set(), "writes reported as not done were stored")
        self.assertEqual(sorted(inboxed), sorted(convs), "one inbox entry per stored message")
        self.assertLessEqual(convs, confirmed | unknown)

    @inlineCallbacks
    def setUpServer(self, **kwargs):
        self.server = yield privateServer(self)
        store = postgresqlStore(self.server.dsn, poolSize=3, **kwargs)
        yield store.open()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_killed(self):
        """
        kill -9 of the server and all its processes, then a restart (with
        crash recovery).
        """
        store = yield self.setUpServer()
        server = self.server

        def recover():
            return sleep(0.3).addCallback(lambda _: deferToThread(server.start))

        results = yield self.writeThrough(store, lambda: deferToThread(server.kill), recover)
        self.assertTrue(results[1], "some calls failed as unavailable while the server was down")
        yield self.check(server.dsn, *results)

    @inlineCallbacks
    def test_restarted(self):
        """
        A clean restart (pg_ctl stop -m fast; start), as an upgrade does.
        """
        store = yield self.setUpServer()
        server = self.server
        results = yield self.writeThrough(
            store, lambda: deferToThread(server.stop), lambda: deferToThread(server.start)
        )
        yield self.check(server.dsn, *results)

    @inlineCallbacks
    def test_frozen(self):
        """
        A server that stops answering (SIGSTOP: a dead network looks the
        same) costs at most statement_timeout + connect_timeout: the calls
        fail as unavailable instead of hanging, and the store recovers
        once it answers again.
        """
        store = yield self.setUpServer(statementTimeout=0.5, connectTimeout=0.5)
        server = self.server

        def freeze():
            server.signal(signal.SIGSTOP)

        def thaw():
            server.signal(signal.SIGCONT)

        self.addCleanup(thaw)
        results = yield self.writeThrough(store, freeze, thaw, after=50)
        yield self.check(server.dsn, *results)
