"""
Tests that the downstream example in docs/extending.md works as written.
"""

import re
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.client import connect
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.frames import client_frame, length_prefixed
from timtx.protocols.structs import TimAuth
from timtx.testing import MemoryClientNode, loggedInClient, requireOrSkip, sourceRoot, startNode, testConfig, wsURL
from timtx.transports.registry import ProtocolRegistry, defaultRegistry, resolveProtocolPath
from timtx.transports.websocket import TimWebSocketServerProtocol


def exampleCode(name="extending"):
    root = sourceRoot()
    if root is None:
        return None
    text = root.child("docs").child("extending.md").getContent().decode("utf-8")
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    return match.group(1)


class ExtendingExampleTests(TestCase):
    @inlineCallbacks
    def test_example(self):
        """
        The documented subclass, registered through [protocols] in the
        config, answers frame type 100.
        """
        code = exampleCode()
        if code is None:
            requireOrSkip("no source checkout (docs/ is not installed)")
        package = FilePath(self.mktemp())
        package.child("myapp").makedirs()
        package.child("myapp").child("__init__.py").setContent(b"")
        package.child("myapp").child("protocols.py").setContent(code.encode("utf-8"))
        sys.path.insert(0, package.path)
        self.addCleanup(sys.path.remove, package.path)
        self.addCleanup(lambda: [sys.modules.pop(m, None) for m in ("myapp", "myapp.protocols")])

        config = testConfig(self.mktemp(), protocols={"client-ws": "myapp.protocols:ShoutProtocol"})
        node = yield startNode(self, reactor, config)
        client = yield loggedInClient(reactor, node, testCase=self)
        client.sendRaw(bytes([100]) + b"hello")
        reply = yield client.next(100)
        self.assertEqual(reply.body, b"HELLO")
        plain = yield connect(reactor, wsURL(node))
        self.addCleanup(plain.disconnect)
        plain.sendRaw(bytes([100]) + b"hello")
        refused = yield plain.next()
        self.assertFalse(refused.body.ok, "frame 100 before login is refused")


class RegistryTests(SynchronousTestCase):
    def test_register(self):
        registry = defaultRegistry()
        self.assertEqual(registry.names(), ["client-tcp", "client-ws", "peer"])
        copy = registry.copy()
        copy.register("client-ws", object)
        self.assertIs(registry.lookup("client-ws"), TimWebSocketServerProtocol)
        self.assertRaises(KeyError, ProtocolRegistry().lookup, "peer")

    def test_resolve(self):
        self.assertIs(
            resolveProtocolPath("timtx.transports.websocket:TimWebSocketServerProtocol"), TimWebSocketServerProtocol
        )
        self.assertRaises(ValueError, resolveProtocolPath, "timtx.transports.websocket")
        self.assertRaises(ValueError, resolveProtocolPath, "timtx.transports.websocket:CLOSE_TOO_BIG")
        self.assertRaises(ImportError, resolveProtocolPath, "no.such:Thing")


class LimitsExampleTests(SynchronousTestCase):
    def test_example(self):
        """
        The documented subclass refuses a frame over its own 512 bytes, though
        the node allows 1 MiB, and logs why.
        """
        code = exampleCode("limits")
        if code is None:
            requireOrSkip("no source checkout (docs/ is not installed)")
        namespace = {}
        exec(compile(code, "docs/extending.md", "exec"), namespace)
        node = MemoryClientNode()
        transport = StringTransport()
        protocol = node.connect(namespace["SensorProtocol"], transport)
        self.assertEqual((protocol.limits.maxFrameBytes, protocol.limits.maxBadFrames), (512, 1))
        self.assertEqual(node.config.client.max_frame_bytes, 1 << 20)
        events = []
        protocol.logger = Logger(observer=events.append)
        login = client_frame(TimType.TIMAUTH, codec.encode(TimAuth(name="s", pwd="secret"), Encoding.COMPACT))
        protocol.dataReceived(length_prefixed(login))
        protocol.dataReceived(length_prefixed(client_frame(TimType.TIMPING, b"x" * 600)))
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["size"] for e in events if "size" in e], [601])
