# -*- test-case-name: timtx.test.test_client -*-
"""
Tests for L{timtx.client}: requests matched to their answers, error acks
raised at once, the offline-message calls; and error texts for malformed
input that never name a Python exception.
"""

import builtins
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.client import ClientTimeout, TimClient, TimRequestFailed
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, NodeInfo, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import client_frame, server_frame
from timtx.protocols.structs import (
    ALL_STRUCTS,
    Tid,
    TimAck,
    TimAuth,
    TimError,
    TimMessage,
    TimNodes,
    TimPresence,
)
from timtx.test.base import NodeTestCase
from timtx.test.test_codec import fullSamples


class FakeTransport:
    """
    What a L{TimClient} writes to: frames are kept, nothing is sent.
    """

    def __init__(self):
        self.frames = []
        self.open = True

    def writeFrame(self, frame):
        self.frames.append(frame)

    def isOpen(self):
        return self.open

    def loseTransport(self):
        self.open = False


def serverSends(client, timType, body=None, ackId=None):
    payload = b"" if body is None else codec.encode(body, client.encoding)
    client._frameReceived(server_frame(timType, payload, ackId))


def message(sender, to, text, **fields):
    return TimMessage(msType=2, odType=1, fromTid=Tid(node=sender), toTid=Tid(node=to), dataString=text, **fields)


def error(timType, code=ErrorCode.ERR_AUTH, **fields):
    return TimAck(ok=False, timType=timType, error=TimError(code=code, info="no"), **fields)


