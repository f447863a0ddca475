# -*- test-case-name: timtx.test.test_routerdoubt -*-
"""
Pushes across nodes while the views of the members differ, as after a
node is killed: L{timtx.cluster.router.ClusterRouter} and
L{timtx.cluster.directory.UserDirectory} of three nodes over a fake,
synchronous network whose views the tests change one node at a time,
sharing one in-memory store, with real inbox delivery to sessions.

A push the storing node cannot be sure reached every session of its
recipient waits in the inbox, and the recipient's nodes are told to look
in it once the storing node is sure where its sessions are: a live
session gets everything stored for it, in order, without a new login, and
one that missed nothing sees nothing of it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.cluster.directory import KIND_BACK, UserDirectory
from timtx.cluster.membership import PeerRequestFailed, PeerTimeout, PeerUnavailable
from timtx.cluster.ownership import Ownership, userKey
from timtx.cluster.router import COMPACT_FEATURE, KIND_PUSH, KIND_REREAD, ClusterRouter
from timtx.cluster.swim import ChangeKind, Member, MemberChange, MemberState
from timtx.cluster.wire import unpack
from timtx.config import DevicesConfig, MessagesConfig
from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.delivery.fanout import GroupFanout
from timtx.delivery.inbox import InboxDelivery
from timtx.delivery.registry import SessionRegistry
from timtx.delivery.router import LocalRouter
from timtx.delivery.sessions import AckIds, Session
from timtx.persistence.memory import MemoryStore
from timtx.protocols.codec import Encoding, decode_compact, decode_json
from timtx.protocols.constants import TimType
from timtx.protocols.structs import TimMessage, TimMessageList
from timtx.test.test_router import _Sink

NODES = ["node1", "node2", "node3"]


class _Network:
    """
    Nodes that reach each other at once, unless one is down (or does not
    answer in time: what is sent to it is lost); every message is logged
    as C{(from, to, kind)}.  A node without a handler for a kind answers
    an error, as a L{ClusterService} does.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, _Cluster] = {}
        self.down: set[str] = set()
        self.slow: set[str] = set()
        self.log: list[tuple[str, str, str]] = []

    def deliver(self, source: str, target: str, kind: str, payload: bytes) -> Deferred[Any]:
        if target in self.down:
            return fail(PeerUnavailable(target, "killed"))
        if target in self.slow:
            return fail(PeerTimeout(f"no answer from node {target} to {kind!r}"))
        self.log.append((source, target, kind))
        handler = self.nodes[target].handlers.get(kind)
        if handler is None:
            return fail(PeerRequestFailed(target, f"no handler for {kind!r}"))
        return maybeDeferred(handler, source, payload)


class _Cluster:
    """
    What the directory and the router use of a L{ClusterService}, with a
    view of the members the test sets.
    """

    #: As a L{ClusterService}'s, without its jitter.
    retryPolicy = staticmethod(backoffPolicy(0.25, 10.0, 2.0, jitter=lambda: 0.0))

    def __init__(self, network: _Network, nodeId: str, clock: Clock):
        self.network = network
        self.nodeId = nodeId
        self.clock = clock
        self.ownership = Ownership(NODES)
        self.handlers: dict[str, Callable[[str, bytes], Any]] = {}
        self.observers: list[Callable[[MemberChange], object]] = []
        self.features: set[str] = set()
        network.nodes[nodeId] = self

    def addHandler(self, kind: str, handler: Callable[[str, bytes], Any]) -> None:
        self.handlers[kind] = handler

    def addObserver(self, observer: Callable[[MemberChange], object]) -> None:
        self.observers.append(observer)

    def addRestartObserver(self, observer: Callable[[str], object]) -> None:
        pass

    def offer(self, feature: str) -> None:
        self.features.add(feature)

    def peerFeatures(self, nodeId: str) -> frozenset[str]:
        other = self.network.nodes.get(nodeId)
        return frozenset(self.features & other.features) if other is not None else frozenset()

    def member(self, nodeId: str) -> Member | None:
        state = MemberState.ALIVE if nodeId in self.ownership else MemberState.DEAD
        return Member(nodeId, 1, state, f"{nodeId}:7946")

    def send(self, node: str, kind: str, payload: bytes) -> Deferred[None]:
        if node == self.nodeId:
            self.handlers[kind](node, payload)
            return succeed(None)
        return self.network.deliver(self.nodeId, node, kind, payload).addCallback(lambda _: None)

    def request(self, node: str, kind: str, payload: bytes) -> Deferred[bytes]:
        if node == self.nodeId:
            return maybeDeferred(self.handlers[kind], node, payload)
        return self.network.deliver(self.nodeId, node, kind, payload)

    def sees(self, dead: str) -> None:
        """
        This node declares C{dead} dead.
        """
        self.ownership = Ownership(n for n in self.ownership.nodes if n != dead)
        change = MemberChange(ChangeKind.DIED, Member(dead, 1, MemberState.DEAD, f"{dead}:7946"), None)
        for observer in list(self.observers):
            observer(change)

    def back(self, node: str) -> None:
        """
        This node sees C{node}, which it held dead, alive again.
        """
        self.ownership = Ownership(n for n in NODES if n in self.ownership or n == node)
        previous = Member(node, 1, MemberState.DEAD, f"{node}:7946")
        change = MemberChange(ChangeKind.JOINED, Member(node, 2, MemberState.ALIVE, f"{node}:7946"), previous)
        for observer in list(self.observers):
            observer(change)


