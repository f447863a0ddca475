# -*- test-case-name: timtx.test.test_peerwire -*-
"""
Tests for L{timtx.protocols.peer}: the peer protocol on bytes.
"""

import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from timtx.protocols.peer import (
    HANDSHAKE_MAX_FRAME_BYTES,
    MAGIC,
    CloseCode,
    CloseReceived,
    Established,
    FrameType,
    Hello,
    MessageReceived,
    PeerConnection,
    PeerProtocolError,
    PeerState,
    PingReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    ResponseStatus,
    Role,
    closeCodeName,
    decodeHello,
    encodeHello,
)

SECRET = b"s" * 32


def make(nodeId, initiator, secret=SECRET, **kwargs):
    kwargs.setdefault("nonce", bytes([len(nodeId)]) * 32)
    return PeerConnection(nodeId, secret, initiator=initiator, **kwargs)


def drain(conn):
    """
    Every event C{conn} has, or the L{PeerProtocolError} that ended it as
    the last item.
    """
    events = []
    while True:
        try:
            event = conn.nextEvent()
        except PeerProtocolError as e:
            events.append(e)
            return events
        if event is None:
            return events
        events.append(event)


def pump(a, b, chunk=None):
    """
    Move bytes both ways until neither end has any to send.

    @param chunk: deliver in pieces of this many bytes (C{None}: whole).
    @return: the events of C{a} and of C{b}.
    """
    eventsA, eventsB = [], []
    while True:
        outA, outB = b"".join(a.dataToSend()), b"".join(b.dataToSend())
        if not outA and not outB:
            return eventsA, eventsB
        for data, conn, events in ((outA, b, eventsB), (outB, a, eventsA)):
            size = chunk or max(len(data), 1)
            for start in range(0, len(data), size):
                conn.receiveData(data[start : start + size])
                events.extend(drain(conn))


def established():
    a, b = make("alpha", True, features=["x", "y"]), make("beta", False, features=["y", "z"])
    pump(a, b)
    return a, b


def frame(frameType, body):
    return struct.pack(">I", len(body) + 1) + bytes((frameType,)) + body