class RequestTests(SynchronousTestCase):
    """
    L{TimClient.request} on a fake connection and a fake clock.
    """

    def setUp(self):
        self.clock = Clock()
        self.client = TimClient(self.clock, Encoding.COMPACT)
        self.transport = FakeTransport()
        self.client._attach(self.transport)
        self.client.uid = "alice"

    def test_olderFramesAreNotAnswers(self):
        """
        A frame of the reply type kept before the request was sent does not
        answer it, even when C{reply} is a frame type.
        """
        serverSends(self.client, TimType.TIMMESSAGE, message("bob", "alice", "old"))
        d = self.client.request(TimType.TIMMESSAGE, message(None, "bob", "mine"), TimType.TIMMESSAGE)
        self.assertNoResult(d)
        serverSends(self.client, TimType.TIMMESSAGE, message("alice", "bob", "mine"))
        self.assertEqual(self.successResultOf(d).body.dataString, "mine")
        self.assertEqual([i.body.dataString for i in self.client.received], ["old"])

    def test_ownEchoNotSomeoneElses(self):
        """
        A message request is answered by its own echo, matched by id: a
        message from someone else arriving first is kept for L{next}.
        """
        d = self.client.request(TimType.TIMMESSAGE, message(None, "bob", "mine"))
        sent = codec.decode(TimMessage, self.transport.frames[-1][1:], Encoding.COMPACT)
        self.assertIsNotNone(sent.id, "the client gives the message an id")
        serverSends(self.client, TimType.TIMMESSAGE, message("bob", "alice", "hi", id=sent.id))
        serverSends(self.client, TimType.TIMMESSAGE, message("carol", "alice", "hey"))
        self.assertNoResult(d)
        serverSends(self.client, TimType.TIMMESSAGE, message("alice", "bob", "mine", id=sent.id, mid=7))
        self.assertEqual(self.successResultOf(d).body.mid, 7)
        self.assertEqual([i.body.dataString for i in self.client.received], ["hi", "hey"])

    def test_resendOfForgottenMessage(self):
        """
        A resend of a message that left the history is answered with an ok
        ack of the type sent (its C{t} the mid): that answers the request.
        """
        d = self.client.request(TimType.TIMMESSAGE, message(None, "bob", "again", id=3))
        serverSends(self.client, TimType.TIMACK, TimAck(ok=True, timType=TimType.TIMBUSINESS, t=4))
        self.assertNoResult(d)
        serverSends(self.client, TimType.TIMACK, TimAck(ok=True, timType=TimType.TIMMESSAGE, t=99))
        self.assertEqual(self.successResultOf(d).body.t, 99)

    def test_oldNoticeNotTaken(self):
        """
        An ack kept from an earlier request of the same kind does not
        answer a new one.
        """
        serverSends(self.client, TimType.TIMACK, TimAck(ok=True, timType=TimType.TIMBUSINESS, t=4, n="bob"))
        d = self.client.business(Business.ADDROSTER, node="carol")
        self.assertNoResult(d)
        serverSends(self.client, TimType.TIMACK, TimAck(ok=True, timType=TimType.TIMBUSINESS, t=4, n="carol"))
        self.assertEqual(self.successResultOf(d).n, "carol")
        self.assertEqual(len(self.client.received), 1)

    def test_errorAckFailsAtOnce(self):
        """
        The error ack answering a message (its id in C{t}) fails the request
        with L{TimRequestFailed} at once; one for another message does not.
        """
        d = self.client.request(TimType.TIMMESSAGE, message(None, "bob", "x", id=5))
        serverSends(self.client, TimType.TIMACK, error(TimType.TIMMESSAGE, t=6))
        self.assertNoResult(d)
        serverSends(self.client, TimType.TIMACK, error(TimType.TIMMESSAGE, t=5))
        failure = self.failureResultOf(d, TimRequestFailed)
        self.assertEqual((failure.value.code, failure.value.ack.t), (ErrorCode.ERR_AUTH, 5))
        self.assertEqual([i.body.t for i in self.client.received], [6])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_errorsAnswerInOrder(self):
        """
        An error ack that names no request answers the oldest waiting
        request of its frame type: the server handles frames in order.
        """
        first = self.client.business(Business.ADDROSTER, node="bob")
        second = self.client.business(Business.BLOCKROSTER, node="carol")
        ping = self.client.ping()
        serverSends(self.client, TimType.TIMACK, error(TimType.TIMBUSINESS, ErrorCode.ERR_BLOCK))
        self.assertEqual(self.failureResultOf(first, TimRequestFailed).value.code, ErrorCode.ERR_BLOCK)
        self.assertNoResult(second)
        serverSends(self.client, TimType.TIMACK, TimAck(ok=True, timType=TimType.TIMBUSINESS, t=7, n="carol"))
        self.assertEqual(self.successResultOf(second).t, 7)
        serverSends(self.client, TimType.TIMPING)
        self.successResultOf(ping)

    def test_listAnswers(self):
        """
        List requests are answered by the TimNodes of their ntype; profile
        reads by the TimNodes of theirs, changes by the ack.
        """
        roster = self.client.business(Business.ROSTER)
        blocked = self.client.business(Business.BLOCKROSTERLIST)
        users = self.client.nodes(NodeInfo.USERINFO, nodelist=["bob"])
        change = self.client.nodes(NodeInfo.MODIFYUSER, usermap={})
        serverSends(self.client, TimType.TIMNODES, TimNodes(ntype=NodeInfo.BLOCKROSTERLIST, nodelist=["x"]))
        serverSends(self.client, TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROSTER, nodelist=["y"]))
        serverSends(self.client, TimType.TIMNODES, TimNodes(ntype=NodeInfo.USERINFO, usermap={}))
        serverSends(self.client, TimType.TIMACK, TimAck(ok=True, timType=TimType.TIMNODES, t=NodeInfo.MODIFYUSER))
        self.assertEqual(self.successResultOf(roster).nodelist, ["y"])
        self.assertEqual(self.successResultOf(blocked).nodelist, ["x"])
        self.assertEqual(self.successResultOf(users).ntype, NodeInfo.USERINFO)
        self.assertEqual(self.successResultOf(change).t, NodeInfo.MODIFYUSER)

    def test_timeout(self):
        """
        Without an answer, L{ClientTimeout} after C{timeout} seconds; the
        late answer is then kept.
        """
        d = self.client.ping(timeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, ClientTimeout)
        serverSends(self.client, TimType.TIMPING)
        self.assertEqual([i.timType for i in self.client.received], [TimType.TIMPING])

    def test_silentSuccessNeedsReply(self):
        """
        Presence succeeds silently: a request for it needs C{reply}; nothing
        is sent without one.
        """
        self.assertRaises(ValueError, self.client.request, TimType.TIMPRESENCE, TimPresence(status="x"))
        self.assertEqual(self.transport.frames, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answersBeforeOnFrame(self):
        """
        With L{TimClient.onFrame} set, requests still get their answers;
        every other frame goes to C{onFrame}.
        """
        seen = []
        self.client.onFrame = seen.append
        d = self.client.ping()
        serverSends(self.client, TimType.TIMMESSAGE, message("bob", "alice", "hi"))
        serverSends(self.client, TimType.TIMPING)
        self.successResultOf(d)
        self.assertEqual([i.timType for i in seen], [TimType.TIMMESSAGE])

    def test_connectionLost(self):
        """
        Requests waiting when the connection closes fail with
        L{ConnectionDone}; sending afterwards raises it, and frames that ask
        for an ack are not acknowledged on a closed connection.
        """
        d = self.client.business(Business.ROSTER)
        self.transport.open = False
        serverSends(self.client, TimType.TIMMESSAGE, message("bob", "alice", "late"), ackId=9)
        self.assertEqual(len(self.transport.frames), 1)
        self.client._connectionLost(None)
        self.failureResultOf(d, ConnectionDone)
        self.failureResultOf(self.client.ping(), ConnectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])


