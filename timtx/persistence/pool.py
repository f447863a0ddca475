# -*- test-case-name: timtx.test.test_pool -*-
"""
A pool of connections to a database server that keeps the store's promise
of order, commits writes in groups, and fails fast while the server is gone.

The promise (L{timtx.persistence.interfaces}): results are delivered in the
order the calls were made, so a read issued after a write sees it.  A pool
of connections running calls side by side would break it; this one keeps it
with three rules:

  1. I{Writes are serial.}  Queued writes run as one transaction (group
     commit) on one connection; the next batch starts after the previous
     one committed.  Two writes therefore commit in call order.
  2. I{A read waits for the writes issued before it.}  A read starts, on any
     idle connection, only once every write with an earlier ticket has
     committed (or failed), so it sees them; reads run side by side, and
     alongside the next write batch.  A read may also see a write issued
     after it (it started while that write's batch committed): callers may
     rely on seeing earlier writes, never on missing later ones.
  3. I{Results are released in call order.}  Each call gets a ticket; a
     result that is ready waits until every earlier call's result has been
     released.

With C{size} 1, reads and writes share the one connection and the store
behaves like the SQLite worker.  With more, one connection is kept for
writes whenever writes are waiting, and reads use the others.

Failures.  A batch in which one call fails is rolled back and run again by
the link with a savepoint around each call, so the failing call is undone
alone (L{Link.runBatch}).  A deadlock or serialization failure
(L{Transient}) rolls the whole batch back: it is run again, up to
C{retries} times, since nothing of it was committed.  A lost connection
(L{LinkLost}) is more careful:

  - lost before the batch's commit was sent: nothing was committed; the
    batch runs again once, on a new connection;
  - lost after the commit was sent: the outcome is unknown.  Calls marked
    idempotent (a value set, a row upserted) run again; the others fail
    with L{StoreOutcomeUnknown}, since running them twice could store a
    message twice;
  - a read lost with its connection runs again once.

A lost connection usually means the server went away, so every idle
connection is closed with it and the pool reconnects at once.  If that
fails and no connection is left, the store is I{down}: queued and new calls
fail at once with L{StoreUnavailable} instead of waiting, and the pool keeps
reconnecting in the background with exponential backoff (and jitter, so
that many nodes do not reconnect in step).  The first connection that
succeeds makes the store available again.
"""

from __future__ import annotations

import random as _random
from collections import deque
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.persistence.errors import StoreOutcomeUnknown, StoreUnavailable


class LinkLost(Exception):
    """
    A link's connection is gone.

    @ivar committing: whether the commit had been sent: the batch's outcome
        is then unknown.
    """

    def __init__(self, reason: str, committing: bool = False):
        super().__init__(reason)
        self.committing = committing


class Transient(Exception):
    """
    The database rolled the transaction back (deadlock, serialization
    failure); nothing of it was committed, and running it again may succeed.
    """


class Link(Protocol):
    """
    One connection, used by one call or batch at a time.
    """

    def runRead(self, op: Any) -> Deferred[Any]:
        """
        Run one read outside any batch.

        @return: its value; a L{LinkLost} or L{Transient} failure, or the
            call's own error.
        """

    def runBatch(self, ops: list[Any]) -> Deferred[list[tuple[bool, Any]]]:
        """
        Run C{ops} in one transaction, each undone alone if it fails.

        @return: per op, C{(True, value)} or C{(False, failure)}; or a
            L{LinkLost} or L{Transient} failure for the whole batch.
        """

    def close(self) -> Deferred[None] | None:
        """
        Close the connection.
        """


class _Call:
    __slots__ = ("ticket", "write", "idempotent", "op", "deferred", "done", "ok", "value", "lost", "transient")

    def __init__(self, ticket: int, write: bool, idempotent: bool, op: Any):
        self.ticket = ticket
        self.write = write
        self.idempotent = idempotent
        self.op = op
        self.deferred: Deferred[Any] = Deferred()
        self.done = False
        self.ok = False
        self.value: Any = None
        #: Attempts lost with their connection, and transient failures.
        self.lost = 0
        self.transient = 0


class InOrder:
    """
    Results released in the order calls were made: a call's result waits
    until every earlier call's has been released.  Calls are anything with
    C{deferred}, C{done}, C{ok} and C{value}.

    @param drained: called whenever the last pending call is released.
    """

    def __init__(self, drained: Callable[[], None]):
        self._calls: deque[Any] = deque()
        self._releasing = False
        self._drained = drained

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, call: Any) -> None:
        self._calls.append(call)

    def finish(self, call: Any, ok: bool, value: Any) -> None:
        call.done = True
        call.ok = ok
        call.value = value
        if self._releasing:
            return
        self._releasing = True
        try:
            calls = self._calls
            while calls and calls[0].done:
                head = calls.popleft()
                if head.ok:
                    head.deferred.callback(head.value)
                else:
                    head.deferred.errback(head.value)
        finally:
            self._releasing = False
        if not self._calls:
            self._drained()


