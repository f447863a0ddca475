# -*- test-case-name: timtx.test.test_store,timtx.test.test_hostedstore -*-
"""
One database thread with group commit (or none, L{InlineWorker}).

Blocking drivers (C{sqlite3}) must stay off the reactor thread.  A single
thread owns the connection: it takes every queued operation, runs them all in
one transaction, commits once, and hands the results back to the reactor in
submission order.  If an operation fails, the batch is rolled back and run
again with a savepoint around each operation, so that the failing one is
undone alone and the others still commit; savepoints cost time, so they are
only paid for when needed.

Operations that carry a C{merge} (see
L{timtx.persistence.pool.mergedRuns}) run merged with the others of their
kind in the batch; alone, in the isolated retry, each runs as it is.

Why one thread and not a pool: SQLite allows one writer at a time anyway, a
single commit for a burst of writes is what makes durable writes fast, and a
strict order of operations lets callers reason simply ("a read issued after
a write sees it").

L{InlineWorker} follows the same rules without a thread, for a process that
does nothing but serve its store (L{timtx.persistence.sqlitehost}): it runs
what is queued when told to.  L{BatchWorker} holds what both share.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from timtx.persistence.pool import mergedRuns

T = TypeVar("T")

_STOP = object()

#: What a batch's operations came to: C{(deferred, ok, result or Failure)}.
_Results = list[tuple[Deferred[Any], bool, Any]]


class WorkerStopped(Exception):
    """
    The worker was stopped before the operation could run.
    """


class BatchWorker:
    """
    How a batch of C{operation(connection)} calls runs: in one
    transaction, merged where they can be, and again one savepoint each if
    that fails.  The subclasses decide where and when.

    @param connect: makes the connection.
    @param begin: called with the connection before each batch.
    @param commit: called with the connection after each batch; if it
        raises, every operation of the batch fails with that error.
    @param rollback: called when a commit fails.
    @param savepoint: C{(connection, name)} to set a savepoint; the release
        and rollback-to functions follow the same signature.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        connect: Callable[[], Any],
        *,
        begin: Callable[[Any], None],
        commit: Callable[[Any], None],
        rollback: Callable[[Any], None],
        savepoint: Callable[[Any, str], None],
        release: Callable[[Any, str], None],
        rollbackTo: Callable[[Any, str], None],
        close: Callable[[Any], None],
        batchMax: int = 256,
        name: str = "timtx-db",
    ):
        self._reactor = reactor
        self._connect = connect
        self._begin = begin
        self._commit = commit
        self._rollback = rollback
        self._savepoint = savepoint
        self._release = release
        self._rollbackTo = rollbackTo
        self._close = close
        self._batchMax = batchMax
        self._name = name
        self._stopping = False
        #: Batches committed, for tests and monitoring.
        self.batches = 0

    def start(self) -> Deferred[None]:
        """
        Connect.

        @return: a L{Deferred} that fires once connected, or fails with the
            connection error.
        """
        raise NotImplementedError

    def submit(self, operation: Callable[[Any], T]) -> Deferred[T]:
        """
        Queue C{operation(connection)}.

        @return: a L{Deferred} with its result, fired after the batch
            holding it is committed.
        """
        raise NotImplementedError

    def stop(self) -> Deferred[None]:
        """
        Run what is queued, then close the connection.
        """
        raise NotImplementedError

    def _runBatch(self, connection: Any, batch: list[tuple[Callable[[Any], Any], Deferred[Any]]]) -> _Results:
        results: list[tuple[Deferred[Any], bool, Any]] = []
        try:
            self._begin(connection)
            merges = [getattr(operation, "merge", None) for operation, _ in batch]
            if any(merges):
                values: list[Any] = [None] * len(batch)
                for indices, kind in mergedRuns(merges):
                    if kind is None:
                        values[indices[0]] = batch[indices[0]][0](connection)
                    else:
                        combined = kind.combine([merges[i] for i in indices])(connection)
                        for index, value in zip(indices, combined, strict=True):
                            values[index] = value
                results = [(d, True, value) for (_, d), value in zip(batch, values, strict=True)]
            else:
                for operation, d in batch:
                    results.append((d, True, operation(connection)))
            self._commit(connection)
        except BaseException:
            try:
                self._rollback(connection)
            except BaseException:
                pass
            return self._runBatchIsolated(connection, batch)
        self.batches += 1
        return results

    def _runBatchIsolated(self, connection: Any, batch: list[tuple[Callable[[Any], Any], Deferred[Any]]]) -> _Results:
        """
        Run a batch again with a savepoint around each operation.
        """
        results: list[tuple[Deferred[Any], bool, Any]] = []
        try:
            self._begin(connection)
            for index, (operation, d) in enumerate(batch):
                name = f"op{index}"
                self._savepoint(connection, name)
                try:
                    value = operation(connection)
                except BaseException:
                    self._rollbackTo(connection, name)
                    self._release(connection, name)
                    results.append((d, False, Failure()))
                else:
                    self._release(connection, name)
                    results.append((d, True, value))
            self._commit(connection)
        except BaseException:
            failure = Failure()
            try:
                self._rollback(connection)
            except BaseException:
                pass
            results = [(d, False, failure) for _, d in batch]
        self.batches += 1
        return results