#: Names a Python or thrift exception goes by: none may reach a client.
_EXCEPTION_NAMES = sorted(
    {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)}
    | {"TProtocolException", "TTransportException", "TException", "Traceback"}
)
_EXCEPTION_WORD = re.compile(r"\b(" + "|".join(_EXCEPTION_NAMES) + r")\b")


class ErrorTextTests(SynchronousTestCase):
    """
    What a client is told about a payload that does not decode.
    """

    def assertHuman(self, text):
        self.assertTrue(text)
        self.assertIsNone(_EXCEPTION_WORD.search(text), text)

    def assertDecodesOrSaysWhy(self, structType, data, encoding):
        try:
            codec.decode(structType, data, encoding)
        except TimProtocolError as e:
            self.assertHuman(e.text)

    @settings(max_examples=800, deadline=None, derandomize=True, database=None)
    @given(st.sampled_from(ALL_STRUCTS), st.binary(max_size=48), st.sampled_from(list(Encoding)))
    def test_randomBytes(self, structType, data, encoding):
        """
        Random bytes as any struct, in either encoding: they decode, or the
        error's text (what an error ack carries) names no Python exception.
        """
        self.assertDecodesOrSaysWhy(structType, data, encoding)

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(st.data())
    def test_damagedStructs(self, data):
        """
        Every struct fully set, encoded in compact, then cut or with bytes
        changed: it decodes, or the error says why in words.
        """
        sample = data.draw(st.sampled_from(fullSamples()))
        encoded = bytearray(codec.encode_compact(sample))
        for _ in range(data.draw(st.integers(1, 4))):
            encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(encoded)))
        self.assertDecodesOrSaysWhy(type(sample), bytes(encoded[:cut]), Encoding.COMPACT)

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(st.data())
    def test_wrongJSONValues(self, data):
        """
        JSON objects with a struct's keys and values of any JSON type: they
        decode, or the error says which key is wrong, in words.
        """
        structType = data.draw(st.sampled_from(ALL_STRUCTS))
        values = st.recursive(
            st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=4),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
            max_leaves=8,
        )
        keys = st.sampled_from([f.json for f in structType.FIELDS])
        document = data.draw(st.dictionaries(keys, values, max_size=4))
        self.assertDecodesOrSaysWhy(structType, json.dumps(document).encode(), Encoding.JSON)

    def test_malformedTimAuth(self):
        """
        Bytes with an unknown Thrift type, truncated bytes, an overlong and a
        negative length each get words, not a class name.
        """
        for data, words in [
            (b"\x0e\xc7\xdd\x01", "an unknown Thrift type"),
            (b"\x18\x03ab", "truncated"),
            (b"k\xdd\ns\t\xcbJ\x12R\xe4\xdap\xe6r\x0f\xca\xa4", "a length beyond the end of the frame"),
        ]:
            e = self.assertRaises(TimProtocolError, codec.decode, TimAuth, data, Encoding.COMPACT)
            self.assertEqual((e.code, e.text), (ErrorCode.ERR_FORMAT, f"malformed TimAuth: {words}"))


