"""
Compatibility with what real tim clients send (docs: tim-client-quirks):
timjs's JSON dialect byte for byte, and timgo's compact one.
"""

import json

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.web.client import Agent, readBody

from timtx.client import connect
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.test.base import NodeTestCase
from timtx.testing import httpURL, wsURL
from timtx.util.bodies import BytesProducer


def timjsAuth(**fields):
    """
    A TimAuth as timjs serialises its one long-lived object.
    """
    auth = {"name": "", "pwd": "", "domain": None, "resource": "", "termtyp": 0, "token": None, "extend": None}
    auth.update(fields)
    return json.dumps(auth).encode()


def timjsMessage(msType, odType, **fields):
    message = dict.fromkeys(
        [
            "id",
            "mid",
            "bnType",
            "fromTid",
            "toTid",
            "roomTid",
            "dataString",
            "dataBinary",
            "isOffline",
            "timestamp",
            "udtype",
            "udshow",
            "extend",
            "extra",
        ]
    )
    message.update(msType=msType, odType=odType, **fields)
    return json.dumps(message).encode()


def frame(timType, payload=b""):
    # timjs sets 0x80 on everything it sends.
    return bytes([timType | 0x80]) + payload


class TimjsTests(NodeTestCase):
    @inlineCallbacks
    def tim2(self, node, body):
        response = yield Agent(reactor).request(b"POST", httpURL(node).encode(), None, BytesProducer(body))
        content = yield readBody(response)
        self.assertEqual(content[0], TimType.TIMACK)
        return json.loads(content[1:])

    @inlineCallbacks
    def timjs(self, node):
        """
        A WebSocket speaking as timjs: raw frames, acks sent by hand.
        """
        client = yield connect(reactor, wsURL(node), Encoding.JSON, origin="http://localhost:8080", autoAck=False)
        self.addCleanup(lambda: client.disconnect() if not client.closed.called else None)
        return client

    def ackAsTimjs(self, client, incoming):
        # timjs: "if 0x80 is set it acks and skips 4 more bytes".
        client.sendRaw(frame(TimType.TIMACK, incoming.ackId.to_bytes(4, "big")))

    @inlineCallbacks
    def test_session(self):
        """
        Register, token, login by token with name and password alongside, a
        message with every unset field null, acks and pings with 0x80, and a
        reconnect that logs in again with the spent token.
        """
        node = yield self.node(messages={"noauth": True})
        reply = yield self.tim2(node, frame(TimType.TIMREGISTER, timjsAuth(name="js", pwd="pw1")))
        self.assertEqual((reply["ok"], reply["timType"]), (True, TimType.TIMREGISTER))
        uid = reply["n"]
        # timjs builds TIMTOKEN without the flag; its encoder adds it.
        reply = yield self.tim2(node, frame(TimType.TIMTOKEN, timjsAuth(name="js", pwd="pw1")))
        token = reply["t"]
        self.assertIsInstance(token, int)
        self.assertLess(token, 2**53, "a JavaScript number keeps it exact")
        other = yield self.user(node)

        client = yield self.timjs(node)
        client.sendRaw(frame(TimType.TIMAUTH, timjsAuth(name="js", pwd="pw1", token=token)))
        login = yield client.next(TimType.TIMACK)
        self.assertEqual((login.body.ok, login.body.n), (True, uid))
        client.sendRaw(frame(TimType.TIMPING))
        pong = yield client.next(TimType.TIMPING)
        self.assertEqual(pong.payload, b"")
        client.sendRaw(frame(TimType.TIMOFFLINEMSG))
        yield client.next(TimType.TIMOFFLINEMSGEND)

        client.sendRaw(
            frame(TimType.TIMMESSAGE, timjsMessage(2, 1, toTid={"node": other.uid, "domain": None}, dataString="hi"))
        )
        echo = yield client.next(TimType.TIMMESSAGE)
        got = yield other.next(TimType.TIMMESSAGE)
        self.assertEqual((echo.body.dataString, got.body.dataString), ("hi", "hi"))
        other.sendMessage(uid, "back")
        incoming = yield client.next(TimType.TIMMESSAGE)
        self.assertIsNotNone(incoming.ackId)
        raw = json.loads(incoming.payload)
        self.assertEqual(raw["dataString"], "back")
        self.assertNotIn("isOffline", raw, "unset fields are left out, as Go writes them")
        self.ackAsTimjs(client, incoming)
        yield client.disconnect()

        # timjs reconnects after 2 s with the same TimAuth: the spent token
        # and the password.
        again = yield self.timjs(node)
        again.sendRaw(frame(TimType.TIMAUTH, timjsAuth(name="js", pwd="pw1", token=token)))
        login = yield again.next(TimType.TIMACK)
        self.assertEqual((login.body.ok, login.body.n), (True, uid))
        again.sendRaw(frame(TimType.TIMOFFLINEMSG))
        end = yield again.next(lambda i: i.timType in (TimType.TIMOFFLINEMSG, TimType.TIMOFFLINEMSGEND))
        self.assertEqual(end.timType, TimType.TIMOFFLINEMSGEND, "the acked message is not sent again")

    @inlineCallbacks
    def test_refusedLoginInJSON(self):
        """
        A refused timjs login is answered in JSON with Go's keys.
        """
        node = yield self.node()
        client = yield self.timjs(node)
        client.sendRaw(frame(TimType.TIMAUTH, timjsAuth(name="nobody", pwd="x")))
        refused = yield client.next(TimType.TIMACK)
        self.assertEqual(
            json.loads(refused.payload),
            {"ok": False, "timType": TimType.TIMAUTH, "error": {"code": 4105, "info": "wrong name or password"}},
        )


class TimgoTests(NodeTestCase):
    @inlineCallbacks
    def test_compactDialect(self):
        """
        timgo: compact frames without the flag, acks as 0x0C + id, its own
        Origin header.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        timgo = yield connect(reactor, wsURL(node), Encoding.COMPACT, autoAck=False)
        self.addCleanup(timgo.disconnect)
        yield timgo.login(bob.loginName, "secret", termtyp=3)
        alice.sendMessage(bob.uid, "to timgo")
        incoming = yield timgo.next(TimType.TIMMESSAGE)
        timgo.sendRaw(bytes([TimType.TIMACK]) + incoming.ackId.to_bytes(4, "big"))
        yield timgo.ping()
        yield bob.ping()
        self.assertEqual((yield node.store.countInbox(bob.uid)), 0)
