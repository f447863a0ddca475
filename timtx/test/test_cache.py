"""
Tests for L{timtx.util.cache}.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from timtx.util.cache import LoadingCache


class LoadingCacheTests(SynchronousTestCase):
    def test_oneReadForConcurrentUses(self):
        reads = []

        def load(key):
            d = Deferred()
            reads.append((key, d))
            return d

        cache = LoadingCache(load, 10)
        first, second = cache.get("a"), cache.get("a")
        self.assertEqual(len(reads), 1)
        reads[0][1].callback("value")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("value", "value"))
        self.assertEqual(self.successResultOf(cache.get("a")), "value")
        self.assertEqual(len(reads), 1)

    def test_putDuringReadWins(self):
        pending = Deferred()
        cache = LoadingCache(lambda key: pending, 10)
        d = cache.get("a")
        cache.put("a", "newer")
        pending.callback("older")
        self.assertEqual(self.successResultOf(d), "newer")

    def test_invalidate(self):
        """
        An invalidated key is read again; a read under way when it was
        invalidated answers its waiters but is not kept (it may predate the
        change).
        """
        reads = []

        def load(key):
            d = Deferred()
            reads.append(d)
            return d

        cache = LoadingCache(load, 10)
        d = cache.get("a")
        cache.invalidate("a")
        reads[0].callback("older")
        self.assertEqual(self.successResultOf(d), "older")
        again = cache.get("a")
        self.assertEqual(len(reads), 2)
        reads[1].callback("newer")
        self.assertEqual(self.successResultOf(again), "newer")
        cache.invalidate("a")
        self.assertIsNone(cache.peek("a"))
        cache.get("a")
        self.assertEqual(len(reads), 3)

    def test_lru(self):
        evicted = []
        cache = LoadingCache(lambda key: succeed(key.upper()), 2, lambda k, v: evicted.append(k) or k == "keep")
        for key in ("keep", "b", "c", "d"):
            self.successResultOf(cache.get(key))
        self.assertIn("keep", cache)
        self.assertNotIn("b", cache)
        self.assertEqual(evicted[:2], ["keep", "b"])

    def test_failedRead(self):
        cache = LoadingCache(lambda key: fail(RuntimeError("down")), 2)
        self.failureResultOf(cache.get("a"), RuntimeError)
        self.assertNotIn("a", cache)

    def test_clearDuringRead(self):
        """
        After L{LoadingCache.clear}, a read that began before it is handed
        to its waiters but not kept: it may predate what cleared the cache.
        """
        pending = Deferred()
        reads = []

        def load(key):
            reads.append(key)
            return pending if len(reads) == 1 else succeed("new")

        cache = LoadingCache(load, 10)
        cache.put("kept", "old")
        first = cache.get("k")
        cache.clear()
        self.assertIsNone(cache.peek("kept"))
        pending.callback("old")
        self.assertEqual(self.successResultOf(first), "old")
        self.assertEqual(self.successResultOf(cache.get("k")), "new")
        self.assertEqual(reads, ["k", "k"])
