# -*- test-case-name: timtx.test.test_clusterrouting -*-
"""
Routing between nodes: several L{Node}s in this process, each with a
C{[cluster]} on loopback (ports chosen by the OS), sharing one PostgreSQL
database, with real tim clients logged in to different nodes.
"""

import json
import os
import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.admin.metrics import NodeCollector, Sampler
from timtx.admin.status import clusterStatus
from timtx.chat.conversations import pairConversation
from timtx.client import TimRequestFailed, connect, register, requestToken
from timtx.cluster.membership import PeerRequestFailed, checkClusterConfig, loadSecret
from timtx.cluster.messaging import ECHO_FEATURE, ClusterMessaging
from timtx.cluster.ownership import conversationKey
from timtx.cluster.router import ClusterRouter
from timtx.cluster.swim import ChangeKind, MemberChange
from timtx.cluster.wire import BadPayload, pack, unpack
from timtx.config import load, replace
from timtx.delivery.router import LocalRouter
from timtx.persistence.records import STANCE_BLOCK, STANCE_FRIEND
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, MsType, NodeInfo, OdType, TimType
from timtx.protocols.structs import Tid, TimMessage, TimPresence, TimUserBean
from timtx.test.base import waitUntil, within
from timtx.test.databases import postgresqlDatabase
from timtx.test.test_messaging import isMessage
from timtx.test.test_roster import notice
from timtx.testing import (
    httpURL,
    loggedInClient,
    requireOrSkip,
    sourceRoot,
    startNode,
    testConfig,
    uniqueName,
    wsURL,
)

SECRET = "cluster-secret-for-tests"


def presence(i):
    return i.timType == TimType.TIMPRESENCE


def untilMembers(node, count):
    """
    Fire once C{node} sees C{count} live members (itself included).
    """
    cluster = node.cluster
    done = Deferred()

    def check(change=None):
        if not done.called and len(cluster.liveMembers()) >= count:
            cluster.removeObserver(check)
            done.callback(node)

    cluster.addObserver(check)
    check()
    return within(done, 20)


class WireTests(SynchronousTestCase):
    def test_roundTrip(self):
        """
        Fields come back as packed, empty ones included.
        """
        fields = [b"", b"compact", b"\x00\xff" * 3]
        self.assertEqual(unpack(pack(*fields), 3), fields)

    def test_malformed(self):
        """
        A payload cut short, with trailing bytes or another number of fields
        is refused with L{BadPayload}.
        """
        data = pack(b"one", b"two")
        for bad, count in [(data[:-1], 2), (data + b"x", 2), (data, 3), (data, 1), (b"\x00\x00", 1)]:
            self.assertRaises(BadPayload, unpack, bad, count)

    def test_optionalFields(self):
        """
        Fields a newer sender adds at the end are read if they are all
        there, and not missed if none is; some of them is malformed.
        """
        self.assertEqual(unpack(pack(b"a"), 1, optional=2), [b"a"])
        self.assertEqual(unpack(pack(b"a", b"b", b"c"), 1, optional=2), [b"a", b"b", b"c"])
        for bad in (pack(b"a", b"b"), pack(b"a", b"b", b"c", b"d"), pack()):
            self.assertRaises(BadPayload, unpack, bad, 1, 2)


class ClusterFixture:
    """
    A mesh of nodes in this process and clients of them, for a L{TestCase}.
    """

    encoding = Encoding.COMPACT

    @inlineCallbacks
    def cluster(self, count=2, **sections):
        """
        C{count} nodes sharing a fresh PostgreSQL database, each seeing all.
        """
        dsn = yield postgresqlDatabase(self)
        nodes = []
        seeds = ()
        for i in range(count):
            merged = {name: dict(values) for name, values in sections.items()}
            merged.setdefault("store", {})["dsn"] = dsn
            merged.setdefault("devices", {}).setdefault("limit", 0)
            merged["devices"].setdefault("type_limit", 0)
            merged["cluster"] = {
                "listen": "tcp:0:interface=127.0.0.1",
                "secret": SECRET,
                "node_id": f"node{i + 1}",
                "seeds": seeds,
                **sections.get("cluster", {}),
            }
            config = testConfig(self.mktemp(), backend="postgresql", **merged)
            node = yield startNode(self, reactor, config)
            nodes.append(node)
            seeds = (node.cluster.address,)
        for node in nodes:
            yield untilMembers(node, count)
        return nodes

    @inlineCallbacks
    def user(self, node, name=None, **kwargs):
        kwargs.setdefault("encoding", self.encoding)
        client = yield loggedInClient(reactor, node, name, testCase=self, **kwargs)
        return client

    @inlineCallbacks
    def friends(self, node, *clients):
        for a in clients:
            for b in clients:
                if a is not b:
                    yield node.relations.setStance(a.uid, b.uid, STANCE_FRIEND)


