# -*- test-case-name: timtx.test.test_generations -*-
"""
Tests for L{timtx.protocols.generations}: tim 2.0 and tim 2.1 sessions,
each served group profiles (TimRoomBean) in its own layout.

What a tim client reads is checked against Thrift specs written here from
the field lists of tim's own C{stub/stub.go} (tag 2.0.0 and HEAD 9f03a3a,
which timgo aa69a0f and HEAD 893e758 match), not from
L{timtx.protocols.structs}: the layouts are the facts under test.
"""

import json

from thrift.protocol import fastbinary
from thrift.Thrift import TType
from thrift.transport.TTransport import TMemoryBuffer
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from timtx.client import TimRequestFailed, ackFor, requestToken
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, GroupType, NodeInfo, TimType
from timtx.protocols.frames import client_frame
from timtx.protocols.generations import decode_for_session, login_generation, proven_generation
from timtx.protocols.structs import Generation, TimAuth, TimNodes, TimRoomBean
from timtx.test.base import NodeTestCase
from timtx.testing import httpURL

_STR = "UTF8"
_BIN = "BINARY"


class Bag:
    """
    Any struct: fields become attributes.
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __eq__(self, other):
        return type(other) is Bag and vars(self) == vars(other)

    def __repr__(self):
        return f"Bag({vars(self)})"


def _spec(*fields):
    size = max(f[0] for f in fields) + 1
    spec = [None] * size
    for f in fields:
        spec[f[0]] = f
    return tuple(spec)


_COMMON = (
    (1, TType.STRING, "founder", _STR, None),
    (2, TType.LIST, "managers", (TType.STRING, _STR, False), None),
    (3, TType.STRING, "cover", _STR, None),
    (4, TType.STRING, "topic", _STR, None),
    (5, TType.STRING, "label", _STR, None),
    (6, TType.BYTE, "gtype", None, None),
)
#: TimRoomBean of tim 2.0.0 (timgo aa69a0f).
ROOM_20 = _spec(
    *_COMMON,
    (7, TType.I64, "createtime", None, None),
    (8, TType.MAP, "extend", (TType.STRING, _STR, TType.STRING, _STR, False), None),
    (9, TType.MAP, "extra", (TType.STRING, _STR, TType.STRING, _BIN, False), None),
)
#: TimRoomBean of tim 2.1 (HEAD; timgo 893e758).
ROOM_21 = _spec(
    *_COMMON,
    (7, TType.I64, "kind", None, None),
    (8, TType.I64, "createtime", None, None),
    (9, TType.MAP, "extend", (TType.STRING, _STR, TType.STRING, _STR, False), None),
    (10, TType.MAP, "extra", (TType.STRING, _STR, TType.STRING, _BIN, False), None),
)


def nodesSpec(room):
    return _spec(
        (1, TType.I32, "ntype", None, None),
        (2, TType.LIST, "nodelist", (TType.STRING, _STR, False), None),
        (4, TType.MAP, "roommap", (TType.STRING, _STR, TType.STRUCT, [Bag, room], False), None),
        (5, TType.STRING, "node", _STR, None),
    )


class _Source:
    def __init__(self, data):
        self.trans = TMemoryBuffer(data)
        self.string_length_limit = self.container_length_limit = len(data)


def readAs(room, payload):
    """
    A TimNodes payload as a client with C{room}'s TimRoomBean layout reads it.
    """
    out = Bag()
    fastbinary.decode_compact(out, _Source(payload), [Bag, nodesSpec(room)])
    return out


def writeAs(room, ntype, roommap):
    """
    A TimNodes payload as a client with C{room}'s layout writes it.
    """
    nodes = Bag(ntype=ntype, nodelist=None, roommap=roommap, node=None)
    return bytes(fastbinary.encode_compact(nodes, [Bag, nodesSpec(room)]))


def bean(**fields):
    """
    A Bag with every TimRoomBean field, unset ones None (the C codec reads
    every field of the spec).
    """
    names = {"founder", "managers", "cover", "topic", "label", "gtype", "kind", "createtime", "extend", "extra"}
    return Bag(**{name: fields.get(name) for name in names})


class LayoutTests(SynchronousTestCase):
    def test_defaultIsTim20(self):
        """
        Without a generation, TimRoomBean is written in tim 2.0.0's layout
        and C{kind} goes to field 101, which tim 2.0 clients skip.
        """
        room = TimRoomBean(topic="t", createtime=5, extend={"a": "b"}, extra={"x": b"\xff"}, kind=3)
        payload = codec.encode_compact(TimNodes(ntype=5, roommap={"g": room}))
        read = readAs(ROOM_20, payload).roommap["g"]
        self.assertEqual((read.topic, read.createtime, read.extend, read.extra), ("t", 5, {"a": "b"}, {"x": b"\xff"}))
        self.assertEqual(codec.decode_compact(TimRoomBean, codec.encode_compact(room)), room)

    def test_tim21Layout(self):
        """
        In tim 2.1's layout, kind, createtime, extend and extra are where
        tim 2.1 reads them, and read back.
        """
        room = TimRoomBean(topic="t", createtime=5, extend={"a": "b"}, extra={"x": b"\xff"}, kind=3)
        nodes = TimNodes(ntype=5, roommap={"g": room})
        payload = codec.encode_compact(nodes, Generation.TIM21)
        read = readAs(ROOM_21, payload).roommap["g"]
        self.assertEqual((read.kind, read.createtime, read.extend, read.extra), (3, 5, {"a": "b"}, {"x": b"\xff"}))
        self.assertEqual(codec.decode_compact(TimNodes, payload, Generation.TIM21), nodes)

    def test_pythonFallback(self):
        """
        Without thrift's C module, each generation's layout is written and
        read the same, nested beans included.
        """
        room = TimRoomBean(topic="t", createtime=5, extend={"a": "b"}, extra={"x": b"\xff"}, kind=3)
        nodes = TimNodes(ntype=5, roommap={"g": room})
        fast = {generation: codec.encode_compact(nodes, generation) for generation in Generation}
        self.patch(codec, "_fastbinary", None)
        for generation in Generation:
            self.assertEqual(codec.encode_compact(nodes, generation), fast[generation])
            self.assertEqual(codec.decode_compact(TimNodes, fast[generation], generation), nodes)

    def test_jsonHasNoLayout(self):
        """
        JSON keys are names: both generations write and read the same,
        C{kind} included.
        """
        room = TimRoomBean(topic="t", createtime=5, kind=3)
        data = codec.encode(room, Encoding.JSON, Generation.TIM21)
        self.assertEqual(data, codec.encode(room, Encoding.JSON, Generation.TIM20))
        self.assertEqual(json.loads(data), {"topic": "t", "createtime": 5, "kind": 3})
        self.assertEqual(codec.decode(TimRoomBean, data, Encoding.JSON, Generation.TIM21), room)

    def test_loginGeneration(self):
        """
        A string token is tim 2.1's, a number tim 2.0's; a password proves
        nothing and takes the default.
        """
        self.assertIs(login_generation(TimAuth(name="n", token="7", domain="d")), Generation.TIM21)
        self.assertIs(login_generation(TimAuth(token=7), Generation.TIM21), Generation.TIM20)
        self.assertIs(login_generation(TimAuth(name="n", pwd="p", domain="d")), Generation.TIM20)
        self.assertIs(login_generation(TimAuth(name="n", pwd="p"), Generation.TIM21), Generation.TIM21)

    def test_tokenTypeDecidesLayout(self):
        """
        A compact TimAuth with a string token (tim 2.1) and one with a
        number (tim 2.0) both decode, each with its token's type.
        """
        auth = TimAuth(name="n", domain="d", token="abc")
        for generation in Generation:
            data = codec.encode_compact(TimAuth(name="n", domain="d", token="abc"), Generation.TIM21)
            self.assertEqual(codec.decode_compact(TimAuth, data, generation), auth)
            data = codec.encode_compact(TimAuth(token=77))
            self.assertEqual(codec.decode_compact(TimAuth, data, generation).token, 77)

    def test_proof(self):
        """
        A TimRoomBean with an i64 in field 8 or with a field 10 was written
        by tim 2.1; one with only fields both have proves nothing.
        """
        cases = [
            (bean(createtime=1), Generation.TIM21),
            (bean(extra={"x": b"\xff"}), Generation.TIM21),
            (bean(kind=1, extend={"a": "b"}), None),
            (bean(topic="t"), None),
        ]
        for room, expected in cases:
            payload = writeAs(ROOM_21, 7, {"g": room})
            self.assertIs(proven_generation(TimNodes, payload), expected, room)
        payload = writeAs(ROOM_20, 7, {"g": bean(extend={"a": "b"}, extra={"x": b"\xff"}, createtime=1)})
        self.assertIsNone(proven_generation(TimNodes, payload))
        self.assertIsNone(proven_generation(TimNodes, b"\xff\xff"))
        self.assertIsNone(proven_generation(TimAuth, b""))

    def test_sessionRaisedOnce(self):
        """
        A tim 2.0 session that sends a bean only tim 2.1 writes becomes 2.1,
        and that bean reads right; a 2.1 session stays 2.1.
        """
        payload = writeAs(ROOM_21, 7, {"g": bean(kind=4, extend={"a": "b"}, extra={"x": b"\xff"})})
        nodes, generation = decode_for_session(TimNodes, payload, Encoding.COMPACT, Generation.TIM20)
        self.assertIs(generation, Generation.TIM21)
        self.assertEqual(nodes.roommap["g"], TimRoomBean(kind=4, extend={"a": "b"}, extra={"x": b"\xff"}))
        plain = writeAs(ROOM_21, 7, {"g": bean(topic="t")})
        self.assertIs(decode_for_session(TimNodes, plain, Encoding.COMPACT, Generation.TIM21)[1], Generation.TIM21)
        self.assertIs(decode_for_session(TimNodes, plain, Encoding.COMPACT, Generation.TIM20)[1], Generation.TIM20)


def bagOf(room):
    return bean(**{name: getattr(room, name) for name in vars(bean())})


class GenerationTestsMixin:
    """
    Group profiles through a real node, for a tim 2.0 and a tim 2.1 client.
    """

    sections = {"groups": {"member_notices": False}}

    @inlineCallbacks
    def tim21(self, node, name=None):
        """
        A tim 2.1 client: it logs in with a string token, name and domain,
        as timgo HEAD does.
        """
        client = yield self.user(node, name=name, domain="d.example")
        name = client.loginName
        yield client.disconnect()
        token = yield requestToken(reactor, httpURL(node), name, "secret", "d.example")
        again = yield self.client(node)
        yield again.login(name, domain="d.example", token=token.n)
        self.assertIs(again.generation, Generation.TIM21)
        return again

    @inlineCallbacks
    def group(self, node, founder):
        ack = yield founder.business(Business.NEWROOM, node="first", reqInt=GroupType.OPEN)
        return ack.n

    @inlineCallbacks
    def readRaw(self, client, gid):
        """
        Ask for a group's profile; the frame's raw payload and the bean the
        client decoded.
        """
        client.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROOMINFO, nodelist=[gid]))
        incoming = yield client.next(TimType.TIMNODES)
        return incoming.payload, incoming.body.roommap[gid]

    @inlineCallbacks
    def test_eachReadsItsLayout(self):
        """
        A profile with kind, extend and extra set reaches a tim 2.0 client
        in 2.0's layout and a tim 2.1 client in 2.1's: each finds
        createtime, extend and extra where its tim puts them, and the 2.1
        client its kind at 7.
        """
        node = yield self.node()
        old = yield self.user(node)
        new = yield self.tim21(node)
        gid = yield self.group(node, old)
        change = TimRoomBean(topic="t", kind=9, extend={"a": "b"}, extra={"x": b"\xff"})
        yield old.nodes(NodeInfo.MODIFYROOM, roommap={gid: change})
        payload, oldView = yield self.readRaw(old, gid)
        _, newView = yield self.readRaw(new, gid)
        for view in (oldView, newView):
            self.assertEqual((view.topic, view.kind, view.extend, view.extra), ("t", 9, {"a": "b"}, {"x": b"\xff"}))
            self.assertEqual(view.createtime, oldView.createtime)
        self.assertGreater(oldView.createtime, 1 << 53)
        if self.encoding is Encoding.COMPACT:
            read = readAs(ROOM_20, payload).roommap[gid]
            self.assertEqual(
                (read.createtime, read.extend, read.extra), (oldView.createtime, {"a": "b"}, {"x": b"\xff"})
            )
            newPayload, _ = yield self.readRaw(new, gid)
            read = readAs(ROOM_21, newPayload).roommap[gid]
            self.assertEqual(
                (read.kind, read.createtime, read.extend, read.extra),
                (9, oldView.createtime, {"a": "b"}, {"x": b"\xff"}),
            )

    @inlineCallbacks
    def test_tim21ClientWrites(self):
        """
        A tim 2.1 client's change, written in its own layout, is accepted:
        its kind is stored (not refused as a createtime), its extend and
        extra land in extend and extra, and a tim 2.0 client reads them
        there.
        """
        node = yield self.node()
        old = yield self.user(node)
        new = yield self.tim21(node)
        gid = yield self.group(node, new)
        if self.encoding is Encoding.COMPACT:
            payload = writeAs(
                ROOM_21, NodeInfo.MODIFYROOM, {gid: bean(kind=5, extend={"a": "b"}, extra={"x": b"\x00"})}
            )
            new.sendRaw(client_frame(TimType.TIMNODES, payload, Encoding.COMPACT))
        else:
            body = {"ntype": 7, "roommap": {gid: {"kind": 5, "extend": {"a": "b"}, "extra": {"x": "AA=="}}}}
            new.sendRaw(client_frame(TimType.TIMNODES, json.dumps(body).encode(), Encoding.JSON))
        ack = (yield new.next(ackFor(TimType.TIMNODES))).body
        self.assertTrue(ack.ok, ack)
        for client in (old, new):
            _, view = yield self.readRaw(client, gid)
            self.assertEqual((view.kind, view.extend, view.extra), (5, {"a": "b"}, {"x": b"\x00"}))

    @inlineCallbacks
    def test_defaultGeneration(self):
        """
        With C{[client] default_generation = 2.1}, a password login is a
        tim 2.1 session; a numeric token still makes a 2.0 one.
        """
        node = yield self.node(client={"default_generation": "2.1"})
        client = yield self.user(node)
        gid = yield self.group(node, client)
        payload, _ = yield self.readRaw(client, gid)
        if self.encoding is Encoding.COMPACT:
            self.assertGreater(readAs(ROOM_21, payload).roommap[gid].createtime, 1 << 53)
        name = client.loginName
        token = yield requestToken(reactor, httpURL(node), name, "secret")
        numeric = yield self.client(node)
        yield numeric.login(token=token.t)
        self.assertIs(numeric.generation, Generation.TIM20)
        payload, view = yield self.readRaw(numeric, gid)
        if self.encoding is Encoding.COMPACT:
            self.assertGreater(readAs(ROOM_20, payload).roommap[gid].createtime, 1 << 53)

    @inlineCallbacks
    def test_createtimeStillRefused(self):
        """
        In either layout, a client may not set createtime: 4104.
        """
        node = yield self.node()
        old = yield self.user(node)
        new = yield self.tim21(node)
        gid = yield self.group(node, old)
        yield old.business(Business.PULLROOM, node=gid, node2=new.uid)
        yield old.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(managers=[new.uid])})
        for client in (old, new):
            failure = yield self.assertFailure(
                client.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(createtime=1)}), TimRequestFailed
            )
            self.assertEqual(failure.code, ErrorCode.ERR_PARAMS)


class CompactGenerationTests(GenerationTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT

    @inlineCallbacks
    def test_passwordLoginRaised(self):
        """
        A tim 2.1 client that logs in with a password is served 2.0 until it
        sends a bean only tim 2.1 writes; from then on it is a 2.1 session.
        """
        node = yield self.node()
        client = yield self.user(node)
        gid = yield self.group(node, client)
        payload, _ = yield self.readRaw(client, gid)
        self.assertIsNotNone(readAs(ROOM_20, payload).roommap[gid].createtime)
        change = writeAs(ROOM_21, NodeInfo.MODIFYROOM, {gid: bean(kind=2, extra={"x": b"1"})})
        client.sendRaw(client_frame(TimType.TIMNODES, change, Encoding.COMPACT))
        self.assertTrue((yield client.next(ackFor(TimType.TIMNODES))).body.ok)
        payload, _ = yield self.readRaw(client, gid)
        read = readAs(ROOM_21, payload).roommap[gid]
        self.assertEqual((read.kind, read.extra), (2, {"x": b"1"}))
        self.assertGreater(read.createtime, 1 << 53)


class JSONGenerationTests(GenerationTestsMixin, NodeTestCase):
    encoding = Encoding.JSON
