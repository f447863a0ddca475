"""
Tests of big payloads: the reassembly without I/O (whole, in pieces, byte
by byte, timgo's form, every malformation), and end to end: TIMBIGSTRING
and TIMBIGBINARY to users, TIMBIGBINARYSTREAM into rooms, several MiB
intact, refusals, broken chunk streams and the reassembly deadline.
"""

import random
import struct

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.persistence.records import STANCE_BLOCK
from timtx.protocols.bigframes import (
    MAX_BIG_DATA_BYTES,
    BigDataAssembler,
    clientBigDataFrame,
    isBigDataFrame,
    splitBigData,
)
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.test.base import NodeTestCase, waitUntil, within

BIGSTRING, BIGBINARY, BIGSTREAM = TimType.TIMBIGSTRING, TimType.TIMBIGBINARY, TimType.TIMBIGBINARYSTREAM


class BigDataLayoutTests(SynchronousTestCase):
    def test_timjsLayout(self):
        """
        timjs's layout: type with 0x80, total length (header included),
        target, separator (| for strings, 131 for binary), data.
        """
        frame = clientBigDataFrame(BIGSTRING, "Bob", b"hi")
        self.assertEqual(frame, b"\xdf\x00\x00\x00\x0bBob|hi")
        frame = clientBigDataFrame(BIGBINARY, "Bob", b"\x00", json=False)
        self.assertEqual(frame, b"\x60\x00\x00\x00\x0aBob\x83\x00")
        self.assertTrue(isBigDataFrame(frame))
        self.assertFalse(isBigDataFrame(b"\x5e"))
        self.assertFalse(isBigDataFrame(b""))

    def test_split(self):
        """
        The first separator ends the target; the data may hold separators.
        """
        self.assertEqual(splitBigData(BIGSTRING, b"Bob|a|b"), ("Bob", b"a|b"))
        self.assertEqual(splitBigData(BIGBINARY, b"Bob\x83\x83|"), ("Bob", b"\x83|"))
        self.assertEqual(splitBigData(BIGSTREAM, b"Room\x83"), ("Room", b""))
        for bad in (b"no separator", b"\x83data", b"B\xffb\x83data", b"x" * 200 + b"\x83"):
            error = self.assertRaises(TimProtocolError, splitBigData, BIGBINARY, bad)
            self.assertEqual(error.code, ErrorCode.ERR_FORMAT)

    def test_capBelowBase58(self):
        """
        Every length a node accepts starts with a byte no base58 character
        has, so timgo's form cannot be mistaken for a length.
        """
        self.assertLess(MAX_BIG_DATA_BYTES.to_bytes(4, "big")[0], ord("1"))


