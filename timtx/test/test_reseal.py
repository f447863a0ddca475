# -*- test-case-name: timtx.test.test_reseal -*-
"""
Keys at rest: key ids and a keyring in L{timtx.crypto.vault}, moving data
to a new key (L{timtx.chat.reseal}) on every backend, retiring the old key,
and raw dumps of every backend that hold no message body, profile field or
login name in clear.
"""

import os
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.chat.reseal import Resealer
from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import KeyringError, SealError, StanzaVault, headerOf, keyOf, loadKeyring, newKeyFile
from timtx.persistence.memory import MemoryStore
from timtx.persistence.records import Group, Member, NewMessage
from timtx.persistence.sqlite import SQLiteStore
from timtx.protocols.structs import TimMessage, TimRoomBean, TimUserBean
from timtx.test.databases import mariadbDatabase, postgresqlDatabase
from timtx.test.test_sharded import memorySharded

SECRET = NodeKeys(b"k" * 32)


def keyFile(testCase):
    path = os.path.join(testCase.mktemp())
    newKeyFile(path)
    return path


class KeyringTests(SynchronousTestCase):
    def test_oldBlobsOpen(self):
        """
        Blobs written before key ids existed (key 1, from the node secret)
        open with a keyring whose write key is another; new blobs name
        their key.
        """
        old = StanzaVault(SECRET)
        message = TimMessage(msType=2, odType=1, dataString="before", mid=1, seq=1)
        blob = old.sealMessage("p:a:b", 1, message)
        self.assertEqual((blob[:1], keyOf(blob)), (b"\x01", 1))
        ring = loadKeyring(SECRET, {2: keyFile(self)})
        new = StanzaVault(SECRET, ring)
        self.assertEqual((new.writeKey, new.keyIds), (2, [1, 2]))
        self.assertEqual(new.openMessage("p:a:b", 1, blob), message)
        fresh = new.sealMessage("p:a:b", 1, message)
        self.assertEqual((fresh[:3], keyOf(fresh)), (b"\x02\x00\x02", 2))
        self.assertEqual(headerOf(2), b"\x02\x00\x02")
        self.assertRaises(SealError, old.openMessage, "p:a:b", 1, fresh)
        moved = new.reseal(b"message\0p:a:b\x001", blob)
        self.assertEqual(keyOf(moved), 2)
        self.assertIsNone(new.reseal(b"message\0p:a:b\x001", moved))
        self.assertRaises(SealError, new.reseal, b"message\0elsewhere", blob)

    def test_retired(self):
        """
        A retired key opens nothing; it may not be the write key.
        """
        path = keyFile(self)
        blob = StanzaVault(SECRET).sealFor("u", TimMessage(msType=2, odType=1))
        vault = StanzaVault(SECRET, loadKeyring(SECRET, {2: path}, retired=(1,)))
        self.assertEqual(vault.keyIds, [2])
        self.assertRaises(SealError, vault.openFor, "u", blob)
        error = self.assertRaises(KeyringError, loadKeyring, SECRET, {2: path}, 1, (1,))
        self.assertIn("retired", str(error))

    def test_badKeys(self):
        """
        A key file that is missing, short or not hex, an id out of range, a
        write key nobody configured: one clear error each.
        """
        short = self.mktemp()
        with open(short, "w") as f:
            f.write("abcd\n")
        for files, write, words in [
            ({2: "/nonexistent/key"}, 0, "cannot read key 2"),
            ({2: short}, 0, "shorter than 32 bytes"),
            ({1: short}, 0, "key ids run from 2"),
            ({}, 7, "no such key"),
        ]:
            error = self.assertRaises(KeyringError, loadKeyring, SECRET, files, write)
            self.assertIn(words, str(error))


