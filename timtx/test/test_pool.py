# -*- test-case-name: timtx.test.test_pool -*-
"""
Tests for L{timtx.persistence.pool}: the order, batching and fault rules of
the connection pool, on links a test drives by hand and a L{Clock}.
"""

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from timtx.persistence.errors import StoreOutcomeUnknown, StoreUnavailable
from timtx.persistence.pool import LinkLost, OrderedPool, Transient


class FakeLink:
    """
    A link whose reads and batches wait until the test answers them.
    """

    def __init__(self, name):
        self.name = name
        self.running = []
        self.closed = False

    def runRead(self, op):
        d = Deferred()
        self.running.append(("read", op, d))
        return d

    def runBatch(self, ops):
        d = Deferred()
        self.running.append(("batch", list(ops), d))
        return d

    def close(self):
        self.closed = True

    def answer(self, result=None):
        """
        Answer the oldest running call: a read with C{result} (default: its
        op), a batch with C{result} or every op's own name.
        """
        kind, op, d = self.running.pop(0)
        if isinstance(result, Failure):
            d.errback(result)
        elif result is not None:
            d.callback(result)
        elif kind == "read":
            d.callback(op)
        else:
            d.callback([(True, each) for each in op])
        return kind, op


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.attempts = []
        self.links = []

    def connect(self):
        d = Deferred()
        self.attempts.append(d)
        return d

    def pool(self, size=3, batchMax=100, links=None):
        pool = OrderedPool(
            self.connect,
            self.clock,
            size=size,
            batchMax=batchMax,
            backoffInitial=0.5,
            backoffMax=4.0,
            describe="db",
            random=lambda: 1.0,
        )
        pool.start(self.newLink())
        for _ in range((size if links is None else links) - 1):
            self.attempts.pop(0).callback(self.newLink())
        return pool

    def newLink(self):
        link = FakeLink(f"link{len(self.links)}")
        self.links.append(link)
        return link

    def results(self, *ds):
        seen = []
        for i, d in enumerate(ds):
            d.addBoth(lambda r, i=i: seen.append((i, r)) or r)
        return seen

    def busy(self):
        return [(link.name, kind, op) for link in self.links for kind, op, _ in link.running]

    def test_readWaitsForEarlierWrites(self):
        """
        A read starts only once every write issued before it has
        committed; a read issued before them starts at once.
        """
        pool = self.pool()
        early = pool.read("r0")
        w1 = pool.write("w1")
        r2 = pool.read("r2")
        self.assertEqual(sorted(str(op) for _, _, op in self.busy()), ["['w1']", "r0"])
        self._answer("r0")
        self.assertEqual(self.successResultOf(early), "r0")
        self.assertNoResult(r2)
        self._answer(["w1"])
        self.assertEqual(self.successResultOf(w1), "w1")
        self.assertIn("r2", [op for _, _, op in self.busy()])
        self._answer("r2")
        self.assertEqual(self.successResultOf(r2), "r2")

    def _answer(self, op, result=None):
        for link in self.links:
            for index, (_, running, _d) in enumerate(link.running):
                if running == op:
                    link.running.insert(0, link.running.pop(index))
                    link.answer(result)
                    return None
        self.fail(f"{op} is not running: {self.busy()}")

    def test_resultsInCallOrder(self):
        """
        A result that is ready waits for every earlier call's result.
        """
        pool = self.pool()
        r1 = pool.read("r1")
        w2 = pool.write("w2")
        seen = self.results(r1, w2)
        self._answer(["w2"])
        self.assertEqual(seen, [])
        self._answer("r1")
        self.assertEqual(seen, [(0, "r1"), (1, "w2")])

    def test_groupCommit(self):
        """
        Writes queued while a batch runs go together in the next one, at
        most C{batchMax} at a time.
        """
        pool = self.pool(batchMax=3)
        first = pool.write("w0")
        rest = [pool.write(f"w{i}") for i in range(1, 6)]
        self.assertEqual([op for _, _, op in self.busy()], [["w0"]])
        self._answer(["w0"])
        self.successResultOf(first)
        self.assertEqual(self.busy()[0][2], ["w1", "w2", "w3"])
        self._answer(["w1", "w2", "w3"])
        self.assertEqual(self.busy()[0][2], ["w4", "w5"])
        self._answer(["w4", "w5"])
        self.assertEqual([self.successResultOf(d) for d in rest], ["w1", "w2", "w3", "w4", "w5"])
        self.assertEqual(pool.batches, 3)

    def test_readsShareAndWritesKeepALink(self):
        """
        Reads run side by side, but when writes wait, the last idle link
        goes to them.
        """
        pool = self.pool(size=2)
        pool.write("w0")
        reads = [pool.read(f"r{i}") for i in range(1, 4)]
        pool.write("w4")
        self._answer(["w0"])
        running = sorted(str(op) for _, _, op in self.busy())
        self.assertEqual(running, ["['w4']", "r1"])
        self.assertNoResult(reads[1])

    def test_sizeOneSharesTheLink(self):
        """
        With one connection, reads and writes take turns on it, in order.
        """
        pool = self.pool(size=1)
        w0 = pool.write("w0")
        r1 = pool.read("r1")
        w2 = pool.write("w2")
        self._answer(["w0"])
        self.assertEqual(self.busy(), [("link0", "read", "r1")])
        self._answer("r1")
        self._answer(["w2"])
        self.assertEqual([self.successResultOf(d) for d in (w0, r1, w2)], ["w0", "r1", "w2"])

    def test_failingOpAlone(self):
        """
        A batch's per-op failure goes to that call only.
        """
        pool = self.pool()
        pool.write("before")
        ok = pool.write("a")
        bad = pool.write("b")
        self._answer(["before"])
        self._answer(["a", "b"], [(True, 1), (False, Failure(ValueError("no")))])
        self.assertEqual(self.successResultOf(ok), 1)
        self.failureResultOf(bad, ValueError)

    def test_lostBeforeCommit(self):
        """
        A batch lost before its commit was sent runs again on a new
        connection; the idle connections are dropped with the lost one.
        """
        pool = self.pool()
        w = pool.write("w")
        self._answer(["w"], Failure(LinkLost("gone")))
        self.assertTrue(all(link.closed for link in self.links))
        self.assertNoResult(w)
        self.attempts.pop(0).callback(self.newLink())
        self.assertEqual(self.busy(), [("link3", "batch", ["w"])])
        self._answer(["w"])
        self.assertEqual(self.successResultOf(w), "w")

    def test_lostWhileCommitting(self):
        """
        A batch lost after its commit was sent: idempotent calls run again,
        the others fail with L{StoreOutcomeUnknown}.
        """
        pool = self.pool()
        pool.write("before")
        append = pool.write("append")
        upsert = pool.write("upsert", idempotent=True)
        self._answer(["before"])
        self._answer(["append", "upsert"], Failure(LinkLost("gone", committing=True)))
        self.failureResultOf(append, StoreOutcomeUnknown)
        self.attempts.pop(0).callback(self.newLink())
        self._answer(["upsert"])
        self.assertEqual(self.successResultOf(upsert), "upsert")

    def test_lostTwice(self):
        """
        A call is run again once after a lost connection, not forever.
        """
        pool = self.pool()
        w = pool.write("w")
        self._answer(["w"], Failure(LinkLost("gone")))
        self.attempts.pop(0).callback(self.newLink())
        self._answer(["w"], Failure(LinkLost("gone again")))
        failure = self.failureResultOf(w, StoreUnavailable)
        self.assertIn("gone again", str(failure.value))

    def test_readLost(self):
        """
        A read lost with its connection runs again on a new one.
        """
        pool = self.pool()
        r = pool.read("r")
        self._answer("r", Failure(LinkLost("gone")))
        self.attempts.pop(0).callback(self.newLink())
        self._answer("r")
        self.assertEqual(self.successResultOf(r), "r")

    def test_transient(self):
        """
        A batch the server rolled back for a conflict runs again, up to
        C{retries} times.
        """
        pool = self.pool()
        w = pool.write("w")
        for _ in range(3):
            self._answer(["w"], Failure(Transient("deadlock")))
            self.assertNoResult(w)
        self._answer(["w"], Failure(Transient("deadlock")))
        self.failureResultOf(w, Transient)

    def test_downFailsFast(self):
        """
        With no connection left and reconnection failing, queued and new
        calls fail at once with L{StoreUnavailable}; the pool keeps trying
        with growing waits, and works again once a connection succeeds.
        """
        pool = self.pool(size=1)
        running = pool.write("running")
        queued = pool.read("queued")
        self._answer(["running"], Failure(LinkLost("gone")))
        self.assertFalse(pool.down, "one attempt at once before giving up")
        self.attempts.pop(0).errback(StoreUnavailable("connection refused"))
        self.assertTrue(pool.down)
        for d in (running, queued):
            failure = self.failureResultOf(d, StoreUnavailable)
            self.assertIn("connection refused", str(failure.value))
        self.failureResultOf(pool.write("new"), StoreUnavailable)
        delays = []
        for _ in range(5):
            before = self.clock.seconds()
            while not self.attempts:
                self.clock.advance(0.25)
            delays.append(self.clock.seconds() - before)
            self.attempts.pop(0).errback(StoreUnavailable("connection refused"))
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 4.0])
        self.clock.advance(4.0)
        self.attempts.pop(0).callback(self.newLink())
        self.assertFalse(pool.down)
        r = pool.read("again")
        self._answer("again")
        self.assertEqual(self.successResultOf(r), "again")

    def test_idleLinkLost(self):
        """
        A connection that goes while idle is replaced.
        """
        pool = self.pool(size=2)
        pool.linkLost(self.links[1], "server closed the connection")
        self.assertEqual(len(self.attempts), 1)
        self.attempts.pop(0).callback(self.newLink())
        self.attempts.pop(0).callback(self.newLink())
        reads = [pool.read(i) for i in range(2)]
        self.assertEqual(sorted(link.name for link in self.links if link.running), ["link2", "link3"])
        for i in range(2):
            self._answer(i)
        self.assertEqual([self.successResultOf(d) for d in reads], [0, 1])

    def test_close(self):
        """
        Closing lets running calls finish, fails new ones, then closes
        every connection.
        """
        pool = self.pool(size=2)
        w = pool.write("w")
        closed = pool.close()
        late = pool.read("late")
        self.assertNoResult(closed)
        self._answer(["w"])
        self.successResultOf(w)
        self.failureResultOf(late, StoreUnavailable)
        self.successResultOf(closed)
        self.assertTrue(all(link.closed for link in self.links))

    def test_callsBeforeStart(self):
        """
        Calls made before the first connection wait for it; if it never
        comes, closing fails them.
        """
        pool = OrderedPool(
            lambda: fail(StoreUnavailable("x")),
            self.clock,
            size=1,
            batchMax=10,
            backoffInitial=1,
            backoffMax=1,
            describe="db",
        )
        early = pool.read("r")
        self.assertNoResult(early)
        self.successResultOf(pool.close())
        self.failureResultOf(early, StoreUnavailable)