class HandshakeTests(SynchronousTestCase):
    def assertEstablished(self, events, peerId, features):
        self.assertEqual(len(events), 1, events)
        self.assertIsInstance(events[0], Established)
        self.assertEqual((events[0].peerId, events[0].version, events[0].features), (peerId, 1, features))

    def test_whole(self):
        """
        Both ends prove the secret and learn each other's node id, the
        version and the features both offered.
        """
        a, b = make("alpha", True, features=["x", "y"]), make("beta", False, features=["y", "z"])
        eventsA, eventsB = pump(a, b)
        self.assertEstablished(eventsA, "beta", frozenset({"y"}))
        self.assertEstablished(eventsB, "alpha", frozenset({"y"}))
        self.assertEqual((a.state, b.state), (PeerState.ESTABLISHED, PeerState.ESTABLISHED))
        self.assertEqual(eventsA[0].linkId, eventsB[0].linkId)
        self.assertEqual(len(a.linkId), 32)

    def test_byteByByte(self):
        """
        A handshake delivered one byte at a time gives the same result.
        """
        a, b = make("alpha", True), make("beta", False)
        eventsA, eventsB = pump(a, b, chunk=1)
        self.assertEstablished(eventsA, "beta", frozenset())
        self.assertEstablished(eventsB, "alpha", frozenset())

    def test_trailingData(self):
        """
        Frames that arrive in the same chunk as the handshake, after it, are
        events after L{Established}.
        """
        a, b = make("alpha", True), make("beta", False)
        b.receiveData(b"".join(a.dataToSend()))
        self.assertEqual(drain(b), [])
        a.receiveData(b"".join(b.dataToSend()))
        [event] = drain(a)
        self.assertIsInstance(event, Established)
        a.sendMessage("hi", b"one")
        a.sendRequest(7, "ask", b"two")
        b.receiveData(b"".join(a.dataToSend()))
        events = drain(b)
        self.assertIsInstance(events[0], Established)
        self.assertEqual(events[1:], [MessageReceived("hi", b"one"), RequestReceived(7, "ask", b"two")])

    def test_sessionIdentifiesARun(self):
        """
        The session id given to each link of one run reaches the peer.
        """
        a = make("alpha", True, session=b"S" * 8)
        b = make("beta", False)
        _, eventsB = pump(a, b)
        self.assertEqual(eventsB[0].session, b"S" * 8)

    def test_wrongSecret(self):
        """
        Ends with different secrets both refuse, saying authentication
        failed, and neither is established.
        """
        a, b = make("alpha", True), make("beta", False, secret=b"t" * 32)
        eventsA, eventsB = pump(a, b)
        for events, peer in ((eventsA, "beta"), (eventsB, "alpha")):
            [error] = events
            self.assertIsInstance(error, PeerProtocolError)
            self.assertEqual(error.code, CloseCode.AUTHENTICATION_FAILED)
            self.assertIn(f"node {peer} failed authentication", error.reason)
        self.assertEqual((a.state, b.state), (PeerState.CLOSED, PeerState.CLOSED))

    def test_replayedInitiator(self):
        """
        A recorded initiator handshake (HELLO and AUTH) replayed to a
        responder fails: the responder's nonce is fresh.
        """
        a, b = make("alpha", True), make("beta", False, nonce=b"1" * 32)
        recorded = b"".join(a.dataToSend())
        b.receiveData(recorded)
        drain(b)
        a.receiveData(b"".join(b.dataToSend()))
        drain(a)
        recorded += b"".join(a.dataToSend())
        # Replay everything the initiator sent to a new responder.
        fresh = make("beta", False, nonce=b"2" * 32)
        fresh.receiveData(recorded)
        [error] = drain(fresh)
        self.assertEqual(error.code, CloseCode.AUTHENTICATION_FAILED)

    def test_replayedResponder(self):
        """
        A recorded responder handshake replayed to a new initiator fails.
        """
        a, b = make("alpha", True, nonce=b"1" * 32), make("beta", False)
        b.receiveData(b"".join(a.dataToSend()))
        drain(b)
        recorded = b"".join(b.dataToSend())
        fresh = make("alpha", True, nonce=b"2" * 32)
        fresh.receiveData(recorded)
        [error] = drain(fresh)
        self.assertEqual(error.code, CloseCode.AUTHENTICATION_FAILED)

    def test_reflectedAuth(self):
        """
        A responder's own AUTH sent back to it as the initiator's fails: the
        tags name the role.
        """
        a = make("alpha", True)
        b = make("beta", False)
        b.receiveData(b"".join(a.dataToSend()))
        drain(b)
        helloAndAuth = b"".join(b.dataToSend())
        (helloSize,) = struct.unpack(">I", helloAndAuth[:4])
        reflected = helloAndAuth[4 + helloSize :]
        b.receiveData(reflected)
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.AUTHENTICATION_FAILED)

    def test_unknownVersion(self):
        """
        Ends with no common version refuse with a reason that names both
        ranges, and the peer can read it.
        """
        a, b = make("alpha", True), make("beta", False, versions=(2, 3))
        b.receiveData(b"".join(a.dataToSend()))
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.UNSUPPORTED_VERSION)
        self.assertIn("this node speaks 2-3, node alpha speaks 1-1", error.reason)
        a.receiveData(b"".join(b.dataToSend()))
        events = drain(a)
        # a also sees b's HELLO first and refuses for the same reason.
        self.assertEqual(events[0].code, CloseCode.UNSUPPORTED_VERSION)

    def test_closeBeforeAuthIsReadable(self):
        """
        A CLOSE sent before the AUTH reaches the peer as L{CloseReceived}.
        """
        a, b = make("alpha", True), make("beta", False)
        b.close(CloseCode.HANDSHAKE_TIMEOUT, "too slow")
        a.receiveData(b"".join(b.dataToSend()))
        self.assertEqual(drain(a), [CloseReceived(CloseCode.HANDSHAKE_TIMEOUT, "too slow")])
        self.assertEqual((a.state, a.closeCode, a.closeReason), (PeerState.CLOSED, 8, "too slow"))

    def test_closeAfterOwnAuthIsReadable(self):
        """
        A CLOSE sent after this end's AUTH, before the peer's, is tagged and
        still reaches the peer.
        """
        a, b = make("alpha", True), make("beta", False)
        b.receiveData(b"".join(a.dataToSend()))
        drain(b)
        b.close(CloseCode.HANDSHAKE_TIMEOUT, "too slow")
        a.receiveData(b"".join(b.dataToSend()))
        events = drain(a)
        self.assertIsInstance(events[0], Established)
        self.assertEqual(events[1:], [CloseReceived(CloseCode.HANDSHAKE_TIMEOUT, "too slow")])

    def test_selfConnection(self):
        """
        A HELLO with this node's own id is refused.
        """
        a, b = make("alpha", True), make("alpha", False, nonce=b"9" * 32)
        b.receiveData(b"".join(a.dataToSend()))
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.SELF_CONNECTION)

    def test_sameRole(self):
        """
        Two initiators refuse each other.
        """
        a, b = make("alpha", True), make("beta", True)
        b.receiveData(b"".join(a.dataToSend()))
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.PROTOCOL_ERROR)
        self.assertIn("both ends claim to be the initiator", error.reason)

    def test_helloRoundTrip(self):
        """
        A HELLO decodes to what was encoded; bytes after its fields are
        ignored.
        """
        hello = Hello(1, 2, Role.RESPONDER, b"n" * 32, b"s" * 8, "node-1", ("a", "b.c"))
        self.assertEqual(decodeHello(encodeHello(hello)), hello)
        self.assertEqual(decodeHello(encodeHello(hello) + b"future field"), hello)


