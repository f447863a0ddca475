# -*- test-case-name: timtx.test.test_reference -*-
"""
Tests for L{timtx.protocols.reference} and for what C{docs/protocol.md}
states about the transports: the generated struct tables are current, the
Origin rule is the one documented, C{/tim2} answers as binary.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, readBody

from timtx.protocols.codec import Encoding, encode_compact
from timtx.protocols.constants import TimType
from timtx.protocols.frames import client_frame
from timtx.protocols.reference import BEGIN, END, reference_markdown, struct_table
from timtx.protocols.structs import ALL_STRUCTS, TimAuth, TimRoomBean
from timtx.test.base import NodeTestCase
from timtx.testing import httpURL, requireOrSkip, sourceRoot
from timtx.util.bodies import BytesProducer


def protocolDoc():
    root = sourceRoot()
    if root is None:
        requireOrSkip("no source checkout (docs/ is not installed)")
    return root.child("docs").child("protocol.md").getContent().decode("utf-8")


class ReferenceTests(SynchronousTestCase):
    def test_docsCurrent(self):
        """
        docs/protocol.md holds the struct reference generated from the
        declarations, between its markers.
        """
        doc = protocolDoc()
        _, _, rest = doc.partition(BEGIN)
        generated, _, _ = rest.partition(END)
        self.assertEqual(
            generated.strip(),
            reference_markdown().strip(),
            "run: python -m timtx.protocols.reference --write docs/protocol.md",
        )

    def test_everyFieldExplained(self):
        """
        Every struct says what it is for and every field what it means.
        """
        for struct in ALL_STRUCTS:
            self.assertTrue(struct.DOC, struct.__name__)
            for field in struct.FIELDS:
                self.assertTrue(field.doc, f"{struct.__name__}.{field.name}")
                self.assertNotIn("|", field.doc, "a | would break the table")

    def test_layoutsShown(self):
        """
        Where tim 2.1 numbers or types a field differently, both are shown;
        timtx extensions are marked.
        """
        rows = {line.split("|")[2].strip(): line for line in struct_table(TimRoomBean).splitlines()[4:]}
        self.assertIn("| 2.0: 7 · 2.1: 8 |", rows["`createtime`"])
        self.assertIn("| 2.0: 101 · 2.1: 7 |", rows["`kind`"])
        self.assertIn("**timtx**", rows["`kind`"])
        self.assertIn("2.0: `i64` · 2.1: `string`", struct_table(TimAuth))


class _Handshake(Protocol):
    def connectionMade(self):
        self.received = b""
        self.transport.write(self.factory.request)

    def dataReceived(self, data):
        self.received += data
        if b"\r\n" in self.received and not self.factory.status.called:
            self.factory.status.callback(int(self.received.split(b" ", 2)[1]))
            self.transport.loseConnection()


class TransportDocTests(NodeTestCase):
    @inlineCallbacks
    def handshake(self, node, origin):
        """
        The HTTP status of a WebSocket handshake with C{origin} (C{None}: no
        header).
        """
        factory = Factory.forProtocol(_Handshake)
        factory.status = Deferred()
        factory.request = (
            b"GET /tim HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + (b"" if origin is None else b"Origin: " + origin + b"\r\n")
            + b"\r\n"
        )
        address = node.listeningAddress("client-ws")
        yield TCP4ClientEndpoint(reactor, address.host, address.port).connect(factory)
        status = yield factory.status
        return status

    @inlineCallbacks
    def test_originRule(self):
        """
        The Origin rule of docs/protocol.md: null and non-URL origins get
        400 whatever the configuration; a missing one 403 unless allowed; a
        list compares exactly.
        """
        cases = {
            None: (403, 101),
            b"null": (400, 400),
            b"file:///index.html": (400, 400),
            b"example.com": (400, 400),
            b"localhost:8080": (400, 400),
            b"http://host:port": (400, 400),
            b"https://ok.example": (101, 101),
            b"https://ok.example/": (101, 403),
            b"https://other.example": (101, 403),
        }
        anyOrigin = yield self.node(client={"allow_missing_origin": False})
        listed = yield self.node(client={"allowed_origins": ("https://ok.example",), "allow_missing_origin": True})
        for origin, (byDefault, withList) in cases.items():
            self.assertEqual((yield self.handshake(anyOrigin, origin)), byDefault, origin)
            self.assertEqual((yield self.handshake(listed, origin)), withList, origin)

    @inlineCallbacks
    def test_tim2ContentType(self):
        """
        /tim2 answers are binary frames: Content-Type
        application/octet-stream, for a success and for an error ack.
        """
        node = yield self.node()
        for timType in (TimType.TIMREGISTER, TimType.TIMAUTH):
            body = client_frame(timType, encode_compact(TimAuth(name="ct", pwd="secret")), Encoding.COMPACT)
            response = yield Agent(reactor).request(b"POST", httpURL(node).encode(), None, BytesProducer(body))
            content = yield readBody(response)
            self.assertEqual(response.code, 200)
            self.assertEqual(content[0], TimType.TIMACK)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/octet-stream"])