class BigDataAssemblerTests(SynchronousTestCase):
    frame = clientBigDataFrame(BIGBINARY, "Target", bytes(range(256)) * 4)
    whole = frame[:1] + frame[5:]

    def test_whole(self):
        """
        A payload in one message comes out at once, without its length.
        """
        assembler = BigDataAssembler(1 << 20)
        self.assertEqual(assembler.feed(self.frame), self.whole)
        self.assertFalse(assembler.pending)

    def test_pieces(self):
        """
        After a first message holding the header, the rest may come in any
        pieces, down to single bytes.
        """
        for size in (1, 7, 100, 1000):
            assembler = BigDataAssembler(1 << 20)
            self.assertIsNone(assembler.feed(self.frame[:6]))
            rest = self.frame[6:]
            results = [assembler.feed(rest[i : i + size]) for i in range(0, len(rest), size)]
            self.assertEqual(results[-1], self.whole)
            self.assertEqual(set(results[:-1]), {None} if len(results) > 1 else set())
            self.assertFalse(assembler.pending)
            self.assertEqual(assembler.feed(self.frame), self.whole)

    def test_timgoForm(self):
        """
        timgo's HEAD leaves out the length field; the whole message is the
        payload.
        """
        assembler = BigDataAssembler(1 << 20)
        self.assertEqual(assembler.feed(b"\x5fBob|text"), b"\x5fBob|text")

    def test_tooBig(self):
        """
        Over the cap: 4114, fatal only if pieces of it would follow.
        """
        assembler = BigDataAssembler(100)
        error = self.assertRaises(TimProtocolError, assembler.feed, clientBigDataFrame(BIGBINARY, "T", b"x" * 100))
        self.assertEqual((error.code, error.fatal), (ErrorCode.ERR_BIGDATA, False))
        announced = clientBigDataFrame(BIGBINARY, "T", b"x" * 1000)[:50]
        error = self.assertRaises(TimProtocolError, assembler.feed, announced)
        self.assertEqual((error.code, error.fatal), (ErrorCode.ERR_BIGDATA, True))
        error = self.assertRaises(TimProtocolError, assembler.feed, b"\x5fBob|" + b"x" * 100)
        self.assertEqual((error.code, error.fatal), (ErrorCode.ERR_BIGDATA, False))
        self.assertFalse(assembler.pending)

    def test_malformed(self):
        """
        Too short for a header, or longer than announced: 4113, and nothing
        pending.  Pieces that run past the announced length: 4113, fatal.
        """
        assembler = BigDataAssembler(1 << 20)
        for bad in (b"\x60", b"\x60\x00\x00", b"\x60\x00\x00\x00\x05extra"):
            error = self.assertRaises(TimProtocolError, assembler.feed, bad)
            self.assertEqual((error.code, error.fatal), (ErrorCode.ERR_FORMAT, False))
            self.assertFalse(assembler.pending)
        assembler.feed(self.frame[:-10])
        self.assertTrue(assembler.pending)
        error = self.assertRaises(TimProtocolError, assembler.feed, b"x" * 11)
        self.assertEqual((error.code, error.fatal), (ErrorCode.ERR_FORMAT, True))
        self.assertFalse(assembler.pending)

    def test_randomBytes(self):
        """
        Whatever arrives, the assembler returns a frame, asks for more, or
        raises TimProtocolError; nothing else, and never more than the cap.
        """
        rng = random.Random(4)
        assembler = BigDataAssembler(4096)
        for _ in range(3000):
            kind = rng.random()
            if kind < 0.3:
                message = bytes([rng.choice((95, 96, 97, 0xE0))]) + struct.pack(">I", rng.randrange(0, 6000))
                message += rng.randbytes(rng.randrange(0, 300))
            else:
                message = rng.randbytes(rng.randrange(0, 300))
            if not assembler.pending and not isBigDataFrame(message):
                continue
            try:
                frame = assembler.feed(message)
            except TimProtocolError:
                self.assertFalse(assembler.pending)
                continue
            self.assertLessEqual(assembler.received, 4096)
            if frame is not None:
                self.assertLessEqual(len(frame), 4096)