class MalformedTests(SynchronousTestCase):
    def refuse(self, data, code=CloseCode.PROTOCOL_ERROR, conn=None):
        conn = conn or make("beta", False)
        conn.receiveData(data)
        events = drain(conn)
        error = events[-1]
        self.assertIsInstance(error, PeerProtocolError)
        self.assertEqual(error.code, code)
        self.assertEqual(conn.state, PeerState.CLOSED)
        # The reason goes to the peer in a CLOSE.
        out = b"".join(conn.dataToSend())
        self.assertIn(error.reason.encode("utf-8")[:40], out)
        return error

    def helloBody(self, **fields):
        values = {
            "minVersion": 1,
            "maxVersion": 1,
            "role": Role.INITIATOR,
            "nonce": b"n" * 32,
            "session": b"s" * 8,
            "nodeId": "alpha",
            "features": (),
        }
        values.update(fields)
        return encodeHello(Hello(**values))

    def test_notAPeer(self):
        """
        An HTTP request is refused at once: its first bytes read as a length
        far over the handshake limit.
        """
        error = self.refuse(b"GET / HTTP/1.1\r\n\r\n", CloseCode.FRAME_TOO_LARGE)
        self.assertIn("exceeds the handshake limit of 4096", error.reason)

    def test_badMagic(self):
        error = self.refuse(frame(FrameType.HELLO, b"NOT-A-PEER" + b"\x00" * 60))
        self.assertIn("bad HELLO magic", error.reason)

    def test_firstFrameNotHello(self):
        error = self.refuse(frame(FrameType.MESSAGE, b"\x02hihello"))
        self.assertIn("expected HELLO", error.reason)

    def test_truncatedHello(self):
        for size in range(len(MAGIC), len(self.helloBody())):
            error = self.refuse(frame(FrameType.HELLO, self.helloBody()[:size]))
            self.assertIn("malformed HELLO", error.reason)

    def test_badFields(self):
        """
        A bad role, version range, node id or feature name is refused.
        """
        good = self.helloBody()
        roleOffset = len(MAGIC) + 4
        self.assertIn(
            "unknown role", self.refuse(frame(1, good[:roleOffset] + b"\x07" + good[roleOffset + 1 :])).reason
        )
        self.assertIn("version range", self.refuse(frame(1, self.helloBody(minVersion=3, maxVersion=2))).reason)
        self.assertIn("version range", self.refuse(frame(1, self.helloBody(minVersion=0, maxVersion=2))).reason)
        bad = good.replace(b"\x05alpha", b"\x05al ha")
        self.assertIn("invalid node id", self.refuse(frame(1, bad)).reason)
        bad = good.replace(b"\x05alpha", b"\x05al\xffha")
        self.assertIn("non-ASCII", self.refuse(frame(1, bad)).reason)
        bad = self.helloBody(features=("ok",)).replace(b"\x02ok", b"\x02o!")
        self.assertIn("invalid feature", self.refuse(frame(1, bad)).reason)

    def test_emptyFrame(self):
        self.refuse(b"\x00\x00\x00\x00")

    def test_authBeforeHello(self):
        self.refuse(frame(FrameType.AUTH, b"x" * 32))

    def test_helloTwice(self):
        """
        After the HELLO only an AUTH (or a CLOSE) may come.
        """
        a, b = make("alpha", True), make("beta", False)
        hello = b"".join(a.dataToSend())
        error = self.refuse(hello + hello, conn=b)
        self.assertIn("expected AUTH", error.reason)

    def test_oversizeHandshakeFrame(self):
        """
        Before authentication a frame over 4 KiB is refused from its length
        alone, before its body is buffered.
        """
        conn = make("beta", False)
        conn.receiveData(struct.pack(">I", HANDSHAKE_MAX_FRAME_BYTES + 1))
        [error] = drain(conn)
        self.assertEqual(error.code, CloseCode.FRAME_TOO_LARGE)

    def test_oversizeFrame(self):
        """
        Once established, a frame over C{maxFrameBytes} is refused.
        """
        a = make("alpha", True, maxFrameBytes=1 << 20)
        b = make("beta", False, maxFrameBytes=100000)
        pump(a, b)
        a.sendMessage("big", b"x" * 100000)
        b.receiveData(b"".join(a.dataToSend())[:10])
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.FRAME_TOO_LARGE)
        self.assertIn("exceeds the limit of 100000", error.reason)

    def test_largeFrameWithinLimit(self):
        a, b = established()
        payload = bytes(range(256)) * 4000
        a.sendMessage("big", payload)
        b.receiveData(b"".join(a.dataToSend()))
        self.assertEqual(drain(b), [MessageReceived("big", payload)])


