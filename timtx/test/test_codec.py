"""
Tests for L{timtx.protocols.structs} and L{timtx.protocols.codec}.
"""

import json
import random

from thrift.protocol import fastbinary
from twisted.trial.unittest import SynchronousTestCase

from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import (
    ALL_STRUCTS,
    Tid,
    TimAck,
    TimAuth,
    TimError,
    TimMessage,
    TimMessageList,
    TimNodes,
    TimPresence,
    TimReq,
    TimRoomBean,
    TimStream,
    TimUserBean,
)


def articleMessage():
    """
    The sample TimMessage of the tim articles.
    """
    return TimMessage(
        msType=1,
        odType=1,
        id=1 << 60,
        mid=1 << 61,
        bnType=1 << 30,
        fromTid=Tid(node="tom"),
        toTid=Tid(node="jerry"),
        dataString="A good programmer",
        isOffline=True,
        timestamp=1 << 60,
        extend={"ex1": "A good programmer", "ex2": "A good programmer"},
    )


def fullSamples():
    """
    One instance of every struct with every field set.
    """
    tid = Tid(node="n1", domain="d", resource="phone", termtyp=2, extend={"a": "b"})
    user = TimUserBean(
        name="Ann",
        nickName="ann",
        brithday="2000-01-01",
        gender=1,
        cover="c",
        area="a",
        createtime=5,
        photoTidAlbum=["p1", "p2"],
        extend={"k": "v"},
        extra={"bin": b"\x00\xff"},
    )
    room = TimRoomBean(
        founder="f",
        managers=["m1"],
        cover="c",
        topic="t",
        label="l",
        gtype=2,
        createtime=7,
        extend={"k": "v"},
        extra={"x": b"\x01"},
    )
    message = TimMessage(
        msType=2,
        odType=1,
        id=-5,
        mid=(1 << 63) - 1,
        bnType=-(1 << 31),
        fromTid=tid,
        toTid=Tid(node="n2"),
        roomTid=Tid(node="r"),
        dataBinary=b"\x00\x01\x02",
        dataString="héllo ✓",
        isOffline=False,
        timestamp=1,
        udtype=-(1 << 15),
        udshow=(1 << 15) - 1,
        extend={"e": "f"},
        extra={"g": b"h"},
        toList=["a", "b"],
    )
    return [
        TimError(code=4104, info="bad"),
        TimAck(ok=False, timType=-128, error=TimError(code=1, info="x"), t=-(1 << 63), n="n", t2=2, n2="n2"),
        TimReq(rtype=1, node="a", node2="b", reqInt=3, reqInt2=4, reqStr="s", reqStr2="t"),
        tid,
        user,
        room,
        TimAuth(name="n", pwd="p", domain="d", resource="r", termtyp=127, token=123, extend={"a": "b"}),
        TimPresence(
            id=1,
            offline=True,
            subStatus=1,
            fromTid=tid,
            toTid=tid,
            toList=["x"],
            show=2,
            status="s",
            extend={"a": "b"},
            extra={"c": b"d"},
        ),
        message,
        TimStream(id=9, VNode="v", dtype=1, body=b"\x00" * 10, fromNode="f"),
        TimNodes(ntype=4, nodelist=["a"], usermap={"a": user}, roommap={"r": room}, node="x"),
        TimMessageList(id=3, messageList=[message, articleMessage()]),
    ]


class SansIOTests(SynchronousTestCase):
    def test_noTwisted(self):
        """
        The codec, structs, frames and connection state import no Twisted:
        they can be used (and fuzzed) without a reactor.
        """
        import subprocess
        import sys

        code = (
            "import sys\n"
            "import timtx.protocols.codec, timtx.protocols.frames, timtx.protocols.connection\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'twisted')\n"
            "print(loaded)\n"
        )
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        self.assertEqual(output.strip(), "[]")