class ResealTestsMixin:
    """
    Moving every blob to a new key, on one backend: C{makeStore()} gives
    an opened store.
    """

    @inlineCallbacks
    def fill(self, store, vault):
        message = TimMessage(msType=2, odType=1, dataString="history", mid=1, seq=1)
        for i in range(1, 8):
            conv = f"p:a:{i}"
            yield store.appendMessages(
                [
                    NewMessage(
                        conv,
                        1,
                        i,
                        "a",
                        vault.sealMessage(conv, 1, message),
                        0.0,
                        inbox=((f"u{i}", None), (f"u{i}", vault.sealFor(f"u{i}", message))),
                    )
                ]
            )
            yield store.putProfile(f"u{i}", vault.sealProfile(f"u{i}", TimUserBean(nickName=f"n{i}")))
        yield store.createGroup(
            Group("g1", "", "a", 1, 1, 0.0, vault.sealRoom("g1", TimRoomBean(topic="t"))), Member("a", 2, 0.0)
        )

    @inlineCallbacks
    def test_reseal(self):
        """
        A pass moves every blob to the write key (counted per key before
        and after), everything still opens to the same content, and a
        blob changed since it was read is left as it was changed.
        """
        store = yield self.makeStore()
        old = StanzaVault(SECRET)
        yield self.fill(store, old)
        new = StanzaVault(SECRET, loadKeyring(SECRET, {2: keyFile(self)}))
        resealer = Resealer(store=store, vault=new, clock=reactor, rate=0, batch=3)
        self.assertEqual((yield resealer.count()), {1: 7 + 7 + 7 + 1})
        # A change under way: replaced by someone else between the read
        # and the write.
        raced = []
        original = store.replaceSealed

        def racing(kind, rows):
            if kind == "profile" and not raced:
                raced.append(rows[0][0])
                store.putProfile(rows[0][0][0], new.sealProfile(rows[0][0][0], TimUserBean(nickName="changed")))
            return original(kind, rows)

        store.replaceSealed = racing
        done = yield resealer.run()
        self.assertEqual(done, 21)
        self.assertEqual((yield resealer.count()), {2: 22})
        self.assertEqual(resealer.status()["state"], "done")
        self.assertEqual(resealer.status()["total"], 22)
        (entry, copy) = yield store.readInbox("u3", 0, 10)
        self.assertEqual(new.openMessage(entry.conv, entry.seq, entry.stanza).dataString, "history")
        self.assertEqual(new.openFor("u3", copy.stanza).dataString, "history")
        self.assertEqual(new.openRoom("g1", (yield store.getGroup("g1")).profile).topic, "t")
        nick = new.openProfile(raced[0][0], (yield store.getProfile(raced[0][0]))).nickName
        self.assertEqual(nick, "changed")
        self.assertEqual((yield Resealer(store=store, vault=new, clock=reactor, rate=0).run()), 0)


class MemoryResealTests(ResealTestsMixin, TestCase):
    def makeStore(self):
        store = MemoryStore()
        return store.open().addCallback(lambda _: store)


class SQLiteResealTests(ResealTestsMixin, TestCase):
    def makeStore(self):
        path = os.path.join(self.mktemp(), "tim.db")
        os.makedirs(os.path.dirname(path))
        store = SQLiteStore(reactor, path)
        self.addCleanup(store.close)
        return store.open().addCallback(lambda _: store)


class PostgreSQLResealTests(ResealTestsMixin, TestCase):
    @inlineCallbacks
    def makeStore(self):
        from timtx.persistence.postgresql import PostgreSQLStore

        store = PostgreSQLStore(reactor, (yield postgresqlDatabase(self)), poolSize=2)
        yield store.open()
        self.addCleanup(store.close)
        return store


class MariaDBResealTests(ResealTestsMixin, TestCase):
    @inlineCallbacks
    def makeStore(self):
        from timtx.persistence.mariadb import MariaDBStore

        store = MariaDBStore(reactor, (yield mariadbDatabase(self)), driver="pymysql", poolSize=2)
        yield store.open()
        self.addCleanup(store.close)
        return store


class ShardedResealTests(ResealTestsMixin, TestCase):
    @inlineCallbacks
    def makeStore(self):
        store, _ = memorySharded()
        yield store.open()
        self.addCleanup(store.close)
        return store


