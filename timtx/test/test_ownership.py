# -*- test-case-name: timtx.test.test_ownership -*-
"""
Tests for L{timtx.cluster.ownership}: rendezvous hashing.
"""

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from timtx.cluster import ownership as ownershipModule
from timtx.cluster.ownership import NoOwner, Ownership, conversationKey, groupKey, roomKey, score, userKey

KEYS = [userKey(str(i)) for i in range(3000)]
NODES = [f"node-{i}" for i in range(10)]


class OwnershipTests(SynchronousTestCase):
    def test_stableHash(self):
        """
        Scores are the same in every process and version: BLAKE2b, not
        Python's salted C{hash}; the value is what C{b2sum -l 64} gives.
        """
        self.assertEqual(score("node-1", "user:42"), 0x66AE901C0204BE04)
        self.assertEqual(Ownership(NODES).owner("user:42"), Ownership(reversed(NODES)).owner("user:42"))

    def test_ownerIsHighestScore(self):
        ownership = Ownership(NODES)
        for key in KEYS[:50]:
            self.assertEqual(ownership.owner(key), max(NODES, key=lambda n: score(n, key)))

    def test_sameViewSameOwners(self):
        """
        Nodes that see the same members agree on every owner, whatever order
        they learnt the members in.
        """
        a, b = Ownership(NODES), Ownership(sorted(NODES, reverse=True) + NODES[:3])
        self.assertEqual(a, b)
        self.assertEqual([a.owner(k) for k in KEYS], [b.owner(k) for k in KEYS])

    def test_balanced(self):
        """
        Each of 10 nodes owns roughly a tenth of the keys.
        """
        counts = Counter(Ownership(NODES).owner(key) for key in KEYS)
        self.assertEqual(set(counts), set(NODES))
        for count in counts.values():
            self.assertTrue(200 < count < 400, counts)

    def test_joinMovesOnlyItsShare(self):
        """
        A joining node takes about 1/n of the keys, and every key that moves
        moves to it.
        """
        before, after = Ownership(NODES), Ownership([*NODES, "node-new"])
        moved = [key for key in KEYS if before.owner(key) != after.owner(key)]
        self.assertTrue(len(KEYS) / 11 * 0.7 < len(moved) < len(KEYS) / 11 * 1.3, len(moved))
        self.assertEqual({after.owner(key) for key in moved}, {"node-new"})

    def test_leaveMovesOnlyItsKeys(self):
        """
        When a node leaves only its keys move, each to its successor, which
        L{Ownership.owners} named in advance.
        """
        before, after = Ownership(NODES), Ownership(NODES[1:])
        for key in KEYS:
            owners = before.owners(key, 2)
            if owners[0] == "node-0":
                self.assertEqual(after.owner(key), owners[1])
            else:
                self.assertEqual(after.owner(key), owners[0])

    def test_owners(self):
        ownership = Ownership(NODES[:3])
        owners = ownership.owners("room:x", 5)
        self.assertEqual(sorted(owners), sorted(NODES[:3]))
        self.assertEqual(owners[0], ownership.owner("room:x"))
        self.assertEqual(ownership.owners("room:x", 1), owners[:1])
        self.assertTrue(ownership.owns(owners[0], "room:x"))
        self.assertFalse(ownership.owns(owners[1], "room:x"))

    def test_empty(self):
        empty = Ownership([])
        self.assertRaises(NoOwner, empty.owner, "user:1")
        self.assertRaises(NoOwner, empty.owners, "user:1", 2)
        self.assertFalse(empty.owns("a", "user:1"))

    def test_keys(self):
        self.assertEqual(
            [userKey("u"), conversationKey("c"), groupKey("g"), roomKey("r")],
            ["user:u", "conv:c", "group:g", "room:r"],
        )
        self.assertIn("node-1", Ownership(NODES))
        self.assertEqual(repr(Ownership(["b", "a"])), "Ownership(['a', 'b'])")

    def test_rememberedOwners(self):
        """
        A snapshot answers a key it was asked before from memory, the same
        as it computed it, and remembers a bounded number of keys.
        """
        self.patch(ownershipModule, "MAX_REMEMBERED_OWNERS", 10)
        snapshot = Ownership(["a", "b", "c"])
        keys = [userKey(f"u{i}") for i in range(25)]
        first = [snapshot.owner(key) for key in keys]
        self.assertEqual([snapshot.owner(key) for key in keys], first)
        self.assertEqual(first, [max(Ownership(["a", "b", "c"])._scores(key))[1] for key in keys])
        self.assertLessEqual(len(snapshot._owners), 10)