class CompactTests(SynchronousTestCase):
    def test_articleVector(self):
        """
        The tim articles' sample message is 124 bytes in compact, as tim's
        Go code encodes it, and decodes back equal.
        """
        data = codec.encode_compact(articleMessage())
        self.assertEqual(len(data), 124)
        self.assertEqual(codec.decode_compact(TimMessage, data), articleMessage())

    def test_everyStructRoundTrips(self):
        """
        Every struct, with every field set, survives compact encoding.
        """
        samples = fullSamples()
        self.assertEqual({type(s) for s in samples}, set(ALL_STRUCTS))
        for sample in samples:
            self.assertEqual(codec.decode(type(sample), codec.encode_compact(sample), Encoding.COMPACT), sample)

    def test_cCodecIsUsed(self):
        """
        Compact encoding and decoding go through thrift's C module.
        """
        self.assertTrue(codec.ACCELERATED)
        calls = []

        class Spy:
            def encode_compact(self, *args):
                calls.append("encode")
                return fastbinary.encode_compact(*args)

            def decode_compact(self, *args):
                calls.append("decode")
                return fastbinary.decode_compact(*args)

        self.patch(codec, "_fastbinary", Spy())
        codec.decode_compact(TimMessage, codec.encode_compact(articleMessage()))
        self.assertEqual(calls, ["encode", "decode"])

    def test_pythonFallbackAgrees(self):
        """
        Without the C module the pure-Python protocol gives the same bytes.
        """
        fast = [codec.encode_compact(s) for s in fullSamples()]
        self.patch(codec, "_fastbinary", None)
        slow = [codec.encode_compact(s) for s in fullSamples()]
        self.assertEqual(fast, slow)
        for sample, data in zip(fullSamples(), slow, strict=True):
            self.assertEqual(codec.decode_compact(type(sample), data), sample)

    def test_requiredFieldsWrittenAsZero(self):
        """
        Required fields left unset are written with their zero value, as
        Go's generated code does.
        """
        data = codec.encode_compact(TimAck())
        self.assertEqual(codec.decode_compact(TimAck, data), TimAck(ok=False, timType=0))

    def test_truncated(self):
        """
        Every proper prefix of a message fails with ERR_FORMAT, or decodes
        to a struct missing a required field (ERR_PARAMS); nothing else
        escapes.
        """
        data = codec.encode_compact(articleMessage())
        for end in range(len(data) - 1):
            try:
                codec.decode(TimMessage, data[:end], Encoding.COMPACT)
            except TimProtocolError as e:
                self.assertIn(e.code, (ErrorCode.ERR_FORMAT, ErrorCode.ERR_PARAMS))
            else:
                self.fail(f"prefix of {end} bytes decoded")

    def test_trailingBytesIgnored(self):
        """
        Bytes after the struct's end are ignored, as Thrift does.
        """
        data = codec.encode_compact(articleMessage()) + b"trailing"
        self.assertEqual(codec.decode_compact(TimMessage, data), articleMessage())

    def test_mistypedFieldSkipped(self):
        """
        A field of another wire type than declared is skipped, so a TimAuth
        sent where a TimMessage belongs lacks its required fields.
        """
        data = codec.encode_compact(TimAuth(name="x", pwd="y"))
        error = self.assertRaises(TimProtocolError, codec.decode, TimMessage, data, Encoding.COMPACT)
        self.assertEqual(error.code, ErrorCode.ERR_PARAMS)
        self.assertIn("msType", error.text)

    def test_hugeContainerLength(self):
        """
        A list claiming more elements than the payload has bytes fails
        quickly instead of allocating.
        """
        # Field 9 (photoTidAlbum) of TimUserBean: list of 2**31-1 strings.
        data = b"\x99\xf8\xff\xff\xff\x07"
        error = self.assertRaises(TimProtocolError, codec.decode_compact, TimUserBean, data)
        self.assertEqual(error.code, ErrorCode.ERR_FORMAT)

    def test_randomBytes(self):
        """
        Random payloads decode or raise L{TimProtocolError}, nothing else.
        """
        rng = random.Random(1234)
        for structType in ALL_STRUCTS:
            for _ in range(300):
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                try:
                    codec.decode(structType, data, Encoding.COMPACT)
                except TimProtocolError:
                    pass

    def test_tokenAsStringFromTim21(self):
        """
        tim 2.1 sends TimAuth.token as a string (field 6, binary wire
        type); it is decoded as a string.
        """
        from thrift.protocol import fastbinary as fb

        from timtx.protocols.structs import TIMAUTH_TOKEN_STRING_SPEC

        auth = TimAuth(name="n", token="abc")
        data = fb.encode_compact(auth, [TimAuth, TIMAUTH_TOKEN_STRING_SPEC])
        decoded = codec.decode_compact(TimAuth, data)
        self.assertEqual((decoded.name, decoded.token), ("n", "abc"))
        self.assertEqual(codec.decode_compact(TimAuth, codec.encode_compact(TimAuth(token=77))).token, 77)