class _Node:
    """
    The delivery side of one node: sessions, inbox delivery, the
    directory and the cluster router.
    """

    def __init__(self, network: _Network, nodeId: str, clock: Clock, store: MemoryStore, vault: StanzaVault):
        self.cluster = _Cluster(network, nodeId, clock)
        self.ackIds = AckIds()
        self.sessions = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        self.inbox = InboxDelivery(
            MessagesConfig(), store=store, vault=vault, sessions=self.sessions, ackIds=self.ackIds, clock=clock
        )
        fanout = GroupFanout(
            store=store,
            vault=vault,
            sessions=self.sessions,
            flow=self.inbox.flow,
            ackIds=self.ackIds,
            groupsOf=lambda uid: succeed(set()),
        )
        self.directory = UserDirectory(
            self.cluster,  # type: ignore[arg-type]
            self.sessions,
            unknownToOwner=self.inbox.recheck,
        )
        local = LocalRouter(self.sessions, self.inbox, fanout)
        self.router = ClusterRouter(local, self.directory, self.cluster)  # type: ignore[arg-type]

    def live(self, uid: str, encoding: Encoding = Encoding.COMPACT) -> tuple[Session, _Sink]:
        """
        A live session of C{uid} here, registered with its owner.
        """
        sink = _Sink()
        session = Session(sink, uid, "", None, 0, encoding, 0.0, self.ackIds)
        self.sessions.admit(session)
        self.inbox.flow.start(session).live = True
        self.directory.register(uid, "", admit=session)
        return session, sink


def userOwnedBy(owners: list[str]) -> str:
    """
    A uid whose owner and successor are C{owners}.
    """
    ownership = Ownership(NODES)
    return next(uid for i in range(10_000) if ownership.owners(userKey(uid := f"bob{i}"), 2) == owners)