class SerialWorker(BatchWorker):
    """
    Runs C{operation(connection)} calls in order on one thread; see
    L{BatchWorker} for the parameters.
    """

    def __init__(self, reactor: IReactorFromThreads, connect: Callable[[], Any], **kwargs: Any):
        super().__init__(reactor, connect, **kwargs)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._started: Deferred[None] = Deferred()
        self._stopped: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        """
        Start the thread and connect.

        @return: a L{Deferred} that fires once connected, or fails with the
            connection error.
        """
        self._thread.start()
        return self._started

    def submit(self, operation: Callable[[Any], T]) -> Deferred[T]:
        """
        Queue C{operation(connection)}.

        @return: a L{Deferred} with its result, fired on the reactor thread
            after the batch holding it is committed.
        """
        d: Deferred[T] = Deferred()
        if self._stopping:
            d.errback(WorkerStopped())
            return d
        self._queue.put((operation, d))
        return d

    def stop(self) -> Deferred[None]:
        """
        Run what is queued, then close the connection and end the thread.
        """
        if not self._stopping:
            self._stopping = True
            self._queue.put(_STOP)
        return self._stopped

    # The worker thread.

    def _run(self) -> None:
        try:
            connection = self._connect()
        except BaseException:
            failure = Failure()
            self._stopping = True
            self._reactor.callFromThread(self._started.errback, failure)
            self._reactor.callFromThread(self._stopped.callback, None)
            return
        self._reactor.callFromThread(self._started.callback, None)
        try:
            while True:
                first = self._queue.get()
                batch = [first]
                while first is not _STOP and len(batch) < self._batchMax:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(item)
                    if item is _STOP:
                        break
                work = [item for item in batch if item is not _STOP]
                if work:
                    self._reactor.callFromThread(_deliver, self._runBatch(connection, work))
                if len(work) != len(batch):
                    break
        finally:
            try:
                self._close(connection)
            finally:
                self._reactor.callFromThread(self._stopped.callback, None)


class InlineWorker(BatchWorker):
    """
    Runs queued calls on the calling thread when told to (L{flush}), for a
    process that does nothing but serve its store
    (L{timtx.persistence.storehost}): there a thread would only be a
    second holder of the GIL, and handing results back to a reactor work
    of its own.  Results are delivered before L{flush} returns.
    """

    def __init__(self, reactor: Any, connect: Callable[[], Any], **kwargs: Any):
        super().__init__(reactor, connect, **kwargs)
        self._pending: list[tuple[Callable[[Any], Any], Deferred[Any]]] = []
        self._connection: Any = None

    def start(self) -> Deferred[None]:
        try:
            self._connection = self._connect()
        except BaseException:
            self._stopping = True
            return fail()
        return succeed(None)

    def submit(self, operation: Callable[[Any], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        if self._stopping or self._connection is None:
            d.errback(WorkerStopped())
        else:
            self._pending.append((operation, d))
        return d

    @property
    def pending(self) -> int:
        """
        How many calls are queued.
        """
        return len(self._pending)

    @property
    def batchMax(self) -> int:
        """
        Most calls run in one transaction.
        """
        return self._batchMax

    def flush(self) -> None:
        """
        Run what is queued, at most C{batchMax} calls to a transaction.
        """
        while self._pending:
            batch = self._pending[: self._batchMax]
            del self._pending[: self._batchMax]
            _deliver(self._runBatch(self._connection, batch))

    def stop(self) -> Deferred[None]:
        """
        Run what is queued, then close the connection.
        """
        if not self._stopping:
            self.flush()
            self._stopping = True
            if self._connection is not None:
                self._close(self._connection)
        return succeed(None)


def _deliver(results: _Results) -> None:
    for d, ok, value in results:
        if ok:
            d.callback(value)
        else:
            d.errback(value)
