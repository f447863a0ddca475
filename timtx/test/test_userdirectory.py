# -*- test-case-name: timtx.test.test_userdirectory -*-
"""
Tests for L{timtx.cluster.directory.UserDirectory} on a fake cluster: a
registration its owner never got is made again when the membership
changes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from timtx.cluster.directory import KIND_GET, KIND_SET, UserDirectory
from timtx.cluster.ownership import Ownership, userKey
from timtx.cluster.swim import ChangeKind, Member, MemberChange, MemberState
from timtx.cluster.wire import dumps, loads
from timtx.config import DevicesConfig
from timtx.delivery.registry import SessionRegistry
from timtx.delivery.sessions import AckIds, Session
from timtx.protocols.codec import Encoding
from timtx.test.test_router import _Sink


class _Cluster:
    """
    What the directory uses of a L{ClusterService}: requests are kept for
    the test to answer, sends go nowhere.
    """

    def __init__(self, nodeId: str, nodes: list[str]):
        self.nodeId = nodeId
        self.ownership = Ownership(nodes)
        self.requests: list[tuple[str, str, Any, Deferred[bytes]]] = []
        self.observers: list[Any] = []
        self.restartObservers: list[Any] = []

    def addHandler(self, kind: str, handler: Any) -> None:
        pass

    def addObserver(self, observer: Any) -> None:
        self.observers.append(observer)

    def addRestartObserver(self, observer: Any) -> None:
        self.restartObservers.append(observer)

    def restarts(self, nodeId: str) -> None:
        for observer in self.restartObservers:
            observer(nodeId)

    def request(self, node: str, kind: str, payload: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.requests.append((node, kind, loads(payload), d))
        return d

    def send(self, node: str, kind: str, payload: bytes) -> Deferred[None]:
        return succeed(None)

    def dies(self, nodeId: str) -> None:
        self.ownership = Ownership(n for n in self.ownership.nodes if n != nodeId)
        change = MemberChange(ChangeKind.DIED, Member(nodeId, 1, MemberState.DEAD, f"{nodeId}:7946"), None)
        for observer in self.observers:
            observer(change)


def ownedBy(ownership: Ownership, node: str, prefix: str) -> str:
    """
    A uid C{node} owns.
    """
    return next(uid for i in range(1000) if ownership.owner(userKey(uid := f"{prefix}{i}")) == node)


class RegisteringAgainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = _Cluster("node2", ["node1", "node2", "node3"])
        self.sessions = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        self.told: list[tuple[str, Deferred[bool]]] = []
        self.directory = UserDirectory(
            self.cluster,  # type: ignore[arg-type]
            self.sessions,
            registeringAgain=lambda uid, d: self.told.append((uid, d)),
        )
        self.ackIds = AckIds()

    def online(self, uid: str) -> None:
        self.sessions.admit(Session(_Sink(), uid, "", None, 0, Encoding.COMPACT, 0.0, self.ackIds))

    def registered(self, uid: str, fail: bool) -> None:
        d = self.directory.register(uid, "")
        node, kind, payload, answer = self.cluster.requests.pop()
        self.assertEqual((node, kind, payload["uid"]), (self.directory.owner(uid), KIND_SET, uid))
        if fail:
            answer.errback(ConnectionRefusedError("the owner is dying"))
        else:
            answer.callback(dumps({"admitted": True}))
        # A login goes ahead either way.
        self.assertIs(self.successResultOf(d), True)

    def test_failedThenAgain(self) -> None:
        """
        A user whose registration failed is registered again when the
        membership changes, and C{registeringAgain} is told, with a
        L{Deferred} that fires once the owner has it; a user registered
        fine whose owner did not move is not registered again.
        """
        ann = ownedBy(self.cluster.ownership, "node3", "ann")
        bob = ownedBy(self.cluster.ownership, "node1", "bob")
        self.online(ann)
        self.online(bob)
        self.registered(ann, fail=True)
        self.registered(bob, fail=False)
        self.assertEqual(list(self.directory.unconfirmed), [ann])

        self.cluster.dies("node3")
        [(node, kind, payload, answer)] = self.cluster.requests
        self.assertEqual((node, kind, payload["uid"]), (self.directory.owner(ann), KIND_SET, ann))
        [(uid, registered)] = self.told
        self.assertEqual(uid, ann)
        self.assertNoResult(registered)
        answer.callback(dumps({"admitted": True}))
        self.assertIs(self.successResultOf(registered), True)
        self.assertEqual(self.directory.unconfirmed, {})

    def test_underWayThenAgain(self) -> None:
        """
        A user whose registration is still under way when its owner dies
        (the request waits for a node that stopped answering) is
        registered again, and C{registeringAgain} is told; the first
        request failing later changes nothing.  Nor does an older
        registration confirmed after a newer one started.
        """
        ann = ownedBy(self.cluster.ownership, "node3", "ann")
        self.online(ann)
        self.directory.register(ann, "")
        [(_, _, _, first)] = self.cluster.requests
        self.assertEqual(list(self.directory.unconfirmed), [ann])
        self.cluster.dies("node3")
        [(uid, registered)] = self.told
        self.assertEqual(uid, ann)
        self.cluster.requests[-1][3].callback(dumps({"admitted": True}))
        first.errback(ConnectionRefusedError("it died"))
        self.assertIs(self.successResultOf(registered), True)
        self.assertEqual(self.directory.unconfirmed, {})

        self.directory.register(ann, "")
        self.directory.register(ann, "")
        older, newer = self.cluster.requests[-2:]
        older[3].callback(dumps({"admitted": True}))
        self.assertEqual(list(self.directory.unconfirmed), [ann])
        newer[3].callback(dumps({"admitted": True}))
        self.assertEqual(self.directory.unconfirmed, {})

    def test_offlineForgotten(self) -> None:
        """
        A user that went offline here after a failed registration is
        neither registered again nor remembered.
        """
        ann = ownedBy(self.cluster.ownership, "node3", "ann")
        self.online(ann)
        self.registered(ann, fail=True)
        for session in list(self.sessions.sessionsView(ann)):
            self.sessions.remove(session)
        self.cluster.dies("node3")
        self.assertEqual((self.cluster.requests, self.told, self.directory.unconfirmed), ([], [], {}))

    def test_ownerMovedWithoutFailure(self) -> None:
        """
        A user registered fine whose owner moves is registered with the new
        owner without telling C{registeringAgain}: the nodes storing for it
        knew its sessions all along.
        """
        ann = ownedBy(self.cluster.ownership, "node3", "ann")
        self.online(ann)
        self.registered(ann, fail=False)
        self.cluster.dies("node3")
        [(node, kind, payload, answer)] = self.cluster.requests
        self.assertEqual(payload["uid"], ann)
        self.assertEqual(self.told, [])


class SureAnswersTests(SynchronousTestCase):
    """
    A lookup's answer is kept only if it is the owner's in both views.
    """

    def setUp(self) -> None:
        self.cluster = _Cluster("node2", ["node1", "node2", "node3"])
        self.directory = UserDirectory(self.cluster, SessionRegistry(DevicesConfig(limit=0, type_limit=0)))  # type: ignore[arg-type]

    def asked(self, uid: str, answer: Any) -> Any:
        d = self.directory.route(uid)
        node, kind, payload, pending = self.cluster.requests.pop()
        self.assertEqual((node, kind, payload), (self.directory.owner(uid), KIND_GET, {"uid": uid}))
        if isinstance(answer, Exception):
            pending.errback(answer)
        else:
            pending.callback(dumps(answer))
        return self.successResultOf(d)

    def test_ownersAnswerKept(self) -> None:
        """
        The owner's answer is sure and kept; an answer without the flag
        (a node of an earlier version) counts as the owner's.
        """
        ann = ownedBy(self.cluster.ownership, "node1", "ann")
        bob = ownedBy(self.cluster.ownership, "node3", "bob")
        located = self.asked(ann, {"uid": ann, "nodes": ["node3"], "owner": True})
        self.assertEqual((located.nodes, located.sure), (frozenset(["node3"]), True))
        self.assertEqual(self.directory.nodes(ann), frozenset(["node3"]))
        self.assertTrue(self.asked(bob, {"uid": bob, "nodes": []}).sure)
        self.assertEqual(self.directory.nodes(bob), frozenset())

    def test_notTheOwnerNotKept(self) -> None:
        """
        An answer from a node that does not own the user in its own view,
        or a lookup that failed, is not sure and not kept.
        """
        ann = ownedBy(self.cluster.ownership, "node1", "ann")
        located = self.asked(ann, {"uid": ann, "nodes": ["node1"], "owner": False})
        self.assertEqual((located.nodes, located.sure), (frozenset(["node1"]), False))
        self.assertIsNone(self.directory.nodes(ann))
        located = self.asked(ann, ConnectionRefusedError("the owner is dying"))
        self.assertEqual((located.nodes, located.sure), (frozenset(), False))
        self.assertIsNone(self.directory.nodes(ann))

    def test_answerAsNotTheOwner(self) -> None:
        """
        Asked about a user it does not own in its view, a node answers its
        successor's copy (or nothing) flagged as not the owner's, and does
        not take the asker as a subscriber; about a user it owns, its
        entry, as the owner.
        """
        mine = ownedBy(self.cluster.ownership, "node2", "ann")
        theirs = ownedBy(self.cluster.ownership, "node1", "bob")
        self.directory._replicaReceived(
            "node1", dumps({"uid": theirs, "domain": "", "nodes": {"node3": [[1, 0, 0.0]]}})
        )
        answer = loads(self.directory._getReceived("node3", dumps({"uid": theirs})))
        self.assertEqual(answer, {"uid": theirs, "nodes": ["node3"], "owner": False})
        self.assertEqual(self.directory._subscribers, {})
        answer = loads(self.directory._getReceived("node3", dumps({"uid": mine})))
        self.assertEqual(answer, {"uid": mine, "nodes": [], "owner": True})
        self.assertEqual(self.directory._subscribers, {mine: {"node3"}})


class UnknownToOwnerTests(SynchronousTestCase):
    """
    A registration after a move that the owner answers as news: its
    sessions here were unknown to it, and may have missed pushes.
    """

    def setUp(self) -> None:
        self.cluster = _Cluster("node2", ["node1", "node2", "node3"])
        self.sessions = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        self.unknown: list[str] = []
        self.directory = UserDirectory(
            self.cluster,  # type: ignore[arg-type]
            self.sessions,
            unknownToOwner=self.unknown.append,
        )
        self.ackIds = AckIds()

    def test_told(self) -> None:
        """
        Registering sessions again (not a login) answered C{known: false}
        tells C{unknownToOwner}; answered C{known: true}, or without the
        flag (an earlier version), or for a login, it does not.
        """
        ann = ownedBy(self.cluster.ownership, "node1", "ann")
        session = Session(_Sink(), ann, "", None, 0, Encoding.COMPACT, 0.0, self.ackIds)
        self.sessions.admit(session)
        for admit, answer in [
            (None, {"admitted": True, "known": True}),
            (None, {"admitted": True}),
            (session, {"admitted": True, "known": False}),
            (None, {"admitted": True, "known": False}),
        ]:
            self.directory.register(ann, "", admit=admit)
            self.cluster.requests.pop()[3].callback(dumps(answer))
        self.assertEqual(self.unknown, [ann])

    def test_answer(self) -> None:
        """
        The owner says whether it had sessions of the registering node for
        the user before.
        """
        ann = ownedBy(self.cluster.ownership, "node2", "ann")
        payload = dumps({"uid": ann, "domain": "", "sessions": [[1, 0, 0.0]]})
        first = self.successResultOf(self.directory._setReceived("node1", payload))
        again = self.successResultOf(self.directory._setReceived("node1", payload))
        self.assertEqual(
            [loads(first), loads(again)], [{"admitted": True, "known": False}, {"admitted": True, "known": True}]
        )


class RestartedNodeTests(SynchronousTestCase):
    """
    A node started again before any member held it dead: the owner drops
    the sessions its last run registered.
    """

    def setUp(self) -> None:
        self.cluster = _Cluster("node2", ["node1", "node2", "node3"])
        self.ended: list[str] = []
        self.sessions = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        self.directory = UserDirectory(
            self.cluster,  # type: ignore[arg-type]
            self.sessions,
            lastSessionEnded=lambda uid, domain: self.ended.append(uid),
        )

    def register(self, node: str, uid: str, sids: list[int]) -> None:
        payload = dumps({"uid": uid, "domain": "", "sessions": [[sid, 0, 0.0] for sid in sids]})
        self.successResultOf(self.directory._setReceived(node, payload))

    def test_sessionsOfTheLastRunDropped(self) -> None:
        """
        The users whose only sessions were on the restarted node are
        offline (told once); a user with a session on another node keeps
        it; what the new run registers afterwards counts.
        """
        ann = ownedBy(self.cluster.ownership, "node2", "ann")
        bob = ownedBy(self.cluster.ownership, "node2", "bob")
        self.register("node3", ann, [1, 2])
        self.register("node3", bob, [3])
        self.register("node1", bob, [4])
        self.cluster.restarts("node3")
        self.assertEqual(self.ended, [ann])
        self.assertEqual(self.directory.sessionsOf(ann), [])
        self.assertEqual([(e.node, e.sid) for e in self.directory.sessionsOf(bob)], [("node1", 4)])
        self.register("node3", ann, [1])
        self.assertEqual([(e.node, e.sid) for e in self.directory.sessionsOf(ann)], [("node3", 1)])

    def test_itsUsersRegisteredAgain(self) -> None:
        """
        Its new run knows nothing of this node's sessions of the users it
        owns, nor that this node cached where its users are: those
        sessions are registered with it again, and the cache is forgotten.
        """
        carol = ownedBy(self.cluster.ownership, "node3", "carol")
        dave = ownedBy(self.cluster.ownership, "node3", "dave")
        self.sessions.admit(Session(_Sink(), carol, "", None, 0, Encoding.COMPACT, 0.0, AckIds()))
        self.directory._remember(dave, frozenset({"node1"}))
        self.assertEqual(self.directory.nodes(dave), frozenset({"node1"}))
        self.cluster.restarts("node3")
        [(node, kind, payload, _)] = self.cluster.requests
        self.assertEqual((node, kind, payload["uid"]), ("node3", KIND_SET, carol))
        self.assertIsNone(self.directory.nodes(dave))
