# -*- test-case-name: timtx.test.test_hostedstore -*-
"""
Tests for L{timtx.persistence.hosted}: the SQLite store in a child process
passes the store conformance suite, survives its child being killed, and
its child goes when its parent goes.
"""

import os
import pickle
import signal
import sqlite3
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.persistence.errors import (
    DuplicateConflict,
    SchemaTooNew,
    SequenceConflict,
    StoreOutcomeUnknown,
    StoreUnavailable,
)
from timtx.persistence.hosted import HostedStore, childEnvironment
from timtx.persistence.records import Account, Duplicate, NewMessage
from timtx.persistence.sqlite import SQLiteStore, transactionSteps
from timtx.persistence.sqlitehost import inlineStore
from timtx.persistence.storehost import OPENED, FrameReader, StoreHost, packFrame
from timtx.persistence.worker import InlineWorker, WorkerStopped
from timtx.test.base import waitUntil
from timtx.test.test_store import MessageStoreTestsMixin, newerDatabase


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


class HostedStoreTests(MessageStoreTestsMixin, TestCase):
    """
    The conformance suite, and what a child process adds to it.
    """

    def makeStore(self, **kwargs):
        self.path = os.path.join(self.mktemp(), "sub", "tim.db")
        store = HostedStore(reactor, self.path, "full", **kwargs)
        return store.open().addCallback(lambda _: store)

    @inlineCallbacks
    def test_sameFileAsInProcess(self):
        """
        The child writes the ordinary SQLite file: the in-process store
        reads what it wrote, and it reads what the in-process store wrote.
        """
        store = yield self.makeStore()
        yield store.createAccount(Account("u", "d", "h", 1.0))
        yield store.close()
        inProcess = SQLiteStore(reactor, self.path)
        yield inProcess.open()
        self.assertEqual((yield inProcess.getAccount("u")), Account("u", "d", "h", 1.0))
        yield inProcess.createAccount(Account("v", "d", "h", 2.0))
        yield inProcess.close()
        again = HostedStore(reactor, self.path)
        yield again.open()
        self.addCleanup(again.close)
        self.assertEqual((yield again.getAccount("v")), Account("v", "d", "h", 2.0))

    @inlineCallbacks
    def test_refusesNewerSchema(self):
        """
        A database written by a newer timtx: opening fails with the
        child's reason, and no child is left.
        """
        path = newerDatabase(self.mktemp())
        store = HostedStore(reactor, path)
        yield self.assertFailure(store.open(), SchemaTooNew)
        yield store.close()
        self.assertIsNone(store.pid)
        self.assertFalse(store.available)

    @inlineCallbacks
    def test_conflictsCross(self):
        """
        The fences' errors reach the caller as themselves, fields and all.
        """
        store = yield self.store()
        yield store.appendMessages([NewMessage("c", 1, 1, "a", b"x", 0.0, dedupe=("a", 5))])
        taken = yield self.assertFailure(
            store.appendMessages([NewMessage("c", 1, 2, "a", b"y", 0.0)]), SequenceConflict
        )
        self.assertEqual((taken.conv, taken.seq), ("c", 1))
        resent = NewMessage("c", 2, 3, "a", b"x", 0.0, dedupe=("a", 5))
        held = yield self.assertFailure(store.appendMessages([resent]), DuplicateConflict)
        self.assertEqual(held.held, {0: Duplicate("c", 1, 1, 0.0)})

    @inlineCallbacks
    def test_closeAnswersQueued(self):
        """
        Closing right after many writes: every one is answered and stored,
        and the child is gone.
        """
        store = yield self.makeStore()
        pid = store.pid
        writes = [store.createAccount(Account(f"u{i}", "", "h", 0.0)) for i in range(300)]
        yield store.close()
        self.assertEqual((yield gatherResults(writes)), [True] * 300)
        self.assertFalse(_alive(pid))
        yield self.assertFailure(store.getAccount("u1"), StoreUnavailable)
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("SELECT COUNT(*) FROM accounts").fetchone()[0], 300)

    @inlineCallbacks
    def test_childKilled(self):
        """
        A child killed -9: the calls it had not answered fail as of unknown
        outcome, the store is unavailable and refuses calls until a new
        child has the database open, then everything committed is there.
        """
        store = yield self.makeStore(restartInitial=0.05)
        self.addCleanup(store.close)
        yield store.createAccount(Account("before", "", "h", 0.0))
        first = store.pid
        unanswered = store.createAccount(Account("lost?", "", "h", 0.0))
        os.kill(first, signal.SIGKILL)
        yield self.assertFailure(unanswered, StoreOutcomeUnknown)
        self.assertFalse(store.available)
        yield self.assertFailure(store.getAccount("before"), StoreUnavailable)
        yield waitUntil(lambda: store.available, 20)
        self.assertNotEqual(store.pid, first)
        self.assertEqual(store.restarts, 1)
        self.assertEqual((yield store.getAccount("before")), Account("before", "", "h", 0.0))
        self.assertIs((yield store.createAccount(Account("after", "", "h", 0.0))), True)

    @inlineCallbacks
    def test_childStderrLogged(self):
        """
        What the child writes on stderr reaches the node's log, line by
        line; a child that dies before it opens the database has its last
        line in the error the node stops with.
        """
        said = []

        def observer(event):
            if event.get("log_format", "").startswith("SQLite store process {pid}:"):
                said.append(event["line"])

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        store = HostedStore(reactor, os.path.join(self.mktemp(), "tim.db"), "full", batchMax="many")
        failure = yield self.assertFailure(store.open(), StoreUnavailable)
        last = "ValueError: invalid literal for int() with base 10: 'many'"
        self.assertIn(f"its last words: {last}", str(failure))
        self.assertEqual(said[0], "Traceback (most recent call last):")
        self.assertEqual(said[-1], last)

    @inlineCallbacks
    def test_childOutlivesNoParent(self):
        """
        A node killed -9 leaves no store process behind: the child sees its
        stdin end, commits what it was given and exits.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        script = (
            "import os, sys\n"
            "from twisted.internet import reactor\n"
            "from timtx.persistence.hosted import HostedStore\n"
            "store = HostedStore(reactor, sys.argv[1])\n"
            "def opened(_):\n"
            "    print(store.pid, flush=True)\n"
            "    os.kill(os.getpid(), 9)\n"
            "store.open().addCallback(opened)\n"
            "reactor.run()\n"
        )
        # Killed by a signal, the parent's output comes as a failure.
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-c", script, os.path.join(directory, "tim.db")], env=childEnvironment()
        ).addErrback(lambda f: f.value)
        self.assertEqual(code, signal.SIGKILL, err)
        pid = int(out.split()[0])
        yield waitUntil(lambda: not _alive(pid), 10)


class _Raw(ProcessProtocol):
    """
    The child process of a store, spoken to directly.
    """

    def __init__(self):
        self.reader = FrameReader()
        self.answers = []
        self.waiting = []
        self.ended = Deferred()

    def outReceived(self, data):
        self.answers.extend(self.reader.feed(data))
        waiting, self.waiting = self.waiting, []
        for count, d in waiting:
            self.when(count, d)

    def when(self, count, d=None):
        d = d or Deferred()
        if len(self.answers) >= count:
            d.callback(self.answers[:count])
        else:
            self.waiting.append((count, d))
        return d

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class StoreHostProcessTests(TestCase):
    """
    C{python -m timtx.persistence.sqlitehost} as a parent sees it.
    """

    def spawn(self):
        path = os.path.join(self.mktemp(), "tim.db")
        child = _Raw()
        argv = [sys.executable, "-m", "timtx.persistence.sqlitehost", path, "full", "256"]
        transport = reactor.spawnProcess(
            child, sys.executable, argv, env=childEnvironment(), childFDs={0: "w", 1: "r", 2: 2}
        )
        self.addCleanup(
            lambda: child.ended if transport.pid is None else (transport.signalProcess("KILL"), child.ended)[1]
        )
        return child, transport

    @inlineCallbacks
    def test_endsWhenStdinCloses(self):
        """
        The child ignores SIGTERM and SIGINT, answers what it was sent, and
        exits with 0 once its stdin is closed.
        """
        child, transport = self.spawn()
        (opened,) = yield child.when(1)
        self.assertEqual(opened, (OPENED, True, None))
        transport.signalProcess("TERM")
        transport.signalProcess("INT")
        transport.write(packFrame((1, "createAccount", (Account("u", "", "h", 0.0),))))
        transport.write(packFrame((2, "getAccount", ("u",))))
        transport.write(packFrame((3, "nosuch", ())))
        transport.write(packFrame((4, "close", ())))
        transport.closeStdin()
        self.assertEqual((yield child.ended), 0)
        # Answered by id: a call refused at once is answered first.
        answers = sorted(child.answers[1:], key=lambda answer: answer[0])
        self.assertEqual(answers[:2], [(1, True, True), (2, True, Account("u", "", "h", 0.0))])
        self.assertEqual([(callId, ok) for callId, ok, _ in answers[2:]], [(3, False), (4, False)])
        self.assertIsInstance(answers[2][2], AttributeError)


class _Pipe:
    """
    The two ends a L{StoreHost} reads and writes, in memory: C{chunks} are
    what each read returns.
    """

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.written = b""
        #: For each write, how many chunks were still unread.
        self.unread = []

    def read(self, n):
        while self.chunks and self.chunks[0] is None:
            self.chunks.pop(0)
        return self.chunks.pop(0) if self.chunks else b""

    def ready(self):
        # None in the chunks: a wait, the sender being slow.
        return bool(self.chunks) and self.chunks[0] is not None

    def write(self, data):
        self.written += data
        self.unread.append(len(self.chunks))


class StoreHostTests(TestCase):
    """
    L{StoreHost}'s loop, without a process.
    """

    def serve(self, chunks, batchMax=256, path=None):
        if path is None:
            path = os.path.join(self.mktemp(), "tim.db")
            os.makedirs(os.path.dirname(path))
        store, worker = inlineStore(path, "full", batchMax)
        self.pipe = _Pipe(chunks)
        StoreHost(store, worker, self.pipe.read, self.pipe.ready, self.pipe.write).serve()
        return list(FrameReader().feed(self.pipe.written)), worker

    def test_batchPerRead(self):
        """
        The calls of one read, however split into chunks, are one
        transaction; each read after a wait is another.
        """
        calls = b"".join(packFrame((i, "createAccount", (Account(f"u{i}", "", "h", 0.0),))) for i in range(1, 21))
        first = [calls[i : i + 7] for i in range(0, len(calls), 7)]
        answers, worker = self.serve([*first, None, packFrame((21, "countInbox", ("u1",)))])
        self.assertEqual(answers[0], (OPENED, True, None))
        self.assertEqual(answers[1:], [(i, True, True) for i in range(1, 21)] + [(21, True, 0)])
        self.assertEqual(worker.batches, 2)

    def test_neverEndingWriter(self):
        """
        Calls that keep arriving are taken a batch's worth at a time: a
        parent that never stops writing still gets answers.
        """
        calls = [packFrame((i, "countInbox", ("u",))) for i in range(1, 11)]
        answers, worker = self.serve(calls, batchMax=4)
        self.assertEqual(answers[1:], [(i, True, 0) for i in range(1, 11)])
        # Opened; 4 answered with 6 unread; 4 more with 2 unread; the rest.
        self.assertEqual(self.pipe.unread, [10, 6, 2, 0])

    def test_failedOpen(self):
        """
        A database that cannot be opened: one answer saying why, nothing
        read.
        """
        answers, _ = self.serve([packFrame((1, "countInbox", ("u",)))], path=newerDatabase(self.mktemp()))
        ((callId, ok, error),) = answers
        self.assertEqual((callId, ok, type(error)), (OPENED, False, SchemaTooNew))
        self.assertEqual(len(self.pipe.chunks), 1)


class FramingTests(SynchronousTestCase):
    def test_anySplit(self):
        """
        Frames cut anywhere come out whole and in order.
        """
        values = [(1, "a", (b"x" * 300,)), (2, True, None), {"k": [1, 2]}]
        stream = b"".join(packFrame(v) for v in values)
        for size in (1, 3, 4, 5, 64, len(stream)):
            reader = FrameReader()
            out = []
            for start in range(0, len(stream), size):
                out.extend(reader.feed(stream[start : start + size]))
            self.assertEqual(out, values)

    def test_errorsPickle(self):
        """
        The store errors callers tell apart cross a pipe as themselves.
        """
        conflict = pickle.loads(pickle.dumps(SequenceConflict("c", 7)))
        self.assertEqual(
            (type(conflict), conflict.conv, conflict.seq, str(conflict)),
            (SequenceConflict, "c", 7, "seq 7 of c is already stored"),
        )
        held = {2: Duplicate("c", 1, 9, 0.5)}
        duplicate = pickle.loads(pickle.dumps(DuplicateConflict(held)))
        self.assertEqual((type(duplicate), duplicate.held), (DuplicateConflict, held))


class InlineWorkerTests(TestCase):
    """
    L{InlineWorker}: the transaction rules of L{SerialWorker}, run when
    flushed.
    """

    def makeWorker(self, batchMax=256):
        path = os.path.join(self.mktemp(), "w.db")
        os.makedirs(os.path.dirname(path))

        def connect():
            c = sqlite3.connect(path, isolation_level=None)
            c.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            return c

        worker = InlineWorker(None, connect, **transactionSteps("BEGIN"), batchMax=batchMax)
        self.successResultOf(worker.start())
        return worker

    def test_flushRunsInBatches(self):
        """
        Nothing runs until flushed; then at most C{batchMax} calls go to
        a transaction, and a failing call is undone alone.
        """
        worker = self.makeWorker(batchMax=2)
        ok1 = worker.submit(lambda c: c.execute("INSERT INTO t VALUES (1)").rowcount)
        bad = worker.submit(lambda c: c.execute("INSERT INTO t VALUES (1)"))
        ok2 = worker.submit(lambda c: c.execute("INSERT INTO t VALUES (2)").rowcount)
        self.assertNoResult(ok1)
        self.assertEqual(worker.pending, 3)
        worker.flush()
        self.assertEqual((self.successResultOf(ok1), self.successResultOf(ok2)), (1, 1))
        self.failureResultOf(bad, sqlite3.IntegrityError)
        self.assertEqual(worker.batches, 2)

    def test_stopRunsQueued(self):
        """
        Stopping runs what was queued; later calls fail.
        """
        worker = self.makeWorker()
        results = [worker.submit(lambda c, i=i: i) for i in range(10)]
        self.successResultOf(worker.stop())
        self.assertEqual([self.successResultOf(r) for r in results], list(range(10)))
        self.failureResultOf(worker.submit(lambda c: None), WorkerStopped)