class ClientNodeTestsMixin:
    """
    The client against a real node.
    """

    @inlineCallbacks
    def test_postMessageGetsOwnEcho(self):
        """
        L{TimClient.postMessage} returns the message as stored, not the
        message a friend sent before, which stays for L{TimClient.next}.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        bob.sendMessage(alice.uid, "from bob")
        yield bob.next(TimType.TIMMESSAGE)
        yield alice.ping()
        stored = yield alice.postMessage(bob.uid, "from alice")
        self.assertEqual((stored.fromTid.node, stored.dataString), (alice.uid, "from alice"))
        self.assertIsNotNone(stored.mid)
        kept = yield alice.next(TimType.TIMMESSAGE)
        self.assertEqual(kept.body.dataString, "from bob")

    @inlineCallbacks
    def test_refusalRaisedAtOnce(self):
        """
        A refused message raises L{TimRequestFailed} with the server's code,
        also when C{reply} names the echo's frame type.
        """
        node = yield self.node()
        alice = yield self.user(node)
        stranger = yield self.user(node)
        request = TimMessage(msType=2, odType=1, toTid=Tid(node=stranger.uid), dataString="hi")
        failure = yield self.assertFailure(
            alice.request(TimType.TIMMESSAGE, request, TimType.TIMMESSAGE, timeout=30), TimRequestFailed
        )
        self.assertEqual((failure.code, failure.ack.t), (ErrorCode.ERR_AUTH, request.id))
        failure = yield self.assertFailure(alice.postMessage(stranger.uid, "again"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)

    @inlineCallbacks
    def test_recallAnsweredByNotice(self):
        """
        A recall (92) is answered by its notice, a TIMMESSAGE (90) with
        odType 2 and the recall's id.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        stored = yield alice.postMessage(bob.uid, "oops")
        notice = yield alice.postMessage(bob.uid, None, odType=2, timType=TimType.TIMREVOKEMESSAGE, mid=stored.mid)
        self.assertEqual((notice.odType, notice.mid), (2, stored.mid))

    @inlineCallbacks
    def test_offlineCalls(self):
        """
        L{TimClient.requestOfflineMessages} asks; the lists and the end
        arrive as frames.  L{TimClient.offlineMessages} collects them.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        yield bob.disconnect()
        yield alice.postMessage(bob.uid, "one")
        yield alice.postMessage(bob.uid, "two")
        again = yield self.user(node, name=bob.loginName, registerFirst=False)
        again.requestOfflineMessages()
        batch = yield again.next(TimType.TIMOFFLINEMSG)
        self.assertEqual([m.dataString for m in batch.body.messageList], ["one", "two"])
        yield again.next(TimType.TIMOFFLINEMSGEND)
        yield alice.postMessage(bob.uid, "three")
        self.assertEqual((yield again.next(TimType.TIMMESSAGE)).body.dataString, "three")
        self.assertEqual((yield again.offlineMessages()), [])

    @inlineCallbacks
    def test_malformedLoginIsWords(self):
        """
        A malformed TimAuth gets an error ack in words (4113), not a Python
        exception's name.
        """
        node = yield self.node()
        client = yield self.client(node)
        if self.encoding is Encoding.COMPACT:
            frame, info = b"\x0e\xc7\xdd\x01\xe4\x88", "malformed TimAuth: an unknown Thrift type"
        else:
            frame, info = b'{"name": ["x"]}', "TimAuth.name: expected a string"
        client.sendRaw(client_frame(TimType.TIMAUTH, frame, self.encoding))
        ack = (yield client.next(TimType.TIMACK)).body
        self.assertEqual((ack.ok, ack.error.code, ack.error.info), (False, ErrorCode.ERR_FORMAT, info))

    @inlineCallbacks
    def test_listRequests(self):
        """
        Lists and acks answer their own requests when several wait at once.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        added = alice.business(Business.ADDROSTER, node=bob.uid)
        blocked = alice.business(Business.BLOCKROSTER, node=carol.uid)
        listed = alice.business(Business.BLOCKROSTERLIST)
        self.assertEqual(((yield added).t, (yield blocked).t), (Business.ADDROSTER, Business.BLOCKROSTER))
        self.assertEqual((yield listed).nodelist, [carol.uid])
        bad = alice.business(Business.ADDROSTER, node=alice.uid)
        after = alice.business(Business.ROSTER)
        self.assertEqual((yield self.assertFailure(bad, TimRequestFailed)).code, ErrorCode.ERR_AUTH)
        self.assertEqual((yield after).ntype, NodeInfo.ROSTER)


class CompactClientTests(ClientNodeTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT


class JSONClientTests(ClientNodeTestsMixin, NodeTestCase):
    encoding = Encoding.JSON
    transport = "tcp"
