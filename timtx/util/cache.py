# -*- test-case-name: timtx.test.test_cache -*-
"""
An LRU of values read from the store on first use.

Several parts of the engine keep per-user or per-group state in memory so
that the hot paths (a message, a presence, a fan-out) never wait on the
store: relations, group members, duplicate keys, read cursors.  They share
this cache: a value is read once, concurrent first uses wait for the same
read, and the least recently used values are dropped past C{maxSize}.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LoadingCache(Generic[K, V]):
    """
    @param load: C{load(key)} reads a value from the store, as a L{Deferred}.
    @param maxSize: values kept at most.
    @param onEvict: called with a key and value dropped for room, or
        C{None}; return true to keep it after all (it still has unsaved
        changes, say).
    """

    def __init__(
        self,
        load: Callable[[K], Deferred[V]],
        maxSize: int,
        onEvict: Callable[[K, V], bool] | None = None,
    ):
        self._load = load
        self.maxSize = maxSize
        self._onEvict = onEvict
        self._values: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, list[Deferred[V]]] = {}
        #: Keys whose read under way started before an L{invalidate}.
        self._stale: set[K] = set()

    def __contains__(self, key: K) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: K) -> Deferred[V]:
        """
        The value of C{key}: at once if cached, else after one read shared
        by everyone who asks meanwhile.
        """
        value = self.peek(key)
        if value is not None:
            return succeed(value)
        d: Deferred[V] = Deferred()
        waiters = self._loading.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        self._loading[key] = [d]
        self._load(key).addCallbacks(self._loaded, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return d

    def peek(self, key: K) -> V | None:
        """
        The cached value of C{key}, or C{None}; counts as a use.
        """
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        self._trim()

    def items(self) -> list[tuple[K, V]]:
        """
        The cached keys and values, least recently used first (a copy; no
        use is counted).
        """
        return list(self._values.items())

    def pop(self, key: K) -> V | None:
        return self._values.pop(key, None)

    def clear(self) -> None:
        """
        Forget every value, as L{invalidate} does each: the next use of
        each key reads it again.
        """
        self._values.clear()
        self._stale.update(self._loading)

    def invalidate(self, key: K) -> None:
        """
        Forget C{key}'s value because the store changed: the next use reads
        it again.  A read already under way may have seen the store before
        the change, so its result goes to those waiting for it but is not
        kept.
        """
        self._values.pop(key, None)
        if key in self._loading:
            self._stale.add(key)

    def _loaded(self, value: V, key: K) -> None:
        # A value put while the read was under way is newer than the read;
        # nothing (None) is not kept, so it is read again next time.
        current = self._values.get(key)
        if current is None:
            current = value
            if value is not None and key not in self._stale:
                self.put(key, value)
        self._stale.discard(key)
        for d in self._loading.pop(key):
            d.callback(current)

    def _failed(self, failure: Failure, key: K) -> None:
        self._stale.discard(key)
        for d in self._loading.pop(key):
            d.errback(failure)

    def _trim(self) -> None:
        kept = 0
        while len(self._values) - kept > self.maxSize:
            key, value = self._values.popitem(last=False)
            if self._onEvict is not None and self._onEvict(key, value):
                self._values[key] = value
                kept += 1
                if kept >= len(self._values):
                    return
