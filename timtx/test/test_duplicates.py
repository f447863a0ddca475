"""
Tests for L{timtx.chat.duplicates}: resends recognised, and memory bounded
however many senders and messages pass (issue 10).
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.chat.conversations import MID_EPOCH_MS, AlreadyStored, Appended, Conversations, pairConversation
from timtx.chat.duplicates import DuplicateFilter, InFlight
from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import StanzaVault
from timtx.persistence.memory import MemoryStore
from timtx.persistence.records import Duplicate
from timtx.protocols.structs import TimMessage


class DuplicateFilterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(MID_EPOCH_MS / 1000 + 10)
        self.store = MemoryStore()
        vault = StanzaVault(NodeKeys(b"d" * 32))
        self.conversations = Conversations(store=self.store, vault=vault, clock=self.clock)
        self.filter = DuplicateFilter(store=self.store, vault=vault, clock=self.clock, window=300, maxKeys=100)

    def send(self, sender, clientId, other="bob"):
        """
        What the 1:1 path does with a message that has a client id: check,
        then append and remember.

        @return: what the filter knew C{clientId} as before, or the store
            when it refused the append (L{AlreadyStored}), or C{None} if it
            was new (and is now stored).
        """
        seen = self.successResultOf(self.filter.check(sender, clientId))
        if seen is not None:
            return seen
        conv = pairConversation(sender, other)
        message = TimMessage(msType=2, odType=1, id=clientId, dataString="hi")
        appending = self.conversations.append(conv, sender, message, (other,), dedupe=(sender, clientId))
        self.filter.remember(sender, clientId, appending, conv)
        refused = []
        appending.addErrback(lambda f: f.trap(AlreadyStored) and refused.append(f.value.duplicate))
        return refused[0] if refused else None

    def test_resendRecognised(self):
        """
        A resend within the window is known by where the first copy was
        stored; a new id is not known.
        """
        self.assertIsNone(self.send("alice", 1))
        seen = self.send("alice", 1)
        self.assertIsInstance(seen, Duplicate)
        self.assertEqual((seen.conv, seen.seq), (pairConversation("alice", "bob"), 1))
        self.assertEqual(self.filter.peek("alice", 1), (True, seen))
        self.assertIsNone(self.send("alice", 2))

    def test_resendWhileWriting(self):
        """
        A resend that arrives while the first copy is written is told to
        wait for it; once written it is a key like any other.
        """
        self.successResultOf(self.filter.check("alice", 7))
        appending = Deferred()
        self.filter.remember("alice", 7, appending, "p:alice:bob")
        seen = self.successResultOf(self.filter.check("alice", 7))
        self.assertIsInstance(seen, InFlight)
        waited = seen.wait()
        appended = Appended(TimMessage(msType=2, odType=1, id=7, seq=4, mid=99), {})
        appending.callback(appended)
        self.assertIs(self.successResultOf(waited), appended)
        self.assertEqual(self.successResultOf(self.filter.check("alice", 7)).mid, 99)

    def test_failedWriteForgotten(self):
        """
        An id whose write failed is new again.
        """
        self.successResultOf(self.filter.check("alice", 7))
        appending = Deferred()
        self.filter.remember("alice", 7, appending, "p:alice:bob")
        appending.addErrback(lambda f: None)
        appending.errback(RuntimeError("disk full"))
        self.assertIsNone(self.successResultOf(self.filter.check("alice", 7)))
        self.assertEqual(len(self.filter), 0)

    def test_boundedOverSenders(self):
        """
        However many distinct senders send, memory holds at most C{maxKeys}
        keys, the most recent: a resend of a recent message is recognised,
        one pushed out by 100 newer keys is not known in memory, but the
        store refuses to store it again and names the first copy.
        """
        for n in range(1000):
            self.assertIsNone(self.send(f"user{n}", n))
            self.assertLessEqual(len(self.filter), 100)
        self.assertIsInstance(self.send("user999", 999), Duplicate)
        self.assertIsNone(self.successResultOf(self.filter.check("user0", 0)))
        conv = pairConversation("user0", "bob")
        refused = self.send("user0", 0)
        self.assertEqual((refused.conv, refused.seq), (conv, 1))
        self.assertEqual(self.successResultOf(self.store.lastMessage(conv))[0], 1)
        # Known in memory again, as what the store holds.
        self.assertEqual(self.filter.peek("user0", 0), (True, refused))

    def test_storeRefusalAnswersWaiters(self):
        """
        Resends that waited for a write the store refused as a resend get
        the message it named, and the key is known as that message.
        """
        self.successResultOf(self.filter.check("alice", 7))
        appending = Deferred()
        self.filter.remember("alice", 7, appending, "p:alice:bob")
        seen = self.successResultOf(self.filter.check("alice", 7))
        waited = seen.wait()
        stored = Duplicate("p:alice:bob", 3, 42, self.clock.seconds())
        appending.addErrback(lambda f: f.trap(AlreadyStored))
        appending.errback(AlreadyStored(stored))
        self.assertEqual(self.successResultOf(waited), stored)
        self.assertEqual(self.filter.peek("alice", 7), (True, stored))

    def test_boundedOverTime(self):
        """
        One sender sending five messages a second for 20 minutes, with the
        node's purge every minute: memory never holds more than C{maxKeys}
        keys, and after the window without messages, none.
        """
        clientId = 0
        for second in range(1200):
            for _ in range(5):
                clientId += 1
                self.send("alice", clientId)
            self.clock.advance(1)
            if second % 60 == 0:
                self.successResultOf(self.filter.purge())
            self.assertLessEqual(len(self.filter), 100)
        self.clock.advance(301)
        self.successResultOf(self.filter.purge())
        self.assertEqual(len(self.filter), 0)

    def test_expiredKeysPurged(self):
        """
        The purge forgets keys older than the window, in memory and in the
        store; a resend after that is a new message.
        """
        self.send("alice", 1)
        self.clock.advance(200)
        self.send("alice", 2)
        self.clock.advance(101)
        self.assertEqual(self.successResultOf(self.filter.purge()), 1)
        self.assertEqual(len(self.filter), 1)
        self.assertIsNone(self.send("alice", 1))
        self.assertIsInstance(self.send("alice", 2), Duplicate)

    def test_keysReadFromStore(self):
        """
        A sender's stored keys are read on its first message after a
        restart (a new filter over the same store), within the bound.
        """
        for clientId in range(150):
            self.send("alice", clientId)
        restarted = DuplicateFilter(
            store=self.store, vault=self.filter.vault, clock=self.clock, window=300, maxKeys=100
        )
        self.assertEqual(restarted.peek("alice", 149), (False, None))
        seen = self.successResultOf(restarted.check("alice", 149))
        self.assertEqual(seen.seq, 150)
        self.assertEqual(len(restarted), 100)
        self.assertIsNone(self.successResultOf(restarted.check("alice", 0)))