class JSONTests(SynchronousTestCase):
    def test_everyStructRoundTrips(self):
        """
        Every struct, with every field set, survives JSON.
        """
        for sample in fullSamples():
            self.assertEqual(codec.decode(type(sample), codec.encode_json(sample), Encoding.JSON), sample)

    def test_goKeyNames(self):
        """
        JSON uses tim's Go key names, writes required fields always and
        leaves out unset and empty optional ones; bytes are base64.
        """
        message = TimMessage(msType=2, odType=1, dataBinary=b"\x00\xff", extend={}, toList=["a"])
        self.assertEqual(
            json.loads(codec.encode_json(message)),
            {"msType": 2, "odType": 1, "dataBinary": "AP8=", "ToList": ["a"]},
        )
        self.assertEqual(json.loads(codec.encode_json(TimAck())), {"ok": False, "timType": 0})
        stream = TimStream(id=1, VNode="v", fromNode="f")
        self.assertEqual(json.loads(codec.encode_json(stream)), {"id": 1, "VNode": "v", "fromNode": "f"})

    def test_timjsNullsAndCase(self):
        """
        timjs sends every field, unset ones as null, and C{vNode} for
        C{VNode}: nulls mean unset and keys match without case, as in Go.
        """
        data = json.dumps(
            {"id": None, "vNode": "room", "dtype": None, "body": None, "fromNode": None, "unknown": 5}
        ).encode()
        stream = codec.decode_json(TimStream, data)
        self.assertEqual(stream, TimStream(VNode="room"))

    def test_tokenNumberOrString(self):
        """
        A token may be a JSON number (tim 2.0) or string (tim 2.1).
        """
        self.assertEqual(codec.decode_json(TimAuth, b'{"token": 12}').token, 12)
        self.assertEqual(codec.decode_json(TimAuth, b'{"token": "12"}').token, "12")

    def test_badJSON(self):
        """
        Invalid UTF-8, invalid JSON, a non-object and wrongly typed values
        are ERR_FORMAT; a missing required field is ERR_PARAMS.
        """
        cases = [
            b"\xff\xfe",
            b"{",
            b"[1]",
            b'{"msType": "2", "odType": 1}',
            b'{"msType": 2.5, "odType": 1}',
            b'{"msType": true, "odType": 1}',
            b'{"msType": 300, "odType": 1}',
            b'{"msType": 2, "odType": 1, "dataBinary": "not base64!"}',
            b'{"msType": 2, "odType": 1, "toTid": "x"}',
            b'{"msType": 2, "odType": 1, "extend": {"a": 1}}',
            b"[" * 100000,
        ]
        for data in cases:
            error = self.assertRaises(TimProtocolError, codec.decode, TimMessage, data, Encoding.JSON)
            self.assertEqual(error.code, ErrorCode.ERR_FORMAT, data[:40])
        error = self.assertRaises(TimProtocolError, codec.decode, TimMessage, b'{"odType": 1}', Encoding.JSON)
        self.assertEqual(error.code, ErrorCode.ERR_PARAMS)
