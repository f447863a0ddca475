"""
A base for end-to-end tests: a node per test, clients that log in to it.
"""

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from timtx.client import connect
from timtx.persistence.records import STANCE_FRIEND
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.structs import TimAck
from timtx.testing import loggedInClient, startNode, tcpURL, testConfig, wsURL


def within(d, seconds=10):
    return d.addTimeout(seconds, reactor)


@inlineCallbacks
def waitUntil(predicate, seconds=10.0):
    """
    Poll C{predicate} on the real clock until it is true.
    """
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"{predicate} stayed false for {seconds}s")


class NodeTestCase(TestCase):
    """
    Starts a node per test with C{self.sections} applied to the test config.
    """

    sections: dict = {}
    backend = "memory"

    @inlineCallbacks
    def node(self, clock=None, **sections):
        merged = {name: dict(values) for name, values in self.sections.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        config = testConfig(self.mktemp(), backend=self.backend, **merged)
        self.clock = clock
        node = yield startNode(self, reactor, config, clock=clock)
        return node

    @inlineCallbacks
    def client(self, node, encoding=None, transport=None, **kwargs):
        url = wsURL(node) if (transport or self.transport) == "ws" else tcpURL(node)
        client = yield connect(reactor, url, encoding or self.encoding, **kwargs)
        self.addCleanup(lambda: client.disconnect() if not client.closed.called else None)
        return client

    def errorOf(self, incoming, timType):
        """
        Assert C{incoming} is an error TIMACK for C{timType}; return its code.
        """
        self.assertEqual(incoming.timType, TimType.TIMACK)
        ack = incoming.body
        self.assertIsInstance(ack, TimAck)
        self.assertEqual((ack.ok, ack.timType), (False, timType))
        self.assertTrue(ack.error.info)
        self.assertNotIn("Traceback", ack.error.info)
        return ack.error.code

    transport = "ws"
    encoding = Encoding.COMPACT

    @inlineCallbacks
    def user(self, node, name=None, encoding=None, transport=None, **loginArgs):
        """
        A registered, logged-in client, disconnected when the test ends.
        """
        client = yield loggedInClient(
            reactor,
            node,
            name,
            encoding=encoding or self.encoding,
            transport=transport or self.transport,
            testCase=self,
            **loginArgs,
        )
        return client

    @inlineCallbacks
    def befriend(self, node, *clients):
        """
        Make every pair of C{clients} friends (through the relation service,
        as if each had added the other).
        """
        for a in clients:
            for b in clients:
                if a is not b:
                    yield node.relations.setStance(a.uid, b.uid, STANCE_FRIEND)
