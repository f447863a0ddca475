# -*- test-case-name: timtx.test.test_badtext -*-
"""
Text that is not Unicode is refused where it is decoded, with 4113, in
both encodings: a lone surrogate escape in JSON, bytes that are not UTF-8
in Thrift compact.  Nothing later fails to encode it.
"""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from timtx.client import TimRequestFailed, register
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import client_frame
from timtx.protocols.structs import ALL_STRUCTS, TimAuth, TimMessage
from timtx.test.base import NodeTestCase
from timtx.testing import httpURL


class CodecTests(SynchronousTestCase):
    def test_loneSurrogateJSON(self):
        """
        A lone surrogate escape in any JSON string is 4113.
        """
        for text in ('{"dataString":"a\\ud800"}', '{"extend":{"\\udfff":"x"}}', '{"toTid":{"node":"\\udbff"}}'):
            error = self.assertRaises(TimProtocolError, codec.decode_json, TimMessage, text.encode())
            self.assertEqual(error.code, ErrorCode.ERR_FORMAT)
        # A surrogate pair is a character, and fine.
        self.assertEqual(codec.decode_json(TimMessage, b'{"dataString":"\\ud83d\\ude00"}').dataString, "\U0001f600")

    def test_notUtf8Compact(self):
        """
        A compact string that is not UTF-8 is 4113; a real U+FFFD is text.
        """
        good = codec.encode_compact(TimAuth(name="ab", pwd="secret"))
        error = self.assertRaises(TimProtocolError, codec.decode_compact, TimAuth, good.replace(b"ab", b"\xff\xc0"))
        self.assertEqual((error.code, error.text), (ErrorCode.ERR_FORMAT, "malformed TimAuth: invalid UTF-8"))
        self.assertEqual(codec.decode_compact(TimAuth, codec.encode_compact(TimAuth(name="\ufffd"))).name, "\ufffd")

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(ALL_STRUCTS), st.binary(max_size=200), st.sampled_from(list(Encoding)))
    def test_anyBytes(self, cls, data, encoding):
        """
        Any bytes decode to a struct that encodes again in both encodings, or
        raise L{TimProtocolError}; nothing else.
        """
        try:
            struct = codec.decode(cls, data, encoding)
        except TimProtocolError:
            return
        codec.encode_compact(struct)
        codec.encode_json(struct)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=0x10FFFF), max_size=8))
    def test_anyCodePoints(self, points):
        """
        Any code points, surrogates included, escaped in JSON: decoded text
        encodes again, or the frame is 4113.
        """
        text = "".join(chr(p) for p in points)
        data = json.dumps({"dataString": text, "extend": {text: text}}, ensure_ascii=True).encode()
        try:
            message = codec.decode_json(TimMessage, data)
        except TimProtocolError as e:
            self.assertEqual(e.code, ErrorCode.ERR_FORMAT)
            return
        codec.encode_compact(message)
        codec.encode_json(message)


class NodeTests(NodeTestCase):
    encoding = Encoding.JSON

    @inlineCallbacks
    def test_badTextEverywhere(self):
        """
        Before login (/tim2 register) and after it (TIMMESSAGE, add-friend,
        TIMPRESENCE, TIMNODES), a lone surrogate gets 4113 and nothing is
        logged as critical or as a failure.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        node = yield self.node()
        failure = yield self.assertFailure(
            register(reactor, httpURL(node), "x\ud800", "secret", encoding=Encoding.JSON),
            TimRequestFailed,
            UnicodeEncodeError,
        )
        if isinstance(failure, TimRequestFailed):
            self.assertEqual(failure.code, ErrorCode.ERR_FORMAT)
        alice = yield self.user(node)
        bad = b'"\\ud800"'
        frames = [
            (TimType.TIMMESSAGE, b'{"msType":2,"odType":1,"toTid":{"node":' + bad + b'},"dataString":' + bad + b"}"),
            (TimType.TIMBUSINESS, b'{"rtype":4,"node":' + bad + b"}"),
            (TimType.TIMPRESENCE, b'{"toTid":{"node":"x"},"status":' + bad + b"}"),
            (TimType.TIMNODES, b'{"ntype":4,"usermap":{"x":{"name":' + bad + b"}}}"),
        ]
        for timType, payload in frames:
            alice.sendRaw(client_frame(timType, payload, Encoding.JSON))
            reply = yield alice.next(TimType.TIMACK)
            self.assertEqual(self.errorOf(reply, timType), ErrorCode.ERR_FORMAT)
        yield alice.ping()
        bad_events = [
            e for e in observer if e["log_level"] in (LogLevel.critical, LogLevel.error) or "log_failure" in e
        ]
        self.assertEqual(bad_events, [])

    @inlineCallbacks
    def test_rawRegister(self):
        """
        /tim2 register with a lone surrogate in the JSON body is answered
        4113.
        """
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        from timtx.protocols.frames import parse_server_frame
        from timtx.protocols.structs import TimAck
        from timtx.util.bodies import BytesProducer

        node = yield self.node()
        body = client_frame(TimType.TIMREGISTER, b'{"name":"\\ud800","pwd":"secret"}', Encoding.JSON)
        response = yield Agent(reactor).request(
            b"POST",
            httpURL(node).encode(),
            Headers({b"Content-Type": [b"application/octet-stream"]}),
            BytesProducer(body),
        )
        ack = codec.decode(TimAck, parse_server_frame((yield readBody(response))).payload, Encoding.JSON)
        self.assertEqual((ack.ok, ack.error.code), (False, ErrorCode.ERR_FORMAT))
