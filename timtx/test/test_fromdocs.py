# -*- test-case-name: timtx.test.test_fromdocs -*-
"""
A tim client written from C{docs/protocol.md} alone: the struct tables are
parsed from the Markdown, TimAuth and TimMessage are encoded in Thrift
compact by a small encoder written here from the compact protocol's
specification, and the client registers, logs in and sends a message
through a real node.

Nothing here imports L{timtx.protocols} or L{timtx.client}: if the docs
stop being enough to build a client, this test fails.  (The node itself,
started from L{timtx.testing}, is the server under test.)
"""

import re
import struct
from collections import namedtuple

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from timtx.persistence.records import STANCE_FRIEND
from timtx.testing import httpURL, requireOrSkip, sourceRoot, startNode, testConfig
from timtx.util.bodies import BytesProducer

Column = namedtuple("Column", "fid name type json required")


def protocolDoc():
    root = sourceRoot()
    if root is None:
        requireOrSkip("no source checkout (docs/ is not installed)")
    return root.child("docs").child("protocol.md").getContent().decode("utf-8")


def structTables(markdown):
    """
    Every C{### Name} section's table, as C{{name: [Column]}}.  Where tim
    2.0 and 2.1 differ, the 2.0 value is taken.
    """
    tables = {}
    for section in re.split(r"^### ", markdown, flags=re.M)[1:]:
        name, _, body = section.partition("\n")
        body = re.split(r"^#", body, flags=re.M)[0]
        rows = [line for line in body.splitlines() if line.startswith("|")]
        if len(rows) < 3:
            continue
        header = [cell.strip() for cell in rows[0].strip("|").split("|")]
        if header[:3] != ["Id", "Field", "Type"]:
            continue
        columns = []
        for row in rows[2:]:
            cells = dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True))

            def first(text):
                text = text.split("·")[0]
                return text.split(":", 1)[1].strip() if re.match(r"\s*2\.0:", text) else text.strip()

            columns.append(
                Column(
                    int(first(cells["Id"])),
                    cells["Field"].strip("`"),
                    first(cells["Type"]).strip("`"),
                    cells["JSON"].strip("`"),
                    cells["Req"] == "yes",
                )
            )
        tables[name.strip()] = columns
    return tables


# Thrift compact, from the protocol's specification (thrift-compact-protocol.md).

_TYPES = {"bool": 1, "i8": 3, "i16": 4, "i32": 5, "i64": 6, "double": 7, "string": 8, "binary": 8}
_LIST, _MAP, _STRUCT = 9, 11, 12


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def zigzag(n):
    return (n << 1) ^ (n >> 63)


def compactType(typeName):
    if typeName.startswith("list<"):
        return _LIST
    if typeName.startswith("map<"):
        return _MAP
    return _TYPES.get(typeName, _STRUCT)


class Encoder:
    def __init__(self, tables):
        self.tables = tables

    def value(self, typeName, value):
        kind = compactType(typeName)
        if kind == 3:
            return struct.pack(">b", value)
        if kind in (4, 5, 6):
            return varint(zigzag(value))
        if kind == 8:
            data = value.encode("utf-8") if isinstance(value, str) else value
            return varint(len(data)) + data
        if kind == _LIST:
            element = typeName[5:-1]
            head = bytes([(len(value) << 4) | compactType(element)]) if len(value) < 15 else None
            head = head or bytes([0xF0 | compactType(element)]) + varint(len(value))
            return head + b"".join(self.value(element, v) for v in value)
        if kind == _MAP:
            key, element = typeName[4:-1].split(",", 1)
            if not value:
                return b"\x00"
            head = varint(len(value)) + bytes([(compactType(key) << 4) | compactType(element)])
            return head + b"".join(self.value(key, k) + self.value(element, v) for k, v in value.items())
        return self.struct(typeName, value)

    def struct(self, name, values):
        """
        C{values} by field name; required fields missing get their zero.
        """
        out = bytearray()
        last = 0
        for column in sorted(self.tables[name], key=lambda c: c.fid):
            value = values.get(column.name)
            if value is None and column.required:
                value = {"string": "", "bool": False}.get(column.type, 0)
            if value is None:
                continue
            kind = compactType(column.type)
            if kind == 1:
                kind = 1 if value else 2
            delta = column.fid - last
            if 0 < delta <= 15:
                out.append((delta << 4) | kind)
            else:
                out.append(kind)
                out += varint(zigzag(column.fid))
            if compactType(column.type) != 1:
                out += self.value(column.type, value)
            last = column.fid
        out.append(0)
        return bytes(out)