def chatMessage(sender, recipient, text, **fields):
    """
    A 1:1 chat message from C{sender} to C{recipient}, as a node stores one
    it was sent (for messages put in the store behind the clients' backs).
    """
    return TimMessage(
        dataString=text,
        msType=MsType.SOURCE_USER,
        odType=OdType.ORDER_INOF,
        fromTid=Tid(node=sender.uid),
        toTid=Tid(node=recipient.uid),
        timestamp=1,
        **fields,
    )


@inlineCallbacks
def textsReceived(client, count):
    """
    The texts of the next C{count} messages C{client} receives, pushed or
    in offline lists, in the order they came.
    """
    got = []
    while len(got) < count:
        incoming = yield client.next(lambda i: i.timType in (TimType.TIMMESSAGE, TimType.TIMOFFLINEMSG))
        if incoming.timType == TimType.TIMOFFLINEMSG:
            got.extend(m.dataString for m in incoming.body.messageList or ())
        elif incoming.body.dataString:
            got.append(incoming.body.dataString)
    return got


@inlineCallbacks
def noticeReceived(client, bnType):
    """
    The next notice of C{bnType} that C{client} receives, pushed or in an
    offline list: one stored while the client's new session still reads
    its inbox comes with what it reads there.
    """
    while True:
        incoming = yield client.next(lambda i: i.timType in (TimType.TIMMESSAGE, TimType.TIMOFFLINEMSG))
        if incoming.timType == TimType.TIMMESSAGE:
            messages = [incoming.body]
        else:
            messages = incoming.body.messageList or []
        for message in messages:
            if message.bnType == bnType:
                return message


