"""
End-to-end tests of 1:1 messaging: delivery, echo, order, offline, resends,
recall, burn, streams, custom types, history and every refusal.
"""

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock

from timtx.chat.conversations import pairConversation
from timtx.persistence.records import MESSAGE_BURNED, MESSAGE_RECALLED, STANCE_BLOCK
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.structs import Tid
from timtx.test.base import NodeTestCase, waitUntil


def isMessage(i):
    return i.timType == TimType.TIMMESSAGE


def errorFor(timType):
    return lambda i: i.timType == TimType.TIMACK and i.body.timType == timType and not i.body.ok


class MessagingTestsMixin:
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def pair(self, **sections):
        node = yield self.node(**sections)
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        return node, alice, bob

    @inlineCallbacks
    def test_sendAndReceive(self):
        """
        A message reaches the recipient with the ack bit and the server's
        fields; the sender sees its echo with its own id, mid and seq.
        """
        node, alice, bob = yield self.pair()
        alice.sendMessage(bob.uid, "hello", id=77, udtype=3, extend={"k": "v"})
        echo = yield alice.next(isMessage)
        got = yield bob.next(isMessage)
        self.assertIsNotNone(got.ackId)
        for message in (echo.body, got.body):
            self.assertEqual((message.dataString, message.id, message.seq, message.udtype), ("hello", 77, 1, 3))
            self.assertEqual((message.fromTid.node, message.toTid.node), (alice.uid, bob.uid))
            self.assertEqual(message.extend, {"k": "v"})
            self.assertGreater(message.mid, 0)
            self.assertGreater(message.timestamp, 0)
            self.assertIsNone(message.isOffline)
        self.assertEqual(echo.body.mid, got.body.mid)

    @inlineCallbacks
    def test_refusals(self):
        """
        Every refused message gets its tim error code, with the message's
        id in t, and nothing is stored.
        """
        node, alice, bob = yield self.pair(messages={"max_body_bytes": 100})
        stranger = yield self.user(node)
        cases = [
            ({"to": stranger.uid}, ErrorCode.ERR_AUTH),
            ({"to": bob.uid, "msType": 1}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "odType": 4}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "odType": 6}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "odType": 30}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "bnType": 5}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "isOffline": True}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "mid": 5}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "fromTid": Tid(node=bob.uid)}, ErrorCode.ERR_PARAMS),
            ({"to": bob.uid, "dataString": "x" * 101}, ErrorCode.ERR_BIGDATA),
            ({"to": None}, ErrorCode.ERR_PARAMS),
            ({"to": "NoSuchUser"}, ErrorCode.ERR_ACCOUNT),
        ]
        for number, (fields, code) in enumerate(cases, 1):
            to = fields.pop("to")
            alice.sendMessage(to, fields.pop("dataString", "hi"), id=number, **fields)
            error = yield alice.next(errorFor(TimType.TIMMESSAGE))
            self.assertEqual((error.body.error.code, error.body.t), (code, number), fields)
        yield alice.ping()
        self.assertEqual((yield bob.history(alice.uid)), [])
        self.assertEqual(alice.take(isMessage) + bob.take(isMessage), [])

    @inlineCallbacks
    def test_blocked(self):
        """
        Blocked in either direction: 4110, even for friends' old rights.
        """
        node, alice, bob = yield self.pair()
        yield node.relations.setStance(bob.uid, alice.uid, STANCE_BLOCK)
        alice.sendMessage(bob.uid, "hi")
        self.assertEqual((yield alice.next(errorFor(90))).body.error.code, ErrorCode.ERR_BLOCK)
        bob.sendMessage(alice.uid, "hi")
        self.assertEqual((yield bob.next(errorFor(90))).body.error.code, ErrorCode.ERR_BLOCK)

    @inlineCallbacks
    def test_noauth(self):
        """
        With message.noauth strangers may write; unknown users are 4106.
        """
        node = yield self.node(messages={"noauth": True})
        alice = yield self.user(node)
        bob = yield self.user(node)
        alice.sendMessage(bob.uid, "hi stranger")
        self.assertEqual((yield bob.next(isMessage)).body.dataString, "hi stranger")
        alice.sendMessage("NoSuchUser", "hi")
        self.assertEqual((yield alice.next(errorFor(90))).body.error.code, ErrorCode.ERR_ACCOUNT)

    @inlineCallbacks
    def test_offlineInOrder(self):
        """
        A recipient offline during the send gets every message, in order,
        in acknowledged lists after logging in; then new ones live.
        """
        node = yield self.node(messages={"offline_batch": 3})
        alice = yield self.user(node)
        bob = yield self.user(node, name="offline-bob")
        yield self.befriend(node, alice, bob)
        yield bob.disconnect()
        for i in range(8):
            alice.sendMessage(bob.uid, f"m{i}")
        for _ in range(8):
            yield alice.next(isMessage)
        again = yield self.user(node, name="offline-bob", registerFirst=False)
        messages = yield again.offlineMessages()
        self.assertEqual([m.dataString for m in messages], [f"m{i}" for i in range(8)])
        self.assertEqual([m.seq for m in messages], list(range(1, 9)))
        self.assertTrue(all(m.isOffline for m in messages))
        self.assertEqual((yield node.store.countInbox(bob.uid)), 0)
        alice.sendMessage(bob.uid, "live")
        self.assertEqual((yield again.next(isMessage)).body.dataString, "live")

    @inlineCallbacks
    def test_nothingOffline(self):
        """
        Asking for offline messages right after login, while the node still
        checks on its own, gets TIMOFFLINEMSGEND; new messages then come
        live.
        """
        node = yield self.node()
        alice = yield self.user(node)
        self.assertEqual((yield alice.offlineMessages()), [])
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        bob.sendMessage(alice.uid, "live")
        self.assertEqual((yield alice.next(isMessage)).body.dataString, "live")

    @inlineCallbacks
    def test_offlineSentUnasked(self):
        """
        A client that does not ask for its offline messages gets them
        offline_push_after seconds after login.
        """
        clock = Clock()
        node = yield self.node(clock=clock, messages={"offline_push_after": 5.0})
        alice = yield self.user(node)
        bob = yield self.user(node, name="lazy-bob")
        yield self.befriend(node, alice, bob)
        yield bob.disconnect()
        alice.sendMessage(bob.uid, "waiting")
        yield alice.next(isMessage)
        again = yield self.user(node, name="lazy-bob", registerFirst=False)
        (session,) = node.sessions.sessionsOf(bob.uid)
        yield waitUntil(lambda: node.inbox.flow.state(session).timer is not None)
        clock.advance(4.9)
        yield again.ping()
        self.assertEqual(again.take(TimType.TIMOFFLINEMSG), [])
        clock.advance(0.1)
        messages = yield again.offlineMessages(request=False)
        self.assertEqual([m.dataString for m in messages], ["waiting"])

    @inlineCallbacks
    def test_unackedComesAgain(self):
        """
        A client that never acknowledges gets the message again when it
        reconnects.
        """
        node, alice, _ = yield self.pair()
        bob = yield self.user(node, autoAck=False)
        yield self.befriend(node, alice, bob)
        alice.sendMessage(bob.uid, "ack me")
        first = yield bob.next(isMessage)
        self.assertIsNotNone(first.ackId)
        yield bob.disconnect()
        again = yield self.user(node, name=bob.loginName, registerFirst=False)
        messages = yield again.offlineMessages()
        self.assertEqual([(m.dataString, m.mid) for m in messages], [("ack me", first.body.mid)])

    @inlineCallbacks
    def test_resendStoredOnce(self):
        """
        A resend with the same id is stored once and answered with the
        original mid, also when the first is still being written.
        """
        node, alice, bob = yield self.pair()
        alice.sendMessage(bob.uid, "once", id=4242)
        alice.sendMessage(bob.uid, "once", id=4242)
        first = yield alice.next(isMessage)
        second = yield alice.next(isMessage)
        alice.sendMessage(bob.uid, "once", id=4242)
        third = yield alice.next(isMessage)
        self.assertEqual({first.body.mid, second.body.mid, third.body.mid}, {first.body.mid})
        yield bob.next(isMessage)
        yield bob.ping()
        self.assertEqual(bob.take(isMessage), [])
        self.assertEqual(len((yield bob.history(alice.uid))), 1)

    @inlineCallbacks
    def test_recall(self):
        """
        The sender recalls: the recipient gets the notice, and the stored
        message keeps its place but loses its content, in the store and in
        the recipient's inbox.
        """
        node, alice, bob = yield self.pair()
        carol = yield self.user(node)
        yield bob.disconnect()
        alice.sendMessage(bob.uid, "oops, secret")
        sent = (yield alice.next(isMessage)).body
        alice.sendMessage(bob.uid, "fine")
        yield alice.next(isMessage)
        # Outside the conversation the message does not exist.
        carol.sendMessage(bob.uid, "x", odType=2, mid=sent.mid, timType=TimType.TIMREVOKEMESSAGE)
        self.assertEqual((yield carol.next(errorFor(92))).body.error.code, ErrorCode.ERR_PARAMS)
        alice.sendMessage(bob.uid, None, odType=2, mid=sent.mid, timType=TimType.TIMREVOKEMESSAGE)
        notice = (yield alice.next(isMessage)).body
        self.assertEqual((notice.odType, notice.mid, notice.seq), (2, sent.mid, 1))
        conv = pairConversation(alice.uid, bob.uid)
        row = yield node.store.getMessage(conv, sent.mid)
        self.assertEqual(row.state, MESSAGE_RECALLED)
        self.assertNotIn(b"secret", row.stanza)
        tombstone = node.vault.openMessage(conv, row.seq, row.stanza)
        self.assertEqual((tombstone.dataString, tombstone.dataBinary, tombstone.odType), (None, None, 2))
        bob2 = yield self.user(node, name=bob.loginName, registerFirst=False)
        offline = yield bob2.offlineMessages()
        self.assertEqual([(m.odType, m.mid, m.dataString) for m in offline][0], (2, sent.mid, None))
        # The recipient may not recall what it received.
        bob2.sendMessage(alice.uid, None, odType=2, mid=offline[1].mid, timType=TimType.TIMREVOKEMESSAGE)
        self.assertEqual((yield bob2.next(errorFor(92))).body.error.code, ErrorCode.ERR_AUTH)
        self.assertEqual([m.dataString for m in offline][1:], ["fine", None])
        self.assertEqual(offline[-1].fromTid.node, alice.uid)
        history = yield bob2.history(alice.uid)
        self.assertEqual([(m.seq, m.odType, m.dataString) for m in history], [(2, 1, "fine"), (1, 2, None)])
        alice.sendMessage(bob.uid, None, odType=2, mid=sent.mid, timType=TimType.TIMREVOKEMESSAGE)
        self.assertEqual((yield alice.next(errorFor(92))).body.error.code, ErrorCode.ERR_PARAMS)

    @inlineCallbacks
    def test_recallWindow(self):
        clock = Clock()
        node, alice, bob = yield self.pair(clock=clock, messages={"recall_window": 60.0})
        alice.sendMessage(bob.uid, "late")
        sent = (yield alice.next(isMessage)).body
        clock.advance(61)
        alice.sendMessage(bob.uid, None, odType=2, mid=sent.mid, timType=TimType.TIMREVOKEMESSAGE)
        self.assertEqual((yield alice.next(errorFor(92))).body.error.code, ErrorCode.ERR_EXPIREOP)

    @inlineCallbacks
    def test_burn(self):
        """
        Only the recipient burns; the sender is told and the content is
        gone from the store.
        """
        node, alice, bob = yield self.pair()
        alice.sendMessage(bob.uid, "read once")
        sent = (yield alice.next(isMessage)).body
        yield bob.next(isMessage)
        alice.sendMessage(bob.uid, None, odType=3, mid=sent.mid, timType=TimType.TIMBURNMESSAGE)
        self.assertEqual((yield alice.next(errorFor(93))).body.error.code, ErrorCode.ERR_AUTH)
        bob.sendMessage(alice.uid, None, odType=3, mid=sent.mid, timType=TimType.TIMBURNMESSAGE)
        told = (yield alice.next(isMessage)).body
        self.assertEqual((told.odType, told.mid, told.fromTid.node), (3, sent.mid, bob.uid))
        echo = (yield bob.next(isMessage)).body
        self.assertEqual(echo.odType, 3)
        row = yield node.store.getMessage(pairConversation(alice.uid, bob.uid), sent.mid)
        self.assertEqual(row.state, MESSAGE_BURNED)
        self.assertIsNone(node.vault.openMessage(row.conv, row.seq, row.stanza).dataString)

    @inlineCallbacks
    def test_stream(self):
        """
        odType 5 reaches online sessions only, without ack, and is never
        stored.
        """
        node, alice, bob = yield self.pair()
        alice.sendMessage(bob.uid, "frame", odType=5)
        got = yield bob.next(isMessage)
        self.assertEqual((got.body.odType, got.ackId), (5, None))
        self.assertEqual((yield bob.history(alice.uid)), [])
        self.assertEqual(alice.take(isMessage), [])

    @inlineCallbacks
    def test_customType(self):
        """
        A custom odType waits offline and is delivered, but is not history.
        """
        node, alice, bob = yield self.pair()
        yield bob.disconnect()
        alice.sendMessage(bob.uid, "typing", odType=40)
        echo = (yield alice.next(isMessage)).body
        self.assertEqual((echo.odType, echo.seq), (40, None))
        bob2 = yield self.user(node, name=bob.loginName, registerFirst=False)
        offline = yield bob2.offlineMessages()
        self.assertEqual([(m.odType, m.dataString) for m in offline], [(40, "typing")])
        self.assertEqual((yield bob2.history(alice.uid)), [])

    @inlineCallbacks
    def test_history(self):
        """
        History pages newest first by mid; the limit is capped; an empty
        history answers an empty list.
        """
        node, alice, bob = yield self.pair(messages={"history_limit": 4})
        self.assertEqual((yield alice.history(bob.uid)), [])
        for i in range(6):
            alice.sendMessage(bob.uid, f"h{i}")
        mids = []
        for _ in range(6):
            mids.append((yield alice.next(isMessage)).body.mid)
        page = yield bob.history(alice.uid, limit=100)
        self.assertEqual([m.dataString for m in page], ["h5", "h4", "h3", "h2"])
        page = yield bob.history(alice.uid, mid=mids[2], limit=10)
        self.assertEqual([m.dataString for m in page], ["h1", "h0"])
        error = yield self.assertFailure(bob.history(alice.uid, limit=0), Exception)
        self.assertEqual(error.code, ErrorCode.ERR_PARAMS)

    @inlineCallbacks
    def test_thousandMessagesFourDevices(self):
        """
        1,000 messages sent as fast as possible between two users with two
        devices each arrive complete and in order on all four devices.
        """
        node = yield self.node()
        alice1 = yield self.user(node, name="alice1000", termtyp=1)
        alice2 = yield self.user(node, name="alice1000", registerFirst=False, termtyp=2)
        bob1 = yield self.user(node, name="bob1000", termtyp=1)
        bob2 = yield self.user(node, name="bob1000", registerFirst=False, termtyp=2)
        yield self.befriend(node, alice1, bob1)
        texts = [f"n{i}" for i in range(1000)]
        for text in texts:
            alice1.sendMessage(bob1.uid, text)
        for device in (alice1, alice2, bob1, bob2):
            got = []
            while len(got) < len(texts):
                got.append((yield device.next(isMessage, timeout=60)).body)
            self.assertEqual([m.dataString for m in got], texts)
            self.assertEqual([m.seq for m in got], list(range(1, 1001)))
        yield bob1.ping()
        yield bob2.ping()
        for _ in range(100):
            if not (yield node.store.countInbox(bob1.uid)):
                break
            yield bob1.ping()
        self.assertEqual((yield node.store.countInbox(bob1.uid)), 0)

    @inlineCallbacks
    def test_stillBeforeOfflineEnd(self):
        """
        While a session drains its offline list, new messages wait behind
        it, so the conversation arrives in order.
        """
        node = yield self.node(messages={"offline_batch": 1})
        alice = yield self.user(node)
        bob = yield self.user(node, name="draining-bob")
        yield self.befriend(node, alice, bob)
        yield bob.disconnect()
        for i in range(3):
            alice.sendMessage(bob.uid, f"old{i}")
            yield alice.next(isMessage)
        again = yield self.user(node, name="draining-bob", registerFirst=False)
        again.send(TimType.TIMOFFLINEMSG)
        alice.sendMessage(bob.uid, "new")
        yield alice.next(isMessage)
        messages = yield again.offlineMessages(request=False)
        live = yield again.next(isMessage, timeout=5) if not any(m.dataString == "new" for m in messages) else None
        received = [m.dataString for m in messages] + ([live.body.dataString] if live else [])
        self.assertEqual(received, ["old0", "old1", "old2", "new"])


class WebSocketCompactMessagingTests(MessagingTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT


class WebSocketJSONMessagingTests(MessagingTestsMixin, NodeTestCase):
    encoding = Encoding.JSON


class TCPJSONSQLiteMessagingTests(MessagingTestsMixin, NodeTestCase):
    transport = "tcp"
    encoding = Encoding.JSON
    backend = "sqlite"
