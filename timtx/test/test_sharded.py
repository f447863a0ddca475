# -*- test-case-name: timtx.test.test_sharded -*-
"""
Tests for L{timtx.persistence.sharded}: the conformance suite on a store of
three shards (in memory, and on three PostgreSQL databases), and what only
a sharded store does: writes that span shards, their repair after a crash
between steps, the order of results, slots held during a move.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.persistence.errors import DuplicateConflict, StoreOutcomeUnknown, StoreUnavailable
from timtx.persistence.memory import MemoryStore
from timtx.persistence.placement import SLOTS, Range, ShardMap, convKey, evenRanges, parseSlots, slotOf
from timtx.persistence.records import (
    MESSAGE_RECALLED,
    ROLE_MEMBER,
    STANCE_FRIEND,
    Account,
    Duplicate,
    Group,
    Member,
    NewMessage,
)
from timtx.persistence.sharded import ShardedStore
from timtx.test.base import NodeTestCase
from timtx.test.databases import postgresqlDatabase
from timtx.test.test_groups import GroupTestsMixin
from timtx.test.test_messaging import MessagingTestsMixin
from timtx.test.test_store import MessageStoreTestsMixin


def keyOn(shard, count=3, prefix="k", avoid=()):
    """
    A key whose slot is on C{shard} of C{count} shards split evenly.
    """
    ranges = evenRanges(list(range(count)))
    for i in range(100000):
        key = f"{prefix}{i}"
        slot = slotOf(key)
        if ranges[shard].lo <= slot <= ranges[shard].hi and key not in avoid:
            return key
    raise AssertionError("no key found")


class MemoryShards:
    """
    Named memory stores, kept across opens, as databases would be.
    """

    def __init__(self):
        self.stores = {}

    def __call__(self, dsn):
        return self.stores.setdefault(dsn, MemoryStore())


def memorySharded(clock=reactor, count=3, shards=None, **kwargs):
    shards = shards or MemoryShards()
    store = ShardedStore(shards, [f"m{i}" for i in range(count)], clock, backend="memory", **kwargs)
    return store, shards


class ShardedMemoryStoreTests(MessageStoreTestsMixin, TestCase):
    """
    The conformance suite on three shards in memory.
    """

    fencesAcrossConversations = False

    def makeStore(self):
        store, self.shards = memorySharded()
        return store.open().addCallback(lambda _: store)


class ShardedPostgreSQLStoreTests(MessageStoreTestsMixin, TestCase):
    """
    The conformance suite on three PostgreSQL databases.
    """

    fencesAcrossConversations = False

    @inlineCallbacks
    def makeStore(self):
        from timtx.persistence.postgresql import PostgreSQLStore

        dsns = []
        for _ in range(3):
            dsns.append((yield postgresqlDatabase(self)))
        store = ShardedStore(lambda dsn: PostgreSQLStore(reactor, dsn, poolSize=2), dsns, reactor, backend="postgresql")
        yield store.open()
        return store


class PlacementTests(SynchronousTestCase):
    def test_slots(self):
        """
        A key's slot is the first 12 bits of its MD5, the same for its text
        and its UTF-8 bytes; a group conversation is placed by its group.
        """
        self.assertEqual(slotOf("alice"), int("6384e2b2184bcbf58eccf10ca7a6563c"[:3], 16))
        self.assertEqual(slotOf("\u00e9"), slotOf("\u00e9".encode()))
        self.assertEqual(convKey("g:G1"), "G1")
        self.assertEqual(convKey("p:a:b"), "p:a:b")
        self.assertTrue(all(0 <= slotOf(f"k{i}") < SLOTS for i in range(1000)))

    def test_map(self):
        """
        A map covers every slot once; held ranges are known.
        """
        shardMap = ShardMap(3, {0: "a", 1: "b"}, (Range(0, 99, 0), Range(100, SLOTS - 1, 1, held=True)))
        self.assertEqual((shardMap.shardOf(0), shardMap.shardOf(100)), (0, 1))
        self.assertTrue(shardMap.isHeld(SLOTS - 1))
        self.assertFalse(shardMap.isHeld(5))
        self.assertEqual(shardMap.slotsOf(1), [(100, SLOTS - 1)])
        self.assertRaises(ValueError, ShardMap, 1, {0: "a"}, (Range(0, 10, 0),))
        self.assertEqual(evenRanges([0, 1, 2])[1], Range(1365, 2729, 1))
        self.assertEqual(parseSlots("2048-4095"), (2048, 4095))
        self.assertEqual(parseSlots("7"), (7, 7))
        self.assertRaises(ValueError, parseSlots, "0-4096")
        self.assertRaises(ValueError, parseSlots, "x")


class CrossShardTests(TestCase):
    """
    Writes that span shards, on three memory shards.
    """

    @inlineCallbacks
    def sharded(self, **kwargs):
        store, shards = memorySharded(**kwargs)
        yield store.open()
        self.addCleanup(store.close)
        return store, shards.stores

    @inlineCallbacks
    def test_messageAcrossShards(self):
        """
        A 1:1 message whose conversation, recipient and sender live on three
        shards: the history row on the conversation's, the inbox entry on
        the recipient's (referring to the row), the duplicate key on the
        sender's and, as the fence of resends, on the conversation's;
        nothing left pending.
        """
        store, shards = yield self.sharded()
        conv, bob, alice = keyOn(0, prefix="c"), keyOn(1, prefix="b"), keyOn(2, prefix="a")
        ((qid,),) = yield store.appendMessages(
            [NewMessage(conv, 1, 7, alice, b"sealed", 1.0, inbox=((bob, None),), dedupe=(alice, 5))]
        )
        self.assertEqual(list(shards["m0"]._messages), [conv])
        self.assertEqual(list(shards["m1"]._inbox), [bob])
        self.assertEqual(list(shards["m2"]._duplicates), [(alice, 5)])
        self.assertEqual(list(shards["m0"]._duplicates), [(alice, 5)])
        (entry,) = yield store.readInbox(bob, 0, 10)
        self.assertEqual((entry.qid, entry.conv, entry.seq, entry.stanza), (qid, conv, 1, b"sealed"))
        yield store.replaceMessage(conv, 1, b"tomb", MESSAGE_RECALLED, [(alice, b"notice")], 2.0)
        self.assertEqual([e.stanza for e in (yield store.readInbox(bob, 0, 10))], [b"tomb"])
        self.assertEqual([e.stanza for e in (yield store.readInbox(alice, 0, 10))], [b"notice"])
        yield deferLater(store.dropDelay + 0.1)
        self.assertEqual([dict(s._intents) for s in shards.values()], [{}, {}, {}])

    @inlineCallbacks
    def test_secondStepFails(self):
        """
        If the shard of the recipient cannot be reached after the message
        is stored, the call fails with L{StoreOutcomeUnknown} (never a
        confirmation), and a repair finishes it: the entry appears once.
        Both count as incidents of the store.
        """
        clock = Clock()
        store, shards = yield self.sharded(clock=clock, repairInterval=5.0)
        conv, bob = keyOn(0, prefix="c"), keyOn(1, prefix="b")
        broken = shards["m1"]
        broken.applyParts = lambda parts, intent: _unavailable()
        d = store.appendMessages([NewMessage(conv, 1, 7, conv, b"x", 0.0, inbox=((bob, None),))])
        self.failureResultOf(d, StoreOutcomeUnknown)
        # An incident: the node reads its live sessions' inboxes again.
        self.assertEqual(store.incidents, 1)
        self.assertEqual(len(shards["m0"]._intents), 1)
        self.assertEqual(broken.countInbox(bob).result, 0)
        del broken.applyParts
        clock.advance(6)
        self.assertEqual(store.repaired, 1)
        # Another, once the entry that no one was pushed exists.
        self.assertEqual(store.incidents, 2)
        self.assertEqual(broken.countInbox(bob).result, 1)
        self.assertEqual(shards["m0"]._intents, {})
        self.assertEqual((yield store.readInbox(bob, 0, 10))[0].stanza, b"x")

    @inlineCallbacks
    def test_partsOnce(self):
        """
        Applying an intent's parts twice makes each inbox entry once.
        """
        store, shards = yield self.sharded()
        conv, bob = keyOn(0, prefix="c"), keyOn(1, prefix="b")
        captured = []
        original = shards["m1"].applyParts

        def capture(parts, intent):
            captured.append(parts)
            return original(parts, intent)

        shards["m1"].applyParts = capture
        yield store.appendMessages([NewMessage(conv, 1, 7, conv, b"x", 0.0, inbox=((bob, None), (bob, b"copy")))])
        again = yield original(captured[0], None)
        self.assertEqual(len(again), 2)
        self.assertEqual((yield store.countInbox(bob)), 2)

    @inlineCallbacks
    def test_sequenceConflictWritesNothingElsewhere(self):
        """
        A taken seq fails on the conversation's shard, and nothing reaches
        the recipient's.
        """
        store, shards = yield self.sharded()
        conv, bob = keyOn(0, prefix="c"), keyOn(1, prefix="b")
        yield store.appendMessages([NewMessage(conv, 1, 1, conv, b"x", 0.0)])
        from timtx.persistence.errors import SequenceConflict

        yield self.assertFailure(
            store.appendMessages([NewMessage(conv, 1, 2, conv, b"y", 0.0, inbox=((bob, None),))]), SequenceConflict
        )
        self.assertEqual((yield store.countInbox(bob)), 0)
        self.assertEqual(shards["m0"]._intents, {})

    @inlineCallbacks
    def test_duplicateKeyFencedWithConversation(self):
        """
        A resend to a conversation on another shard than its sender's is
        refused on the conversation's shard, naming the first copy, and
        nothing of it reaches the recipient's shard.
        """
        store, shards = yield self.sharded()
        conv, bob, alice = keyOn(0, prefix="c"), keyOn(1, prefix="b"), keyOn(2, prefix="a")
        yield store.appendMessages([NewMessage(conv, 1, 7, alice, b"x", 1.0, inbox=((bob, None),), dedupe=(alice, 5))])
        error = yield self.assertFailure(
            store.appendMessages([NewMessage(conv, 2, 8, alice, b"x", 2.0, inbox=((bob, None),), dedupe=(alice, 5))]),
            DuplicateConflict,
        )
        self.assertEqual(error.held, {0: Duplicate(conv, 1, 7, 1.0)})
        self.assertEqual((yield store.countInbox(bob)), 1)
        self.assertEqual((yield store.lastMessage(conv)), (1, 7))
        yield deferLater(store.dropDelay + 0.1)
        self.assertEqual(shards["m0"]._intents, {})

    @inlineCallbacks
    def test_mirrors(self):
        """
        Membership is seen from the group and from the user, stances from
        both users, blocks of a group from the user, on different shards;
        C{countFounded} counts groups on every shard once.
        """
        store, shards = yield self.sharded()
        gid, bob, alice = keyOn(0, prefix="g"), keyOn(1, prefix="b"), keyOn(2, prefix="a")
        yield store.createGroup(Group(gid, "", alice, 1, 1, 0.0), Member(alice, 2, 0.0))
        yield store.putMember(gid, Member(bob, ROLE_MEMBER, 1.0))
        self.assertEqual((yield store.groupsOf(bob)), [gid])
        self.assertEqual((yield store.groupsOf(alice)), [gid])
        self.assertEqual(sorted(m.uid for m in (yield store.groupMembers(gid))), sorted([alice, bob]))
        self.assertEqual((yield store.countFounded(alice)), 1)
        self.assertEqual((yield store.removeMembers(gid, [bob, "nobody"])), 1)
        self.assertEqual((yield store.groupsOf(bob)), [])
        yield store.setStance(alice, bob, STANCE_FRIEND)
        self.assertEqual([(r.other, r.mine, r.theirs) for r in (yield store.relationsOf(bob))], [(alice, 0, 1)])
        yield store.setStance(alice, bob, 0)
        self.assertEqual((yield store.relationsOf(bob)), [])
        yield store.setGroupBlock(gid, bob, 1, True)
        self.assertEqual((yield store.userGroupBlocks(bob)), [gid])
        self.assertEqual((yield store.groupBlocks(gid)), {bob: {1}})

    @inlineCallbacks
    def test_orderAcrossShards(self):
        """
        A read issued after a write spanning shards sees it, and results
        come back in call order, whichever shard answers first.
        """
        store, shards = yield self.sharded()
        conv, bob = keyOn(0, prefix="c"), keyOn(1, prefix="b")
        slow = shards["m0"]
        gate = Deferred()
        original = slow.appendStaged
        slow.appendStaged = lambda messages, intent: gate.addCallback(lambda _: original(messages, intent))
        order = []
        write = store.appendMessages([NewMessage(conv, 1, 1, conv, b"x", 0.0, inbox=((bob, None),))])
        write.addCallback(lambda _: order.append("write"))
        read = store.readInbox(bob, 0, 10)
        read.addCallback(lambda entries: order.append(("read", len(entries))))
        other = store.getAccount(keyOn(2, prefix="a"))
        other.addCallback(lambda _: order.append("other"))
        self.assertEqual(order, [])
        gate.callback(None)
        yield read
        self.assertEqual(order, ["write", ("read", 1), "other"])

    @inlineCallbacks
    def test_heldSlots(self):
        """
        A call touching a held slot waits for the map to release it, and
        every later call waits behind it; one waiting too long fails.
        """
        clock = Clock()
        store, shards = yield self.sharded(clock=clock, holdTimeout=5.0, mapPoll=1.0, mapLease=60.0)
        alice, bob = keyOn(0, prefix="a"), keyOn(1, prefix="b")
        directory = shards["m0"]
        base = directory._shardMap
        held = tuple(Range(r.lo, r.hi, r.shard, held=(r.shard == 0)) for r in base.ranges)
        directory._shardMap = ShardMap(base.version + 1, base.shards, held, moving=True)
        clock.advance(1.0)
        self.assertEqual(store.map.version, base.version + 1)
        first = store.getAccount(alice)
        later = store.getAccount(bob)
        self.assertNoResult(first)
        self.assertNoResult(later)
        moved = tuple(Range(r.lo, r.hi, 1 if r.shard == 0 else r.shard) for r in base.ranges)
        shards["m1"]._accounts[alice] = Account(alice, "", "h", 0.0)
        directory._shardMap = ShardMap(base.version + 2, base.shards, moved, moving=False)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(first), Account(alice, "", "h", 0.0))
        self.successResultOf(later)
        directory._shardMap = ShardMap(base.version + 3, base.shards, held, moving=True)
        clock.advance(1.0)
        stuck = store.getAccount(keyOn(2, prefix="a"))
        waiting = store.getAccount(alice)
        clock.advance(5.0)
        self.failureResultOf(waiting, StoreUnavailable)
        self.successResultOf(stuck)

    @inlineCallbacks
    def test_repairWaitsForEveryKeyOfItsRows(self):
        """
        A repair of a sender's copy of a duplicate key waits while the
        conversation's slot is held, though the part's own slot (the
        sender's) is not: during a move's switch the source is compared
        with the target and takes no write of a row with a key in the
        range but its own copies.
        """
        clock = Clock()
        store, shards = yield self.sharded(
            clock=clock, repairInterval=5.0, holdTimeout=30.0, mapPoll=1.0, mapLease=60.0
        )
        conv, sender = keyOn(0, prefix="c"), keyOn(1, prefix="s")
        shards["m1"].applyParts = lambda parts, intent: _unavailable()
        d = store.appendMessages([NewMessage(conv, 1, 7, sender, b"x", 0.0, dedupe=(sender, 3))])
        self.failureResultOf(d, StoreOutcomeUnknown)
        del shards["m1"].applyParts
        directory = shards["m0"]
        base = directory._shardMap
        held = tuple(Range(r.lo, r.hi, r.shard, held=(r.shard == 0)) for r in base.ranges)
        directory._shardMap = ShardMap(base.version + 1, base.shards, held, moving=True)
        clock.advance(6.0)
        self.assertEqual(store.map.version, base.version + 1)
        self.assertEqual((store.repaired, self.successResultOf(shards["m1"].recentDuplicates(sender, 0.0))), (0, {}))
        directory._shardMap = ShardMap(base.version + 2, base.shards, base.ranges, moving=False)
        clock.advance(0.1)
        self.assertEqual(store.repaired, 1)
        self.assertEqual(sorted(self.successResultOf(shards["m1"].recentDuplicates(sender, 0.0))), [3])

    @inlineCallbacks
    def test_lease(self):
        """
        A node that cannot confirm the map for C{map_lease} seconds refuses
        calls, and serves again once it can.
        """
        clock = Clock()
        store, shards = yield self.sharded(clock=clock, mapPoll=1.0, mapLease=3.0)
        directory = shards["m0"]
        directory.heartbeat = lambda node, version: _unavailable()
        clock.advance(4.0)
        self.assertFalse(store.available)
        self.failureResultOf(store.getAccount("a"), StoreUnavailable)
        del directory.heartbeat
        clock.advance(1.0)
        self.assertTrue(store.available)
        self.successResultOf(store.getAccount("a"))
        self.assertIn(store.nodeName, directory.nodes)

    @inlineCallbacks
    def test_mapKept(self):
        """
        The map is made once from the configured shards; a store opened
        later with another list uses the one in the directory.
        """
        store, shards = yield self.sharded()
        first = store.map
        again = ShardedStore(shards.__getitem__, ["m0", "m1"], reactor, backend="memory")
        yield again.open()
        self.addCleanup(again.close)
        self.assertEqual(again.map, first)
        self.assertEqual(sorted(again.shards), [0, 1, 2])


def _unavailable():
    from twisted.internet.defer import fail

    return fail(StoreUnavailable("shard down"))


def deferLater(seconds):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class ShardedMemoryMessagingTests(MessagingTestsMixin, NodeTestCase):
    """
    Every 1:1 messaging test, through a node on three shards in memory.
    """

    sections: dict = {**MessagingTestsMixin.sections, "store": {"shards": ("m0", "m1", "m2")}}


class ShardedMemoryGroupTests(GroupTestsMixin, NodeTestCase):
    """
    Every group test, through a node on three shards in memory.
    """

    sections: dict = {**GroupTestsMixin.sections, "store": {"shards": ("m0", "m1", "m2")}}


class ShardedPostgreSQLMessagingTests(MessagingTestsMixin, NodeTestCase):
    """
    Every 1:1 messaging test, through a node on three PostgreSQL databases.
    """

    backend = "postgresql"

    @inlineCallbacks
    def node(self, clock=None, **sections):
        dsns = []
        for _ in range(3):
            dsns.append((yield postgresqlDatabase(self)))
        sections = {name: dict(values) for name, values in sections.items()}
        sections.setdefault("store", {})["shards"] = tuple(dsns)
        node = yield super().node(clock, **sections)
        return node
