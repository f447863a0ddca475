# -*- test-case-name: timtx.test.test_limits -*-
"""
Rate limits that actually fire.

tim's C{reqhzsecond} resets its counter on every call and so never limits
anything.  A token bucket refilled from the clock on each use needs no
periodic task: each call to L{TokenBucket.take} first adds what accrued
since the last call.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime


class TokenBucket:
    """
    Allows C{rate} events per second on average and bursts of C{burst}.
    A C{rate} of 0 allows everything.
    """

    __slots__ = ("rate", "burst", "_clock", "_tokens", "_last")

    def __init__(self, rate: float, burst: int, clock: IReactorTime):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock.seconds()

    def take(self, count: float = 1.0) -> bool:
        """
        Spend C{count} tokens if there are enough.

        @return: whether the event is allowed.
        """
        if not self.rate:
            return True
        now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= count:
            self._tokens -= count
            return True
        return False


class KeyedBuckets:
    """
    One L{TokenBucket} per key (a peer address, say), remembering at most
    C{maxKeys} keys: the least recently used are forgotten first, so a flood
    of new keys cannot grow memory without bound.
    """

    def __init__(self, rate: float, burst: int, clock: IReactorTime, maxKeys: int = 10000):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._maxKeys = maxKeys
        self._buckets: OrderedDict[object, TokenBucket] = OrderedDict()

    def take(self, key: object) -> bool:
        if not self.rate:
            return True
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self._clock)
            if len(self._buckets) >= self._maxKeys:
                self._buckets.popitem(last=False)
        self._buckets[key] = bucket
        return bucket.take()
