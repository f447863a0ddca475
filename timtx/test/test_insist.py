# -*- test-case-name: timtx.test.test_insist -*-
"""
Tests for L{timtx.cluster.insist.Insistence} between real
L{ClusterService}s over in-memory links on simulated time
(L{timtx.test.test_membership.FakeNetwork}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from timtx.cluster.insist import Insistence
from timtx.cluster.membership import ClusterService
from timtx.test.test_membership import FakeNetwork


class InsistenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = FakeNetwork(self)
        names = ["node0", "node1"]
        for name in names:
            self.net.service(name, seeds=["node0:7946"])
        self.assertIsNotNone(self.net.run(5.0, until=self.net.converged))
        self.net.run(1.0)
        self.a: ClusterService = self.net.services["node0"]
        self.b: ClusterService = self.net.services["node1"]
        self.heard: list[bytes] = []
        self.insistence = Insistence(self.a, "test.back")
        self.addCleanup(self.insistence.stop)

    def handle(self, node: str, payload: bytes) -> Any:
        self.heard.append(payload)
        return None

    def test_linkLostToldAgain(self) -> None:
        """
        The link breaks before the node answers while it stays alive: it
        is told again once a link is back, until it answers, then no more.
        """
        self.b.addHandler("test.back", lambda node, payload: Deferred())
        self.insistence.tell("node1", b"x")
        self.net.flush()
        self.net.links(self.a)["node1"].transport.loseConnection()
        self.net.flush()
        self.assertTrue(self.insistence.telling("node1"))
        self.b.removeHandler("test.back")
        self.b.addHandler("test.back", self.handle)
        self.assertIsNotNone(self.net.run(15.0, until=lambda: not self.insistence.telling("node1")))
        self.assertEqual(self.heard, [b"x"])
        self.net.run(30.0)
        self.assertEqual(self.heard, [b"x"])

    def test_oneWayHandlerAnswers(self) -> None:
        """
        A node that handles the kind as a one-way message (its handler
        returns nothing) answers the request: told once.
        """
        self.b.addHandler("test.back", self.handle)
        self.insistence.tell("node1", b"x")
        self.net.flush()
        self.assertFalse(self.insistence.telling("node1"))
        self.assertEqual(self.heard, [b"x"])

    def test_unknownKindToldOnce(self) -> None:
        """
        A node of a version without the kind answers that it has no
        handler: not told again.
        """
        self.insistence.tell("node1", b"x")
        self.net.flush()
        self.assertFalse(self.insistence.telling("node1"))
        self.b.addHandler("test.back", self.handle)
        self.net.run(30.0)
        self.assertEqual(self.heard, [])

    def test_deadNotToldAgain(self) -> None:
        """
        A node that stops answering is asked until it is held dead, then
        no more.
        """
        self.b.addHandler("test.back", lambda node, payload: Deferred())
        self.insistence.tell("node1", b"x")
        self.net.flush()
        self.net.crash("node1")
        self.assertIsNotNone(self.net.run(30.0, until=lambda: not self.insistence.telling("node1")))
        member = self.a.member("node1")
        self.assertFalse(member is not None and member.live)