class OrderedPool:
    """
    Connections to one database server, shared by one store.

    @param connect: makes a new L{Link}; fails with L{StoreUnavailable}
        saying why.  Links report a connection lost while idle by calling
        L{linkLost}.
    @param describe: names the server in errors, such as
        C{"PostgreSQL at 127.0.0.1:5432/timtx"}.
    @param random: returns a float in [0, 1) for the backoff's jitter.
    """

    log = Logger()

    def __init__(
        self,
        connect: Callable[[], Deferred[Any]],
        clock: IReactorTime,
        *,
        size: int,
        batchMax: int,
        backoffInitial: float,
        backoffMax: float,
        describe: str,
        retries: int = 3,
        random: Callable[[], float] = _random.random,
    ):
        self._connect = connect
        self._clock = clock
        self.size = size
        self._batchMax = batchMax
        self._backoffInitial = backoffInitial
        self._backoffMax = backoffMax
        self.describe = describe
        self._retries = retries
        self._random = random
        self._links: set[Any] = set()
        self._idle: list[Any] = []
        self._connecting: set[Deferred[Any]] = set()
        self._retryCall: IDelayedCall | None = None
        self._delay = 0.0
        #: Every call not yet released, in ticket order.
        self._calls = InOrder(self._maybeClosed)
        self._reads: deque[_Call] = deque()
        self._writes: deque[_Call] = deque()
        self._batch: list[_Call] | None = None
        self._ticket = 0
        self._started = False
        self._closing = False
        self._closed: Deferred[None] | None = None
        self._shutDown = False
        self._pumping = False
        self._pumpAgain = False
        #: Why the last connection attempt failed, for errors while down.
        self._why = "not connected yet"
        #: Whether calls fail at once: no connection and the last attempt failed.
        self.down = False
        #: Times the store went down or could not tell whether a write was
        #: committed: after either, something may be stored that nobody was
        #: told about (see L{timtx.delivery.inbox.InboxDelivery.recheckLive}).
        self.incidents = 0
        #: Batches committed, for tests and monitoring.
        self.batches = 0

    # Starting and stopping.

    def start(self, link: Any) -> None:
        """
        Start with a first connected C{link} and connect the others.
        """
        self._started = True
        self._addLink(link)
        self._refill()

    def close(self) -> Deferred[None]:
        """
        Run what is queued, then close every connection and stop
        reconnecting.  Calls made from now on fail with
        L{StoreUnavailable}.
        """
        if self._closed is None:
            self._closing = True
            self._closed = Deferred()
            if not self._started:
                self._failQueued(StoreUnavailable(f"{self.describe}: store closed"))
            self._maybeClosed()
        return self._closed

    def _maybeClosed(self) -> None:
        if not self._closing or self._calls or self._closed is None or self._shutDown:
            return
        self._shutDown = True
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
        self._retryCall = None
        links, self._links, self._idle = list(self._links), set(), []
        waits = [maybeDeferred(link.close) for link in links]
        waits.extend(self._connecting)
        closed = self._closed
        DeferredList(waits, consumeErrors=True).addCallback(lambda _: closed.callback(None))

    # Calls.

    def read(self, op: Any) -> Deferred[Any]:
        """
        Run a read: after every earlier write, on any connection.
        """
        return self._submit(False, False, op)

    def write(self, op: Any, idempotent: bool = False) -> Deferred[Any]:
        """
        Run a write in the next batch.

        @param idempotent: running it twice leaves the same state as once,
            so it may run again when its commit's outcome is unknown.
        """
        return self._submit(True, idempotent, op)

    def _submit(self, write: bool, idempotent: bool, op: Any) -> Deferred[Any]:
        self._ticket += 1
        call = _Call(self._ticket, write, idempotent, op)
        self._calls.add(call)
        d = call.deferred
        if self._closing:
            self._finish(call, False, Failure(StoreUnavailable(f"{self.describe}: store closed")))
        elif self.down:
            self._finish(call, False, Failure(self._unavailable()))
        else:
            (self._writes if write else self._reads).append(call)
            self._pump()
        return d

    def _unavailable(self) -> StoreUnavailable:
        return StoreUnavailable(f"{self.describe} is unavailable: {self._why}")

    def _firstPendingWrite(self) -> int:
        if self._batch:
            return self._batch[0].ticket
        if self._writes:
            return self._writes[0].ticket
        return self._ticket + 1

    def _pump(self) -> None:
        if self._pumping:
            self._pumpAgain = True
            return
        self._pumping = True
        try:
            self._pumpAgain = True
            while self._pumpAgain:
                self._pumpAgain = False
                self._schedule()
        finally:
            self._pumping = False

    def _schedule(self) -> None:
        while self._idle:
            writesWaiting = self._batch is None and bool(self._writes)
            if (
                self._reads
                and self._reads[0].ticket < self._firstPendingWrite()
                and (self.size == 1 or len(self._idle) > 1 or not writesWaiting)
            ):
                self._startRead(self._reads.popleft(), self._idle.pop())
            elif writesWaiting:
                count = min(len(self._writes), self._batchMax)
                self._startBatch([self._writes.popleft() for _ in range(count)], self._idle.pop())
            else:
                return

    def _startRead(self, call: _Call, link: Any) -> None:
        d = maybeDeferred(link.runRead, call.op)
        d.addCallbacks(self._readDone, self._readFailed, callbackArgs=(call, link), errbackArgs=(call, link))

    def _readDone(self, value: Any, call: _Call, link: Any) -> None:
        self._release(link)
        self._finish(call, True, value)
        self._pump()

    def _readFailed(self, failure: Failure, call: _Call, link: Any) -> None:
        if failure.check(LinkLost):
            self._lost(link, failure)
            call.lost += 1
            retry = call.lost <= 1
        else:
            self._release(link)
            retry = False
            if failure.check(Transient):
                call.transient += 1
                retry = call.transient <= self._retries
        if retry and not self.down:
            # It ran once, so every write it waits for is done: it can go
            # first.
            self._reads.appendleft(call)
        else:
            self._finish(call, False, self._failureFor(call, failure))
        self._pump()

    def _startBatch(self, batch: list[_Call], link: Any) -> None:
        self._batch = batch
        d = maybeDeferred(link.runBatch, [call.op for call in batch])
        d.addCallbacks(self._batchDone, self._batchFailed, callbackArgs=(batch, link), errbackArgs=(batch, link))

    def _batchDone(self, outcomes: list[tuple[bool, Any]], batch: list[_Call], link: Any) -> None:
        self._batch = None
        self.batches += 1
        self._release(link)
        for call, (ok, value) in zip(batch, outcomes, strict=True):
            self._finish(call, ok, value)
        self._pump()

    def _batchFailed(self, failure: Failure, batch: list[_Call], link: Any) -> None:
        self._batch = None
        again: list[_Call] = []
        if failure.check(LinkLost):
            self._lost(link, failure)
            lost: LinkLost = failure.value  # type: ignore[assignment]
            committing = lost.committing
            for call in batch:
                call.lost += 1
                if call.lost <= 1 and (call.idempotent or not committing):
                    again.append(call)
                else:
                    if committing:
                        self.incidents += 1
                    error = StoreOutcomeUnknown(f"{self.describe}: connection lost while committing: {failure.value}")
                    self._finish(call, False, Failure(error) if committing else self._failureFor(call, failure))
        elif failure.check(Transient):
            self._release(link)
            for call in batch:
                call.transient += 1
                if call.transient <= self._retries:
                    again.append(call)
                else:
                    self._finish(call, False, failure)
        else:
            # A bug in the link: its connection's state is unknown.
            self.log.failure("batch failed on {db}", failure, db=self.describe)
            self._lost(link, failure)
            for call in batch:
                self._finish(call, False, failure)
        if self.down:
            for call in again:
                self._finish(call, False, Failure(self._unavailable()))
        else:
            self._writes.extendleft(reversed(again))
        self._pump()

    def _failureFor(self, call: _Call, failure: Failure) -> Failure:
        if failure.check(LinkLost):
            return Failure(StoreUnavailable(f"{self.describe}: connection lost: {failure.value}"))
        return failure

    def _finish(self, call: _Call, ok: bool, value: Any) -> None:
        call.op = None
        self._calls.finish(call, ok, value)

    def _failQueued(self, error: Exception) -> None:
        queued = list(self._reads) + list(self._writes)
        self._reads.clear()
        self._writes.clear()
        for call in sorted(queued, key=lambda c: c.ticket):
            self._finish(call, False, Failure(error))

    # Connections.

    def _addLink(self, link: Any) -> None:
        if self._closing:
            maybeDeferred(link.close)
            return
        self._links.add(link)
        self._idle.append(link)
        if self.down:
            self.log.info("{db} is available again", db=self.describe)
        self.down = False
        self._delay = 0.0

    def _release(self, link: Any) -> None:
        if link in self._links:
            self._idle.append(link)

    def linkLost(self, link: Any, reason: str = "connection lost") -> None:
        """
        A link's connection went away while it was idle.
        """
        if link in self._links:
            self._lost(link, Failure(LinkLost(reason)))
            self._pump()

    def _lost(self, link: Any, failure: Failure) -> None:
        """
        Drop C{link} and every idle link with it (they most likely lost
        their server too), and reconnect.
        """
        if link not in self._links:
            return
        self.log.warn("lost a connection to {db}: {why}", db=self.describe, why=failure.getErrorMessage())
        dropped = [link, *self._idle]
        self._idle = []
        for each in dropped:
            self._links.discard(each)
            maybeDeferred(each.close).addErrback(lambda _: None)
        if not self._links and self._retryCall is not None and self._retryCall.active():
            # News that outdates the backoff of an earlier failed attempt.
            self._retryCall.cancel()
            self._retryCall = None
        self._refill()

    def _refill(self) -> None:
        if self._closing or (self._retryCall is not None and self._retryCall.active()):
            return
        # While no connection works, try one at a time.
        wanted = self.size if self._links else 1
        while len(self._links) + len(self._connecting) < wanted:
            d = maybeDeferred(self._connect)
            self._connecting.add(d)
            d.addBoth(self._attempted, d)

    def _attempted(self, result: Any, d: Deferred[Any]) -> None:
        self._connecting.discard(d)
        if isinstance(result, Failure):
            self._why = result.getErrorMessage()
            if not self._links and not self.down and not self._closing:
                self.log.error("{db} is unavailable: {why}", db=self.describe, why=self._why)
                self.down = True
                self.incidents += 1
                self._failQueued(self._unavailable())
            self._scheduleRetry()
            return
        self._addLink(result)
        self._refill()
        self._pump()

    def _scheduleRetry(self) -> None:
        if self._closing or (self._retryCall is not None and self._retryCall.active()):
            return
        self._delay = min(self._backoffMax, self._delay * 2 or self._backoffInitial)
        delay = self._delay * (0.5 + self._random() / 2)
        self._retryCall = self._clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retryCall = None
        self._refill()


