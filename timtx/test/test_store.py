"""
Tests for the storage plugins: one conformance suite, run against each.
"""

import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from timtx.chat.conversations import AlreadyStored, Conversations
from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import StanzaVault
from timtx.persistence import (
    BUILTIN_STORES,
    DuplicateConflict,
    IMessageStore,
    SequenceConflict,
    StoreUnavailable,
    storeFactory,
)
from timtx.persistence.errors import SchemaTooNew
from timtx.persistence.memory import MemoryStore
from timtx.persistence.records import (
    BLOCK_BY_GROUP,
    BLOCK_BY_USER,
    GROUP_CANCELLED,
    MESSAGE_RECALLED,
    ROLE_FOUNDER,
    ROLE_MANAGER,
    ROLE_MEMBER,
    STANCE_BLOCK,
    STANCE_FRIEND,
    Account,
    Duplicate,
    Group,
    Member,
    NewMessage,
    Relation,
    TokenGrant,
)
from timtx.persistence.sqlite import MIGRATIONS, SQLiteStore, transactionSteps
from timtx.persistence.worker import SerialWorker, WorkerStopped
from timtx.protocols.structs import TimMessage
from timtx.test.databases import mariadbDatabase, postgresqlDatabase


def newerDatabase(directory):
    """
    A database file in the new C{directory} as a newer timtx would leave
    it: a schema version past this one's.
    """
    os.makedirs(directory)
    path = os.path.join(directory, "tim.db")
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    connection.close()
    return path


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

    @inlineCallbacks
    def test_appendAndHistory(self):
        """
        Appended messages are read back newest first, paged by mid; inbox
        entries refer to them; the last seq and mid are known.
        """
        store = yield self.store()
        self.assertEqual((yield store.lastMessage("c")), (0, 0))
        batch = [
            NewMessage("c", i, 100 + i, "alice", b"body%d" % i, float(i), inbox=(("bob", None),)) for i in range(1, 6)
        ]
        qids = yield store.appendMessages(batch)
        self.assertEqual([len(q) for q in qids], [1] * 5)
        self.assertEqual((yield store.lastMessage("c")), (5, 105))
        page = yield store.history("c", None, 2)
        self.assertEqual([(m.seq, m.mid, m.stanza) for m in page], [(5, 105, b"body5"), (4, 104, b"body4")])
        page = yield store.history("c", 104, 10)
        self.assertEqual([m.seq for m in page], [3, 2, 1])
        self.assertEqual((yield store.getMessage("c", 103)).stanza, b"body3")
        self.assertIsNone((yield store.getMessage("c", 999)))
        inbox = yield store.readInbox("bob", 0, 10)
        self.assertEqual([(e.conv, e.seq, e.stanza) for e in inbox], [("c", i, b"body%d" % i) for i in range(1, 6)])
        self.assertEqual([e.qid for e in inbox], [q[0] for q in qids])

    @inlineCallbacks
    def test_appendIsAtomic(self):
        """
        A batch with a clashing seq writes nothing at all.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"x", 0.0)])
        bad = [
            NewMessage("c", 2, 2, "a", b"y", 0.0, inbox=(("bob", None),), dedupe=("a", 7)),
            NewMessage("c", 1, 3, "a", b"z", 0.0),
        ]
        yield self.assertFailure(store.appendMessages(bad), SequenceConflict)
        self.assertEqual((yield store.lastMessage("c")), (1, 1))
        self.assertEqual((yield store.countInbox("bob")), 0)
        self.assertEqual((yield store.recentDuplicates("a", 0.0)), {})

    @inlineCallbacks
    def test_sequenceConflict(self):
        """
        A taken C{(conv, seq)} fails the append with L{SequenceConflict}
        naming it, and nothing of that call is written: not its other
        messages, inbox entries or duplicate keys.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"x", 0.0)])
        bad = [
            NewMessage("c", 2, 2, "a", b"y", 0.0, inbox=(("bob", None),), dedupe=("a", 7)),
            NewMessage("c", 1, 3, "a", b"z", 0.0, inbox=(("bob", b"copy"),)),
        ]
        error = yield self.assertFailure(store.appendMessages(bad), SequenceConflict)
        self.assertEqual((error.conv, error.seq), ("c", 1))
        self.assertEqual((yield store.lastMessage("c")), (1, 1))
        self.assertEqual((yield store.countInbox("bob")), 0)
        self.assertEqual((yield store.recentDuplicates("a", 0.0)), {})
        self.assertEqual([m.stanza for m in (yield store.history("c", None, 10))], [b"x"])

    @inlineCallbacks
    def test_sequenceConflictWithinCall(self):
        """
        Two messages of one call with the same seq conflict too.
        """
        store = yield self.store()
        twice = [NewMessage("c", 1, 1, "a", b"x", 0.0), NewMessage("c", 1, 2, "a", b"y", 0.0)]
        error = yield self.assertFailure(store.appendMessages(twice), SequenceConflict)
        self.assertEqual((error.conv, error.seq), ("c", 1))
        self.assertEqual((yield store.lastMessage("c")), (0, 0))

    @inlineCallbacks
    def test_sequenceConflictAlone(self):
        """
        Calls made together (committed together by stores with group
        commit) are not taken down by one that conflicts: each gets its own
        result, in call order.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"x", 0.0)])
        order = []

        def record(result, name):
            order.append(name)
            return result

        calls = [
            store.appendMessages([NewMessage("c", 2, 2, "a", b"ok1", 0.0, inbox=(("bob", None),))]),
            store.appendMessages([NewMessage("c", 1, 3, "a", b"bad", 0.0, inbox=(("bob", None),))]),
            store.createAccount(Account("u1", "", "h", 0.0)),
            store.appendMessages([NewMessage("d", 1, 4, "a", b"ok2", 0.0, inbox=(("bob", None),))]),
        ]
        for name, d in zip(["ok1", "bad", "account", "ok2"], calls, strict=True):
            d.addBoth(record, name)
        ok1, bad, account, ok2 = yield gatherResults(
            [d.addErrback(lambda f: f.trap(SequenceConflict) and f.value) for d in calls]
        )
        self.assertEqual(order, ["ok1", "bad", "account", "ok2"])
        self.assertIsInstance(bad, SequenceConflict)
        self.assertIs(account, True)
        self.assertEqual([len(ok1[0]), len(ok2[0])], [1, 1])
        inbox = yield store.readInbox("bob", 0, 10)
        self.assertEqual([e.stanza for e in inbox], [b"ok1", b"ok2"])
        self.assertEqual((yield store.lastMessage("c")), (2, 2))

    def test_callsTogether(self):
        """
        Appends and inbox deletions made together (committed together, and
        merged into few statements, by the server stores) each get their
        own result: qids in call order, counts of their own entries.
        """
        return self.callsTogether(conflict=False)

    def test_callsTogetherWithConflict(self):
        """
        The same with an append whose seq another call of the batch takes:
        only that call fails.
        """
        return self.callsTogether(conflict=True)

    @inlineCallbacks
    def callsTogether(self, conflict):
        store = yield self.store()
        ((bobOld, carolOld),) = yield store.appendMessages(
            [NewMessage("c0", 1, 1, "a", b"old", 0.0, inbox=(("bob", None), ("carol", None)))]
        )
        calls = [
            store.createAccount(Account("u", "", "h", 0.0)),
            store.appendMessages(
                [
                    NewMessage("c1", 1, 10, "a", b"a1", 0.0, inbox=(("bob", None),)),
                    NewMessage("c1", 2, 11, "a", b"a2", 0.0, inbox=(("bob", None), ("carol", b"copy"))),
                ]
            ),
            store.deleteInbox("bob", [bobOld, bobOld, 999999]),
            store.appendMessages([NewMessage("c2", 1, 20, "a", b"b1", 0.0, inbox=(("carol", None),), dedupe=("a", 5))]),
            store.deleteInbox("carol", [bobOld]),
            store.deleteInbox("carol", [carolOld]),
            store.appendMessages(
                [NewMessage("c2", 1 if conflict else 2, 21, "a", b"taken", 0.0, inbox=(("x", None),))]
            ),
            store.appendMessages([NewMessage("c3", 1, 30, "a", b"c1", 0.0, inbox=(("bob", None),))]),
        ]
        results = yield gatherResults([d.addErrback(lambda f: f.trap(SequenceConflict) and f.value) for d in calls])
        account, a, bobGone, b, notCarols, carolGone, taken, c = results
        self.assertIs(account, True)
        self.assertEqual((bobGone, notCarols, carolGone), (1, 0, 1))
        if conflict:
            self.assertIsInstance(taken, SequenceConflict)
            self.assertEqual((taken.conv, taken.seq), ("c2", 1))
        else:
            self.assertEqual(len(taken[0]), 1)
        self.assertEqual([len(q) for q in a], [1, 2])
        qids = [*a[0], *a[1], *b[0], *c[0]]
        self.assertEqual(qids, sorted(set(qids)), "qids grow in call order")
        bob = yield store.readInbox("bob", 0, 10)
        self.assertEqual([(e.qid, e.stanza) for e in bob], [(a[0][0], b"a1"), (a[1][0], b"a2"), (c[0][0], b"c1")])
        carol = yield store.readInbox("carol", 0, 10)
        self.assertEqual([(e.qid, e.stanza) for e in carol], [(a[1][1], b"copy"), (b[0][0], b"b1")])
        stored = [m.stanza for m in (yield store.messagesAfter("c2", 0, 10))]
        self.assertEqual(stored, [b"b1"] if conflict else [b"b1", b"taken"])
        self.assertEqual((yield store.countInbox("x")), 0 if conflict else 1)
        self.assertEqual(list((yield store.recentDuplicates("a", 0.0))), [5])

    @inlineCallbacks
    def test_awkwardValues(self):
        """
        Ids with quotes, backslashes, braces, commas, the word NULL and
        non-ASCII letters, and stanzas of every byte, come back as written
        (the server stores build array literals of their own).
        """
        store = yield self.store()
        weird = "a\"b\\c'd{e},f NULL \u00e9\u4e2d"
        body = bytes(range(256))
        ((own, copy),) = yield store.appendMessages(
            [NewMessage(weird, 1, 7, weird, body, 1e-5, inbox=((weird, None), ("x", body)), dedupe=(weird, 9))]
        )
        self.assertEqual([(e.conv, e.stanza) for e in (yield store.readInbox(weird, 0, 10))], [(weird, body)])
        self.assertEqual([e.stanza for e in (yield store.readInbox("x", 0, 10))], [body])
        (row,) = yield store.messagesAfter(weird, 0, 10)
        self.assertEqual((row.sender, row.stanza, row.created), (weird, body, 1e-5))
        self.assertEqual(list((yield store.recentDuplicates(weird, 0.0))), [9])
        self.assertEqual((yield store.deleteInbox(weird, [own, copy])), 1)

    @inlineCallbacks
    def test_transientAndInbox(self):
        """
        A message without seq writes no history row but its inbox copy;
        entries are read after a qid, counted and deleted.
        """
        store = yield self.store()
        (qids,) = yield store.appendMessages([NewMessage("c", None, 9, "a", None, 1.0, inbox=(("bob", b"copy"),))])
        self.assertEqual((yield store.history("c", None, 10)), [])
        more = yield store.addInbox([("bob", b"n1"), ("carol", b"n2")], 2.0)
        entries = yield store.readInbox("bob", 0, 10)
        self.assertEqual([e.stanza for e in entries], [b"copy", b"n1"])
        self.assertEqual((yield store.readInbox("bob", qids[0], 10))[0].qid, more[0])
        self.assertEqual((yield store.countInbox("bob")), 2)
        self.assertEqual((yield store.deleteInbox("bob", [qids[0], more[1]])), 1)
        self.assertEqual((yield store.countInbox("bob")), 1)
        self.assertEqual((yield store.countInbox("carol")), 1)

    @inlineCallbacks
    def test_replaceMessage(self):
        """
        A tombstone replaces the row everywhere it is read, inbox included,
        and its notices are queued.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 50, "a", b"secret", 0.0, inbox=(("bob", None),))])
        notices = yield store.replaceMessage("c", 1, b"tomb", MESSAGE_RECALLED, [("bob", b"recalled")], 1.0)
        self.assertEqual(len(notices), 1)
        row = yield store.getMessage("c", 50)
        self.assertEqual((row.stanza, row.state, row.seq), (b"tomb", MESSAGE_RECALLED, 1))
        self.assertEqual([e.stanza for e in (yield store.readInbox("bob", 0, 10))], [b"tomb", b"recalled"])
        self.assertEqual([m.stanza for m in (yield store.history("c", None, 10))], [b"tomb"])

    @inlineCallbacks
    def test_duplicates(self):
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 5, "a", b"x", 10.0, dedupe=("a", 77))])
        yield store.appendMessages([NewMessage("d", None, 6, "a", None, 20.0, dedupe=("a", 78))])
        found = yield store.recentDuplicates("a", 0.0)
        self.assertEqual(found, {77: Duplicate("c", 1, 5, 10.0), 78: Duplicate("d", None, 6, 20.0)})
        self.assertEqual(list((yield store.recentDuplicates("a", 15.0))), [78])
        self.assertEqual((yield store.purgeDuplicates(15.0)), 1)
        self.assertEqual(list((yield store.recentDuplicates("a", 0.0))), [78])

    #: Whether a key stored with one conversation fences appends to any
    #: other (a sharded store fences it with its conversation only).
    fencesAcrossConversations = True

    @inlineCallbacks
    def test_duplicateKeyFences(self):
        """
        A second append of a stored duplicate key fails with
        L{DuplicateConflict} naming the message that holds it, and writes
        nothing of its call; once the key is purged it no longer fences.
        """
        store = yield self.store()
        yield store.appendMessages(
            [NewMessage("c", 1, 5, "a", b"first", 10.0, inbox=(("bob", None),), dedupe=("a", 77))]
        )
        again = [
            NewMessage("c", 2, 6, "a", b"other", 11.0, inbox=(("bob", None),), dedupe=("a", 78)),
            NewMessage("c", 3, 7, "a", b"resent", 11.0, inbox=(("bob", None),), dedupe=("a", 77)),
        ]
        error = yield self.assertFailure(store.appendMessages(again), DuplicateConflict)
        self.assertEqual(error.held, {1: Duplicate("c", 1, 5, 10.0)})
        self.assertEqual((yield store.lastMessage("c")), (1, 5))
        self.assertEqual([e.stanza for e in (yield store.readInbox("bob", 0, 10))], [b"first"])
        self.assertEqual((yield store.recentDuplicates("a", 0.0)), {77: Duplicate("c", 1, 5, 10.0)})
        # A message kept only in inboxes is fenced too.
        error = yield self.assertFailure(
            store.appendMessages(
                [NewMessage("c", None, 8, "a", None, 12.0, inbox=(("x", b"copy"),), dedupe=("a", 77))]
            ),
            DuplicateConflict,
        )
        self.assertEqual(error.held, {0: Duplicate("c", 1, 5, 10.0)})
        self.assertEqual((yield store.countInbox("x")), 0)
        if self.fencesAcrossConversations:
            error = yield self.assertFailure(
                store.appendMessages([NewMessage("d", 1, 8, "a", b"elsewhere", 12.0, dedupe=("a", 77))]),
                DuplicateConflict,
            )
            self.assertEqual(error.held, {0: Duplicate("c", 1, 5, 10.0)})
            self.assertEqual((yield store.lastMessage("d")), (0, 0))
        self.assertEqual((yield store.purgeDuplicates(10.5)), 1)
        yield store.appendMessages([NewMessage("c", 2, 9, "a", b"later", 20.0, dedupe=("a", 77))])
        self.assertEqual((yield store.recentDuplicates("a", 0.0)), {77: Duplicate("c", 2, 9, 20.0)})

    @inlineCallbacks
    def test_duplicateKeyAlone(self):
        """
        Calls made together (committed together by stores with group
        commit) are not taken down by one that resends a stored key, nor by
        one that repeats a key another call of the batch writes: each of
        those fails alone, naming the holder, and the others are stored.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"x", 1.0, dedupe=("a", 1))])
        calls = [
            store.appendMessages([NewMessage("c", 2, 2, "a", b"ok1", 2.0, inbox=(("bob", None),), dedupe=("a", 2))]),
            store.appendMessages([NewMessage("c", 3, 3, "a", b"stored", 3.0, inbox=(("bob", None),), dedupe=("a", 1))]),
            store.createAccount(Account("u1", "", "h", 0.0)),
            store.appendMessages([NewMessage("c", 3, 4, "a", b"batch", 4.0, inbox=(("bob", None),), dedupe=("a", 2))]),
            store.appendMessages([NewMessage("f", 1, 5, "a", b"ok2", 5.0, inbox=(("bob", None),), dedupe=("a", 3))]),
        ]
        ok1, stored, account, batch, ok2 = yield gatherResults(
            [d.addErrback(lambda f: f.trap(DuplicateConflict) and f.value) for d in calls]
        )
        self.assertEqual(stored.held, {0: Duplicate("c", 1, 1, 1.0)})
        self.assertEqual(batch.held, {0: Duplicate("c", 2, 2, 2.0)})
        self.assertIs(account, True)
        self.assertEqual([len(ok1[0]), len(ok2[0])], [1, 1])
        self.assertEqual([e.stanza for e in (yield store.readInbox("bob", 0, 10))], [b"ok1", b"ok2"])
        self.assertEqual((yield store.lastMessage("c")), (2, 2))
        self.assertEqual(sorted((yield store.recentDuplicates("a", 0.0))), [1, 2, 3])

    @inlineCallbacks
    def test_conversationBatchWithResend(self):
        """
        Through a conversation owner: a batch holding a resend of a stored
        message stores the others, numbered without a gap, and answers the
        resend with the stored copy.
        """
        store = yield self.store()
        conversations = Conversations(store=store, vault=StanzaVault(NodeKeys(b"s" * 32)), clock=reactor)

        def append(text, clientId):
            message = TimMessage(msType=2, odType=1, id=clientId, dataString=text)
            return conversations.append("c", "a", message, ("bob",), dedupe=("a", clientId))

        first = yield append("first", 1)
        # Three queued while one is written: one batch, on stores that
        # answer later.
        calls = [append("new1", 2), append("new2", 3), append("resent", 1), append("new3", 4)]
        results = yield gatherResults([d.addErrback(lambda f: f.trap(AlreadyStored) and f.value) for d in calls])
        self.assertEqual([r.message.seq for r in results if not isinstance(r, AlreadyStored)], [2, 3, 4])
        refused = results[2]
        self.assertEqual((refused.duplicate.conv, refused.duplicate.seq), ("c", 1))
        self.assertEqual(refused.duplicate.mid, first.message.mid)
        stored = yield store.messagesAfter("c", 0, 10)
        self.assertEqual([m.seq for m in stored], [1, 2, 3, 4])
        self.assertEqual((yield store.countInbox("bob")), 4)

    @inlineCallbacks
    def test_duplicateKeyBeforeSequence(self):
        """
        A call that both resends a stored key and takes a stored seq is
        refused as a resend: numbering it again would not help.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"x", 1.0, dedupe=("a", 1))])
        error = yield self.assertFailure(
            store.appendMessages([NewMessage("c", 1, 2, "a", b"y", 2.0, dedupe=("a", 1))]), DuplicateConflict
        )
        self.assertEqual(error.held, {0: Duplicate("c", 1, 1, 1.0)})

    @inlineCallbacks
    def test_relations(self):
        store = yield self.store()
        yield store.setStance("a", "b", STANCE_FRIEND)
        yield store.setStance("b", "a", STANCE_FRIEND)
        yield store.setStance("a", "c", STANCE_BLOCK)
        yield store.setStance("d", "a", STANCE_FRIEND)
        relations = sorted((yield store.relationsOf("a")), key=lambda r: r.other)
        self.assertEqual(
            relations,
            [
                Relation("b", STANCE_FRIEND, STANCE_FRIEND),
                Relation("c", STANCE_BLOCK, 0),
                Relation("d", 0, STANCE_FRIEND),
            ],
        )
        yield store.setStance("a", "c", 0)
        self.assertNotIn("c", [r.other for r in (yield store.relationsOf("a"))])

    @inlineCallbacks
    def test_profilesAndFlags(self):
        store = yield self.store()
        self.assertIsNone((yield store.getProfile("a")))
        yield store.putProfile("a", b"p1")
        yield store.putProfile("a", b"p2")
        self.assertEqual((yield store.getProfile("a")), b"p2")
        self.assertFalse((yield store.getInvisible("a")))
        yield store.setInvisible("a", True)
        self.assertTrue((yield store.getInvisible("a")))
        yield store.setInvisible("a", False)
        self.assertFalse((yield store.getInvisible("a")))

    @inlineCallbacks
    def test_groups(self):
        """
        A group is created with its founder, members come and go with
        roles, the group changes, and each user's groups are known.
        """
        store = yield self.store()
        group = Group("g1", "dom", "alice", 1, 1, 5.0, b"sealed", 50, False)
        yield store.createGroup(group, Member("alice", ROLE_FOUNDER, 5.0))
        self.assertEqual((yield store.getGroup("g1")), group)
        self.assertIsNone((yield store.getGroup("g2")))
        yield store.putMember("g1", Member("bob", ROLE_MEMBER, 6.0))
        yield store.putMember("g1", Member("carol", ROLE_MEMBER, 7.0, mutedUntil=99.0))
        yield store.putMember("g1", Member("bob", ROLE_MANAGER, 6.0))
        members = sorted((yield store.groupMembers("g1")), key=lambda m: m.uid)
        self.assertEqual(
            members,
            [Member("alice", ROLE_FOUNDER, 5.0), Member("bob", ROLE_MANAGER, 6.0), Member("carol", 0, 7.0, 99.0)],
        )
        self.assertEqual((yield store.groupsOf("bob")), ["g1"])
        self.assertEqual((yield store.removeMembers("g1", ["carol", "nobody"])), 1)
        self.assertEqual((yield store.groupsOf("carol")), [])
        self.assertEqual((yield store.countFounded("alice")), 1)
        changed = Group("g1", "dom", "bob", 2, GROUP_CANCELLED, 5.0, None, 0, True)
        yield store.updateGroup(changed)
        self.assertEqual((yield store.getGroup("g1")), changed)
        self.assertEqual((yield store.countFounded("alice")), 0)
        self.assertEqual((yield store.countFounded("bob")), 0, "dissolved groups do not count")

    @inlineCallbacks
    def test_groupRequestsAndBlocks(self):
        store = yield self.store()
        yield store.addJoinRequest("g1", "bob", 1.0)
        self.assertTrue((yield store.takeJoinRequest("g1", "bob")))
        self.assertFalse((yield store.takeJoinRequest("g1", "bob")))
        yield store.setGroupBlock("g1", "bob", BLOCK_BY_USER, True)
        yield store.setGroupBlock("g1", "bob", BLOCK_BY_GROUP, True)
        yield store.setGroupBlock("g1", "carol", BLOCK_BY_GROUP, True)
        self.assertEqual((yield store.groupBlocks("g1")), {"bob": {1, 2}, "carol": {2}})
        self.assertEqual((yield store.userGroupBlocks("bob")), ["g1"])
        yield store.setGroupBlock("g1", "bob", BLOCK_BY_USER, False)
        self.assertEqual((yield store.userGroupBlocks("bob")), [])
        self.assertEqual((yield store.groupBlocks("g1"))["bob"], {2})

    @inlineCallbacks
    def test_cursorsAndBacklog(self):
        """
        Cursors only move forward; messages after a seq come oldest first.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("g:g1", i, i * 10, "a", b"m%d" % i, 0.0) for i in range(1, 6)])
        yield store.saveCursors([("bob", "g1", 3), ("bob", "g2", 1)])
        yield store.saveCursors([("bob", "g1", 2)])
        self.assertEqual((yield store.cursorsOf("bob")), {"g1": 3, "g2": 1})
        rows = yield store.messagesAfter("g:g1", 3, 10)
        self.assertEqual([r.seq for r in rows], [4, 5])
        self.assertEqual([r.seq for r in (yield store.messagesAfter("g:g1", 0, 2))], [1, 2])


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
    def test_qidsAcrossReopen(self):
        """
        Qids given by the store keep growing across a reopen, even after
        the newest entry was deleted, and do not collide with those SQLite
        gave before.
        """
        store = yield self.makeStore()
        ((first,),) = yield store.appendMessages([NewMessage("c", 1, 1, "a", b"x", 0.0, inbox=(("bob", None),))])
        (second,) = yield store.addInbox([("bob", b"n")], 0.0)
        self.assertGreater(second, first)
        yield store.deleteInbox("bob", [second])
        yield store.close()
        again = SQLiteStore(reactor, self.path)
        yield again.open()
        self.addCleanup(again.close)
        ((third,),) = yield again.appendMessages([NewMessage("c", 2, 2, "a", b"y", 0.0, inbox=(("bob", None),))])
        self.assertGreater(third, second)
        self.assertEqual([e.qid for e in (yield again.readInbox("bob", 0, 10))], [first, third])

    @inlineCallbacks
    def test_refusesNewerSchema(self):
        """
        A database written by a newer timtx is not touched.
        """
        path = newerDatabase(self.mktemp())
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


class ConcurrentWritersMixin:
    """
    The fence of duplicate keys between transactions of different
    connections (nodes), for the server stores.  A subclass provides
    C{makeStore()}, C{rawConnect()} (a blocking DB-API connection to the
    same database, in a transaction, called in a thread) and
    C{LOCK_WAITS} (SQL counting this database's sessions waiting for a
    row lock).
    """

    @inlineCallbacks
    def heldKey(self, finish):
        """
        Another connection writes message 1 of C{c} with key C{(a, 77)}
        and keeps its transaction open; the store appends message 1 of C{d}
        with the same key, which must wait for it; the other connection
        then does C{finish} (C{commit} or C{rollback}).

        @return: the store, and the append's outcome.
        """
        store = yield self.store()
        other = yield deferToThread(self.rawConnect)
        self.addCleanup(deferToThread, other.close)

        def write():
            with other.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO messages (conv, seq, mid, sender, stanza, created) VALUES ('c', 1, 1, 'a', %s, 1.0)",
                    (b"first",),
                )
                cursor.execute(
                    "INSERT INTO duplicates (sender, client_id, conv, seq, mid, created) "
                    "VALUES ('a', 77, 'c', 1, 1, 1.0)"
                )

        yield deferToThread(write)
        outcome = []
        d = store.appendMessages([NewMessage("d", 1, 2, "a", b"second", 2.0, inbox=(("bob", None),), dedupe=("a", 77))])
        d.addBoth(outcome.append)
        waiting = 0
        for _ in range(400):
            waiting = yield deferToThread(self._count, self.LOCK_WAITS)
            if waiting or outcome:
                break
            yield deferLater(reactor, 0.025, lambda: None)
        self.assertEqual((waiting, outcome), (1, []), "the append waits for the other transaction")
        yield deferToThread(getattr(other, finish))
        while not outcome:
            yield deferLater(reactor, 0.01, lambda: None)
        return store, outcome[0]

    def _count(self, sql):
        connection = self.rawConnect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchone()[0]
        finally:
            connection.close()

    @inlineCallbacks
    def test_duplicateKeyCommittedMeanwhile(self):
        """
        A key another transaction holds uncommitted fences once it
        commits: the append waits, then fails naming that message, and only
        the first copy is stored.
        """
        store, outcome = yield self.heldKey("commit")
        self.assertIsInstance(outcome, Failure)
        outcome.trap(DuplicateConflict)
        self.assertEqual(outcome.value.held, {0: Duplicate("c", 1, 1, 1.0)})
        self.assertEqual((yield store.lastMessage("d")), (0, 0))
        self.assertEqual((yield store.countInbox("bob")), 0)
        self.assertEqual((yield store.recentDuplicates("a", 0.0)), {77: Duplicate("c", 1, 1, 1.0)})

    @inlineCallbacks
    def test_duplicateKeyRolledBackMeanwhile(self):
        """
        A key whose other transaction rolls back does not fence: the
        append that waited for it stores its message.
        """
        store, outcome = yield self.heldKey("rollback")
        self.assertEqual(outcome, [[outcome[0][0]]])
        self.assertEqual((yield store.lastMessage("d")), (1, 2))
        self.assertEqual((yield store.recentDuplicates("a", 0.0)), {77: Duplicate("d", 1, 2, 2.0)})

    @inlineCallbacks
    def test_duplicateKeyRacingStores(self):
        """
        Two stores (two nodes' pools) append the same key at once, to two
        seqs of one conversation: exactly one is stored, and the other
        names it.
        """
        first = yield self.store()
        second = yield self.store()
        results = yield gatherResults(
            [
                store.appendMessages([NewMessage("c", seq, seq, "a", b"m%d" % seq, 1.0, dedupe=("a", 5))]).addErrback(
                    lambda f: f.trap(DuplicateConflict) and f.value
                )
                for seq, store in ((1, first), (2, second))
            ]
        )
        refused = [r for r in results if isinstance(r, DuplicateConflict)]
        self.assertEqual(len(refused), 1)
        stored = yield first.messagesAfter("c", 0, 10)
        self.assertEqual(len(stored), 1)
        self.assertEqual(refused[0].held, {0: Duplicate("c", stored[0].seq, stored[0].mid, 1.0)})


class PostgreSQLStoreTests(MessageStoreTestsMixin, ConcurrentWritersMixin, TestCase):
    """
    The conformance suite on this machine's PostgreSQL, in a database of
    each test's own.
    """

    @inlineCallbacks
    def makeStore(self):
        from timtx.persistence.postgresql import PostgreSQLStore

        if not hasattr(self, "dsn"):
            self.dsn = yield postgresqlDatabase(self)
        store = PostgreSQLStore(reactor, self.dsn, poolSize=3)
        yield store.open()
        return store

    LOCK_WAITS = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"

    def rawConnect(self):
        import psycopg2

        return psycopg2.connect(self.dsn)


class MariaDBStoreTests(MessageStoreTestsMixin, ConcurrentWritersMixin, TestCase):
    """
    The conformance suite on this machine's MariaDB with PyMySQL (the
    driver installed with timtx), in a database of each test's own.
    """

    driver = "pymysql"

    @inlineCallbacks
    def makeStore(self):
        from timtx.persistence.mariadb import MariaDBStore

        if not hasattr(self, "url"):
            self.url = yield mariadbDatabase(self)
        store = MariaDBStore(reactor, self.url, driver=self.driver, poolSize=3)
        yield store.open()
        return store

    LOCK_WAITS = (
        "SELECT COUNT(*) FROM information_schema.innodb_trx t "
        "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
        "WHERE t.trx_state = 'LOCK WAIT' AND p.db = DATABASE()"
    )

    def rawConnect(self):
        import pymysql

        from timtx.persistence.mariadb import parseDSN

        return pymysql.connect(**parseDSN(self.url))


class MariaDBMysqlclientStoreTests(MariaDBStoreTests):
    """
    The same with mysqlclient, the faster driver, when it is installed (an
    option, so this skips without it even under CI).
    """

    driver = "mysqlclient"

    def setUp(self):
        try:
            import MySQLdb  # noqa: F401
        except ImportError:
            raise SkipTest("mysqlclient is not installed (optional: pip install mysqlclient)") from None


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

        worker = SerialWorker(reactor, connect, **transactionSteps("BEGIN"))
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
        self.assertEqual(sorted(BUILTIN_STORES), ["mariadb", "memory", "postgresql", "sqlite"])
        self.assertIs(storeFactory("memory"), BUILTIN_STORES["memory"])

    def test_lazy(self):
        """
        The server plugins are imported when used; a plugin whose driver
        cannot be imported makes a store that fails to open, saying why.
        """
        from timtx.persistence import LazyStoreFactory

        factory = LazyStoreFactory("broken", "x", "timtx.persistence.nosuchmodule:Factory")
        store = factory.makeStore(None, None)
        failure = self.failureResultOf(store.open(), StoreUnavailable)
        self.assertIn("the broken store cannot be loaded", str(failure.value))
        self.successResultOf(store.close())

    def test_unknown(self):
        error = self.assertRaises(KeyError, storeFactory, "nosuchdb")
        self.assertIn("memory", str(error))