class ThreeNodes(SynchronousTestCase):
    """
    Three nodes' delivery sides over one network and one store.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.vault = StanzaVault(NodeKeys(b"d" * 32))
        self.network = _Network()
        self.nodes = {n: _Node(self.network, n, self.clock, self.store, self.vault) for n in NODES}
        for node in self.nodes.values():
            self.addCleanup(node.router.stop)

    def stored(self, storing: str, uid: str, text: str) -> None:
        """
        Store a message for C{uid} and push it from node C{storing}, as a
        conversation's owner does.
        """
        message = TimMessage(id=len(text), dataString=text)
        [qid] = self.successResultOf(self.store.addInbox([(uid, self.vault.sealFor(uid, message))], 0.0))
        self.nodes[storing].router.push(uid, qid, Encoded(message))

    def received(self, session: Session, sink: _Sink) -> list[Any]:
        """
        What C{session} got, acknowledging each frame: C{(type, texts)}.
        """
        got: list[Any] = []
        while sink.frames:
            frame = sink.frames.pop(0)
            texts: list[str | None] = []
            if frame.timType == TimType.TIMOFFLINEMSG:
                texts = [m.dataString for m in decode_compact(TimMessageList, frame.payload).messageList or ()]
            elif frame.timType == TimType.TIMMESSAGE:
                texts = [decode_compact(TimMessage, frame.payload).dataString]
            got.append((TimType(frame.timType).name, texts))
            if frame.ackId is not None:
                session.ackReceived(frame.ackId)
        return got


class DoubtfulPushTests(ThreeNodes):
    def test_newOwnerNotYetAware(self) -> None:
        """
        Node 3 owned bob, whose session is on node 1 (its successor, which
        keeps a copy of the entry).  Node 3 is killed; node 2 sees it dead
        first and asks node 1, bob's owner in its view, which does not know
        yet that it is: its answer is not kept, and what node 2 stores for
        bob meanwhile waits in bob's inbox.  Once node 1 sees the death
        too, node 2 is sure, tells node 1 to read bob's inbox again before
        pushing anything newer: bob's live session gets all of it, in
        order, without a login.  (Kept, node 1's answer, "no sessions",
        routed bob's messages nowhere until his next change of sessions.)
        """
        bob = userOwnedBy(["node3", "node1"])
        session, sink = self.nodes["node1"].live(bob)
        self.assertIn(bob, self.nodes["node1"].directory.replicas)
        self.network.down.add("node3")
        self.nodes["node2"].cluster.sees("node3")

        self.stored("node2", bob, "one")
        self.stored("node2", bob, "two")
        self.assertEqual(self.received(session, sink), [])
        self.assertIsNone(self.nodes["node2"].directory.nodes(bob))
        self.clock.advance(ClusterRouter.rerouteMaxDelay)
        self.assertEqual(self.received(session, sink), [])

        self.nodes["node1"].cluster.sees("node3")
        self.stored("node2", bob, "three")
        self.clock.advance(ClusterRouter.rerouteMaxDelay)
        self.assertEqual(
            self.received(session, sink),
            [("TIMOFFLINEMSG", ["one", "two", "three"]), ("TIMOFFLINEMSGEND", [])],
        )
        self.stored("node2", bob, "live")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["live"])])
        self.assertEqual(self.nodes["node2"].router.rereads, 1)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.store.countInbox(bob)), 0)

    def test_ownerUnreachable(self) -> None:
        """
        A push whose recipient's owner cannot be asked (killed, not yet
        declared dead) waits in the inbox, and the user's nodes read it
        again once its new owner answers.
        """
        bob = userOwnedBy(["node3", "node1"])
        session, sink = self.nodes["node1"].live(bob)
        self.network.down.add("node3")
        self.stored("node2", bob, "one")
        self.clock.advance(ClusterRouter.rerouteDelay)
        self.assertEqual(self.received(session, sink), [])
        for node in ("node1", "node2"):
            self.nodes[node].cluster.sees("node3")
        self.clock.advance(ClusterRouter.rerouteDelay)
        self.assertEqual(self.received(session, sink), [("TIMOFFLINEMSG", ["one"]), ("TIMOFFLINEMSGEND", [])])

    def test_staleAnswerAfterMove(self) -> None:
        """
        Node 2 kept bob's nodes from his owner, node 3.  Node 3 is killed;
        node 1, seeing it first, owns bob now without a copy of his entry
        (lost, say), and bob logs in again on node 1 meanwhile: node 2,
        still routing by the answer it kept, pushes to no node.  When node
        2 sees the death, bob's owner moved soon after those pushes: node
        2 looks him up again and has node 1 read his inbox.
        """
        bob = userOwnedBy(["node3", "node1"])
        self.stored("node2", bob, "offline")
        self.assertEqual(self.nodes["node2"].directory.nodes(bob), frozenset())
        self.network.down.add("node3")
        self.nodes["node1"].cluster.sees("node3")
        self.nodes["node1"].directory.entries.pop(bob, None)
        session, sink = self.nodes["node1"].live(bob)
        self.assertEqual(self.received(session, sink), [])
        self.stored("node2", bob, "stale")
        self.assertEqual(self.received(session, sink), [])
        self.nodes["node2"].cluster.sees("node3")
        self.clock.advance(ClusterRouter.rerouteDelay)
        self.assertEqual(
            self.received(session, sink), [("TIMOFFLINEMSG", ["offline", "stale"]), ("TIMOFFLINEMSGEND", [])]
        )

    def test_pushToLiveNodeFailed(self) -> None:
        """
        A push that did not reach a node still live makes its user
        doubtful: the next push to the user is preceded by a reread, and
        the node's session gets what it missed first; a push to a dead
        node's sessions, which are gone, does not.
        """
        bob = userOwnedBy(["node1", "node2"])
        session, sink = self.nodes["node1"].live(bob)
        self.stored("node2", bob, "live")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["live"])])
        self.network.down.add("node1")
        self.stored("node2", bob, "lost")
        self.network.down.discard("node1")
        self.stored("node2", bob, "after")
        self.assertEqual(self.received(session, sink), [("TIMOFFLINEMSG", ["lost", "after"]), ("TIMOFFLINEMSGEND", [])])
        pushes = [entry[2] for entry in self.network.log if entry[2] in (KIND_PUSH, KIND_REREAD)]
        self.assertEqual(pushes, [KIND_PUSH, KIND_REREAD, KIND_PUSH])
        self.stored("node2", bob, "live again")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["live again"])])

        self.nodes["node2"].cluster.sees("node3")
        self.network.down.add("node3")
        carol = userOwnedBy(["node1", "node3"])
        self.nodes["node2"].router._pushTo(carol, 1, frozenset(["node3"]), lambda node: b"")
        self.assertEqual(self.nodes["node2"].router.doubted, 1)

    def test_nothingMissed(self) -> None:
        """
        A user doubted for nothing (his owner moved soon after a push that
        reached him) sees nothing of it: his node looks in his inbox, finds
        nothing he was not pushed, and pushes stay live.
        """
        bob = userOwnedBy(["node3", "node1"])
        session, sink = self.nodes["node1"].live(bob)
        self.stored("node2", bob, "before")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["before"])])
        self.network.down.add("node3")
        for node in ("node1", "node2"):
            self.nodes[node].cluster.sees("node3")
        self.stored("node2", bob, "after")
        self.clock.advance(ClusterRouter.rerouteMaxDelay)
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["after"])])
        self.assertEqual(self.nodes["node2"].router.rereads, 1)

    def test_resend(self) -> None:
        """
        L{ClusterRouter.reread} (a resend recognised by its id) has the
        user's sessions look in the inbox on every node holding them, a
        moment later: what was stored and never pushed comes then.
        """
        bob = userOwnedBy(["node1", "node2"])
        here, hereSink = self.nodes["node2"].live(bob)
        there, thereSink = self.nodes["node1"].live(bob)
        message = TimMessage(id=1, dataString="never pushed")
        self.successResultOf(self.store.addInbox([(bob, self.vault.sealFor(bob, message))], 0.0))
        self.nodes["node2"].router.reread(bob)
        self.assertEqual(self.received(here, hereSink) + self.received(there, thereSink), [])
        self.clock.advance(ClusterRouter.resendGrace)
        for session, sink in [(here, hereSink), (there, thereSink)]:
            self.assertEqual(
                self.received(session, sink), [("TIMOFFLINEMSG", ["never pushed"]), ("TIMOFFLINEMSGEND", [])]
            )

    def test_stop(self) -> None:
        """
        A stopped router looks nothing up again.
        """
        bob = userOwnedBy(["node3", "node1"])
        self.network.down.add("node3")
        self.stored("node2", bob, "one")
        self.nodes["node2"].router.reread(bob)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.nodes["node2"].router.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OneSidedDeathTests(ThreeNodes):
    """
    Node 3 holds node 1 dead for a moment while node 1 never sees a change
    (group simulation seeds 44 and, with five nodes, 328): node 3 drops
    node 1's sessions of the users it owns and stops telling node 1 of
    their moves.  Seeing node 1 back, it tells it so (C{dir.back}): node 1
    registers those users again and forgets where it cached them.
    """

    def heldDead(self, node: str, by: str) -> None:
        """
        C{by} declares C{node} dead, unreachable meanwhile; C{node} sees
        nothing.
        """
        self.network.down.add(node)
        self.nodes[by].cluster.sees(node)

    def seenBack(self, node: str, by: str) -> None:
        self.network.down.discard(node)
        self.nodes[by].cluster.back(node)

    def test_cachedLocationForgotten(self) -> None:
        """
        Node 1 routed to bob (owned by node 3) and cached his session there.
        Node 3 holds node 1 dead, and bob logs in on node 2 meanwhile: node
        1 is not told.  Once node 3 sees node 1 back, node 1 forgets the
        stale answer: its next push reaches both sessions, and the one it
        pushed to node 1 only meanwhile (routed by that answer) reaches
        node 2 from bob's inbox.
        """
        bob = userOwnedBy(["node3", "node2"])
        first, firstSink = self.nodes["node1"].live(bob)
        self.stored("node1", bob, "before")
        self.assertEqual(self.nodes["node1"].directory.nodes(bob), frozenset(["node1"]))
        self.assertEqual(self.received(first, firstSink), [("TIMMESSAGE", ["before"])])
        self.heldDead("node1", by="node3")
        second, secondSink = self.nodes["node2"].live(bob)
        self.network.down.discard("node1")
        self.stored("node1", bob, "stale")
        self.assertEqual(self.received(second, secondSink), [])
        self.seenBack("node1", by="node3")
        self.assertEqual(self.nodes["node1"].directory.nodes(bob), None)
        self.clock.advance(ClusterRouter.rerouteDelay)
        self.assertEqual(self.received(second, secondSink), [("TIMOFFLINEMSG", ["stale"]), ("TIMOFFLINEMSGEND", [])])
        self.stored("node1", bob, "after")
        self.assertEqual(self.nodes["node1"].directory.nodes(bob), frozenset(["node1", "node2"]))
        self.assertEqual(self.received(first, firstSink), [("TIMMESSAGE", ["stale"]), ("TIMMESSAGE", ["after"])])
        self.assertEqual(self.received(second, secondSink), [("TIMMESSAGE", ["after"])])

    def test_sessionsRegisteredAgain(self) -> None:
        """
        Node 3 dropped bob's session on node 1 when it held node 1 dead,
        and told node 2, which routes to bob: node 2's pushes wait in the
        inbox.  Once node 3 sees node 1 back, node 1 registers bob again:
        node 3 did not know of the session, so it reads what waited, and
        node 2's next push goes live.
        """
        bob = userOwnedBy(["node3", "node2"])
        session, sink = self.nodes["node1"].live(bob)
        self.stored("node2", bob, "before")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["before"])])
        self.heldDead("node1", by="node3")
        self.assertEqual(self.nodes["node3"].directory.sessionsOf(bob), [])
        self.assertEqual(self.nodes["node2"].directory.nodes(bob), frozenset())
        self.network.down.discard("node1")
        self.stored("node2", bob, "waits")
        self.assertEqual(self.received(session, sink), [])
        self.seenBack("node1", by="node3")
        self.assertEqual([entry.node for entry in self.nodes["node3"].directory.sessionsOf(bob)], ["node1"])
        self.assertEqual(self.nodes["node2"].directory.nodes(bob), frozenset(["node1"]))
        self.assertEqual(self.received(session, sink), [("TIMOFFLINEMSG", ["waits"]), ("TIMOFFLINEMSGEND", [])])
        self.stored("node2", bob, "after")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["after"])])

    def test_othersUntouched(self) -> None:
        """
        Only the users the node that held it dead owns are registered
        again and forgotten: what node 1 cached of a user node 2 owns
        stays, and nothing is sent to node 2.
        """
        bob = userOwnedBy(["node3", "node2"])
        carol = userOwnedBy(["node2", "node3"])
        self.nodes["node1"].live(bob)
        self.nodes["node1"].live(carol)
        self.stored("node1", carol, "cached")
        self.heldDead("node1", by="node3")
        self.network.log.clear()
        self.seenBack("node1", by="node3")
        self.assertEqual(self.nodes["node1"].directory.nodes(carol), frozenset(["node1"]))
        self.assertNotIn("node2", [target for source, target, kind in self.network.log if source == "node1"])
        self.assertIn(("node1", "node3", "dir.set"), self.network.log)

    def backs(self) -> int:
        """
        How many C{dir.back} node 1 got from node 3.
        """
        return self.network.log.count(("node3", "node1", KIND_BACK))

    def test_lostBackToldAgain(self) -> None:
        """
        Node 3's first C{dir.back} to node 1 is lost (the link fails while
        node 1 lives in its view): it tells node 1 again, with backoff,
        and node 1 registers bob with it; answered, it tells it no more.
        """
        bob = userOwnedBy(["node3", "node2"])
        self.nodes["node1"].live(bob)
        self.heldDead("node1", by="node3")
        self.nodes["node3"].cluster.back("node1")
        directory = self.nodes["node3"].directory
        self.assertEqual((self.backs(), directory.sessionsOf(bob)), (0, []))
        self.network.down.discard("node1")
        self.clock.advance(_Cluster.retryPolicy(1))
        self.assertEqual(self.backs(), 1)
        self.assertEqual([entry.node for entry in directory.sessionsOf(bob)], ["node1"])
        self.clock.advance(60)
        self.assertEqual(self.backs(), 1)

    def test_backTimedOut(self) -> None:
        """
        A C{dir.back} that gets no answer in time is sent again (handling
        it twice would be harmless), each time later, until node 1 answers.
        """
        bob = userOwnedBy(["node3", "node2"])
        self.nodes["node1"].live(bob)
        self.heldDead("node1", by="node3")
        self.network.down.discard("node1")
        self.network.slow.add("node1")
        self.nodes["node3"].cluster.back("node1")
        self.clock.advance(_Cluster.retryPolicy(1))
        self.clock.advance(_Cluster.retryPolicy(2))
        self.assertEqual(self.nodes["node3"].directory.sessionsOf(bob), [])
        self.network.slow.discard("node1")
        self.clock.advance(_Cluster.retryPolicy(3))
        self.assertEqual(self.backs(), 1)
        self.assertEqual([entry.node for entry in self.nodes["node3"].directory.sessionsOf(bob)], ["node1"])
        self.assertFalse(self.nodes["node3"].directory._back.telling("node1"))

    def test_noBackOnceDeadAgain(self) -> None:
        """
        Node 3 stops telling node 1 it is back once it holds it dead again:
        it tells it when next back.
        """
        self.heldDead("node1", by="node3")
        self.nodes["node3"].cluster.back("node1")
        self.nodes["node3"].cluster.sees("node1")
        self.network.down.discard("node1")
        self.clock.advance(60)
        self.assertEqual(self.backs(), 0)
        self.assertFalse(self.nodes["node3"].directory._back.telling("node1"))
        self.nodes["node3"].cluster.back("node1")
        self.assertEqual(self.backs(), 1)

    def test_olderNodeToldOnce(self) -> None:
        """
        A node of a version without C{dir.back} answers that it has no
        handler for it: it is told once, as before, not again and again.
        """
        del self.network.nodes["node1"].handlers[KIND_BACK]
        self.heldDead("node1", by="node3")
        self.seenBack("node1", by="node3")
        self.clock.advance(60)
        self.assertEqual(self.backs(), 1)
        self.assertFalse(self.nodes["node3"].directory._back.telling("node1"))

    def test_stopCancels(self) -> None:
        """
        A node that stops tells nothing more, and leaves no timer behind.
        """
        self.heldDead("node1", by="node3")
        calls = len(self.clock.getDelayedCalls())
        self.nodes["node3"].cluster.back("node1")
        self.assertEqual(len(self.clock.getDelayedCalls()), calls + 1)
        self.nodes["node3"].directory.stop()
        self.assertEqual(len(self.clock.getDelayedCalls()), calls)
        self.network.down.discard("node1")
        self.clock.advance(60)
        self.assertEqual(self.backs(), 0)


class HandoverTests(ThreeNodes):
    """
    A conversation changes owners (a membership change, or two nodes
    numbering it at once): the new owner's first message is pushed after
    a look, so that it cannot overtake the old owner's last push, still on
    its way (L{ClusterRouter.pushAfterLook}).
    """

    def inInbox(self, uid: str, text: str) -> tuple[int, Encoded]:
        """
        Store a message for C{uid} whose push is still to come.
        """
        message = TimMessage(id=len(text), dataString=text)
        [qid] = self.successResultOf(self.store.addInbox([(uid, self.vault.sealFor(uid, message))], 0.0))
        return qid, Encoded(message)

    def test_handoverDoesNotOvertake(self) -> None:
        """
        Node 3 stored "ten" for bob and its push is slow; node 2, the new
        owner, stores "eleven" and pushes it after a look: bob's session
        finds "ten" unpushed and reads both, in order.  The old push,
        arriving last, is not shown again, and later pushes go live.
        """
        bob = userOwnedBy(["node1", "node2"])
        session, sink = self.nodes["node1"].live(bob)
        tenQid, ten = self.inInbox(bob, "ten")
        elevenQid, eleven = self.inInbox(bob, "eleven")
        self.nodes["node2"].router.pushAfterLook(bob, elevenQid, eleven)
        self.assertEqual(self.received(session, sink), [("TIMOFFLINEMSG", ["ten", "eleven"]), ("TIMOFFLINEMSGEND", [])])
        kinds = [entry[2] for entry in self.network.log if entry[1] == "node1" and entry[2] in (KIND_PUSH, KIND_REREAD)]
        self.assertEqual(kinds, [KIND_REREAD, KIND_PUSH])
        self.nodes["node3"].router.push(bob, tenQid, ten)
        self.assertEqual(self.received(session, sink), [])
        self.stored("node2", bob, "twelve")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["twelve"])])

    def test_handoverNothingOlder(self) -> None:
        """
        When nothing older waits unpushed (the old owner's push arrived, and
        is in flight or acknowledged), the handover push goes out live.
        """
        bob = userOwnedBy(["node1", "node2"])
        session, sink = self.nodes["node1"].live(bob)
        self.stored("node3", bob, "acknowledged")
        self.assertEqual(self.received(session, sink), [("TIMMESSAGE", ["acknowledged"])])
        self.clock.advance(0)
        self.stored("node3", bob, "in flight")
        qid, encoded = self.inInbox(bob, "after the move")
        self.nodes["node2"].router.pushAfterLook(bob, qid, encoded)
        self.assertEqual(
            self.received(session, sink), [("TIMMESSAGE", ["in flight"]), ("TIMMESSAGE", ["after the move"])]
        )

    def test_handoverHere(self) -> None:
        """
        A recipient on the new owner's own node looks the same way.
        """
        bob = userOwnedBy(["node1", "node2"])
        session, sink = self.nodes["node2"].live(bob)
        tenQid, ten = self.inInbox(bob, "ten")
        elevenQid, eleven = self.inInbox(bob, "eleven")
        self.nodes["node2"].router.pushAfterLook(bob, elevenQid, eleven)
        self.assertEqual(self.received(session, sink), [("TIMOFFLINEMSG", ["ten", "eleven"]), ("TIMOFFLINEMSGEND", [])])
        self.nodes["node3"].router.push(bob, tenQid, ten)
        self.assertEqual(self.received(session, sink), [])


class CompactOnlyTests(ThreeNodes):
    def test_jsonLeftOut(self) -> None:
        """
        A push to a node that offers C{route.compact} leaves the JSON out:
        that node makes it for its JSON session, the same message.  To a
        node that does not offer it, both encodings go, as before.
        """
        bob = userOwnedBy(["node1", "node2"])
        session, sink = self.nodes["node3"].live(bob, Encoding.JSON)
        sent: list[bytes] = []
        deliver = self.network.deliver

        def recording(source: str, target: str, kind: str, payload: bytes) -> Deferred[Any]:
            if kind == KIND_PUSH:
                sent.append(payload)
            return deliver(source, target, kind, payload)

        self.network.deliver = recording  # type: ignore[method-assign]
        self.stored("node1", bob, "one")
        self.nodes["node3"].cluster.features.discard(COMPACT_FEATURE)
        self.stored("node1", bob, "two")
        self.assertEqual([unpack(payload, 4)[1] == b"" for payload in sent], [True, False])
        texts = []
        while sink.frames:
            frame = sink.frames.pop(0)
            texts.append(decode_json(TimMessage, frame.payload).dataString)
            session.ackReceived(frame.ackId)
        self.assertEqual(texts, ["one", "two"])