class Decoder:
    """
    Compact bytes into C{{field name: value}} using the tables.
    """

    def __init__(self, tables):
        self.tables = tables

    def varint(self):
        shift = result = 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    def signed(self):
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind, typeName):
        if kind in (1, 2) and typeName == "bool":
            return kind == 1
        if kind == 3:
            self.at += 1
            return struct.unpack(">b", self.data[self.at - 1 : self.at])[0]
        if kind in (4, 5, 6):
            return self.signed()
        if kind == 8:
            size = self.varint()
            raw = self.data[self.at : self.at + size]
            self.at += size
            return raw.decode("utf-8") if typeName == "string" else raw
        if kind == _LIST:
            head = self.data[self.at]
            self.at += 1
            size = head >> 4 if head >> 4 != 15 else self.varint()
            return [self.value(head & 0x0F, typeName[5:-1]) for _ in range(size)]
        if kind == _MAP:
            size = self.varint()
            if not size:
                return {}
            types = self.data[self.at]
            self.at += 1
            key, element = typeName[4:-1].split(",", 1)
            return {self.value(types >> 4, key): self.value(types & 0x0F, element) for _ in range(size)}
        return self.struct(typeName)

    def struct(self, name):
        byId = {c.fid: c for c in self.tables[name]}
        out = {}
        last = 0
        while True:
            head = self.data[self.at]
            self.at += 1
            if head == 0:
                return out
            kind = head & 0x0F
            fid = last + (head >> 4) if head >> 4 else self.signed()
            column = byId[fid]
            out[column.name] = self.value(kind, column.type)
            last = fid

    def decode(self, name, data):
        self.data, self.at = data, 0
        return self.struct(name)


class _Raw(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.frames.put(payload)


class FromDocsTests(TestCase):
    """
    Register, log in and message with bytes built from the docs alone.
    """

    def setUp(self):
        self.tables = structTables(protocolDoc())
        self.encode = Encoder(self.tables)
        self.decode = Decoder(self.tables)

    def test_tablesFound(self):
        """
        Every struct a client needs has a table with ids, types and JSON
        keys.
        """
        for name in ("TimAck", "TimError", "TimAuth", "TimMessage", "Tid", "TimReq", "TimNodes", "TimRoomBean"):
            self.assertIn(name, self.tables)
        names = {c.name: c for c in self.tables["TimAuth"]}
        self.assertEqual((names["name"].fid, names["name"].type, names["name"].json), (1, "string", "name"))

    @inlineCallbacks
    def register(self, node, name):
        body = bytes([14]) + self.encode.struct("TimAuth", {"name": name, "pwd": "secret"})
        headers = Headers({b"Content-Type": [b"application/octet-stream"]})
        response = yield Agent(reactor).request(b"POST", httpURL(node).encode(), headers, BytesProducer(body))
        content = yield readBody(response)
        self.assertEqual(content[0], 12)
        ack = self.decode.decode("TimAck", content[1:])
        self.assertEqual((ack["ok"], ack["timType"]), (True, 14))
        return ack["n"]

    @inlineCallbacks
    def connect(self, node):
        address = node.listeningAddress("client-ws")
        factory = WebSocketClientFactory(f"ws://{address.host}:{address.port}/tim", origin="https://example.org")
        factory.protocol = _Raw
        factory.opened = Deferred()
        factory.frames = DeferredQueue()
        yield TCP4ClientEndpoint(reactor, address.host, address.port).connect(factory)
        protocol = yield factory.opened
        self.addCleanup(lambda: protocol.sendClose(1000) if protocol.state == protocol.STATE_OPEN else None)
        return protocol, factory.frames

    @inlineCallbacks
    def login(self, node, name):
        protocol, frames = yield self.connect(node)
        protocol.sendMessage(bytes([16]) + self.encode.struct("TimAuth", {"name": name, "pwd": "secret"}), True)
        frame = yield frames.get()
        self.assertEqual(frame[0], 12)
        ack = self.decode.decode("TimAck", frame[1:])
        self.assertEqual((ack["ok"], ack["timType"]), (True, 16))
        return protocol, frames, ack["n"]

    @inlineCallbacks
    def test_messageFromDocs(self):
        """
        Two clients register over /tim2, log in over WebSocket and one sends
        the other a message: the sender gets its echo, the recipient the
        message with the ack bit, and acknowledges it.
        """
        config = testConfig(self.mktemp())
        node = yield startNode(self, reactor, config)
        aliceId = yield self.register(node, "alice")
        bobId = yield self.register(node, "bob")
        alice, aliceFrames, uid = yield self.login(node, "alice")
        self.assertEqual(uid, aliceId)
        bob, bobFrames, _ = yield self.login(node, "bob")
        yield node.relations.setStance(aliceId, bobId, STANCE_FRIEND)
        yield node.relations.setStance(bobId, aliceId, STANCE_FRIEND)
        message = {"msType": 2, "odType": 1, "id": 4242, "toTid": {"node": bobId}, "dataString": "from the docs"}
        alice.sendMessage(bytes([90]) + self.encode.struct("TimMessage", message), True)
        echo = yield aliceFrames.get()
        self.assertEqual(echo[0], 90)
        echoed = self.decode.decode("TimMessage", echo[1:])
        self.assertEqual((echoed["id"], echoed["fromTid"]["node"]), (4242, aliceId))
        self.assertGreater(echoed["timestamp"], 1 << 53)
        pushed = yield bobFrames.get()
        self.assertEqual(pushed[0], 0x80 | 90)
        received = self.decode.decode("TimMessage", pushed[5:])
        self.assertEqual((received["dataString"], received["fromTid"]["node"]), ("from the docs", aliceId))
        bob.sendMessage(bytes([12]) + pushed[1:5], True)