class AuthenticatedFrameTests(SynchronousTestCase):
    def test_allTypes(self):
        """
        Messages, requests, responses, pings and pongs arrive as sent, in
        order, whole or byte by byte.
        """
        for chunk in (None, 1):
            a, b = established()
            a.sendMessage("m", b"")
            a.sendRequest(0xFFFFFFFF, "r.q-1_x", b"payload")
            a.sendResponse(3, ResponseStatus.BUSY, b"later")
            a.sendPing(b"12345678")
            a.sendPong(b"p")
            data = b"".join(a.dataToSend())
            events = []
            for start in range(0, len(data), chunk or len(data)):
                b.receiveData(data[start : start + (chunk or len(data))])
                events += drain(b)
            self.assertEqual(
                events,
                [
                    MessageReceived("m", b""),
                    RequestReceived(0xFFFFFFFF, "r.q-1_x", b"payload"),
                    ResponseReceived(3, ResponseStatus.BUSY, b"later"),
                    PingReceived(b"12345678"),
                    PongReceived(b"p"),
                ],
            )

    def test_bothDirections(self):
        a, b = established()
        b.sendMessage("back", b"1")
        a.sendMessage("forth", b"2")
        eventsA, eventsB = pump(a, b)
        self.assertEqual((eventsA, eventsB), ([MessageReceived("back", b"1")], [MessageReceived("forth", b"2")]))

    def test_close(self):
        """
        A CLOSE after authentication ends the link with its code and reason.
        """
        a, b = established()
        a.close(CloseCode.DUPLICATE_LINK, "keeping the other link")
        self.assertEqual(a.state, PeerState.CLOSED)
        b.receiveData(b"".join(a.dataToSend()))
        self.assertEqual(drain(b), [CloseReceived(CloseCode.DUPLICATE_LINK, "keeping the other link")])
        self.assertEqual(b.closeReason, "keeping the other link")
        # Nothing more is accepted or sent.
        a.close(CloseCode.NORMAL, "again")
        self.assertEqual(a.dataToSend(), [])
        self.assertRaises(RuntimeError, a.sendMessage, "m", b"")

    def test_alteredFrame(self):
        a, b = established()
        a.sendMessage("m", b"payload")
        data = bytearray(b"".join(a.dataToSend()))
        data[10] ^= 1
        b.receiveData(bytes(data))
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.AUTHENTICATION_FAILED)

    def test_replayedFrame(self):
        """
        A frame sent twice fails the second time: tags cover a counter.
        """
        a, b = established()
        a.sendMessage("m", b"payload")
        data = b"".join(a.dataToSend())
        b.receiveData(data + data)
        events = drain(b)
        self.assertEqual(events[0], MessageReceived("m", b"payload"))
        self.assertEqual(events[1].code, CloseCode.AUTHENTICATION_FAILED)

    def test_reorderedFrames(self):
        a, b = established()
        a.sendMessage("m", b"1")
        first = b"".join(a.dataToSend())
        a.sendMessage("m", b"2")
        second = b"".join(a.dataToSend())
        b.receiveData(second + first)
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.AUTHENTICATION_FAILED)

    def test_injectedUntaggedFrame(self):
        """
        An untagged frame injected into an authenticated link is refused.
        """
        a, b = established()
        b.receiveData(frame(FrameType.MESSAGE, b"\x01m" + b"x" * 20))
        [error] = drain(b)
        self.assertEqual(error.code, CloseCode.AUTHENTICATION_FAILED)
        b2 = established()[1]
        b2.receiveData(frame(FrameType.MESSAGE, b""))
        self.assertEqual(drain(b2)[0].code, CloseCode.PROTOCOL_ERROR)

    def test_extensionTypesIgnored(self):
        """
        An unknown type from 0x40 up is skipped; below it, refused.
        """
        a, b = established()
        a._emit(0x41, [b"new"])
        a.sendMessage("m", b"after")
        b.receiveData(b"".join(a.dataToSend()))
        self.assertEqual(drain(b), [MessageReceived("m", b"after")])
        a._emit(0x20, [b"new"])
        b.receiveData(b"".join(a.dataToSend()))
        [error] = drain(b)
        self.assertIn("unknown frame type 32", error.reason)

    def test_malformedBodies(self):
        """
        Short or invalid bodies of known types are refused with the frame
        named.
        """
        cases = [
            (FrameType.MESSAGE, b"", "malformed MESSAGE: truncated"),
            (FrameType.MESSAGE, b"\x05ab", "malformed MESSAGE: truncated"),
            (FrameType.MESSAGE, b"\x02a b", "malformed MESSAGE: invalid kind"),
            (FrameType.REQUEST, b"\x00\x00", "malformed REQUEST: truncated"),
            (FrameType.RESPONSE, b"\x00\x00\x00\x01", "malformed RESPONSE: truncated"),
            (FrameType.RESPONSE, b"\x00\x00\x00\x01\x09", "unknown status 9"),
            (FrameType.PING, b"x" * 65, "malformed PING"),
            (FrameType.CLOSE, b"\x00", "malformed CLOSE"),
        ]
        for frameType, body, text in cases:
            a, b = established()
            a._emit(frameType, [body])
            b.receiveData(b"".join(a.dataToSend()))
            [error] = drain(b)
            self.assertIn(text, error.reason)

    def test_localMisuse(self):
        """
        Sending before the link is established, or with a bad kind, is the
        caller's bug and raises at once.
        """
        a = make("alpha", True)
        self.assertRaises(RuntimeError, a.sendMessage, "m", b"")
        a, b = established()
        self.assertRaises(ValueError, a.sendMessage, "bad kind", b"")
        self.assertRaises(ValueError, a.sendMessage, "", b"")
        self.assertRaises(ValueError, a.sendPing, b"x" * 65)
        self.assertRaises(ValueError, PeerConnection, "bad id", SECRET, initiator=True)
        self.assertRaises(ValueError, PeerConnection, "ok", b"short", initiator=True)
        self.assertRaises(ValueError, PeerConnection, "ok", SECRET, initiator=True, features=["no way"])

    def test_closeCodeNames(self):
        self.assertEqual(closeCodeName(CloseCode.DUPLICATE_LINK), "duplicate link")
        self.assertEqual(closeCodeName(999), "code 999")


class RandomInputTests(SynchronousTestCase):
    def test_randomBytes(self):
        """
        Random bytes before or after authentication produce events or a
        L{PeerProtocolError}, nothing else (bounded: 300 runs).
        """
        rng = random.Random(12)
        for run in range(300):
            if run % 2:
                conn = established()[1]
            else:
                conn = make("beta", False)
            size = rng.randrange(0, 200)
            data = bytes(rng.randrange(256) for _ in range(size))
            if run % 3 == 0 and size >= 4:
                # Make the length plausible so the body gets parsed.
                data = struct.pack(">I", size - 4) + data[4:]
            conn.receiveData(data)
            for item in drain(conn):
                self.assertIsInstance(
                    item,
                    (
                        PeerProtocolError,
                        MessageReceived,
                        RequestReceived,
                        ResponseReceived,
                        CloseReceived,
                        PingReceived,
                    ),
                )