class BackgroundTests(TestCase):
    @inlineCallbacks
    def test_paced(self):
        """
        In the background the pass keeps to its rate, waits while the store
        is unavailable, and stops when told.
        """
        clock = Clock()
        store = MemoryStore()
        old = StanzaVault(SECRET)
        for i in range(10):
            yield store.putProfile(f"u{i}", old.sealProfile(f"u{i}", TimUserBean(nickName="n")))
        new = StanzaVault(SECRET, loadKeyring(SECRET, {2: keyFile(self)}))
        resealer = Resealer(store=store, vault=new, clock=clock, rate=2, batch=2)
        d = resealer.start()
        self.assertEqual(resealer.resealed, 2)
        clock.advance(1.0)
        self.assertEqual(resealer.resealed, 4)
        resealer.stop()
        clock.advance(10)
        self.assertEqual(resealer.status()["state"], "stopped")
        self.assertEqual((yield d), 4)


PLANTED = {
    "login name": b"plantedlogin7q",
    "message body": b"planted-body-9z",
    "nickname": b"plantnick",
    "group topic": b"planted-topic-3x",
}


class DumpTests(TestCase):
    """
    A raw dump of each backend, after a node stored a message, a profile
    and a group under planted strings, holds none of them: not in the
    dump's text, not in any hex or escape of it.
    """

    timeout = 120

    @inlineCallbacks
    def plant(self, backend, store):
        from timtx.protocols.constants import Business, GroupType, NodeInfo
        from timtx.test.base import NodeTestCase
        from timtx.testing import loggedInClient, startNode, testConfig

        config = testConfig(self.mktemp(), backend=backend, store=store)
        node = yield startNode(self, reactor, config)
        alice = yield loggedInClient(reactor, node, PLANTED["login name"].decode(), testCase=self)
        bob = yield loggedInClient(reactor, node, testCase=self)
        yield NodeTestCase.befriend(self, node, alice, bob)
        yield alice.postMessage(bob.uid, PLANTED["message body"].decode())
        yield bob.disconnect()
        yield alice.postMessage(bob.uid, PLANTED["message body"].decode() + " offline")
        from timtx.protocols.structs import TimUserBean

        yield alice.nodes(NodeInfo.MODIFYUSER, usermap={"": TimUserBean(nickName=PLANTED["nickname"].decode())})
        yield alice.business(Business.NEWROOM, node=PLANTED["group topic"].decode(), reqInt=GroupType.OPEN)
        yield node.stopService()
        self.uid = alice.uid
        return node

    def assertClean(self, dump):
        # The dump holds the data: ids are stored as they are.
        self.assertIn(self.uid.encode(), dump)
        lowered = dump.lower()
        for what, planted in PLANTED.items():
            for form in (planted, planted.hex().encode(), planted.upper()):
                self.assertNotIn(form.lower(), lowered, f"the {what} is in the dump")

    @inlineCallbacks
    def test_sqlite(self):
        node = yield self.plant("sqlite", {})
        dump = b""
        for suffix in ("", "-wal", "-shm"):
            path = node.config.store_path + suffix
            if os.path.exists(path):
                with open(path, "rb") as f:
                    dump += f.read()
        self.assertClean(dump)

    @inlineCallbacks
    def test_postgresql(self):
        dsn = yield postgresqlDatabase(self)
        yield self.plant("postgresql", {"dsn": dsn})
        out = yield deferToThread(_dump, ["pg_dump", "--no-owner", dsn])
        self.assertIn(b"COPY public.messages", out)
        self.assertClean(out)

    @inlineCallbacks
    def test_postgresqlSharded(self):
        dsns = []
        for _ in range(2):
            dsns.append((yield postgresqlDatabase(self)))
        yield self.plant("postgresql", {"shards": tuple(dsns)})
        dump = b""
        for dsn in dsns:
            dump += yield deferToThread(_dump, ["pg_dump", "--no-owner", dsn])
        self.assertIn(b"shard_intents", dump)
        self.assertClean(dump)

    @inlineCallbacks
    def test_mariadb(self):
        from timtx.persistence.mariadb import parseDSN

        url = yield mariadbDatabase(self)
        yield self.plant("mariadb", {"dsn": url})
        params = parseDSN(url)
        out = yield deferToThread(
            _dump,
            [
                "mariadb-dump",
                "-h",
                params["host"],
                "-P",
                str(params["port"]),
                "-u",
                params["user"],
                "--single-transaction",
                params["database"],
            ],
        )
        self.assertIn(b"INSERT INTO `messages`", out)
        self.assertClean(out)