class BigDataTestsMixin:
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def friends(self, **sections):
        node = yield self.node(**sections)
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        return node, alice, bob

    def errorFor(self, timType):
        return lambda i: i.timType == TimType.TIMACK and i.body.timType == timType and not i.body.ok

    @inlineCallbacks
    def test_bigString(self):
        """
        TIMBIGSTRING reaches every session of the recipient raw, as tim
        sends it: [95][sender]|[text].  The sender hears nothing.
        """
        node, alice, bob = yield self.friends()
        bob2 = yield self.user(node, name=bob.loginName, registerFirst=False, termtyp=2)
        text = "Grüße | 你好 " * 1000
        alice.bigString(bob.uid, text)
        for client in (bob, bob2):
            frame = yield client.next(BIGSTRING)
            self.assertEqual(frame.payload, f"{alice.uid}|{text}".encode())
            self.assertEqual(client.bigDataOf(frame), (alice.uid, text.encode()))
        yield alice.ping()
        self.assertEqual(alice.take(lambda i: i.timType in (TimType.TIMACK, BIGSTRING)), [])

    @inlineCallbacks
    def test_severalMiB(self):
        """
        A big binary of several MiB sent in pieces (as over TCP, whose frames
        max_frame_bytes bounds) arrives intact; so does one sent in a single
        WebSocket message, as timjs sends it.
        """
        node, alice, bob = yield self.friends()
        data = random.Random(1).randbytes(5 << 20)
        alice.bigBinary(bob.uid, data, chunkSize=512 * 1024)
        frame = yield bob.next(BIGBINARY, timeout=30)
        self.assertEqual(bob.bigDataOf(frame), (alice.uid, data))
        if self.transport == "ws":
            alice.bigBinary(bob.uid, data[::-1])
            frame = yield bob.next(BIGBINARY, timeout=30)
            self.assertEqual(bob.bigDataOf(frame), (alice.uid, data[::-1]))
        yield alice.ping()

    @inlineCallbacks
    def test_timgoForm(self):
        """
        timgo's HEAD sends big payloads without the length field; they are
        delivered too.
        """
        node, alice, bob = yield self.friends()
        alice.sendRaw(bytes([BIGBINARY]) + bob.uid.encode() + b"\x83timgo")
        self.assertEqual(bob.bigDataOf((yield bob.next(BIGBINARY))), (alice.uid, b"timgo"))

    @inlineCallbacks
    def test_rules(self):
        """
        The rules of 1:1 messages apply: strangers 4105, blocks 4110,
        unknown users 4106, each naming the target in n; with
        messages.noauth strangers may send.
        """
        node, alice, bob = yield self.friends()
        stranger = yield self.user(node)
        alice.bigBinary(stranger.uid, b"x")
        error = (yield alice.next(self.errorFor(BIGBINARY))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_AUTH, stranger.uid))
        alice.bigString("NoSuchUser", "x")
        error = (yield alice.next(self.errorFor(BIGSTRING))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_ACCOUNT, "NoSuchUser"))
        yield node.relations.setStance(bob.uid, alice.uid, STANCE_BLOCK)
        alice.bigBinary(bob.uid, b"x")
        self.assertEqual((yield alice.next(self.errorFor(BIGBINARY))).body.error.code, ErrorCode.ERR_BLOCK)
        yield stranger.ping()
        yield bob.ping()
        self.assertEqual(stranger.take(BIGBINARY) + bob.take(BIGBINARY), [])

    @inlineCallbacks
    def test_noauth(self):
        node = yield self.node(messages={"noauth": True})
        alice = yield self.user(node)
        stranger = yield self.user(node)
        alice.bigBinary(stranger.uid, b"hello")
        self.assertEqual(stranger.bigDataOf((yield stranger.next(BIGBINARY))), (alice.uid, b"hello"))

    @inlineCallbacks
    def test_malformed(self):
        """
        A payload without separator, a string that is not UTF-8, one
        longer than announced, or one over the cap: 4113 or 4114, counted
        as bad frames; whole in one message, the connection goes on.
        """
        node, alice, bob = yield self.friends(vrooms={"bigdata_max_bytes": 1000}, client={"max_bad_frames": 10})
        cases = [
            (b"\x60" + struct.pack(">I", 17) + b"no separator", BIGBINARY, ErrorCode.ERR_FORMAT),
            (clientBigDataFrame(BIGSTRING, bob.uid, b"\xff\xfe"), BIGSTRING, ErrorCode.ERR_FORMAT),
            (b"\x60\x00\x00\x00\x06xy\x83z", BIGBINARY, ErrorCode.ERR_FORMAT),
            (clientBigDataFrame(BIGBINARY, bob.uid, b"x" * 1000), BIGBINARY, ErrorCode.ERR_BIGDATA),
            (b"\x61\x00", BIGSTREAM, ErrorCode.ERR_FORMAT),
        ]
        for frame, timType, code in cases:
            alice.sendRaw(frame)
            self.assertEqual(self.errorOf((yield alice.next(TimType.TIMACK)), timType), code)
        yield alice.ping()
        alice.bigBinary(bob.uid, b"still fine")
        self.assertEqual(bob.bigDataOf((yield bob.next(BIGBINARY))), (alice.uid, b"still fine"))
        yield bob.ping()
        self.assertEqual(bob.take(lambda i: i.timType in (BIGBINARY, BIGSTRING)), [])

    @inlineCallbacks
    def test_brokenChunks(self):
        """
        Pieces that run past the announced length, or a payload announced
        over the cap with pieces to follow, cannot be told from frames: an
        error ack, then a clean close.  Others are not affected.
        """
        node, alice, bob = yield self.friends(vrooms={"bigdata_max_bytes": 1000})
        frame = clientBigDataFrame(BIGBINARY, bob.uid, b"x" * 500)
        alice.sendRaw(frame[:100])
        alice.sendRaw(b"y" * 500)
        self.assertEqual(self.errorOf((yield alice.next(TimType.TIMACK)), BIGBINARY), ErrorCode.ERR_FORMAT)
        yield within(alice.closed)
        carol = yield self.user(node, name=alice.loginName, registerFirst=False)
        carol.sendRaw(clientBigDataFrame(BIGBINARY, bob.uid, b"x" * 5000)[:100])
        self.assertEqual(self.errorOf((yield carol.next(TimType.TIMACK)), BIGBINARY), ErrorCode.ERR_BIGDATA)
        yield within(carol.closed)
        yield bob.ping()
        self.assertEqual(bob.take(BIGBINARY), [])

    @inlineCallbacks
    def test_pingInsidePayload(self):
        """
        While a payload is incomplete every message belongs to it, as in
        tim: a ping's byte becomes data.
        """
        node, alice, bob = yield self.friends()
        frame = clientBigDataFrame(BIGBINARY, bob.uid, b"a\x0db")
        alice.sendRaw(frame[:-2])
        alice.sendRaw(frame[-2:-1])  # the TIMPING byte
        alice.sendRaw(frame[-1:])
        self.assertEqual(bob.bigDataOf((yield bob.next(BIGBINARY))), (alice.uid, b"a\x0db"))

    @inlineCallbacks
    def test_streamIntoRoom(self):
        """
        TIMBIGBINARYSTREAM pushes into a room under TIMSTREAM's rules:
        refusals name the room and carry timType 97.
        """
        node, alice, bob = yield self.friends()
        vnode = yield alice.vroomRegister()
        yield bob.vroomSubscribe(vnode)
        data = random.Random(2).randbytes(300_000)
        alice.bigBinaryStream(vnode, data, chunkSize=100_000)
        got = (yield bob.next(TimType.TIMSTREAM)).body
        self.assertEqual((got.body, got.fromNode, got.id), (data, alice.uid, 1))
        bob.bigBinaryStream(vnode, b"x")
        error = (yield bob.next(self.errorFor(BIGSTREAM))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_AUTH, vnode))
        bob.bigBinaryStream("NoSuchRoom", b"x")
        error = (yield bob.next(self.errorFor(BIGSTREAM))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_NOEXIST, "NoSuchRoom"))

    @inlineCallbacks
    def test_beforeLogin(self):
        """
        Before login a big payload is like any other frame: 4105 and a
        close.
        """
        node = yield self.node()
        client = yield self.client(node)
        client.sendRaw(clientBigDataFrame(BIGBINARY, "x", b"y", json=self.encoding is Encoding.JSON))
        self.assertEqual(self.errorOf((yield client.next(TimType.TIMACK)), BIGBINARY), ErrorCode.ERR_AUTH)
        yield within(client.closed)


