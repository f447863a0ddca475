# -*- test-case-name: timtx.test.test_store_node -*-
"""
Nodes on the server stores: the example configs run, clients exchange
messages through PostgreSQL and MariaDB, and a node whose database cannot
be reached exits with one clear line.
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

import timtx
from timtx.config import load, replace
from timtx.test.base import NodeTestCase
from timtx.test.databases import freePort, mariadbDatabase, postgresqlDatabase
from timtx.test.test_messaging import MessagingTestsMixin, isMessage
from timtx.testing import loggedInClient, requireOrSkip, sourceRoot, startNode


class ExampleTests(TestCase):
    """
    C{examples/postgresql.ini} and C{examples/mariadb.ini} as they are, but
    on ports chosen by the OS, a data directory and a database of the
    test's own.
    """

    @inlineCallbacks
    def runExample(self, name, database):
        root = sourceRoot()
        if root is None:
            requireOrSkip("no source checkout (examples/ is not installed)")
        config = load(root.child("examples").child(name).path)
        dsn = yield database(self)
        config = replace(
            config,
            # Absolute: the example's relative paths are taken from
            # examples/, where a test must not write.
            node={"data_dir": os.path.abspath(self.mktemp())},
            client={"listen": "tcp:0:interface=127.0.0.1", "tcp_listen": "tcp:0:interface=127.0.0.1"},
            accounts={"scrypt_n": 16, "scrypt_r": 1},
            store={"dsn": dsn},
        )
        node = yield startNode(self, reactor, config)
        alice = yield loggedInClient(reactor, node, "alice", testCase=self)
        bob = yield loggedInClient(reactor, node, "bob", testCase=self, transport="tcp")
        yield node.relations.setStance(alice.uid, bob.uid, 1)
        yield node.relations.setStance(bob.uid, alice.uid, 1)
        alice.sendMessage(bob.uid, "hello through the database")
        got = yield bob.next(isMessage)
        self.assertEqual((got.body.dataString, got.body.seq), ("hello through the database", 1))
        history = yield alice.history(bob.uid)
        self.assertEqual([m.dataString for m in history], ["hello through the database"])
        return node

    @inlineCallbacks
    def test_postgresql(self):
        node = yield self.runExample("postgresql.ini", postgresqlDatabase)
        self.assertEqual(node.store.name, "postgresql")

    @inlineCallbacks
    def test_mariadb(self):
        node = yield self.runExample("mariadb.ini", mariadbDatabase)
        self.assertEqual(node.store.name, "mariadb")


class ServerStoreNodeMixin:
    """
    A L{NodeTestCase} on a server store, in a database of each test's own.
    """

    @inlineCallbacks
    def node(self, clock=None, **sections):
        dsn = yield self.database(self)
        sections = {name: dict(values) for name, values in sections.items()}
        sections.setdefault("store", {})["dsn"] = dsn
        node = yield super().node(clock, **sections)
        return node


class PostgreSQLMessagingTests(ServerStoreNodeMixin, MessagingTestsMixin, NodeTestCase):
    """
    Every 1:1 messaging test, on PostgreSQL.
    """

    backend = "postgresql"
    database = staticmethod(postgresqlDatabase)


class MariaDBMessagingTests(ServerStoreNodeMixin, MessagingTestsMixin, NodeTestCase):
    """
    Every 1:1 messaging test, on MariaDB.
    """

    backend = "mariadb"
    database = staticmethod(mariadbDatabase)


class UnreachableTests(TestCase):
    """
    C{twist tim} on a database it cannot reach exits non-zero with one line
    saying which database and why.
    """

    timeout = 60

    @inlineCallbacks
    def assertExits(self, backend, dsn, *words):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        ini = directory.child("node.ini")
        ini.setContent(
            f"[client]\nlisten = tcp:0:interface=127.0.0.1\ntcp_listen =\n[admin]\nlisten =\n"
            f"[store]\nbackend = {backend}\ndsn = {dsn}\nconnect_timeout = 2\n".encode()
        )
        # The timtx under test, whether installed or a checkout.
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(timtx.__file__))))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "twisted", "--log-format=text", "tim", "--config", ini.path],
            env=env,
            path=directory.path,
        )
        self.assertEqual(code, 1, (out + err).decode())
        lines = [line for line in (out + err).decode().splitlines() if "timtx: cannot start:" in line]
        self.assertEqual(len(lines), 1, (out + err).decode())
        for word in words:
            self.assertIn(word, lines[0])
        self.assertNotIn("Traceback", (out + err).decode())

    def test_postgresqlDown(self):
        port = freePort()
        return self.assertExits(
            "postgresql", f"postgresql://postgres@127.0.0.1:{port}/test", f"PostgreSQL at 127.0.0.1:{port}/test"
        )

    def test_mariadbDown(self):
        port = freePort()
        return self.assertExits("mariadb", f"mariadb://root@127.0.0.1:{port}/test", f"MariaDB at 127.0.0.1:{port}/test")


class BenchTests(SynchronousTestCase):
    """
    C{python -m bench direct --quick --store postgresql|mariadb}: the
    benchmark runs on the server stores (in a database of its own, dropped
    afterwards) and loses nothing.  Timings are not asserted.
    """

    def test_serverStores(self):
        from timtx.test.test_bench import checkout, runBench

        root = checkout()
        for store in ("postgresql", "mariadb"):
            process, outcome = runBench(self, root, "direct", "--quick", "--store", store)
            self.assertIsNotNone(outcome, process.stderr[-3000:])
            [entry] = outcome
            if entry["status"] == "failed" and "connect" in (entry["reason"] or ""):
                requireOrSkip(f"{store}: {entry['reason']}")
            self.assertEqual(entry["status"], "ok", f"{store}: {entry['reason']}\n{process.stderr[-3000:]}")
            self.assertEqual(entry["lost"], 0)