def _dump(argv):
    return subprocess.run(argv, check=True, capture_output=True, timeout=60).stdout


class RotationTests(TestCase):
    """
    Key rotation as an operator does it: a new key in the config, the node
    seals new data with it and moves the old data in the background, the
    commands say where things are, and the old key is retired once unused.
    """

    timeout = 120

    def command(self, *args):
        from timtx.test.test_pgmove import runTimtx

        return runTimtx("keys", *args)

    def ini(self, directory, extra=""):
        path = os.path.join(directory, "node.ini")
        with open(path, "w") as f:
            f.write(f"[node]\ndata_dir = {directory}\n[store]\nbackend = sqlite\n{extra}")
        return path

    @inlineCallbacks
    def test_rotate(self):
        from timtx.config import load
        from timtx.testing import loggedInClient, startNode

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        sections = (
            "[client]\nlisten = tcp:0:interface=127.0.0.1\ntcp_listen =\n[accounts]\nscrypt_n = 16\nscrypt_r = 1\n"
        )
        config = load(_append(self.ini(directory), sections))
        node = yield startNode(self, reactor, config)
        alice = yield loggedInClient(reactor, node, "alice", testCase=self)
        bob = yield loggedInClient(reactor, node, "bob", testCase=self)
        yield node.relations.setStance(alice.uid, bob.uid, 1)
        yield node.relations.setStance(bob.uid, alice.uid, 1)
        for i in range(5):
            yield alice.postMessage(bob.uid, f"old {i}")
        yield alice.disconnect()
        yield bob.disconnect()
        yield node.stopService()
        out, err, code = yield self.command("new", os.path.join(directory, "data-2.key"))
        self.assertEqual(code, 0, err)
        ini = _append(self.ini(directory, "data_keys = 2:data-2.key\nreseal_rate = 0\n"), sections)
        out, err, code = yield self.command("status", "--config", ini)
        self.assertEqual(code, 0, err)
        self.assertIn("sealed with key 2", out)
        self.assertIn("key 1: ", out)
        out, err, code = yield self.command("retire", "1", "--config", ini)
        self.assertEqual(code, 1)
        self.assertIn("still sealed with key 1", err)
        # The node on the new key: old data reads, new data uses key 2,
        # and the background pass (at its own rate) moves the rest.
        config = load(_append(self.ini(directory, "data_keys = 2:data-2.key\nreseal_rate = 1000\n"), sections))
        node = yield startNode(self, reactor, config)
        yield node.resealer.start()
        self.assertEqual(node.resealer.status()["state"], "done")
        self.assertEqual(node.resealer.status()["resealed"], 5)
        self.assertEqual((yield node.resealer.count()).keys(), {2})
        alice = yield loggedInClient(reactor, node, "alice", testCase=self, registerFirst=False)
        history = yield alice.history(bob.uid)
        self.assertEqual(sorted(m.dataString for m in history), [f"old {i}" for i in range(5)])
        yield alice.disconnect()
        yield node.stopService()
        out, err, code = yield self.command("retire", "1", "--config", ini)
        self.assertEqual(code, 0, err)
        self.assertIn("retired_keys", out)
        config = load(_append(self.ini(directory, "data_keys = 2:data-2.key\nretired_keys = 1\n"), sections))
        node = yield startNode(self, reactor, config)
        self.assertEqual(node.vault.keyIds, [2])
        bob = yield loggedInClient(reactor, node, "bob", testCase=self, registerFirst=False)
        history = yield bob.history(alice.uid)
        self.assertEqual(len(history), 5)


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)
    return path


class BadKeyNodeTests(SynchronousTestCase):
    def test_missingKeyFile(self):
        """
        A node whose key file is missing does not start, and says which.
        """
        from timtx.node import Node, NodeStartError
        from timtx.testing import testConfig

        config = testConfig(self.mktemp(), store={"data_keys": ((2, "/nonexistent/data-2.key"),)})
        node = Node(config, reactor, store=MemoryStore(), keys=SECRET)
        error = self.assertRaises(NodeStartError, node.startService)
        self.assertIn("cannot read key 2 from /nonexistent/data-2.key", str(error))
        self.assertFalse(node.running)
