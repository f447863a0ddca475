"""
A resend racing its first copy through two nodes is stored once: the same
client id sent at the same time by two sessions of one user on two nodes,
to a user and to a group.  The store's fence of duplicate keys decides
(L{timtx.persistence.errors.DuplicateConflict}); both senders are answered
with the one stored message and recipients get it once.
"""

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.chat.conversations import pairConversation
from timtx.cluster.resends import STATUS_RESENT, packResent, unpackResent
from timtx.cluster.wire import BadPayload, unpack
from timtx.delivery.fanout import groupConversation
from timtx.persistence.records import Duplicate
from timtx.protocols.constants import Business, GroupType
from timtx.protocols.structs import Tid
from timtx.test.base import waitUntil
from timtx.test.test_clusterrouting import ClusterFixture
from timtx.test.test_groups import groupMessage
from timtx.test.test_messaging import isMessage


class ResentAnswerTests(SynchronousTestCase):
    def test_roundTrip(self):
        """
        The C{dup} answer carries where the stored message is, a message
        kept only in inboxes (no seq) included.
        """
        for stored in (Duplicate("p:a:b", 7, 1 << 52, 1764567890.123456), Duplicate("g:G", None, 5, 0.5)):
            status, conv, where = unpack(packResent(stored), 3)
            self.assertEqual(status, STATUS_RESENT)
            self.assertEqual(unpackResent(conv, where).duplicate, stored)

    def test_malformed(self):
        """
        A C{dup} answer whose place is not numbers is a bad payload.
        """
        for where in (b"", b"1 2", b"x 2 3.0", b"1 2 3.0 4"):
            self.assertRaises(BadPayload, unpackResent, b"c", where)


class RacingResendTests(ClusterFixture, TestCase):
    timeout = 120

    @inlineCallbacks
    def sameIdTwice(self, send, count=5):
        """
        C{count} times, both sessions send the same new id at once; each
        time both are answered with one message, the same.

        @return: the answers, a pair per id.
        """
        answers = []
        for n in range(count):
            pair = yield gatherResults([send(self.alice1, 7000 + n), send(self.alice2, 7000 + n)])
            first, second = pair
            self.assertEqual((first.id, first.seq, first.mid), (second.id, second.seq, second.mid))
            self.assertEqual(first.dataString, f"once {7000 + n}")
            answers.append(pair)
        return answers

    @inlineCallbacks
    def personal(self, **cluster):
        nodes = yield self.cluster(2, cluster=cluster)
        self.alice1 = yield self.user(nodes[0])
        self.alice2 = yield self.user(nodes[1], self.alice1.loginName, registerFirst=False)
        bob = yield self.user(nodes[1])
        yield self.friends(nodes[0], self.alice1, bob)
        count = 5

        def send(client, clientId):
            return client.postMessage(bob.uid, f"once {clientId}", id=clientId)

        answers = yield self.sameIdTwice(send, count)
        self.assertEqual([first.seq for first, _ in answers], list(range(1, count + 1)))
        stored = yield nodes[0].store.messagesAfter(pairConversation(self.alice1.uid, bob.uid), 0, 100)
        self.assertEqual([m.seq for m in stored], list(range(1, count + 1)))
        got = []
        for _ in range(count):
            got.append((yield bob.next(isMessage)).body)
        yield bob.ping()
        got += [i.body for i in bob.take(isMessage)]
        received = [(m.seq, m.id) for m in got]
        if cluster.get("conversation_owner") is False:
            # Two nodes route the conversation: no order between them.
            received.sort()
        self.assertEqual(received, [(n + 1, 7000 + n) for n in range(count)], "each once")
        return nodes

    def test_personal(self):
        """
        1:1, through the conversation's owner node: stored once, both
        senders answered with it, the recipient gets it once.
        """
        return self.personal()

    @inlineCallbacks
    def test_personalEachNodeStores(self):
        """
        The same with each node storing what its clients send (as when the
        owner is unreachable, or stops while committing): the two nodes'
        transactions race in the database, and its fence stores one.
        """
        nodes = yield self.personal(conversation_owner=False)
        self.assertEqual([n.messaging.__class__.__name__ for n in nodes], ["PersonalMessaging"] * 2)
        # Neither node knew of the other's copy: the store refuses one of
        # each pair.  (Through an owner, the owner's memory of the first
        # copy may answer the second before it reaches the store.)  A
        # sender may be answered by the other copy's echo while its own is
        # still on its way to the store: wait for the refusals.
        yield waitUntil(lambda: sum(node.conversations.resent for node in nodes) == 5)

    @inlineCallbacks
    def test_group(self):
        """
        A group message: stored once in the group's history, both senders
        answered with it, every member's device gets it once.
        """
        nodes = yield self.cluster(2, groups={"member_notices": False})
        founder = yield self.user(nodes[0])
        gid = (yield founder.business(Business.NEWROOM, node="topic", reqInt=GroupType.OPEN)).n
        self.alice1 = yield self.user(nodes[0])
        self.alice2 = yield self.user(nodes[1], self.alice1.loginName, registerFirst=False)
        bob = yield self.user(nodes[1])
        for client in (self.alice1, bob):
            yield client.business(Business.ADDROOM, node=gid)
        for client in (founder, self.alice1, self.alice2, bob):
            self.assertEqual((yield client.offlineMessages()), [])
        count = 5

        def send(client, clientId):
            return client.postMessage(None, f"once {clientId}", msType=3, roomTid=Tid(node=gid), id=clientId)

        answers = yield self.sameIdTwice(send, count)
        self.assertEqual([first.seq for first, _ in answers], list(range(1, count + 1)))
        stored = yield nodes[0].store.messagesAfter(groupConversation(gid), 0, 100)
        self.assertEqual([m.seq for m in stored], list(range(1, count + 1)))
        for client in (founder, bob):
            got = []
            for _ in range(count):
                got.append((yield client.next(groupMessage)).body)
            yield client.ping()
            got += [i.body for i in client.take(groupMessage)]
            self.assertEqual([(m.seq, m.id) for m in got], [(n + 1, 7000 + n) for n in range(count)], "each once")
