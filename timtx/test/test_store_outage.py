# -*- test-case-name: timtx.test.test_store_outage -*-
"""
A node whose PostgreSQL goes away in the middle of 1:1 and group traffic:
clients stay connected, sends are refused with a retryable error while the
store is down, the node reconnects by itself, and every message confirmed
to a sender, before, during or after the outage, is delivered.

Runs a private PostgreSQL (L{timtx.test.databases.privateServer}) that the
test kills -9 and restarts, and the same with the SQLite store's child
process.  Slow: about 15 seconds each.
"""

import os
import signal

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from timtx.client import TimRequestFailed
from timtx.persistence.errors import StoreUnavailable
from timtx.persistence.memory import MemoryStore
from timtx.protocols.constants import Business, ErrorCode, GroupType
from timtx.test.base import NodeTestCase, waitUntil
from timtx.test.databases import privateServer
from timtx.test.traffic import Participant, Traffic, refusalsAreRetryable, undelivered
from timtx.testing import loggedInClient, startNode, testConfig


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


class OutageMixin:
    """
    Traffic through a node whose store goes away and comes back.  A
    subclass provides C{storeNode()} and C{bringBack()}.
    """

    timeout = 120
    sections = {
        "devices": {"limit": 0, "type_limit": 0},
        "store": {
            "reconnect_initial": 0.05,
            "reconnect_max": 0.3,
            "statement_timeout": 3.0,
            "connect_timeout": 1.0,
        },
    }

    @inlineCallbacks
    def storeNode(self):
        """
        A node on a private PostgreSQL server, C{self.server}.
        """
        self.server = yield privateServer(self)
        node = yield self.node(store={"dsn": self.server.dsn})
        return node

    def bringBack(self):
        """
        Start the store again after the outage.
        """
        return deferToThread(self.server.start)

    @inlineCallbacks
    def traffic(self):
        node = yield self.storeNode()
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        yield self.befriend(node, alice, bob, carol)
        ack = yield alice.business(Business.NEWROOM, node="outage", reqInt=GroupType.OPEN)
        gid = ack.n
        for member in (bob, carol):
            yield member.business(Business.ADDROOM, node=gid)
        clients = [alice, bob, carol]
        people = [Participant(c) for c in clients]
        a, b, c = people
        routes = [(a, b.uid, None), (b, a.uid, None), (c, a.uid, None), (a, None, gid), (b, None, gid)]
        return node, people, routes, {gid: people}

    @inlineCallbacks
    def assertDelivered(self, node, people, members):
        for _ in range(50):
            lost, duplicated = undelivered(people, members)
            if not lost:
                break
            yield sleep(0.1)
        states = []
        if lost:
            for p in people:
                for session in node.sessions.sessionsView(p.uid):
                    flow = node.inbox.flow.state(session)
                    count = yield node.store.countInbox(p.uid)
                    states.append((p.uid, count, flow.live, flow.draining, flow.backlogged, flow.unacked))
        self.assertEqual(
            (lost, duplicated), ([], []), f"sessions (uid, inbox, live, draining, backlogged, unacked): {states}"
        )

    @inlineCallbacks
    def outage(self, stop):
        node, people, routes, members = yield self.traffic()
        traffic = Traffic(reactor, routes)
        traffic.start()
        self.addCleanup(traffic.cancel)
        yield sleep(1.0)
        before = sum(len(p.confirmed) for p in people)
        self.assertGreater(before, 10)
        yield deferToThread(stop)
        yield waitUntil(lambda: not node.storeAvailable, 10)
        yield sleep(1.0)
        yield self.bringBack()
        yield waitUntil(lambda: node.storeAvailable, 20)
        yield sleep(1.0)
        yield traffic.stop()
        yield sleep(0.5)
        yield self.assertDelivered(node, people, members)
        for p in people:
            self.assertFalse(p.client.closed.called, "a client was disconnected")
        refusals = sum(len(p.refusals) for p in people)
        self.assertGreater(refusals, 0, "the outage refused nothing")
        refusalsAreRetryable(self, people)
        after = sum(len(p.confirmed) for p in people)
        self.assertGreater(after, before)
        self.flushLoggedErrors()


class OutageTests(OutageMixin, NodeTestCase):
    """
    The node on a private PostgreSQL that is killed and restarted under
    traffic.
    """

    backend = "postgresql"

    def test_killed(self):
        """
        PostgreSQL killed -9 (every process of it) under traffic, then
        started again.
        """
        return self.outage(lambda: self.server.kill())

    def test_restarted(self):
        """
        PostgreSQL stopped (fast shutdown: sessions terminated) under
        traffic, then started again.
        """
        return self.outage(lambda: self.server.stop())

    @inlineCallbacks
    def test_frozen(self):
        """
        PostgreSQL frozen (SIGSTOP) for longer than the statement timeout,
        then thawed: the node takes the silent server as lost, refuses
        sends meanwhile, and comes back.
        """
        node, people, routes, members = yield self.traffic()
        traffic = Traffic(reactor, routes)
        traffic.start()
        self.addCleanup(traffic.cancel)
        yield sleep(1.0)
        self.server.signal(signal.SIGSTOP)
        try:
            yield waitUntil(lambda: not node.storeAvailable, 15)
        finally:
            self.server.signal(signal.SIGCONT)
        yield waitUntil(lambda: node.storeAvailable, 20)
        yield traffic.stop()
        yield sleep(0.5)
        yield self.assertDelivered(node, people, members)
        refusalsAreRetryable(self, people)
        self.flushLoggedErrors()