def mergedRuns(merges: list[Any]) -> list[tuple[list[int], Any]]:
    """
    How a link may run a batch: C{merges} holds, per op, what it writes if
    it may be merged with others of its kind (anything with a C{combine}
    class method), else C{None}.

    Mergeable kinds must commute with each other and with themselves
    within a batch (appends make new rows, inbox deletions name rows
    committed earlier), so each run of them between two other ops becomes
    one step per kind.  Kinds marked C{ordered} (they make inbox entries,
    whose qids follow the order of the calls) do not commute with each
    other: a run ends where one follows another.  Other ops are steps of
    their own, in order.

    @return: C{(indices of the ops, kind)}, in the order to run them; the
        kind is C{None} for a step of one op to run as is.
    """
    steps: list[tuple[list[int], Any]] = []
    run: dict[Any, list[int]] = {}

    def flush() -> None:
        for kind, indices in run.items():
            steps.append((indices, kind if len(indices) > 1 else None))
        run.clear()

    for index, merge in enumerate(merges):
        if merge is None:
            flush()
            steps.append(([index], None))
            continue
        kind = type(merge)
        if getattr(kind, "ordered", False) and any(getattr(k, "ordered", False) and k is not kind for k in run):
            # Two kinds that both make inbox entries: a user's entries keep
            # the order of the calls, so one may not overtake the other.
            flush()
        run.setdefault(kind, []).append(index)
    flush()
    return steps


class PooledStore:
    """
    What the server stores share: an L{OrderedPool} of connections made by
    C{self._connect}, closed with the store.
    """

    def _makePool(
        self,
        clock: IReactorTime,
        describe: str,
        *,
        poolSize: int,
        batchMax: int,
        reconnectInitial: float,
        reconnectMax: float,
        random: Callable[[], float],
    ) -> None:
        self.describe = describe
        self._pool = OrderedPool(
            self._connect,
            clock,
            size=poolSize,
            batchMax=batchMax,
            backoffInitial=reconnectInitial,
            backoffMax=reconnectMax,
            describe=describe,
            random=random,
        )

    def _connect(self) -> Deferred[Any]:
        raise NotImplementedError()

    @property
    def available(self) -> bool:
        """
        Whether calls may succeed: C{False} while the server cannot be
        reached and calls fail at once.
        """
        return not self._pool.down

    @property
    def incidents(self) -> int:
        """
        See L{OrderedPool.incidents}.
        """
        return self._pool.incidents

    @property
    def pool(self) -> OrderedPool:
        """
        The connections, for tests and monitoring.
        """
        return self._pool

    def close(self) -> Deferred[None]:
        return self._pool.close()
