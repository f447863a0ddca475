"""
Tests for L{timtx.node}: composition and lifecycle.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from timtx.crypto.ids import NodeKeys
from timtx.node import Node, NodeStartError
from timtx.persistence.memory import MemoryStore
from timtx.protocols import codec
from timtx.testing import startNode, testConfig


class NodeTests(TestCase):
    @inlineCallbacks
    def test_storeFromConfig(self):
        """
        The store plugin named in the config is used, and the node secret
        file is created in the data directory.
        """
        directory = self.mktemp()
        node = Node(testConfig(directory, backend="sqlite"), reactor)
        node.startService()
        self.addCleanup(node.stopService)
        yield node.ready
        self.assertEqual(node.store.name, "sqlite")
        self.assertEqual(node.keys.accountId("a", ""), NodeKeys.fromFile(node.config.key_path).accountId("a", ""))

    @inlineCallbacks
    def test_missingCCodecIsLoud(self):
        """
        Without thrift's C codec the node logs a critical message at start.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.patch(codec, "ACCELERATED", False)
        yield startNode(self, reactor, testConfig(self.mktemp()))
        critical = [e for e in observer if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn("fastbinary", critical[0]["log_format"])

    def test_portInUse(self):
        """
        A port that cannot be bound stops the start with a clear error, and
        nothing is left listening.
        """
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            config = testConfig(self.mktemp(), client={"tcp_listen": f"tcp:{port}:interface=127.0.0.1"})
            node = Node(config, reactor, store=MemoryStore(), keys=NodeKeys(b"k" * 32))
            error = self.assertRaises(NodeStartError, node.startService)
            self.assertIn(f"tcp:{port}", str(error))
            self.assertFalse(node.running)
            self.assertEqual([listener.port for listener in node._listeners.values()], [None, None])

    @inlineCallbacks
    def test_stopTwice(self):
        node = yield startNode(self, reactor, testConfig(self.mktemp()))
        yield node.stopService()
        yield node.stopService()
