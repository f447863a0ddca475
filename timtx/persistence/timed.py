# -*- test-case-name: timtx.test.test_metrics -*-
"""
A store that reports how long each operation took, for any backend.

L{TimedStore} wraps an L{IMessageStore}: every operation is passed on
unchanged, and when its L{Deferred} fires the wrapper reports the
operation's name, the seconds from call to result, and its outcome to an
observer.  That is the latency a service sees (queueing, the round trip,
the commit), measured once for every plugin instead of inside each.

Anything the wrapped store has besides the interface (its status, a
plugin's own attributes) is reached through the wrapper unchanged.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.interface import Method

from timtx.persistence.errors import DuplicateConflict, SequenceConflict, StoreUnavailable
from timtx.persistence.interfaces import IMessageStore

#: C{observe(operation, seconds, outcome)}; the outcome is C{"ok"},
#: C{"unavailable"} (L{StoreUnavailable}: the database could not be
#: reached), C{"conflict"} (a fence answered: a resend already stored, a
#: seq another writer took) or C{"error"}.
StoreObserver = Callable[[str, float, str], None]

#: Lifecycle calls, not timed.
_UNTIMED = frozenset({"open", "close"})


def _outcome(result: object) -> str:
    if not isinstance(result, Failure):
        return "ok"
    if isinstance(result.value, StoreUnavailable):
        return "unavailable"
    if isinstance(result.value, (DuplicateConflict, SequenceConflict)):
        # The store did its job: a fence refused a write that the caller
        # answers or numbers again.  Counted apart, so that an alert on
        # errors does not fire on every resend.
        return "conflict"
    return "error"


def _timedMethod(name: str) -> Callable[..., Deferred[Any]]:
    def timed(self: TimedStore, *args: Any, **kwargs: Any) -> Deferred[Any]:
        start = perf_counter()
        d: Deferred[Any] = getattr(self.wrapped, name)(*args, **kwargs)
        d.addBoth(self._finished, name, start)
        return d

    timed.__name__ = name
    timed.__doc__ = f"L{{IMessageStore.{name}}}, timed."
    return timed


@implementer(IMessageStore)
class TimedStore:
    """
    L{IMessageStore} of C{wrapped}, each operation timed.

    @ivar wrapped: the store doing the work.
    """

    def __init__(self, wrapped: IMessageStore, observe: StoreObserver):
        self.wrapped = wrapped
        self._observe = observe

    def __getattr__(self, name: str) -> Any:
        # Only reached for what the class does not define: the plugin's name
        # and anything of its own.
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"<TimedStore of {self.wrapped!r}>"

    def open(self) -> Deferred[None]:
        return self.wrapped.open()

    def close(self) -> Deferred[None]:
        return self.wrapped.close()

    def _finished(self, result: object, name: str, start: float) -> object:
        try:
            self._observe(name, perf_counter() - start, _outcome(result))
        except Exception:  # pragma: no cover: an observer bug must not lose a result
            pass
        return result


for _name in IMessageStore.names():
    if _name not in _UNTIMED and isinstance(IMessageStore[_name], Method):
        setattr(TimedStore, _name, _timedMethod(_name))
del _name
