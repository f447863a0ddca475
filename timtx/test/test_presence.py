"""
End-to-end tests of presence: who may send it, automatic offline presence,
invisible mode.
"""

from twisted.internet.defer import inlineCallbacks

from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.structs import Tid, TimPresence
from timtx.test.base import NodeTestCase


def presence(i):
    return i.timType == TimType.TIMPRESENCE


def refused(i):
    return i.timType == TimType.TIMACK and not i.body.ok


class PresenceTestsMixin:
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def trio(self, **sections):
        node = yield self.node(**sections)
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        yield self.befriend(node, alice, bob)
        return node, alice, bob, carol

    @inlineCallbacks
    def test_toFriend(self):
        """
        Presence reaches a friend with server-set id and fromTid.
        """
        node, alice, bob, _ = yield self.trio()
        alice.send(TimType.TIMPRESENCE, TimPresence(toTid=Tid(node=bob.uid), show=2, status="busy", subStatus=1))
        got = (yield bob.next(presence)).body
        self.assertEqual((got.show, got.status, got.subStatus), (2, "busy", 1))
        self.assertEqual(got.fromTid.node, alice.uid)
        self.assertIsNotNone(got.id)
        self.assertIsNone(got.offline)

    @inlineCallbacks
    def test_refusals(self):
        """
        Presence to a stranger (4105), without targets or with too many
        (4104), or with a forged offline flag (4104) goes nowhere.
        """
        node, alice, bob, carol = yield self.trio(presence={"max_targets": 2})
        for sent, code in [
            (TimPresence(toTid=Tid(node=carol.uid)), ErrorCode.ERR_AUTH),
            (TimPresence(), ErrorCode.ERR_PARAMS),
            (TimPresence(toList=[bob.uid, carol.uid, "x"]), ErrorCode.ERR_PARAMS),
            (TimPresence(toTid=Tid(node=bob.uid), offline=True), ErrorCode.ERR_PARAMS),
        ]:
            alice.send(TimType.TIMPRESENCE, sent)
            self.assertEqual((yield alice.next(refused)).body.error.code, code, sent)
        yield bob.ping()
        yield carol.ping()
        self.assertEqual(bob.take(presence) + carol.take(presence), [])

    @inlineCallbacks
    def test_open(self):
        """
        With [presence] open, anyone existing may be reached; blocks hold.
        """
        node, alice, bob, carol = yield self.trio(presence={"open": True})
        alice.send(TimType.TIMPRESENCE, TimPresence(toList=[carol.uid], status="hello"))
        self.assertEqual((yield carol.next(presence)).body.status, "hello")
        alice.send(TimType.TIMPRESENCE, TimPresence(toList=["NoSuchUser"]))
        self.assertEqual((yield alice.next(refused)).body.error.code, ErrorCode.ERR_ACCOUNT)

    @inlineCallbacks
    def test_broadcastToRoster(self):
        node, alice, bob, carol = yield self.trio()
        yield self.befriend(node, alice, carol)
        alice.send(TimType.TIMBROADPRESENCE, TimPresence(status="online"))
        for friend in (bob, carol):
            got = (yield friend.next(presence)).body
            self.assertEqual((got.status, got.fromTid.node), ("online", alice.uid))

    @inlineCallbacks
    def test_offlineWhenLastSessionEnds(self):
        """
        Friends learn a user went offline when its last session ends, not
        before.
        """
        node, alice, bob, carol = yield self.trio()
        phone = yield self.user(node, name=alice.loginName, registerFirst=False, termtyp=7)
        yield alice.disconnect()
        yield phone.ping()
        yield bob.ping()
        self.assertEqual(bob.take(presence), [])
        yield phone.disconnect()
        got = (yield bob.next(presence)).body
        self.assertEqual((got.offline, got.fromTid.node), (True, alice.uid))
        yield carol.ping()
        self.assertEqual(carol.take(presence), [], "strangers are not told")

    @inlineCallbacks
    def test_offlineBlock(self):
        node, alice, bob, _ = yield self.trio(presence={"offline_block": True})
        yield alice.disconnect()
        yield bob.ping()
        self.assertEqual(bob.take(presence), [])

    @inlineCallbacks
    def test_invisible(self):
        """
        Turning invisible shows the user offline; while invisible nothing it
        sends and no offline presence reaches anyone; turning visible sends
        that presence.
        """
        node, alice, bob, _ = yield self.trio()
        alice.send(TimType.TIMBROADPRESENCE, TimPresence(invisible=True))
        got = (yield bob.next(presence)).body
        self.assertEqual((got.offline, got.fromTid.node), (True, alice.uid))
        alice.send(TimType.TIMBROADPRESENCE, TimPresence(status="here"))
        alice.send(TimType.TIMPRESENCE, TimPresence(toTid=Tid(node=bob.uid), status="psst"))
        yield alice.ping()
        yield alice.disconnect()
        again = yield self.user(node, name=alice.loginName, registerFirst=False)
        yield again.ping()
        yield bob.ping()
        self.assertEqual(bob.take(presence), [])
        again.send(TimType.TIMBROADPRESENCE, TimPresence(invisible=False, status="back"))
        got = (yield bob.next(presence)).body
        self.assertEqual((got.status, got.offline), ("back", None))


class WebSocketCompactPresenceTests(PresenceTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT


class TCPJSONPresenceTests(PresenceTestsMixin, NodeTestCase):
    encoding = Encoding.JSON
    transport = "tcp"
    backend = "sqlite"