class WebSocketCompactBigDataTests(BigDataTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT

    @inlineCallbacks
    def test_oversizeOtherMessage(self):
        """
        Once logged in, only big payloads may exceed max_frame_bytes; any
        other message that does is closed with 1009.
        """
        node = yield self.node(client={"max_frame_bytes": 1024})
        alice = yield self.user(node)
        alice.sendRaw(b"\x5a" + b"x" * 2000)
        yield within(alice.closed)
        self.assertEqual(alice.closeCode, 1009)


class WebSocketJSONBigDataTests(BigDataTestsMixin, NodeTestCase):
    encoding = Encoding.JSON


class TCPCompactBigDataTests(BigDataTestsMixin, NodeTestCase):
    transport = "tcp"
    encoding = Encoding.COMPACT


class ClockedBigDataTests(NodeTestCase):
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def test_deadline(self):
        """
        A payload not whole within bigdata_timeout seconds: 4113 and a
        clean close; one completed in time is delivered.
        """
        clock = Clock()
        node = yield self.node(clock=clock, vrooms={"bigdata_timeout": 5})
        alice, bob = yield gatherResults([self.user(node), self.user(node)])
        yield self.befriend(node, alice, bob)
        receiving = node.sessions.sessionsOf(alice.uid)[0].sink._bigData
        frame = clientBigDataFrame(BIGBINARY, bob.uid, b"z" * 100)
        alice.sendRaw(frame[:50])
        yield waitUntil(lambda: receiving.claims(b""))
        clock.advance(4)
        alice.sendRaw(frame[50:])
        self.assertEqual(bob.bigDataOf((yield bob.next(BIGBINARY))), (alice.uid, b"z" * 100))
        alice.sendRaw(frame[:50])
        yield waitUntil(lambda: receiving.claims(b""))
        clock.advance(5)
        self.assertEqual(self.errorOf((yield alice.next(TimType.TIMACK)), BIGBINARY), ErrorCode.ERR_FORMAT)
        yield within(alice.closed)
