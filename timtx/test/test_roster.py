"""
End-to-end tests of friends and blocks (TIMBUSINESS 1, 4, 6, 7, 18, 101)
and password changes (21).
"""

from twisted.internet.defer import inlineCallbacks

from timtx.chat.business import UNBLOCKROSTER
from timtx.client import TimRequestFailed
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, TimType
from timtx.test.base import NodeTestCase


def notice(bnType):
    return lambda i: i.timType == TimType.TIMMESSAGE and i.body.bnType == bnType


def nodesReply(i):
    return i.timType == TimType.TIMNODES


class RosterTestsMixin:
    @inlineCallbacks
    def list(self, client, rtype):
        reply = yield client.business(rtype, reply=nodesReply)
        return reply.nodelist or []

    @inlineCallbacks
    def test_mutualAdd(self):
        """
        A asks (B gets bnType 4 with the greeting), B asks back: both get
        bnType 5 and see each other in their rosters, which start empty.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        self.assertEqual((yield self.list(alice, Business.ROSTER)), [])
        ack = yield alice.business(Business.ADDROSTER, node=bob.uid, reqStr="hi, it's Alice")
        self.assertEqual((ack.ok, ack.t, ack.n), (True, Business.ADDROSTER, bob.uid))
        request = (yield bob.next(notice(Business.ADDROSTER))).body
        self.assertEqual((request.odType, request.fromTid.node, request.dataString), (4, alice.uid, "hi, it's Alice"))
        alice.sendMessage(bob.uid, "not yet")
        self.assertEqual((yield alice.next(TimType.TIMACK)).body.error.code, ErrorCode.ERR_AUTH)
        yield bob.business(Business.ADDROSTER, node=alice.uid)
        for client in (alice, bob):
            friend = (yield client.next(notice(Business.FRIEND))).body
            self.assertEqual((friend.fromTid.node, friend.toTid.node), (bob.uid, alice.uid))
        self.assertEqual((yield self.list(alice, Business.ROSTER)), [bob.uid])
        self.assertEqual((yield self.list(bob, Business.ROSTER)), [alice.uid])
        alice.sendMessage(bob.uid, "now we talk")
        self.assertEqual((yield bob.next(TimType.TIMMESSAGE)).body.dataString, "now we talk")

    @inlineCallbacks
    def test_requestWaitsOffline(self):
        """
        A friend request to an offline user waits in its inbox.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield bob.disconnect()
        yield alice.business(Business.ADDROSTER, node=bob.uid, reqStr="later")
        again = yield self.user(node, name=bob.loginName, registerFirst=False)
        offline = yield again.offlineMessages()
        self.assertEqual([(m.bnType, m.dataString) for m in offline], [(Business.ADDROSTER, "later")])

    @inlineCallbacks
    def test_remove(self):
        """
        Removing ends the friendship on both sides and tells the other
        (bnType 6); the caller gets an ack with t 6.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        ack = yield alice.business(Business.REMOVEROSTER, node=bob.uid)
        self.assertEqual((ack.t, ack.n), (Business.REMOVEROSTER, bob.uid))
        self.assertEqual((yield bob.next(notice(Business.REMOVEROSTER))).body.fromTid.node, alice.uid)
        self.assertEqual((yield self.list(bob, Business.ROSTER)), [])
        bob.sendMessage(alice.uid, "still there?")
        self.assertEqual((yield bob.next(TimType.TIMACK)).body.error.code, ErrorCode.ERR_AUTH)

    @inlineCallbacks
    def test_blockAndUnblock(self):
        """
        Blocking ends friendship, stops messages and requests both ways,
        tells the blocked user (bnType 7), lists it; unblocking (timtx rtype
        101) lifts only the block.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        ack = yield alice.business(Business.BLOCKROSTER, node=bob.uid)
        self.assertEqual(ack.t, Business.BLOCKROSTER)
        yield bob.next(notice(Business.BLOCKROSTER))
        self.assertEqual((yield self.list(alice, Business.BLOCKROSTERLIST)), [bob.uid])
        self.assertEqual((yield self.list(bob, Business.BLOCKROSTERLIST)), [])
        self.assertEqual((yield self.list(alice, Business.ROSTER)), [])
        failure = yield self.assertFailure(bob.business(Business.ADDROSTER, node=alice.uid), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_BLOCK)
        bob.sendMessage(alice.uid, "let me in")
        self.assertEqual((yield bob.next(TimType.TIMACK)).body.error.code, ErrorCode.ERR_BLOCK)
        ack = yield alice.business(UNBLOCKROSTER, node=bob.uid)
        self.assertEqual(ack.t, UNBLOCKROSTER)
        self.assertEqual((yield self.list(alice, Business.BLOCKROSTERLIST)), [])
        self.assertEqual((yield self.list(alice, Business.ROSTER)), [], "unblocking does not restore friendship")
        yield bob.business(Business.ADDROSTER, node=alice.uid)

    @inlineCallbacks
    def test_removeUnblocks(self):
        """
        Removing a blocked user (rtype 6) lifts the block, as tim 2.0 does:
        the only way a tim client can unblock.  A block by the other side
        stays, and friendship does not come back.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield alice.business(Business.BLOCKROSTER, node=bob.uid)
        yield bob.business(Business.BLOCKROSTER, node=alice.uid)
        self.assertEqual((yield self.list(alice, Business.BLOCKROSTERLIST)), [bob.uid])
        ack = yield alice.business(Business.REMOVEROSTER, node=bob.uid)
        self.assertEqual((ack.ok, ack.t, ack.n), (True, Business.REMOVEROSTER, bob.uid))
        self.assertEqual((yield self.list(alice, Business.BLOCKROSTERLIST)), [])
        self.assertEqual((yield self.list(bob, Business.BLOCKROSTERLIST)), [alice.uid])
        self.assertEqual((yield self.list(alice, Business.ROSTER)), [])
        failure = yield self.assertFailure(alice.business(Business.ADDROSTER, node=bob.uid), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_BLOCK, "bob's block on alice stays")
        yield bob.business(Business.REMOVEROSTER, node=alice.uid)
        yield alice.business(Business.ADDROSTER, node=bob.uid)
        yield bob.next(notice(Business.ADDROSTER))

    @inlineCallbacks
    def test_removeKeepsBlockWhenConfigured(self):
        """
        With C{[roster] unblock_on_remove} off, removing leaves the block in
        place; only rtype 101 lifts it.
        """
        node = yield self.node(roster={"unblock_on_remove": False})
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield alice.business(Business.BLOCKROSTER, node=bob.uid)
        ack = yield alice.business(Business.REMOVEROSTER, node=bob.uid)
        self.assertEqual((ack.ok, ack.t), (True, Business.REMOVEROSTER))
        self.assertEqual((yield self.list(alice, Business.BLOCKROSTERLIST)), [bob.uid])
        yield alice.business(UNBLOCKROSTER, node=bob.uid)
        self.assertEqual((yield self.list(alice, Business.BLOCKROSTERLIST)), [])

    @inlineCallbacks
    def test_silentBlock(self):
        node = yield self.node(roster={"notify_block": False})
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield alice.business(Business.BLOCKROSTER, node=bob.uid)
        yield bob.ping()
        self.assertEqual(bob.take(TimType.TIMMESSAGE), [])

    @inlineCallbacks
    def test_refusals(self):
        node = yield self.node()
        alice = yield self.user(node)
        for rtype, fields, code in [
            (Business.ADDROSTER, {"node": alice.uid}, ErrorCode.ERR_AUTH),
            (Business.ADDROSTER, {"node": "NoSuchUser"}, ErrorCode.ERR_ACCOUNT),
            (Business.ADDROSTER, {}, ErrorCode.ERR_PARAMS),
            (Business.BLOCKROSTER, {"node": alice.uid}, ErrorCode.ERR_AUTH),
            (Business.FRIEND, {"node": alice.uid}, ErrorCode.ERR_PARAMS),
            (99, {}, ErrorCode.ERR_PARAMS),
        ]:
            failure = yield self.assertFailure(alice.business(rtype, **fields), TimRequestFailed)
            self.assertEqual(failure.code, code, (rtype, fields))

    @inlineCallbacks
    def test_changePassword(self):
        node = yield self.node()
        alice = yield self.user(node)
        failure = yield self.assertFailure(
            alice.business(Business.MODIFYAUTH, reqStr="wrong", reqStr2="newsecret"), TimRequestFailed
        )
        self.assertEqual(failure.code, ErrorCode.ERR_MODIFYAUTH)
        ack = yield alice.business(Business.MODIFYAUTH, reqStr="secret", reqStr2="newsecret")
        self.assertEqual(ack.t, Business.MODIFYAUTH)
        again = yield self.client(node)
        yield again.login(alice.loginName, "newsecret")
        other = yield self.client(node)
        yield self.assertFailure(other.login(alice.loginName, "secret"), TimRequestFailed)


class WebSocketCompactRosterTests(RosterTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT


class WebSocketJSONRosterTests(RosterTestsMixin, NodeTestCase):
    encoding = Encoding.JSON
    backend = "sqlite"
