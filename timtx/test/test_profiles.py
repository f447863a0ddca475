"""
End-to-end tests of user profiles (TIMNODES 4 and 6).
"""

from twisted.internet.defer import inlineCallbacks

from timtx.client import TimRequestFailed
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, NodeInfo
from timtx.protocols.structs import TimUserBean
from timtx.test.base import NodeTestCase


class ProfileTestsMixin:
    @inlineCallbacks
    def test_modifyAndRead(self):
        """
        A user sets fields of its profile (merged, key ignored) and anyone
        reads it; users without a profile are left out.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        ack = yield alice.nodes(NodeInfo.MODIFYUSER, usermap={"ignored": TimUserBean(nickName="Al", gender=2)})
        self.assertEqual((ack.ok, ack.t), (True, NodeInfo.MODIFYUSER))
        yield alice.nodes(NodeInfo.MODIFYUSER, usermap={"": TimUserBean(area="Mars", extra={"k": b"\x00\x01"})})
        reply = yield bob.nodes(NodeInfo.USERINFO, nodelist=[alice.uid, bob.uid])
        self.assertEqual(reply.ntype, NodeInfo.USERINFO)
        self.assertEqual(list(reply.usermap), [alice.uid])
        profile = reply.usermap[alice.uid]
        self.assertEqual((profile.nickName, profile.gender, profile.area), ("Al", 2, "Mars"))
        self.assertEqual(profile.extra, {"k": b"\x00\x01"})
        self.assertGreater(profile.createtime, 0)
        blob = yield node.store.getProfile(alice.uid)
        self.assertNotIn(b"Mars", blob)

    @inlineCallbacks
    def test_friendsOnly(self):
        node = yield self.node(profiles={"read": "friends"})
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        yield self.befriend(node, alice, bob)
        yield alice.nodes(NodeInfo.MODIFYUSER, usermap={"": TimUserBean(nickName="Al")})
        self.assertEqual(list((yield bob.nodes(NodeInfo.USERINFO, nodelist=[alice.uid])).usermap), [alice.uid])
        self.assertEqual((yield carol.nodes(NodeInfo.USERINFO, nodelist=[alice.uid])).usermap or {}, {})
        self.assertEqual(list((yield alice.nodes(NodeInfo.USERINFO, nodelist=[alice.uid])).usermap), [alice.uid])

    @inlineCallbacks
    def test_refusals(self):
        node = yield self.node(profiles={"max_field_chars": 10, "max_batch": 2})
        alice = yield self.user(node)
        for ntype, fields, code in [
            (NodeInfo.MODIFYUSER, {"usermap": {"": TimUserBean(nickName="x" * 11)}}, ErrorCode.ERR_BIGDATA),
            (NodeInfo.MODIFYUSER, {"usermap": {"a": TimUserBean(), "b": TimUserBean()}}, ErrorCode.ERR_PARAMS),
            (NodeInfo.MODIFYUSER, {"usermap": {"": TimUserBean(createtime=5)}}, ErrorCode.ERR_PARAMS),
            (NodeInfo.USERINFO, {"nodelist": ["a", "b", "c"]}, ErrorCode.ERR_PARAMS),
            (NodeInfo.USERINFO, {}, ErrorCode.ERR_PARAMS),
            (99, {}, ErrorCode.ERR_PARAMS),
        ]:
            failure = yield self.assertFailure(alice.nodes(ntype, **fields), TimRequestFailed)
            self.assertEqual(failure.code, code, fields)
        self.assertIsNone((yield node.store.getProfile(alice.uid)))


class WebSocketCompactProfileTests(ProfileTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT


class WebSocketJSONProfileTests(ProfileTestsMixin, NodeTestCase):
    encoding = Encoding.JSON
    backend = "sqlite"