@inlineCallbacks
def loggedInClientAgain(testCase, node, client):
    """
    Log in again as C{client}'s user.
    """
    again = yield loggedInClient(reactor, node, client.loginName, testCase=testCase, registerFirst=False)
    return again


class SQLiteProcessOutageTests(OutageMixin, NodeTestCase):
    """
    The node on the SQLite store, whose child process is killed -9 under
    traffic: the node starts a new one by itself.
    """

    backend = "sqlite"
    # Long enough for sends to be refused while there is no child.
    sections = {"devices": {"limit": 0, "type_limit": 0}, "store": {"reconnect_initial": 1.0}}

    @inlineCallbacks
    def storeNode(self):
        node = yield self.node()
        self.hosted = node.store
        return node

    def bringBack(self):
        # Nothing to do: the node starts a child after reconnect_initial.
        return succeed(None)

    def test_childKilled(self):
        """
        The store's child process killed -9, then started again by the
        node.
        """
        return self.outage(lambda: os.kill(self.hosted.pid, signal.SIGKILL))


class _FailingStore(MemoryStore):
    """
    A memory store that can be made unreachable.
    """

    #: C{True} for every call, or the names of the calls that fail.
    failing = False

    @property
    def available(self):
        return not self.failing

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        failing = super().__getattribute__("failing")
        if name[:1].islower() and name not in ("open", "close", "failing", "available", "name") and callable(value):
            if failing is True or (failing and name in failing):
                return lambda *a, **k: fail(StoreUnavailable("PostgreSQL at db:5432/timtx is unavailable: refused"))
        return value


class OutageUnitTests(NodeTestCase):
    """
    The same on a memory store made unreachable on demand: quick.
    """

    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def setUpNode(self):
        self.store = _FailingStore()
        config = testConfig(self.mktemp(), **self.sections)
        node = yield startNode(self, reactor, config, store=self.store)
        node.inbox.outageRetry = 0.1
        return node

    @inlineCallbacks
    def test_sendRefused(self):
        """
        A send while the store is down gets C{ERR_DATABASE} "try again"
        with the message's id; the client stays connected and its resend
        goes through once the store is back.
        """
        node = yield self.setUpNode()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        self.store.failing = True
        self.assertFalse(node.storeAvailable)
        failure = yield self.assertFailure(alice.postMessage(bob.uid, "hi", id=5), TimRequestFailed)
        self.assertEqual(
            (failure.code, failure.ack.error.info), (ErrorCode.ERR_DATABASE, "store unavailable, try again")
        )
        self.assertFalse(alice.closed.called)
        error = yield self.assertFailure(
            alice.business(Business.NEWROOM, node="t", reqInt=GroupType.OPEN), TimRequestFailed
        )
        self.assertEqual(error.code, ErrorCode.ERR_DATABASE)
        self.store.failing = False
        echo = yield alice.postMessage(bob.uid, "hi", id=5)
        self.assertEqual(echo.seq, 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_loginDuringOutage(self):
        """
        A session whose inbox cannot be read at login stays connected, and
        gets what it missed once the store is back.
        """
        node = yield self.setUpNode()
        alice = yield self.user(node)
        bob = yield self.user(node)
        yield self.befriend(node, alice, bob)
        yield bob.disconnect()
        yield alice.postMessage(bob.uid, "while away")
        self.store.failing = {"countInbox", "readInbox"}
        again = yield loggedInClientAgain(self, node, bob)
        yield sleep(0.3)
        self.assertFalse(again.closed.called)
        self.store.failing = False
        messages = yield again.offlineMessages()
        self.assertEqual([m.dataString for m in messages], ["while away"])

    @inlineCallbacks
    def test_loginRefused(self):
        """
        A login while the store is down is refused with C{ERR_DATABASE}
        "try again"; the client may try again on the same connection.
        """
        node = yield self.setUpNode()
        alice = yield self.user(node)
        yield alice.disconnect()
        self.store.failing = True
        client = yield self.client(node)
        failure = yield self.assertFailure(client.login(alice.loginName, "secret"), TimRequestFailed)
        self.assertEqual(
            (failure.code, failure.ack.error.info), (ErrorCode.ERR_DATABASE, "store unavailable, try again")
        )
        self.store.failing = False
        yield client.login(alice.loginName, "secret")
