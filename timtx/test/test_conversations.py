"""
Tests for L{timtx.chat.conversations}: gapless numbering, batching, failures.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from timtx.chat.conversations import MID_EPOCH_MS, AlreadyStored, Conversations, MidClock, pairConversation
from timtx.chat.messagerules import MaybeStored
from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import StanzaVault
from timtx.persistence.errors import SequenceConflict, StoreOutcomeUnknown, StoreUnavailable
from timtx.persistence.memory import MemoryStore
from timtx.persistence.records import Duplicate, NewMessage
from timtx.protocols import codec
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage


class ControlledStore(MemoryStore):
    """
    A memory store whose appends wait until the test releases them, and can
    be made to fail.
    """

    def __init__(self):
        super().__init__()
        self.waiting = []
        self.fail = False

    def appendMessages(self, messages):
        d = Deferred()
        self.waiting.append((d, messages))
        return d

    def release(self):
        d, messages = self.waiting.pop(0)
        if self.fail is True:
            d.errback(RuntimeError("disk full"))
        elif self.fail:
            d.errback(self.fail)
        else:
            super().appendMessages(messages).chainDeferred(d)


def message(text):
    return TimMessage(msType=2, odType=1, dataString=text)


class ConversationsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(MID_EPOCH_MS / 1000 + 10)
        self.store = ControlledStore()
        self.conversations = Conversations(store=self.store, vault=StanzaVault(NodeKeys(b"c" * 32)), clock=self.clock)

    def test_batchesWhileWriting(self):
        """
        Appends made while a batch is written go out together in the next
        batch, in order, with consecutive seqs.
        """
        done = [self.conversations.append("c", "a", message(f"m{i}"), ("b",)) for i in range(5)]
        self.assertEqual([len(m) for _, m in self.store.waiting], [1])
        self.store.release()
        self.assertEqual([len(m) for _, m in self.store.waiting], [4])
        self.store.release()
        appended = [self.successResultOf(d) for d in done]
        self.assertEqual([a.message.seq for a in appended], [1, 2, 3, 4, 5])
        mids = [a.message.mid for a in appended]
        self.assertEqual(mids, sorted(set(mids)))
        self.assertLess(mids[-1], 1 << 53)
        self.assertEqual(list(appended[0].qids), ["b"])

    def test_failureLeavesNoGap(self):
        """
        A failed batch uses no numbers: the next message takes the seq the
        failed one would have had.
        """
        first = self.conversations.append("c", "a", message("ok"), ("b",))
        self.store.release()
        self.assertEqual(self.successResultOf(first).message.seq, 1)
        self.store.fail = True
        lost = self.conversations.append("c", "a", message("lost"), ("b",))
        self.store.release()
        error = self.failureResultOf(lost, TimProtocolError).value
        self.assertEqual(error.code, ErrorCode.ERR_DATABASE)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.store.fail = False
        again = self.conversations.append("c", "a", message("again"), ("b",))
        self.store.release()
        self.assertEqual(self.successResultOf(again).message.seq, 2)
        self.assertEqual(self.successResultOf(self.store.lastMessage("c"))[0], 2)

    def test_resumesFromStore(self):
        """
        A new owner continues the numbering found in the store.
        """
        d = self.conversations.append("c", "a", message("one"), ("b",))
        self.store.release()
        self.successResultOf(d)
        other = Conversations(store=self.store, vault=self.conversations.vault, clock=self.clock)
        d = other.append("c", "a", message("two"), ("b",))
        self.store.release()
        self.assertEqual(self.successResultOf(d).message.seq, 2)

    def test_transient(self):
        """
        Messages not kept get a mid but no seq, and do not use up a seq.
        """
        first = self.conversations.append("c", "a", message("custom"), ("b",), keep=False)
        second = self.conversations.append("c", "a", message("kept"), ("b",))
        self.store.release()
        self.store.release()
        self.assertIsNone(self.successResultOf(first).message.seq)
        self.assertEqual(self.successResultOf(second).message.seq, 1)

    def test_compactIsWhatWasSealed(self):
        """
        L{Appended.compact} is the message as stored, in Thrift compact:
        the bytes the history row and a transient inbox copy open to, and
        those of the message as numbered, also after it was numbered again.
        """
        vault = self.conversations.vault
        kept = self.conversations.append("c", "a", message("kept"), ("b",))
        transient = self.conversations.append("c", "a", message("custom"), ("b",), keep=False)
        self.store.release()
        self.store.release()
        results = [self.successResultOf(d) for d in (kept, transient)]
        for appended in results:
            self.assertEqual(appended.compact, codec.encode_compact(appended.message))
        stored = self.store._messages["c"][1]
        self.assertEqual(vault.openMessage("c", 1, stored.stanza), results[0].message)
        # Another writer takes seq 2: the next message is sealed again as 3.
        self.successResultOf(MemoryStore.appendMessages(self.store, [NewMessage("c", 2, 10**15, "x", b"theirs", 0.0)]))
        again = self.conversations.append("c", "a", message("again"), ("b",))
        self.store.release()
        self.store.release()
        appended = self.successResultOf(again)
        self.assertEqual(appended.message.seq, 3)
        self.assertEqual(appended.compact, codec.encode_compact(appended.message))

    def test_sequenceConflictNumbersAgain(self):
        """
        When another writer took the seqs (a moment of split ownership, the
        store's fence), the batch is numbered again from the stored
        position, quietly: no failure is logged and the sender never hears
        of it.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        first = self.conversations.append("c", "a", message("one"), ("b",))
        self.store.release()
        self.successResultOf(first)
        # Another node writes seq 2 behind this owner's back.
        self.successResultOf(MemoryStore.appendMessages(self.store, [NewMessage("c", 2, 10**15, "x", b"theirs", 0.0)]))
        mine = self.conversations.append("c", "a", message("two"), ("b",))
        ((d, rows),) = self.store.waiting
        self.assertEqual([r.seq for r in rows], [2])
        self.store.release()
        self.assertEqual([r.seq for _, rows in self.store.waiting for r in rows], [3])
        self.store.release()
        self.assertEqual(self.successResultOf(mine).message.seq, 3)
        self.assertEqual([e for e in observer if "log_failure" in e], [])

    def appendNow(self, conversations, text):
        d = conversations.append("c", "a", message(text), ("b",))
        self.store.release()
        return self.successResultOf(d)

    def test_handoverAfterAnotherWriter(self):
        """
        In a cluster, the first batch an owner numbers from a position
        another writer moved within C{handoverWindow} is marked a handover
        (the other writer's pushes may still be on their way); the batches
        after it are not.
        """
        self.conversations.handoverWindow = 10.0
        previous = Conversations(store=self.store, vault=self.conversations.vault, clock=self.clock)
        self.assertFalse(self.appendNow(previous, "by the old owner").handover)
        self.clock.advance(2)
        first = self.appendNow(self.conversations, "by the new owner")
        self.assertEqual((first.message.seq, first.handover), (2, True))
        second = self.appendNow(self.conversations, "later")
        self.assertEqual((second.message.seq, second.handover), (3, False))

    def test_noHandoverAfterQuiet(self):
        """
        A position last moved longer ago than the window, or on a single
        node (no window), is numbered on as usual.
        """
        previous = Conversations(store=self.store, vault=self.conversations.vault, clock=self.clock)
        self.appendNow(previous, "long ago")
        self.conversations.handoverWindow = 10.0
        self.clock.advance(11)
        self.assertFalse(self.appendNow(self.conversations, "now").handover)
        single = Conversations(store=self.store, vault=self.conversations.vault, clock=self.clock)
        self.appendNow(self.conversations, "just now")
        self.assertFalse(self.appendNow(single, "on one node").handover)

    def test_handoverAfterConflict(self):
        """
        A batch numbered again after another node took its seq is a
        handover; reading back its own position after a failed write is not.
        """
        self.conversations.handoverWindow = 10.0
        self.assertFalse(self.appendNow(self.conversations, "one").handover)
        mid = self.conversations.mids.next() + (1 << 20)
        self.successResultOf(MemoryStore.appendMessages(self.store, [NewMessage("c", 2, mid, "x", b"theirs", 0.0)]))
        mine = self.conversations.append("c", "a", message("two"), ("b",))
        self.store.release()
        self.store.release()
        appended = self.successResultOf(mine)
        self.assertEqual((appended.message.seq, appended.handover), (3, True))
        self.store.fail = StoreUnavailable("down")
        lost = self.conversations.append("c", "a", message("lost"), ("b",))
        self.store.release()
        self.failureResultOf(lost)
        self.store.fail = False
        again = self.appendNow(self.conversations, "again")
        self.assertEqual((again.message.seq, again.handover), (4, False))

    def test_resendRefusedByStore(self):
        """
        A message whose duplicate key the store holds (written through
        another node) fails with L{AlreadyStored} naming the stored copy;
        the other messages of its batch are numbered again without it, so
        no seq is left unused, and nothing is logged as a failure.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        stored = NewMessage("c", 1, 10**15, "a", b"theirs", 5.0, dedupe=("a", 7))
        self.successResultOf(MemoryStore.appendMessages(self.store, [stored]))
        # The next three wait while this one is written: one batch.
        writing = self.conversations.append("c", "a", message("new0"), ("b",))
        done = [
            self.conversations.append("c", "a", message(text), ("b",), dedupe=dedupe)
            for text, dedupe in (("new1", ("a", 6)), ("resent", ("a", 7)), ("new2", None))
        ]
        self.store.release()
        self.assertEqual(self.successResultOf(writing).message.seq, 2)
        ((_, rows),) = self.store.waiting
        self.assertEqual([r.seq for r in rows], [3, 4, 5])
        self.store.release()
        ((_, rows),) = self.store.waiting
        self.assertEqual([r.seq for r in rows], [3, 4])
        self.store.release()
        refused = self.failureResultOf(done[1], AlreadyStored).value
        self.assertEqual(refused.duplicate, Duplicate("c", 1, 10**15, 5.0))
        self.assertEqual([self.successResultOf(done[i]).message.seq for i in (0, 2)], [3, 4])
        self.assertEqual(self.successResultOf(self.store.lastMessage("c"))[0], 4)
        self.assertEqual([e for e in observer if "log_failure" in e], [])

    def test_resendInOneBatch(self):
        """
        Two appends of one key in one batch (copies from two nodes reaching
        the owner together): the first is stored, the second never reaches
        the store and is answered with the first once it is durable.
        """
        first = self.conversations.append("c", "a", message("m"), ("b",), dedupe=("a", 7))
        others = [
            self.conversations.append("c", "a", message(text), ("b",), dedupe=dedupe)
            for text, dedupe in (("copy", ("a", 7)), ("next", ("a", 8)), ("copy2", ("a", 8)))
        ]
        self.store.release()
        # The copy of the first was not in its batch: the store refuses it.
        ((_, rows),) = self.store.waiting
        self.assertEqual([(r.seq, r.dedupe) for r in rows], [(2, ("a", 7)), (3, ("a", 8))])
        self.store.release()
        ((_, rows),) = self.store.waiting
        self.assertEqual([(r.seq, r.dedupe) for r in rows], [(2, ("a", 8))])
        self.store.release()
        stored = self.successResultOf(first).message
        copy = self.failureResultOf(others[0], AlreadyStored).value.duplicate
        self.assertEqual((copy.conv, copy.seq, copy.mid), ("c", 1, stored.mid))
        self.assertEqual(self.successResultOf(others[1]).message.seq, 2)
        self.assertEqual(self.failureResultOf(others[2], AlreadyStored).value.duplicate.seq, 2)

    def test_resendInFailedBatch(self):
        """
        When the batch holding the first copy fails, the copies waiting on
        it fail with it (and are resent by their clients).
        """
        writing = self.conversations.append("c", "a", message("m"), ("b",))
        done = [self.conversations.append("c", "a", message("m"), ("b",), dedupe=("a", 7)) for _ in range(2)]
        self.store.release()
        self.successResultOf(writing)
        ((_, rows),) = self.store.waiting
        self.assertEqual(len(rows), 1)
        self.store.fail = StoreUnavailable("down")
        self.store.release()
        for d in done:
            self.assertEqual(self.failureResultOf(d, TimProtocolError).value.code, ErrorCode.ERR_DATABASE)

    def test_sequenceConflictGivesUp(self):
        """
        A batch whose seqs keep being taken is refused after
        C{maxConflicts} tries, with a retryable error.
        """
        done = self.conversations.append("c", "a", message("m"), ("b",))
        for _ in range(self.conversations.maxConflicts + 1):
            d, _ = self.store.waiting.pop(0)
            d.errback(SequenceConflict("c", 1))
        error = self.failureResultOf(done, TimProtocolError).value
        self.assertEqual(error.code, ErrorCode.ERR_DATABASE)
        self.assertEqual(self.store.waiting, [])

    def test_unavailable(self):
        """
        A store that cannot be reached refuses the message with a retryable
        error saying so, logged as one line without a traceback.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.store.fail = StoreUnavailable("PostgreSQL at db:5432/timtx is unavailable: refused")
        d = self.conversations.append("c", "a", message("m"), ("b",))
        self.store.release()
        error = self.failureResultOf(d, TimProtocolError).value
        self.assertEqual((error.code, error.text), (ErrorCode.ERR_DATABASE, "store unavailable, try again"))
        self.assertEqual([e for e in observer if "log_failure" in e], [])
        self.assertIn("unavailable", [e for e in observer if "why" in e][0]["why"])

    def test_outcomeUnknown(self):
        """
        A write whose outcome is unknown is never confirmed: the client is
        asked to send it again (its duplicate key will match), and the owner
        reads the position again, since the message may be stored.
        """
        self.store.fail = StoreOutcomeUnknown("lost while committing")
        d = self.conversations.append("c", "a", message("m"), ("b",))
        self.store.release()
        self.assertIsInstance(self.failureResultOf(d, TimProtocolError).value, MaybeStored)
        self.store.fail = False
        again = self.conversations.append("c", "a", message("m2"), ("b",))
        self.store.release()
        self.assertEqual(self.successResultOf(again).message.seq, 1)


class MidClockTests(SynchronousTestCase):
    def test_increasing(self):
        clock = Clock()
        clock.advance(MID_EPOCH_MS / 1000 + 1)
        mids = MidClock(clock)
        values = [mids.next() for _ in range(5000)]
        self.assertEqual(values, sorted(set(values)))
        clock.advance(-0.5)  # a clock stepping back does not repeat ids
        self.assertGreater(mids.next(), values[-1])
        self.assertGreater(mids.next(after=values[-1] + 10**6), values[-1] + 10**6)


class PairTests(SynchronousTestCase):
    def test_symmetric(self):
        self.assertEqual(pairConversation("a", "b"), pairConversation("b", "a"))
        self.assertNotEqual(pairConversation("a", "b"), pairConversation("a", "c"))
