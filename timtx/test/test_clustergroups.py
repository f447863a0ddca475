# -*- test-case-name: timtx.test.test_clustergroups -*-
"""
Groups across nodes: three L{Node}s in this process sharing one PostgreSQL
database, with the actors of every group operation logged in to different
nodes.

L{SpreadGroupTests} runs every single-node group test (L{GroupTestsMixin})
with each new client on the next node in turn; the other tests check what
only a cluster has: a message crosses once to each node holding members,
every device gets every message once and in order wherever it is, and the
group's owner node may die in the middle of traffic.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.chat.groups.directory import GroupState
from timtx.client import TimRequestFailed
from timtx.cluster.groups import KIND_CHANGED, KIND_PUSH, KIND_SEND, GroupDelivery, GroupItem
from timtx.cluster.ownership import groupKey
from timtx.delivery.encoded import Encoded
from timtx.persistence.records import GROUP_ALIVE, ROLE_MEMBER, Group, Member, StoredMessage
from timtx.protocols.constants import Business, ErrorCode, GroupType
from timtx.protocols.structs import Tid, TimMessage
from timtx.test.base import waitUntil, within
from timtx.test.test_clusterrouting import ClusterRoutingTests
from timtx.test.test_groups import GroupTestsMixin, groupMessage
from timtx.testing import loggedInClient


class _Spread:
    """
    The nodes of a cluster, as the single-node group tests see their node:
    its store and vault are the shared ones, and flushing cursors flushes
    every node's.
    """

    def __init__(self, nodes):
        self.nodes = nodes
        self.store = nodes[0].store
        self.vault = nodes[0].vault
        self.fanout = self

    def flush(self):
        return gatherResults([node.fanout.flush() for node in self.nodes])


class ClusterGroupsBase:
    timeout = 120
    encoding = ClusterRoutingTests.encoding
    cluster = ClusterRoutingTests.cluster
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    def say(self, client, gid, text, **fields):
        return client.sendMessage(None, text, msType=3, roomTid=Tid(node=gid), **fields)

    @inlineCallbacks
    def spread(self, count=3, **sections):
        merged = {name: dict(values) for name, values in self.sections.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        nodes = yield self.cluster(count, **merged)
        self._turn = 0
        return _Spread(nodes)

    @inlineCallbacks
    def user(self, node, name=None, encoding=None, transport=None, **kwargs):
        """
        A logged-in client: on the next node of the cluster in turn when
        C{node} is a L{_Spread}.
        """
        if isinstance(node, _Spread):
            node, self._turn = node.nodes[self._turn % len(node.nodes)], self._turn + 1
        kwargs.setdefault("encoding", encoding or self.encoding)
        client = yield loggedInClient(reactor, node, name, testCase=self, **kwargs)
        return client

    def groupOwner(self, nodes, gid):
        name = nodes[0].cluster.ownership.owner(groupKey(gid))
        return next(node for node in nodes if node.cluster.nodeId == name)


class SpreadGroupTests(ClusterGroupsBase, GroupTestsMixin, TestCase):
    """
    Every single-node group test, each client on another node.
    """

    def node(self, clock=None, **sections):
        return self.spread(3, **sections)


class ClusterGroupTests(ClusterGroupsBase, TestCase):
    @inlineCallbacks
    def members(self, nodes, gid, perNode):
        """
        C{perNode} members joined to C{gid} on each node.
        """
        clients = []
        for node in nodes:
            for _ in range(perNode):
                client = yield self.user(node)
                yield client.business(Business.ADDROOM, node=gid)
                clients.append(client)
        return clients

    @inlineCallbacks
    def receivedSeqs(self, client, count):
        seqs = []
        for _ in range(count):
            seqs.append((yield client.next(groupMessage)).body.seq)
        return seqs

    @inlineCallbacks
    def test_oncePerNode(self):
        """
        A group message sent on one node, owned by another, reaches every
        member's devices on every node once, in seq order, the sender's
        other devices as its echo; it crosses once to each node holding
        members, not once per member.
        """
        spread = yield self.spread(3, groups={"member_notices": False})
        nodes = spread.nodes
        founder = yield self.user(nodes[0])
        gid = (yield founder.business(Business.NEWROOM, node="topic", reqInt=GroupType.OPEN)).n
        members = yield self.members(nodes, gid, 3)
        sender = members[0]
        other = yield self.user(nodes[2], sender.loginName, registerFirst=False)
        owner = self.groupOwner(nodes, gid)
        everyone = [founder, *members, other]
        # Every device past its login's read of what it missed, so that
        # what follows is pushed live (not listed as missed).
        for client in everyone:
            self.assertEqual((yield client.offlineMessages()), [])
        before = {node: dict(node.router.forwarded) for node in nodes}
        count = 10
        for i in range(count):
            self.say(sender if i % 2 else members[-1], gid, f"m{i}")
        for client in everyone:
            seqs = yield self.receivedSeqs(client, count)
            self.assertEqual(seqs, list(range(1, count + 1)), client.uid)
        yield gatherResults([client.ping() for client in everyone])
        for client in everyone:
            self.assertEqual(client.take(groupMessage), [], "nothing twice")
        sent = {node: node.router.forwarded.get(KIND_PUSH, 0) - before[node].get(KIND_PUSH, 0) for node in nodes}
        # Only the owner sends, once per message to each other node.
        self.assertEqual(sent[owner], count * 2)
        self.assertEqual(sum(sent.values()), count * 2)
        # Each message was handed to the owner by its sender's node, unless
        # that was the owner.
        fromOthers = sum(1 for i in range(count) if nodes[0 if i % 2 else 2] is not owner)
        self.assertEqual(sum(node.groups.forwarded for node in nodes), fromOthers)
        self.assertEqual(owner.groups.appendedForOthers, fromOthers)
        history = yield members[4].history(gid, rtype=2)
        self.assertEqual([m.seq for m in history], list(range(count, 0, -1)))

    @inlineCallbacks
    def test_streamsOncePerNode(self):
        """
        A stream message (not stored) goes once to each other node holding
        members, with the members there.
        """
        spread = yield self.spread(3, groups={"member_notices": False})
        nodes = spread.nodes
        founder = yield self.user(nodes[0])
        gid = (yield founder.business(Business.NEWROOM, node="topic", reqInt=GroupType.OPEN)).n
        members = yield self.members(nodes, gid, 2)
        # Every member's nodes known on the sender's node.
        for client in members:
            yield nodes[0].userDirectory.locate(client.uid)
        before = nodes[0].router.forwarded.get(KIND_SEND, 0)
        self.say(founder, gid, "frame", odType=5)
        for client in members:
            got = yield client.next(groupMessage)
            self.assertEqual((got.body.odType, got.body.dataString), (5, "frame"))
        self.assertEqual(nodes[0].router.forwarded.get(KIND_SEND, 0) - before, 2)

    @inlineCallbacks
    def test_changesSeenEverywhere(self):
        """
        A change made on one node (a member muted, a member kicked) holds on
        the others at once: the node the member sends through knows.
        """
        spread = yield self.spread(3, groups={"member_notices": False})
        nodes = spread.nodes
        founder = yield self.user(nodes[0])
        gid = (yield founder.business(Business.NEWROOM, node="topic", reqInt=GroupType.OPEN)).n
        bob = yield self.user(nodes[1])
        yield bob.business(Business.ADDROOM, node=gid)
        self.say(bob, gid, "cached")
        yield founder.next(groupMessage)
        yield founder.business(104, node=gid, node2=bob.uid, reqInt=-1)
        self.assertTrue(sum(node.router.received.get(KIND_CHANGED, 0) for node in nodes) >= 2)
        muted = bob.postMessage(None, "muted?", msType=3, roomTid=Tid(node=gid))
        failure = yield self.assertFailure(muted, TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        yield founder.business(Business.KICKROOM, node=gid, node2=bob.uid)
        kicked = bob.postMessage(None, "kicked?", msType=3, roomTid=Tid(node=gid))
        failure = yield self.assertFailure(kicked, TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)

    @inlineCallbacks
    def test_ownerDiesMidTraffic(self):
        """
        The group's owner node stops while two members on the other nodes
        keep sending (resending what was not confirmed, with the same id):
        the next owner takes over; every confirmed message reaches every
        member device on the surviving nodes, once per seq, in seq order,
        with no gap, and the history holds each message once.
        """
        spread = yield self.spread(3, groups={"member_notices": False})
        nodes = spread.nodes
        founder = yield self.user(nodes[0])
        gid = (yield founder.business(Business.NEWROOM, node="topic", reqInt=GroupType.OPEN)).n
        owner = self.groupOwner(nodes, gid)
        survivors = [node for node in nodes if node is not owner]
        senders = []
        readers = []
        for node in survivors:
            sender = yield self.user(node)
            reader = yield self.user(node)
            for client in (sender, reader):
                yield client.business(Business.ADDROOM, node=gid)
            senders.append(sender)
            readers.append(reader)
        onOwner = yield self.user(owner)
        yield onOwner.business(Business.ADDROOM, node=gid)
        confirmed = {}
        stopped = Deferred()
        echoes = {}

        @inlineCallbacks
        def talk(sender, tag, count):
            for i in range(count):
                text = f"{tag}{i}"
                for _attempt in range(20):
                    try:
                        echo = yield sender.postMessage(
                            None, text, msType=3, roomTid=Tid(node=gid), id=hash((tag, i)) & 0xFFFFFFFF
                        )
                    except TimRequestFailed as e:
                        # 5103: the owner went with the message, which may
                        # be stored.  Resend once the node is gone, as a
                        # client does after a pause: a resend that races
                        # the dying node's last commit may be stored again
                        # (docs/cluster.md, groups across nodes).
                        self.assertEqual(e.code, ErrorCode.ERR_DATABASE)
                        yield stopped
                        continue
                    confirmed[text] = echo.seq
                    echoes.setdefault(sender, []).append(echo.seq)
                    break
                else:
                    self.fail(f"{text} never confirmed")

        count = 30
        talking = [talk(sender, f"s{n}-", count) for n, sender in enumerate(senders)]
        yield waitUntil(lambda: len(confirmed) >= 10)
        yield owner.stopService()
        stopped.callback(None)
        yield within(gatherResults(talking), 60)
        self.assertEqual(len(confirmed), count * len(senders))
        seqs = sorted(confirmed.values())
        self.assertEqual(len(set(seqs)), len(seqs), "no seq confirmed twice")
        last = max(seqs)
        for node in survivors:
            yield waitUntil(lambda node=node: node.cluster.ownership.owner(groupKey(gid)) != owner.cluster.nodeId)
        # Every member device got every seq up to the last confirmed one,
        # with no gap; the readers' in order (a sender also gets the echo
        # of a resend, which is the stored message again).
        # (The founder is checked too unless its node was the owner.)
        founders = [] if owner is nodes[0] else [founder]
        for client in [*readers, *senders, *founders]:
            # A sender's own messages came as the echoes postMessage took.
            got = list(echoes.get(client, ()))
            while set(range(1, last + 1)) - set(got):
                got.append((yield client.next(groupMessage, timeout=20)).body.seq)
            if client not in senders:
                self.assertEqual(got, list(range(1, last + 1)), client.uid)
        history = yield readers[0].history(gid, rtype=2, limit=1000)
        texts = [m.dataString for m in history]
        self.assertEqual(len(texts), len(set(texts)), "each message stored once")
        self.assertEqual(sorted(m.seq for m in history), list(range(1, last + 1)))


class _Fanout:
    def __init__(self):
        self.pushed = []
        self.cursors = {}

    def deliver(self, gid, members, encoded, skip=None, seq=None):
        self.pushed.append((seq, sorted(uid for uid in members if uid != skip), skip))
        return 0

    def cursor(self, uid, gid):
        return self.cursors.get(uid)

    def advance(self, uid, gid, seq):
        self.cursors[uid] = seq


class _Store:
    def __init__(self):
        self.reads = []

    def messagesAfter(self, conv, after, limit):
        d = Deferred()
        self.reads.append((conv, after, limit, d))
        return d


class _Vault:
    def openMessage(self, conv, seq, stanza):
        return TimMessage(seq=seq, dataString=stanza.decode())


class GroupDeliveryTests(SynchronousTestCase):
    """
    L{GroupDelivery} without a network: order, late copies, gaps.
    """

    def setUp(self):
        self.state = GroupState(Group("g", "", "alice", 2, GROUP_ALIVE, 0.0, b""), {})
        for uid in ("alice", "bob", "carol"):
            self.state.members[uid] = Member(uid, ROLE_MEMBER, 0.0)
        self.loads = []
        self.fanout = _Fanout()
        self.store = _Store()
        self.sent = []
        directory = self

        class _Directory:
            def get(self, gid):
                if directory.loads is None:
                    return succeed(directory.state)
                d = Deferred()
                directory.loads.append(d)
                return d

        self.delivery = GroupDelivery(
            directory=_Directory(),
            fanout=self.fanout,
            send=lambda uid, timType, encoded: self.sent.append(uid),
            store=self.store,
            vault=_Vault(),
        )

    def item(self, seq, skip=None, echo=False):
        return GroupItem(seq, Encoded(TimMessage(seq=seq)), skip, echo)

    def test_queuedWhileLoading(self):
        """
        Messages that arrive while the group is read wait, and go out in
        arrival order once it is.
        """
        self.delivery.arrived("g", self.item(1))
        self.delivery.arrived("g", self.item(2, "bob", echo=True))
        self.assertEqual(self.fanout.pushed, [])
        self.loads[0].callback(self.state)
        self.loads[1].callback(self.state)
        self.assertEqual([p[0] for p in self.fanout.pushed], [1, 2])
        self.assertEqual(self.fanout.pushed[1], (2, ["alice", "carol"], "bob"))
        self.assertEqual(self.sent, ["bob"])

    def test_lateCopyDropped(self):
        """
        A message older than one delivered (another owner's, during a view
        change) was delivered already: dropped.
        """
        self.loads = None
        for seq in (1, 2, 2, 1):
            self.delivery.arrived("g", self.item(seq))
        self.assertEqual([p[0] for p in self.fanout.pushed], [1, 2])
        self.assertEqual(self.delivery.late, 2)

    def test_gapFilledFromStore(self):
        """
        A message after a gap waits for the missing ones, read from the
        store and pushed first to the members that have not acknowledged
        them; messages arriving meanwhile wait their turn.
        """
        self.loads = None
        self.delivery.arrived("g", self.item(1))
        self.delivery.arrived("g", self.item(4))
        self.delivery.arrived("g", self.item(5))
        self.assertEqual([p[0] for p in self.fanout.pushed], [1])
        conv, after, limit, d = self.store.reads[0]
        self.assertEqual((conv, after, limit), ("g:g", 1, 2))
        # bob read seq 2 (from history, say) and acknowledged it.
        self.fanout.cursors.update({"alice": 1, "bob": 2})
        d.callback([StoredMessage("g:g", 2, 0, "x", b"two", 0, 0.0), StoredMessage("g:g", 3, 0, "x", b"three", 0, 0.0)])
        self.assertEqual(
            self.fanout.pushed[1:],
            [
                (2, ["alice", "carol"], None),
                (3, ["alice", "bob", "carol"], None),
                (4, ["alice", "bob", "carol"], None),
                (5, ["alice", "bob", "carol"], None),
            ],
        )
        self.assertEqual(self.delivery.repaired, 2)
