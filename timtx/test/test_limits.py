"""
Tests for L{timtx.util.ratelimit}.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.util.ratelimit import KeyedBuckets, TokenBucket


class TokenBucketTests(SynchronousTestCase):
    def test_burstThenRate(self):
        """
        A full bucket allows C{burst} events at once, then C{rate} per
        second.
        """
        clock = Clock()
        bucket = TokenBucket(2.0, 3, clock)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)
        self.assertEqual([bucket.take() for _ in range(2)], [True, False])
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 3)

    def test_zeroRateDisables(self):
        bucket = TokenBucket(0, 1, Clock())
        self.assertTrue(all(bucket.take() for _ in range(1000)))


class KeyedBucketsTests(SynchronousTestCase):
    def test_perKeyAndBounded(self):
        """
        Keys have separate buckets and at most C{maxKeys} are remembered.
        """
        clock = Clock()
        buckets = KeyedBuckets(1.0, 1, clock, maxKeys=2)
        self.assertTrue(buckets.take("a"))
        self.assertFalse(buckets.take("a"))
        self.assertTrue(buckets.take("b"))
        self.assertTrue(buckets.take("c"))
        self.assertEqual(len(buckets._buckets), 2)