class ClusterRoutingTests(ClusterFixture, TestCase):
    """
    Nodes that form a mesh, and clients on different nodes.
    """

    timeout = 60

    @inlineCallbacks
    def test_mesh(self):
        """
        Three nodes started with seeds form one mesh, agree on the owners of
        keys, and route through a L{ClusterRouter}.
        """
        nodes = yield self.cluster(3)
        self.assertEqual({n.cluster.ownership for n in nodes}, {nodes[0].cluster.ownership})
        self.assertEqual(nodes[0].cluster.ownership.nodes, ("node1", "node2", "node3"))
        for node in nodes:
            self.assertIsInstance(node.router, ClusterRouter)
        status = clusterStatus(nodes[1])
        self.assertEqual((status["clustered"], status["self"], status["live"]), (True, "node2", 3))
        # The links and the paths that reach the other two, as the admin
        # API shows them.
        self.assertEqual(
            sorted((link["node"], link["up"]) for link in status["links"]), [("node1", True), ("node3", True)]
        )
        self.assertEqual(
            sorted((path["node"], path["path"]) for path in status["paths"]), [("node1", "tcp"), ("node3", "tcp")]
        )
        json.dumps(status)

    @inlineCallbacks
    def test_peerBytes(self):
        """
        Each node counts the bytes over its peer links, both ways, and
        reports them as C{timtx_cluster_peer_bytes_total}: a message from a
        user on one node to one on the other adds at least its text to what
        the first sent and the second received.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        sent, received = node1.cluster.traffic.sent, node2.cluster.traffic.received
        text = "x" * 5000
        alice.sendMessage(bob.uid, text)
        self.assertEqual((yield bob.next(isMessage)).body.dataString, text)
        self.assertGreater(node1.cluster.traffic.sent - sent, len(text))
        self.assertGreater(node2.cluster.traffic.received - received, len(text))
        families = {f.name: f for f in NodeCollector(node1, Sampler(node1, reactor)).collect()}
        samples = {s.labels["direction"]: s.value for s in families["timtx_cluster_peer_bytes"].samples}
        self.assertEqual(samples["sent"], node1.cluster.traffic.sent)
        self.assertGreater(samples["received"], 0)
        self.assertEqual(families["timtx_cluster_peer_links"].samples[0].value, 1)
        paths = {s.labels["path"]: s.value for s in families["timtx_cluster_paths"].samples}
        self.assertEqual(paths, {"tcp": 1})

    @inlineCallbacks
    def test_badPayloads(self):
        """
        Routing requests and messages of the wrong shape are refused, one at
        a time, and the mesh goes on routing.
        """
        node1, node2 = yield self.cluster(2)
        for kind, payload in [
            ("dir.set", b"not json"),
            ("dir.set", b'{"uid": 5}'),
            ("dir.set", b'{"uid": "u", "domain": "", "sessions": [[1]]}'),
            ("dir.get", b"[]"),
            ("conv.append", pack(b"too", b"few")),
        ]:
            failure = yield self.assertFailure(node1.cluster.request("node2", kind, payload), PeerRequestFailed)
            self.assertNotEqual(failure.reason, "internal error", kind)
        for kind in ("route.push", "route.send", "dir.update", "cache.stance"):
            yield node1.cluster.send("node2", kind, b"\x00garbage")
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        yield alice.postMessage(bob.uid, "still routing")
        self.assertEqual((yield bob.next(isMessage)).body.dataString, "still routing")
        self.flushLoggedErrors(BadPayload)

    @inlineCallbacks
    def test_crossNode(self):
        """
        A message from a user on one node reaches the recipient on another,
        durable and numbered, and the sender's other device on a third node
        gets the echo; history reads the same from any node.
        """
        node1, node2, node3 = yield self.cluster(3)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        alice2 = yield self.user(node3, alice.loginName, registerFirst=False)
        yield self.friends(node1, alice, bob)
        alice.sendMessage(bob.uid, "across", id=5)
        echo = yield alice.next(isMessage)
        got = yield bob.next(isMessage)
        other = yield alice2.next(isMessage)
        for message in (echo.body, got.body, other.body):
            self.assertEqual((message.dataString, message.seq, message.mid), ("across", 1, echo.body.mid))
        self.assertIsNotNone(got.ackId)
        history = yield bob.history(alice.uid)
        self.assertEqual([m.dataString for m in history], ["across"])
        history = yield alice2.history(bob.uid)
        self.assertEqual([m.dataString for m in history], ["across"])

    @inlineCallbacks
    def test_inOrder(self):
        """
        Many messages from one node to a recipient with devices on two other
        nodes arrive at each in seq order, each once; the acks empty the
        shared inbox.
        """
        node1, node2, node3 = yield self.cluster(3)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        bob2 = yield self.user(node3, bob.loginName, registerFirst=False)
        yield self.friends(node1, alice, bob)
        count = 50
        for i in range(count):
            alice.sendMessage(bob.uid, f"m{i}")
        for device in (bob, bob2):
            seqs = []
            for _ in range(count):
                seqs.append((yield device.next(isMessage)).body.seq)
            self.assertEqual(seqs, list(range(1, count + 1)))
        yield bob.ping()
        yield bob2.ping()
        self.assertEqual(bob.take(isMessage) + bob2.take(isMessage), [])

    @inlineCallbacks
    def test_bothSendAtOnce(self):
        """
        Two users on different nodes sending to each other at once: every
        device of either, on a third node too, gets the whole conversation
        (its own echoes and the other's messages) in seq order, each once.
        """
        nodes = yield self.cluster(3)
        alice = yield self.user(nodes[0])
        bob = yield self.user(nodes[1])
        alice3 = yield self.user(nodes[2], alice.loginName, registerFirst=False)
        bob3 = yield self.user(nodes[2], bob.loginName, registerFirst=False)
        yield self.friends(nodes[0], alice, bob)
        count = 40
        for i in range(count):
            alice.sendMessage(bob.uid, f"a{i}")
            bob.sendMessage(alice.uid, f"b{i}")
        for device in (alice, bob, alice3, bob3):
            got = []
            for _ in range(2 * count):
                got.append((yield device.next(isMessage)).body)
            self.assertEqual([m.seq for m in got], list(range(1, 2 * count + 1)))
            self.assertEqual([m.dataString for m in got if m.dataString[0] == "a"], [f"a{i}" for i in range(count)])
        owners = [n for n in nodes if n.messaging.appendedForOthers]
        self.assertLessEqual(len(owners), 1, "one node stores the conversation")

    @inlineCallbacks
    def test_echoLeftToSendersNode(self):
        """
        A sender's node asks the conversation's owner to leave the echo to
        its sessions there to it: once the owner knows where the sender is,
        the echo comes with the owner's answer instead of a message of its
        own.  Every device of the sender, there or on a third node, gets
        each message of the conversation once, in seq order.  An owner that
        does not offer it (an older node) sends the echo as before.
        """
        nodes = yield self.cluster(3)
        names = [uniqueName(), uniqueName()]
        uids = []
        for name in names:
            uids.append((yield register(reactor, httpURL(nodes[0]), name, "secret")))
        conversationOwner = nodes[0].cluster.ownership.owner(conversationKey(pairConversation(*uids)))
        home, third = [n for n in nodes if n.cluster.nodeId != conversationOwner]
        alice = yield self.user(home, names[0], registerFirst=False)
        alice3 = yield self.user(third, names[0], registerFirst=False)
        # On the owner: what comes to alice's node is hers alone.
        byId = {node.cluster.nodeId: node for node in nodes}
        bob = yield self.user(byId[conversationOwner], names[1], registerFirst=False)
        yield self.friends(home, alice, bob)
        yield self.sessionsKnown(nodes, alice.uid, 2)
        echoesSent = lambda: home.router.received.get("route.send", 0)  # noqa: E731

        @inlineCallbacks
        def exchange(count, first):
            before = echoesSent()
            for i in range(count):
                alice.sendMessage(bob.uid, f"a{i}")
                bob.sendMessage(alice.uid, f"b{i}")
            for device in (alice, alice3):
                got = []
                for _ in range(2 * count):
                    got.append((yield device.next(isMessage)).body)
                self.assertEqual([m.seq for m in got], list(range(first, first + 2 * count)))
                self.assertEqual([m.dataString for m in got if m.dataString[0] == "a"], [f"a{i}" for i in range(count)])
            yield alice.ping()
            self.assertEqual(alice.take(isMessage), [], "each once")
            return echoesSent() - before

        yield exchange(1, 1)  # the owner learns where alice is
        self.assertEqual((yield exchange(20, 3)), 0, "every echo came with an answer")
        peer = home.cluster._peers[conversationOwner]
        peer.features = peer.features - {ECHO_FEATURE}
        self.assertEqual((yield exchange(5, 43)), 5, "an older owner sends its echoes")

    @inlineCallbacks
    def test_conversationOwnerOff(self):
        """
        With C{conversation_owner} off, the sender's node stores and routes
        the message itself: one link to the recipient's node.
        """
        nodes = yield self.cluster(3, cluster={"conversation_owner": False})
        alice = yield self.user(nodes[0])
        bob = yield self.user(nodes[1])
        yield self.friends(nodes[0], alice, bob)
        for i in range(5):
            alice.sendMessage(bob.uid, f"m{i}")
        got = []
        for _ in range(5):
            got.append((yield bob.next(isMessage)).body.seq)
        self.assertEqual(got, [1, 2, 3, 4, 5])
        self.assertEqual(nodes[0].router.forwarded.get("route.push"), 5)
        self.assertEqual([n.router.received.get("route.push", 0) for n in nodes], [0, 5, 0])
        self.assertNotIsInstance(nodes[0].messaging, ClusterMessaging)

    @inlineCallbacks
    def test_everyOdType(self):
        """
        Streams (unstored, unacked), custom types (inbox only), recalls and
        burns cross nodes, and their notices arrive.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        alice.sendMessage(bob.uid, "frame", odType=5)
        got = yield bob.next(isMessage)
        self.assertEqual((got.body.odType, got.ackId), (5, None))
        alice.sendMessage(bob.uid, "typing", odType=40)
        got = yield bob.next(isMessage)
        self.assertEqual((got.body.odType, got.body.dataString, got.body.seq), (40, "typing", None))
        first = yield alice.postMessage(bob.uid, "oops")
        second = yield alice.postMessage(bob.uid, "burn me")
        yield bob.next(isMessage)
        yield bob.next(isMessage)
        yield alice.postMessage(bob.uid, None, odType=2, mid=first.mid, timType=TimType.TIMREVOKEMESSAGE)
        notice = (yield bob.next(isMessage)).body
        self.assertEqual((notice.odType, notice.mid), (2, first.mid))
        bob.sendMessage(alice.uid, None, odType=3, mid=second.mid, timType=TimType.TIMBURNMESSAGE)
        notice = (yield alice.next(lambda i: isMessage(i) and i.body.odType == 3)).body
        self.assertEqual(notice.mid, second.mid)
        history = yield alice.history(bob.uid)
        self.assertEqual([m.dataString for m in history], [None, None])

    @inlineCallbacks
    def test_bigPayloads(self):
        """
        TIMBIGSTRING and a big binary of a few MiB reach the recipient's
        sessions on other nodes, raw, as on one node.
        """
        nodes = yield self.cluster(3)
        alice = yield self.user(nodes[0])
        bob = yield self.user(nodes[1])
        bob3 = yield self.user(nodes[2], bob.loginName, registerFirst=False)
        yield self.friends(nodes[0], alice, bob)
        text = "Grüße | 你好 " * 1000
        alice.bigString(bob.uid, text)
        for client in (bob, bob3):
            frame = yield client.next(TimType.TIMBIGSTRING)
            self.assertEqual(client.bigDataOf(frame), (alice.uid, text.encode()))
        data = random.Random(1).randbytes(3 << 20)
        alice.bigBinary(bob.uid, data, chunkSize=512 * 1024)
        for client in (bob, bob3):
            frame = yield client.next(TimType.TIMBIGBINARY, timeout=30)
            self.assertEqual(client.bigDataOf(frame), (alice.uid, data))

    @inlineCallbacks
    def test_accountsOnAnyNode(self):
        """
        A token issued by one node logs in on another, and a password
        changed through one node is the one every node checks.
        """
        node1, node2 = yield self.cluster(2)
        name = uniqueName()
        yield register(reactor, httpURL(node1), name, "secret")
        ack = yield requestToken(reactor, httpURL(node1), name, "secret")
        client = yield connect(reactor, wsURL(node2), self.encoding)
        self.addCleanup(client.disconnect)
        login = yield client.login(token=ack.t)
        self.assertTrue(login.ok)
        yield client.business(Business.MODIFYAUTH, reqStr="secret", reqStr2="changed")
        again = yield connect(reactor, wsURL(node1), self.encoding)
        self.addCleanup(again.disconnect)
        failure = yield self.assertFailure(again.login(name, "secret"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        self.assertTrue((yield again.login(name, "changed")).ok)

    @inlineCallbacks
    def test_nodeLeaves(self):
        """
        When a node stops, its users' sessions leave the directory (their
        friends are told they went offline), the owners of what it owned
        move, and the others keep talking.
        """
        nodes = yield self.cluster(3)
        alice = yield self.user(nodes[0])
        bob = yield self.user(nodes[1])
        carol = yield self.user(nodes[2])
        yield self.friends(nodes[0], alice, bob, carol)
        yield alice.postMessage(bob.uid, "before")
        yield bob.next(isMessage)
        yield nodes[2].stopService()
        got = (yield alice.next(presence)).body
        self.assertEqual((got.offline, got.fromTid.node), (True, carol.uid))
        for node in nodes[:2]:
            yield waitUntil(lambda node=node: len(node.cluster.liveMembers()) == 2)
        for uid in (alice.uid, bob.uid):
            yield self.sessionsKnown(nodes[:2], uid, 1)
        yield alice.postMessage(bob.uid, "after")
        self.assertEqual((yield bob.next(isMessage)).body.dataString, "after")
        yield bob.postMessage(alice.uid, "back")
        self.assertEqual((yield alice.next(isMessage)).body.dataString, "back")

    @inlineCallbacks
    def test_ownerDiesWithItsUser(self):
        """
        A node that owned a user and held its only session stops: the
        successor, which kept a copy of the user's entry, now owns it and
        tells the user's friends it went offline.
        """
        nodes = yield self.cluster(3)
        name = uniqueName()
        uid = yield register(reactor, httpURL(nodes[0]), name, "secret")
        owner = self.owner(nodes, uid)
        successorName = owner.cluster.ownership.owners(f"user:{uid}", 2)[1]
        successor = next(node for node in nodes if node.cluster.nodeId == successorName)
        other = next(node for node in nodes if node is not owner)
        carol = yield self.user(owner, name, registerFirst=False)
        alice = yield self.user(other)
        yield self.friends(other, alice, carol)
        yield waitUntil(lambda: uid in successor.userDirectory.replicas)
        yield owner.stopService()
        got = (yield alice.next(presence)).body
        self.assertEqual((got.offline, got.fromTid.node), (True, uid))
        self.assertNotIn(uid, successor.userDirectory.entries)

    @inlineCallbacks
    def test_offlineFromAnyNode(self):
        """
        What a user missed while offline is read at its next login on
        another node, in order.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        yield bob.disconnect()
        for i in range(3):
            yield alice.postMessage(bob.uid, f"while away {i}")
        again = yield self.user(node1, bob.loginName, registerFirst=False)
        messages = yield again.offlineMessages()
        self.assertEqual([m.dataString for m in messages], [f"while away {i}" for i in range(3)])

    @inlineCallbacks
    def test_resendThroughAnotherNode(self):
        """
        A client that sent through one node and resends with the same id
        through another gets the first message back; it is stored once.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        # Alice is known on node2 before the first send.
        alice2 = yield self.user(node2, alice.loginName, registerFirst=False)
        alice2.sendMessage(bob.uid, "before")
        yield alice2.next(isMessage)
        first = yield alice.postMessage(bob.uid, "once", id=9191)
        yield alice.disconnect()
        again = yield self.user(node2, alice.loginName, registerFirst=False)
        second = yield again.postMessage(bob.uid, "once", id=9191)
        self.assertEqual(second.mid, first.mid)
        history = yield bob.history(alice.uid)
        self.assertEqual([m.dataString for m in history], ["once", "before"])

    @inlineCallbacks
    def test_resendOfUnpushedMessage(self):
        """
        A message stored and never pushed (its conversation's owner died
        between the commit and the push, say) reaches its recipient's live
        session once the sender's resend is recognised: the recipient's
        nodes look in its inbox, a moment later (pushes of a first copy
        under way arrive meanwhile): it may come after newer ones.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        stored = chatMessage(alice, bob, "stored, never pushed", id=4242)
        conv = pairConversation(alice.uid, bob.uid)
        yield node1.conversations.append(conv, alice.uid, stored, (bob.uid,), dedupe=(alice.uid, 4242))
        yield alice.disconnect()
        again = yield self.user(node1, alice.loginName, registerFirst=False)
        echo = yield again.postMessage(bob.uid, "stored, never pushed", id=4242)
        self.assertEqual(echo.seq, 1)
        yield again.postMessage(bob.uid, "next")
        got = yield textsReceived(bob, 2)
        self.assertEqual(sorted(got), ["next", "stored, never pushed"])

    @inlineCallbacks
    def test_handoverNotOvertaken(self):
        """
        A conversation's last message was stored by another node a moment
        ago (its owner until a membership change) and its push has not
        arrived: the owner's next message does not overtake it.  The
        recipient's node looks in the inbox first and sends both, in
        order.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        conv = pairConversation(alice.uid, bob.uid)
        ownerId = node1.cluster.ownership.owner(conversationKey(conv))
        previous = node2 if ownerId == node1.cluster.nodeId else node1
        stored = chatMessage(alice, bob, "by the previous owner")
        # Stored, its push still on the way (never, here).
        yield previous.conversations.append(conv, alice.uid, stored, (bob.uid,))
        echo = yield alice.postMessage(bob.uid, "by the new owner")
        self.assertEqual(echo.seq, 2)
        got = yield textsReceived(bob, 2)
        self.assertEqual(got, ["by the previous owner", "by the new owner"])

    def owner(self, nodes, uid):
        """
        The node owning C{uid}'s directory entry.
        """
        name = nodes[0].userDirectory.owner(uid)
        return next(node for node in nodes if node.cluster.nodeId == name)

    def sessionsKnown(self, nodes, uid, count):
        """
        Wait until C{uid}'s owner knows it has C{count} sessions.
        """
        owner = self.owner(nodes, uid)
        return waitUntil(lambda: len(owner.userDirectory.sessionsOf(uid)) == count)

    @inlineCallbacks
    def test_presence(self):
        """
        TIMPRESENCE and TIMBROADPRESENCE reach friends on other nodes.
        """
        nodes = yield self.cluster(3)
        alice = yield self.user(nodes[0])
        bob = yield self.user(nodes[1])
        carol = yield self.user(nodes[2])
        yield self.friends(nodes[0], alice, bob, carol)
        alice.send(TimType.TIMPRESENCE, TimPresence(toTid=Tid(node=bob.uid), status="busy"))
        got = (yield bob.next(presence)).body
        self.assertEqual((got.status, got.fromTid.node), ("busy", alice.uid))
        alice.send(TimType.TIMBROADPRESENCE, TimPresence(status="online"))
        for friend in (bob, carol):
            got = (yield friend.next(presence)).body
            self.assertEqual((got.status, got.fromTid.node), ("online", alice.uid))

    @inlineCallbacks
    def test_offlineWhenLastSessionInCluster(self):
        """
        Friends are told a user went offline when its last session in the
        whole cluster ends, once, and not when a session on one node ends
        while another node holds one; isOnline says so on every node.
        """
        nodes = yield self.cluster(3)
        alice = yield self.user(nodes[0])
        phone = yield self.user(nodes[1], alice.loginName, registerFirst=False)
        bob = yield self.user(nodes[2])
        yield self.friends(nodes[0], alice, bob)
        yield self.sessionsKnown(nodes, alice.uid, 2)
        for node in nodes:
            yield node.userDirectory.locate(alice.uid)
            self.assertTrue(node.router.isOnline(alice.uid))
        yield alice.disconnect()
        yield self.sessionsKnown(nodes, alice.uid, 1)
        yield phone.ping()
        yield bob.ping()
        self.assertEqual(bob.take(presence), [])
        self.assertTrue(nodes[2].router.isOnline(alice.uid))
        yield phone.disconnect()
        got = (yield bob.next(presence)).body
        self.assertEqual((got.offline, got.fromTid.node), (True, alice.uid))
        for node in nodes:
            yield waitUntil(lambda node=node: not node.router.isOnline(alice.uid))
        yield bob.ping()
        self.assertEqual(bob.take(presence), [], "told once")

    @inlineCallbacks
    def test_invisibleOnEveryNode(self):
        """
        A user that turns invisible on one node stays invisible on another:
        what its other session sends there goes nowhere.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        phone = yield self.user(node2, alice.loginName, registerFirst=False)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        # node2 caches alice as visible first.
        phone.send(TimType.TIMBROADPRESENCE, TimPresence(status="here"))
        self.assertEqual((yield bob.next(presence)).body.status, "here")
        alice.send(TimType.TIMBROADPRESENCE, TimPresence(invisible=True))
        got = (yield bob.next(presence)).body
        self.assertEqual((got.offline, got.fromTid.node), (True, alice.uid))
        yield waitUntil(lambda: node2.presence.isInvisible(alice.uid).result is True)
        phone.send(TimType.TIMBROADPRESENCE, TimPresence(status="still here"))
        yield phone.ping()
        yield bob.ping()
        self.assertEqual(bob.take(presence), [])

    @inlineCallbacks
    def test_rosterAndBlocks(self):
        """
        A friend request and a block made on one node reach the other user's
        node: the notice arrives, and that node refuses what the blocked
        user sends from then on.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield alice.business(Business.ADDROSTER, node=bob.uid, reqStr="hi")
        request = yield noticeReceived(bob, Business.ADDROSTER)
        self.assertEqual(request.fromTid.node, alice.uid)
        yield bob.business(Business.ADDROSTER, node=alice.uid)
        yield alice.next(notice(Business.FRIEND))
        yield bob.postMessage(alice.uid, "friends now")
        yield alice.business(Business.BLOCKROSTER, node=bob.uid)
        yield bob.next(notice(Business.BLOCKROSTER))
        yield waitUntil(lambda: getattr((node2.relations.peek(bob.uid) or {}).get(alice.uid), "theirs", 0) == 2)
        failure = yield self.assertFailure(bob.postMessage(alice.uid, "blocked"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_BLOCK)

    @inlineCallbacks
    def test_missedChangesFlushed(self):
        """
        A node that another held dead may have missed its cache changes:
        when it comes back, the other tells it to drop its caches, and what
        it decides from then on follows the store.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        yield bob.postMessage(alice.uid, "cached on node2 now")
        # A block node2 never heard of, as if made while node1 held it dead.
        yield node1.store.setStance(alice.uid, bob.uid, STANCE_BLOCK)
        yield bob.postMessage(alice.uid, "node2 still thinks they are friends")
        member = node1.cluster.member("node2")
        node1.cacheMirror._membershipChanged(MemberChange(ChangeKind.JOINED, member, previous=member))
        yield waitUntil(lambda: node2.cacheMirror.flushes == 1)
        failure = yield self.assertFailure(bob.postMessage(alice.uid, "blocked"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_BLOCK)

    @inlineCallbacks
    def test_profiles(self):
        """
        A profile changed through one node reads the same through another.
        """
        node1, node2 = yield self.cluster(2)
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield alice.nodes(NodeInfo.MODIFYUSER, usermap={"": TimUserBean(nickName="Al")})
        reply = yield bob.nodes(NodeInfo.USERINFO, nodelist=[alice.uid])
        self.assertEqual(reply.usermap[alice.uid].nickName, "Al")

    @inlineCallbacks
    def test_kickOldestAcrossNodes(self):
        """
        With C{kick-oldest}, a login past the limit logs out the user's
        oldest session, on whichever node it is.
        """
        nodes = yield self.cluster(3, devices={"limit": 2, "type_limit": 0, "overflow": "kick-oldest"})
        oldest = yield self.user(nodes[0])
        second = yield self.user(nodes[1], oldest.loginName, registerFirst=False)
        yield self.sessionsKnown(nodes, oldest.uid, 2)
        newest = yield self.user(nodes[2], oldest.loginName, registerFirst=False)
        logout = yield oldest.next(lambda i: i.timType == TimType.TIMACK and i.body.timType == TimType.TIMLOGOUT)
        self.assertTrue(logout.body.ok)
        yield within(oldest.closed)
        yield self.sessionsKnown(nodes, oldest.uid, 2)
        yield nodes[0].userDirectory.locate(oldest.uid)
        yield waitUntil(lambda: nodes[0].userDirectory.nodes(oldest.uid) == {"node2", "node3"})
        yield second.ping()
        yield newest.ping()

    @inlineCallbacks
    def test_typeLimitAcrossNodes(self):
        """
        C{type_limit} counts the sessions of one terminal type on every
        node.
        """
        nodes = yield self.cluster(2, devices={"limit": 0, "type_limit": 1, "overflow": "kick-oldest"})
        phone = yield self.user(nodes[0], termtyp=2)
        desktop = yield self.user(nodes[1], phone.loginName, registerFirst=False, termtyp=3)
        yield self.sessionsKnown(nodes, phone.uid, 2)
        phone2 = yield self.user(nodes[1], phone.loginName, registerFirst=False, termtyp=2)
        yield within(phone.closed)
        yield desktop.ping()
        yield phone2.ping()
        yield self.sessionsKnown(nodes, phone.uid, 2)

    @inlineCallbacks
    def test_rejectAcrossNodes(self):
        """
        With C{reject}, a login past the limit on another node is refused
        with ERR_OVERENTRY, and the sessions already in keep going.
        """
        nodes = yield self.cluster(2, devices={"limit": 1, "type_limit": 0, "overflow": "reject"})
        first = yield self.user(nodes[0])
        yield self.sessionsKnown(nodes, first.uid, 1)
        failure = yield self.assertFailure(self.user(nodes[1], first.loginName, registerFirst=False), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_OVERENTRY)
        yield first.ping()
        self.assertEqual(len(nodes[1].sessions), 0)
        yield self.sessionsKnown(nodes, first.uid, 1)


class JSONClusterRoutingTests(ClusterRoutingTests):
    """
    The same with clients speaking JSON.
    """

    encoding = Encoding.JSON


class AloneTests(TestCase):
    @inlineCallbacks
    def test_noCluster(self):
        """
        Without C{[cluster] listen} a node has no cluster and routes locally,
        as it always did.
        """
        node = yield startNode(self, reactor, testConfig(self.mktemp()))
        self.assertIsNone(node.cluster)
        self.assertIsInstance(node.router, LocalRouter)


class ExampleClusterTests(TestCase):
    """
    C{examples/cluster/node1.ini}, C{node2.ini} and C{node3.ini}.
    """

    timeout = 60

    def examples(self):
        root = sourceRoot()
        if root is None:
            requireOrSkip("no source checkout (examples/ is not installed)")
        directory = root.child("examples").child("cluster")
        return [load(directory.child(f"node{n}.ini").path) for n in (1, 2, 3)]

    def test_agree(self):
        """
        The three are valid cluster configs that share the secret, the
        store and the node key, on distinct ports, with clients where the
        issue says, each seeding all.
        """
        configs = self.examples()
        for config in configs:
            checkClusterConfig(config)
        self.assertEqual({loadSecret(config) for config in configs}, {loadSecret(configs[0])})
        self.assertEqual({(c.store.backend, c.store.dsn) for c in configs}, {("postgresql", configs[0].store.dsn)})
        self.assertIn("/test", configs[0].store.dsn)
        self.assertEqual({c.key_path for c in configs}, {configs[0].key_path})
        self.assertEqual(len({c.node.data_dir for c in configs}), 3)
        self.assertEqual(
            [c.client.listen for c in configs],
            [f"tcp:{port}:interface=127.0.0.1" for port in (5120, 5130, 5140)],
        )
        ports = [
            endpoint.split(":")[1]
            for c in configs
            for endpoint in (c.client.listen, c.client.tcp_listen, c.admin.listen, c.cluster.listen)
        ]
        self.assertEqual(len(ports), len(set(ports)), "every port is distinct")
        peers = {f"127.0.0.1:{c.cluster.listen.split(':')[1]}" for c in configs}
        for config in configs:
            self.assertEqual(set(config.cluster.seeds), peers)
        self.assertEqual(len({c.cluster.node_id for c in configs}), 3)

    @inlineCallbacks
    def test_form(self):
        """
        The three as they are, but on ports chosen by the OS, data
        directories and a database of the test's own, form one mesh and
        carry a message from the first node to the third.
        """
        dsn = yield postgresqlDatabase(self)
        nodes = []
        seeds = ()
        for config in self.examples():
            config = replace(
                config,
                # Absolute: relative paths are taken from the example's
                # directory, which the test must not write to.
                node={"data_dir": os.path.abspath(self.mktemp())},
                client={"listen": "tcp:0:interface=127.0.0.1", "tcp_listen": "tcp:0:interface=127.0.0.1"},
                admin={"listen": ""},
                accounts={"scrypt_n": 16, "scrypt_r": 1},
                store={"dsn": dsn},
                cluster={"listen": "tcp:0:interface=127.0.0.1", "seeds": seeds},
            )
            node = yield startNode(self, reactor, config)
            nodes.append(node)
            seeds = (node.cluster.address,)
        for node in nodes:
            yield untilMembers(node, 3)
        member = nodes[0].cluster.member("node3")
        self.assertTrue(any(a.startswith("ws://127.0.0.1:") for a in member.clientAddresses))
        alice = yield loggedInClient(reactor, nodes[0], testCase=self)
        bob = yield loggedInClient(reactor, nodes[2], testCase=self, encoding=Encoding.JSON)
        yield nodes[1].relations.setStance(alice.uid, bob.uid, STANCE_FRIEND)
        yield nodes[1].relations.setStance(bob.uid, alice.uid, STANCE_FRIEND)
        yield alice.postMessage(bob.uid, "hello, node3")
        got = yield bob.next(isMessage)
        self.assertEqual(got.body.dataString, "hello, node3")
