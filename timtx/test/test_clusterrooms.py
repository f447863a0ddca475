# -*- test-case-name: timtx.test.test_clusterrooms -*-
"""
Virtual rooms across nodes: several L{Node}s in this process sharing one
PostgreSQL database (as in L{timtx.test.test_clusterrouting}), founders,
publishers and subscribers on different nodes.
"""

import json
import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock, LoopingCall
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.admin.metrics import NodeCollector, Sampler
from timtx.chat.vrooms.registry import VRoomRegistry
from timtx.client import TimRequestFailed
from timtx.cluster.ownership import Ownership, roomKey
from timtx.cluster.rooms import ORDER_FEATURE, ClusterVRoomService, RemoteStreamFrame, RoomRules, roomRules
from timtx.cluster.swim import ChangeKind, MemberChange
from timtx.cluster.wire import BadPayload, dumps, pack, unpack
from timtx.config import VRoomsConfig
from timtx.crypto.ids import new_random_id
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.structs import TimStream
from timtx.test import test_clusterrouting as routing
from timtx.test.base import waitUntil
from timtx.testing import startNode, testConfig

STREAM = TimType.TIMSTREAM


def errorFor(timType):
    return lambda i: i.timType == TimType.TIMACK and i.body.timType == timType and not i.body.ok


def vroomAck(rtype):
    return lambda i: i.timType == TimType.TIMACK and i.body.timType == TimType.TIMVROOM and i.body.t == rtype


def byId(nodes, nodeId):
    return next(node for node in nodes if node.cluster.nodeId == nodeId)


class PiecesTests(SynchronousTestCase):
    """
    The parts of rooms across nodes that need no network.
    """

    def test_remoteFrame(self):
        """
        A frame that arrived compact is written as it came to compact
        subscribers; its JSON, raw and missed forms are made from it.
        """
        stream = TimStream(id=7, VNode="room", dtype=1, body=b"\x00body", fromNode="alice")
        compact = codec.encode_compact(stream)
        frame = RemoteStreamFrame(compact)
        self.assertIs(frame.payload(Encoding.COMPACT), compact)
        self.assertEqual(frame.payload(Encoding.JSON), codec.encode_json(stream))
        self.assertEqual(frame.stream.body, b"\x00body")
        self.assertTrue(frame.rawHeader().startswith(bytes((TimType.TIMBIGBINARYSTREAM,)) + b"room"))
        withMissed = codec.decode_compact(TimStream, frame.payloadWithMissed(Encoding.COMPACT, 3))
        self.assertEqual((withMissed.id, withMissed.missed), (7, 3))

    def test_badRules(self):
        """
        Rules of the wrong shape are refused as a bad payload.
        """
        good = {
            "vnode": "r",
            "founder": "f",
            "private": True,
            "publishers": [],
            "allowed": ["u"],
            "version": 2,
            "seq": 9,
        }
        self.assertEqual(RoomRules(good).allowed, {"u"})
        for change in ({"private": 1}, {"publishers": "u"}, {"allowed": [5]}, {"seq": None}, {"vnode": None}):
            self.assertRaises(BadPayload, RoomRules, {**good, **change})
        self.assertRaises(BadPayload, RoomRules, [])

    def test_newerRulesWin(self):
        """
        A mirror takes rules only as new as its own; taking a private
        room's leave back ends the user's subscriptions there.
        """
        registry = VRoomRegistry(VRoomsConfig(), Clock())
        room = registry.adopt("r", "founder", True, mirrorOf="node1")
        self.assertEqual(registry.applyRules(room, True, set(), {"u"}, 2), [])

        class Session:
            uid = "u"
            closed = False

        session = Session()
        registry.subscribe(session, "r")
        self.assertEqual(registry.applyRules(room, True, set(), set(), 1), [])
        self.assertEqual(room.allowed, {"u"})
        ended = registry.applyRules(room, True, set(), set(), 3)
        self.assertEqual([s.session for s in ended], [session])
        self.assertIsNone(registry.subscription(session, "r"))
        # A mirror does not count toward its founder's rooms, nor expire.
        self.assertEqual(registry._founded, {})
        registry.setMirror(room, None)
        self.assertEqual(registry._founded, {"founder": 1})


class _Cluster:
    """
    What L{ClusterVRoomService} uses of a L{ClusterService}: sends are
    recorded, and what waits for each node is set by the test.
    """

    def __init__(self, nodeId, nodes):
        self.nodeId = nodeId
        self.ownership = Ownership(nodes)
        self.handlers = {}
        self.waitingFor = {}
        self.sent = []
        #: Requests, answered by the test.
        self.requests = []
        self.offered = set()
        #: What each other node offers (L{ClusterService.peerFeatures}).
        self.features = {}

    def offer(self, feature):
        self.offered.add(feature)

    def peerFeatures(self, nodeId):
        return self.features.get(nodeId, frozenset())

    def addHandler(self, kind, handler):
        self.handlers[kind] = handler

    def addObserver(self, observer):
        pass

    def addLinkObserver(self, observer):
        pass

    def waiting(self, nodeId):
        return self.waitingFor.get(nodeId)

    def send(self, nodeId, kind, payload):
        self.sent.append((nodeId, kind, payload))
        return succeed(None)

    def request(self, nodeId, kind, payload):
        d = Deferred()
        self.requests.append((nodeId, kind, payload, d))
        return d


class _Session:
    closed = False

    def __init__(self, uid):
        self.uid = uid
        self.sink = self
        self.encoding = Encoding.COMPACT
        self.congested = False
        self.backlog = 0
        self.written = []

    def writeFrameParts(self, header, payload):
        self.written.append(codec.decode_compact(TimStream, payload))


class _Directory:
    """
    What L{ClusterVRoomService} uses of a L{UserDirectory}: session ids.
    """

    def __init__(self):
        self.sids = {}

    def sessionId(self, session):
        return self.sids.setdefault(session, len(self.sids) + 1)


def fakeService(nodeId, nodes, **config):
    """
    A L{ClusterVRoomService} on a fake cluster and a clock, and that
    cluster.
    """
    cluster = _Cluster(nodeId, nodes)
    vroomsConfig = VRoomsConfig(**{"node_stream_buffer_bytes": 10_000, **config})
    clock = Clock()
    service = ClusterVRoomService(
        vroomsConfig,
        cluster=cluster,
        directory=_Directory(),
        peerOutputBytes=1 << 20,
        registry=VRoomRegistry(vroomsConfig, clock),
        accounts=None,
        clock=clock,
        maxOutputBytes=1 << 20,
    )
    return service, cluster


def heldBy(service):
    """
    A room id C{service}'s node holds in its view, and that room's
    successor.
    """
    ownership = service.cluster.ownership
    vnode = next(v for i in range(1000) if ownership.owner(roomKey(v := f"room{i}")) == service.nodeId)
    return vnode, ownership.owners(roomKey(vnode), 2)[1]


def sendFrame(cluster, sender, number, stamp=None, body=b"f"):
    """
    Hand C{cluster}'s node frame C{number} of room C{room} from node
    C{sender}, stamped C{stamp} (source, number) or, as a node without
    L{ORDER_FEATURE} sends it, not.
    """
    stream = TimStream(id=number, VNode="room", body=body, fromNode="founder")
    fields = [b"room", b"%d" % number, codec.encode_compact(stream)]
    if stamp is not None:
        fields += [stamp[0].encode(), b"%d" % stamp[1]]
    cluster.handlers["room.frame"](sender, pack(*fields))


def sendPush(cluster, sender, body, stamp=None, uid="founder"):
    """
    Hand C{cluster}'s node a push into room C{room} from node C{sender},
    stamped C{stamp} or not.
    """
    fields = [b"room", uid.encode(), b"1", b"", b"94", body]
    if stamp is not None:
        fields += [stamp[0].encode(), b"%d" % stamp[1]]
    cluster.handlers["room.push"](sender, pack(*fields))


class DropPolicyTests(SynchronousTestCase):
    """
    The per-node bound on what waits, on a fake cluster and a clock: no
    network, no sleeps.
    """

    def service(self, nodeId, nodes, **config):
        return fakeService(nodeId, nodes, **config)

    def test_changeAnsweredOnceTheSuccessorHasIt(self):
        """
        A founder's change is answered only once the holder's successor has
        the new rules: sent as messages alone, a change acknowledged just
        before the holder died was lost with its unflushed output, and the
        next holder refused a publisher it had been told was granted.  A
        successor that cannot be told delays nothing further.
        """
        service, cluster = self.service("a", ["a", "b", "c"])
        vnode, successor = heldBy(service)
        service.registry.register("founder", vnode=vnode)
        service.nodes[vnode] = {"b", "c"}
        for user, answer in (("publisher", None), ("other", ConnectionRefusedError("gone"))):
            request = dumps({"vnode": vnode, "uid": "founder", "op": "grant", "user": user})
            answered = service._manageReceived("c", request)
            self.assertNoResult(answered)
            node, kind, payload, d = cluster.requests.pop()
            self.assertEqual((node, kind, user in json.loads(payload)["publishers"]), (successor, "room.rules", True))
            if answer is None:
                d.callback(b"")
            else:
                d.errback(answer)
            self.assertEqual(self.successResultOf(answered), b"{}")
        # The other mirror is sent the rules as before.
        self.assertEqual({node for node, kind, _ in cluster.sent if kind == "room.rules"}, {"b", "c"} - {successor})

    def test_roomAnsweredOnceTheSuccessorHasIt(self):
        """
        A room registered through another node is answered once the
        holder's successor has its rules, for the same reason.
        """
        service, cluster = self.service("a", ["a", "b", "c"])
        vnode, successor = heldBy(service)
        answered = service._createReceived("c", dumps({"vnode": vnode, "founder": "f", "private": True}))
        self.assertNoResult(answered)
        node, kind, payload, d = cluster.requests.pop()
        self.assertEqual((node, kind, json.loads(payload)["founder"]), (successor, "room.rules", "f"))
        d.callback(b"")
        self.assertEqual(self.successResultOf(answered), b"{}")

    def test_slowNodeSkipped(self):
        """
        A frame goes to every node with subscribers except one that has
        more than C{node_stream_buffer_bytes} waiting; that one is counted.
        """
        service, cluster = self.service("a", ["a"])
        room = service.registry.register("founder", vnode="room")
        service.nodes["room"] = {"b", "c"}
        cluster.waitingFor = {"b": 100, "c": 9_990}
        service.deliver(room, service.publish(room, "founder", b"x" * 100))
        self.assertEqual([(node, kind) for node, kind, _ in cluster.sent], [("b", "room.frame")])
        self.assertEqual(service.dropped, {"room.frame": 1})
        cluster.waitingFor = {}
        service.deliver(room, service.publish(room, "founder", b"y"))
        self.assertEqual(sorted(node for node, _, _ in cluster.sent[1:]), ["b", "c"])

    def test_gapCountedAsMissed(self):
        """
        A mirror that sees a gap in the frame ids adds it to each of its
        subscriptions' missed count; the next frame carries it.
        """
        service, cluster = self.service("b", ["a", "b"])
        service.registry.adopt("room", "founder", False, mirrorOf="a")
        viewer = _Session("viewer")
        service.registry.subscribe(viewer, "room")
        for number in (1, 4, 3):
            sendFrame(cluster, "a", number)
        self.assertEqual([(f.id, f.missed) for f in viewer.written], [(1, None), (4, 2)])
        self.assertEqual(service.refused, {"stale": 1})
        self.assertEqual(service.registry.subscription(viewer, "room").missed, 2)


class PublisherOrderTests(SynchronousTestCase):
    """
    A publishing session's frames reach subscribers in the order it pushed
    them, also when a push was held up while the room's holder moved: the
    frame that comes after a later one of its session is dropped (issue
    13; five-node simulation seeds 319 and 328).
    """

    def mirror(self, **config):
        service, cluster = fakeService("b", ["a", "b"], **config)
        service.registry.adopt("room", "founder", False, mirrorOf="a")
        viewer = _Session("viewer")
        service.registry.subscribe(viewer, "room")
        return service, cluster, viewer

    def test_offered(self):
        """
        Nodes offer the stamps in their links' handshake.
        """
        _, cluster = fakeService("a", ["a"])
        self.assertEqual(cluster.offered, {ORDER_FEATURE})

    def test_lateFrameDropped(self):
        """
        A mirror drops a frame whose session already had a later one taken
        there, though its id is higher (numbered after the heal of a split
        by the holder it waited for); its subscribers count it as missed
        with the next frame.  Another session's frames are not held back.
        """
        service, cluster, viewer = self.mirror()
        sendFrame(cluster, "a", 1, ("n1.1", 1), b"s:1")
        sendFrame(cluster, "a", 2, ("n1.1", 3), b"s:3")
        sendFrame(cluster, "a", 3, ("n1.1", 2), b"s:2")
        sendFrame(cluster, "a", 4, ("n1.2", 1), b"t:1")
        sendFrame(cluster, "a", 5, ("n1.1", 4), b"s:4")
        self.assertEqual(
            [(f.id, f.body, f.missed) for f in viewer.written],
            [(1, b"s:1", None), (2, b"s:3", None), (4, b"t:1", 1), (5, b"s:4", None)],
        )
        self.assertEqual(service.refused, {"out-of-order": 1})
        self.assertEqual(service.registry.get("room").stamps, {"n1.1": 4, "n1.2": 1})

    def test_latePushNotNumbered(self):
        """
        The holder drops a push whose session already had a later one
        numbered here: it takes no id, reaches no subscriber here or on
        another node, and the publisher is not told (a live frame late is
        worthless, not an error).  Frames it sends carry their stamp to a
        node that offers them, and not to one that does not.
        """
        service, cluster = fakeService("a", ["a"])
        room = service.registry.register("founder", vnode="room")
        viewer = _Session("viewer")
        service.registry.subscribe(viewer, "room")
        service.nodes["room"] = {"b", "c"}
        cluster.features = {"b": frozenset({ORDER_FEATURE})}
        sendPush(cluster, "p", b"1", ("p.1", 1))
        sendPush(cluster, "p", b"3", ("p.1", 3))
        sendPush(cluster, "p", b"2", ("p.1", 2))
        self.assertEqual([f.body for f in viewer.written], [b"1", b"3"])
        self.assertEqual(room.seq, 2)
        self.assertEqual(service.refused, {"out-of-order": 1})
        toB = [unpack(p, 5) for node, kind, p in cluster.sent if node == "b"]
        self.assertEqual([(f[1], f[3], f[4]) for f in toB], [(b"1", b"p.1", b"1"), (b"2", b"p.1", b"3")])
        toC = [unpack(p, 3) for node, kind, p in cluster.sent if node == "c"]
        self.assertEqual([f[1] for f in toC], [b"1", b"2"])
        self.assertFalse([kind for _, kind, _ in cluster.sent if kind == "room.refused"])

    def test_unstampedStillDelivered(self):
        """
        Frames and pushes from a node that does not stamp them (it does not
        offer L{ORDER_FEATURE}) are taken as before, in the order of their
        ids, also after stamped ones.
        """
        service, cluster, viewer = self.mirror()
        sendFrame(cluster, "a", 1, ("n1.1", 5))
        sendFrame(cluster, "a", 2)
        sendFrame(cluster, "a", 3)
        self.assertEqual([f.id for f in viewer.written], [1, 2, 3])
        holder, cluster = fakeService("a", ["a"])
        room = holder.registry.register("founder", vnode="room")
        holder.nodes["room"] = {"b"}
        sendPush(cluster, "p", b"x")
        sendPush(cluster, "p", b"y")
        self.assertEqual(room.seq, 2)
        self.assertEqual([unpack(p, 3)[1] for _, _, p in cluster.sent], [b"1", b"2"])
        self.assertEqual((service.refused, holder.refused), ({}, {}))

    def test_pushStampedForHolderThatOffers(self):
        """
        A session's pushes to a room held elsewhere carry its stamp, its
        number rising, if the holder offers stamps; to one that does not,
        the push is as before.
        """
        service, cluster = fakeService("b", ["a", "b"])
        vnode = next(v for v in (f"room{i}" for i in range(100)) if service.holder(v) == "a")
        publisher = _Session("founder")
        cluster.features = {"a": frozenset({ORDER_FEATURE})}
        service.push(publisher, vnode, b"1")
        service.push(publisher, vnode, b"2")
        cluster.features = {}
        service.push(publisher, vnode, b"3")
        stamped = [unpack(p, 8) for _, _, p in cluster.sent[:2]]
        self.assertEqual(stamped[0][6], stamped[1][6])
        self.assertLess(int(stamped[0][7]), int(stamped[1][7]))
        self.assertEqual(unpack(cluster.sent[2][2], 6)[5], b"3")

    def test_sessionsBounded(self):
        """
        A node remembers the last stamp of at most
        C{max_publishing_sessions} sessions per room, forgetting the one
        heard from longest ago: its late frames are then taken as
        unstamped ones are.
        """
        service, cluster, viewer = self.mirror(max_publishing_sessions=2)
        sendFrame(cluster, "a", 1, ("s1", 2))
        sendFrame(cluster, "a", 2, ("s2", 1))
        sendFrame(cluster, "a", 3, ("s1", 3))
        sendFrame(cluster, "a", 4, ("s3", 1))
        self.assertEqual(list(service.registry.get("room").stamps), ["s1", "s3"])
        sendFrame(cluster, "a", 5, ("s2", 0))
        self.assertEqual(len(viewer.written), 5)

    def test_badStamp(self):
        """
        A stamp without a source, with one too long, or with a number that
        is not one is a bad payload.
        """
        service, cluster, viewer = self.mirror()
        for stamp in (("", 1), ("x" * 65, 1)):
            self.assertRaises(BadPayload, sendFrame, cluster, "a", 1, stamp)
        stream = codec.encode_compact(TimStream(id=1, VNode="room", body=b"f", fromNode="founder"))
        payload = pack(b"room", b"1", stream, b"s", b"one")
        self.assertRaises(BadPayload, cluster.handlers["room.frame"], "a", payload)
        self.assertEqual(viewer.written, [])
        self.assertEqual(service.refused, {"bad-payload": 3})


class ClusterRoomsTests(TestCase):
    """
    Rooms held by one node, used from all.
    """

    timeout = 90
    encoding = Encoding.COMPACT

    cluster = routing.ClusterRoutingTests.cluster
    user = routing.ClusterRoutingTests.user

    def holderOf(self, nodes, vnode):
        return byId(nodes, nodes[0].cluster.ownership.owner(roomKey(vnode)))

    @inlineCallbacks
    def frames(self, client, count, timeout=20):
        """
        The next C{count} stream frames C{client} gets.
        """
        got = []
        for _ in range(count):
            got.append((yield client.next(STREAM, timeout=timeout)).body)
        return got

    @inlineCallbacks
    def test_streamAcrossNodes(self):
        """
        Frames from publishers on two nodes reach every subscriber on every
        node once each, numbered 1, 2, 3... in one order; each node with
        subscribers receives each frame once, however many subscribers it
        has.
        """
        nodes = yield self.cluster(3)
        host = yield self.user(nodes[0])
        vnode = yield host.vroomRegister()
        # The founder's node draws an id it holds itself.
        self.assertIs(self.holderOf(nodes, vnode), nodes[0])
        guest = yield self.user(nodes[1])
        yield host.vroomGrant(vnode, guest.uid)
        viewers = []
        for node, count in ((nodes[0], 1), (nodes[1], 2), (nodes[2], 4)):
            for _ in range(count):
                viewer = yield self.user(node, encoding=random.choice([Encoding.COMPACT, Encoding.JSON]))
                yield viewer.vroomSubscribe(vnode)
                viewers.append(viewer)
        raw = yield self.user(nodes[2])
        yield raw.vroomSubscribe(vnode, binary=True)
        self.assertEqual(nodes[0].vrooms.nodes[vnode], {"node2", "node3"})
        sent = []
        for i in range(30):
            publisher = guest if i % 3 else host
            body = b"frame %d from %s" % (i, publisher.uid.encode())
            publisher.pushStream(vnode, body, dtype=i % 2)
            sent.append((body, publisher.uid))
        for viewer in viewers:
            got = yield self.frames(viewer, 30)
            self.assertEqual([f.id for f in got], list(range(1, 31)))
            self.assertEqual(sorted((f.body, f.fromNode) for f in got), sorted(sent))
            self.assertEqual({f.VNode for f in got}, {vnode})
        rawFrames = []
        for _ in range(30):
            rawFrames.append(raw.bigDataOf((yield raw.next(TimType.TIMBIGBINARYSTREAM))))
        self.assertEqual(sorted(data for _, data in rawFrames), sorted(body for body, _ in sent))
        # One peer message per frame per node, not per subscriber.
        self.assertEqual(nodes[2].vrooms.received.get("room.frame"), 30)
        self.assertEqual(nodes[1].vrooms.received.get("room.frame"), 30)
        self.assertEqual(nodes[0].vrooms.sent.get("room.frame"), 60)
        self.assertEqual(nodes[0].vrooms.received.get("room.push"), 20)
        # Every node shows the room: held on one, mirrored on the others.
        self.assertEqual(nodes[0].vrooms.stats(vnode).frames, 30)
        self.assertEqual(nodes[2].vrooms.stats(vnode).subscribers, 5)
        counters = nodes[2].vrooms.counters()
        self.assertEqual((counters["held"], counters["mirrored"]), (0, 1))
        metrics = {
            (metric.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in NodeCollector(nodes[2], Sampler(nodes[2], reactor)).collect()
            for sample in metric.samples
        }
        key = ("timtx_cluster_room_messages", (("direction", "received"), ("kind", "room.frame")))
        self.assertEqual(metrics[key], 30)
        # Nothing more arrives: each frame came once.
        host.pushStream(vnode, b"last")
        for viewer in viewers:
            self.assertEqual((yield viewer.next(STREAM)).body.body, b"last")

    @inlineCallbacks
    def test_operationsFromAnyNode(self):
        """
        A room held on one node is managed by its founder from another,
        subscribed to from a third; a private room's rules hold on every
        node, and the ends of subscriptions are told where they happen.
        """
        nodes = yield self.cluster(3)
        host = yield self.user(nodes[0])
        vnode = yield host.vroomRegister(private=True)
        self.assertIs(self.holderOf(nodes, vnode), nodes[0])
        host3 = yield self.user(nodes[2], host.loginName, registerFirst=False)
        viewer = yield self.user(nodes[1])
        failure = yield self.assertFailure(viewer.vroomSubscribe(vnode), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        failure = yield self.assertFailure(viewer.vroomSubscribe("NoSuchRoom"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_NOEXIST)
        failure = yield self.assertFailure(host3.vroomAllow(vnode, "NoSuchUser"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_ACCOUNT)
        failure = yield self.assertFailure(viewer.vroomGrant(vnode, viewer.uid), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        # Allowed from node3, subscribed on node2.
        yield host3.vroomAllow(vnode, viewer.uid)
        yield viewer.vroomSubscribe(vnode)
        second = yield self.user(nodes[1], viewer.loginName, registerFirst=False)
        yield second.vroomSubscribe(vnode)
        # Pushing without permission is refused, later, from the holder.
        viewer.pushStream(vnode, b"not mine")
        error = (yield viewer.next(errorFor(STREAM))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_AUTH, vnode))
        self.assertEqual(nodes[0].vrooms.refused.get("no-permission"), 1)
        yield host3.vroomGrant(vnode, viewer.uid)
        yield waitUntil(lambda: viewer.uid in nodes[1].vrooms.registry.get(vnode).publishers)
        viewer.pushStream(vnode, b"mine now")
        for client in (viewer, second):
            self.assertEqual((yield client.next(STREAM)).body.body, b"mine now")
        yield host3.vroomRevoke(vnode, viewer.uid)
        # Disallowed from node3: both sessions on node2 are told, and node2
        # leaves the room.
        yield host3.vroomDisallow(vnode, viewer.uid)
        for client in (viewer, second):
            ack = (yield client.next(vroomAck(6))).body
            self.assertEqual(ack.n, vnode)
        yield waitUntil(lambda: vnode not in nodes[1].vrooms.registry)
        yield waitUntil(lambda: not nodes[0].vrooms.nodes[vnode])
        # Removed from node3: a subscriber on node2 is told.
        yield host3.vroomAllow(vnode, viewer.uid)
        yield viewer.vroomSubscribe(vnode)
        yield host3.vroomRemove(vnode)
        ack = (yield viewer.next(vroomAck(2))).body
        self.assertEqual(ack.n, vnode)
        self.assertNotIn(vnode, nodes[0].vrooms.registry)
        yield waitUntil(lambda: vnode not in nodes[1].vrooms.registry)
        failure = yield self.assertFailure(viewer.vroomSubscribe(vnode), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_NOEXIST)

    @inlineCallbacks
    def test_registeredOnAnotherNode(self):
        """
        When the registering node draws no id it holds, the room is made on
        its holder, and works as any other.
        """
        nodes = yield self.cluster(2)
        vrooms = nodes[0].vrooms
        while True:
            vnode = new_random_id(16)
            if nodes[0].cluster.ownership.owner(roomKey(vnode)) == "node2":
                break
        vrooms._drawId = lambda: vnode
        host = yield self.user(nodes[0])
        self.assertEqual((yield host.vroomRegister()), vnode)
        self.assertIsNone(vrooms.registry.get(vnode))
        self.assertEqual(nodes[1].vrooms.registry.get(vnode).founder, host.uid)
        viewer = yield self.user(nodes[0])
        yield viewer.vroomSubscribe(vnode)
        host.pushStream(vnode, b"via node2")
        got = (yield viewer.next(STREAM)).body
        self.assertEqual((got.body, got.id, got.fromNode), (b"via node2", 1, host.uid))
        self.assertEqual(vrooms.sent.get("room.push"), 1)
        self.assertEqual(vrooms.received.get("room.frame"), 1)
        unsubscribed = yield viewer.vroomUnsubscribe(vnode)
        self.assertEqual(unsubscribed.t2, 0)
        yield waitUntil(lambda: not nodes[1].vrooms.nodes[vnode])

    @inlineCallbacks
    def test_bigPayloads(self):
        """
        A TIMBIGBINARYSTREAM of a few MiB pushed on one node reaches the
        subscribers on the others, as a TimStream and raw; a refused one
        comes back with its own frame type.
        """
        nodes = yield self.cluster(3)
        host = yield self.user(nodes[0])
        vnode = yield host.vroomRegister()
        guest = yield self.user(nodes[1])
        yield host.vroomGrant(vnode, guest.uid)
        viewer = yield self.user(nodes[2], encoding=Encoding.JSON)
        raw = yield self.user(nodes[2])
        yield viewer.vroomSubscribe(vnode)
        yield raw.vroomSubscribe(vnode, binary=True)
        data = random.Random(7).randbytes(3 << 20)
        guest.bigBinaryStream(vnode, data, chunkSize=512 * 1024)
        got = (yield viewer.next(STREAM, timeout=30)).body
        self.assertEqual((got.body, got.fromNode, got.id), (data, guest.uid, 1))
        frame = yield raw.next(TimType.TIMBIGBINARYSTREAM, timeout=30)
        self.assertEqual(raw.bigDataOf(frame), (vnode, data))
        raw.bigBinaryStream(vnode, b"x")
        error = (yield raw.next(errorFor(TimType.TIMBIGBINARYSTREAM))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_AUTH, vnode))

    @inlineCallbacks
    def test_badPeerInput(self):
        """
        Peer messages for a room that is not there, frames from a node
        that does not hold the room, pushes for a user without permission
        and malformed payloads are refused, counted, and change nothing.
        """
        nodes = yield self.cluster(2)
        node1, node2 = nodes
        host = yield self.user(node1)
        vnode = yield host.vroomRegister()
        viewer = yield self.user(node2)
        yield viewer.vroomSubscribe(vnode)
        # A frame for an unknown room: refused, and the sender told to stop.
        yield node1.cluster.send("node2", "room.frame", pack(b"NoSuchRoom", b"1", b"\x00"))
        yield waitUntil(lambda: node2.vrooms.refused.get("unknown-room") == 1)
        yield waitUntil(lambda: node1.vrooms.received.get("room.leave") == 1)
        # A frame for a mirrored room from a node that does not hold it.
        yield node2.cluster.send("node2", "room.frame", pack(vnode.encode(), b"5", b"\x00"))
        yield waitUntil(lambda: node2.vrooms.refused.get("not-holder") == 1)
        # A push from a user the room's rules do not allow.
        push = pack(vnode.encode(), viewer.uid.encode(), b"1", b"", b"94", b"forged")
        yield node2.cluster.send("node1", "room.push", push)
        yield waitUntil(lambda: node1.vrooms.refused.get("no-permission") == 1)
        push = pack(b"NoSuchRoom", viewer.uid.encode(), b"1", b"", b"94", b"forged")
        yield node2.cluster.send("node1", "room.push", push)
        yield waitUntil(lambda: node1.vrooms.refused.get("unknown-room") == 1)
        # Malformed ones.
        for kind in ("room.frame", "room.push", "room.rules", "room.gone", "room.refused"):
            yield node1.cluster.send("node2", kind, b"\x00garbage")
        failure = yield self.assertFailure(node2.cluster.request("node1", "room.join", dumps({"x": 1})), Exception)
        self.assertIn("vnode", str(failure))
        yield waitUntil(lambda: node2.vrooms.refused.get("bad-payload", 0) >= 5)
        self.flushLoggedErrors(BadPayload)
        # No effect: the room and its subscriber are as they were.
        self.assertEqual(node1.vrooms.registry.get(vnode).seq, 0)
        self.assertEqual(node1.vrooms.nodes[vnode], {"node2"})
        host.pushStream(vnode, b"real")
        got = (yield viewer.next(STREAM)).body
        self.assertEqual((got.body, got.id, got.missed), (b"real", 1, None))

    @inlineCallbacks
    def test_lateCopyAfterRemoval(self):
        """
        A copy of a removed room's rules that arrives late (a mirror
        registering again before it heard of the removal) does not bring
        the room back; the mirror told so drops it.
        """
        node1, node2 = yield self.cluster(2)
        host = yield self.user(node1)
        vnode = yield host.vroomRegister()
        viewer = yield self.user(node2)
        yield viewer.vroomSubscribe(vnode)
        rules = dumps(roomRules(node1.vrooms.registry.get(vnode)))
        yield host.vroomRemove(vnode)
        yield viewer.next(vroomAck(2))
        late = dumps({"vnode": vnode, "uid": None, "subscribe": True, "rules": json.loads(rules)})
        answer = json.loads((yield node2.cluster.request("node1", "room.join", late)))
        self.assertEqual(answer["error"], ErrorCode.ERR_NOEXIST)
        self.assertNotIn(vnode, node1.vrooms.registry)
        self.assertNotIn(vnode, node1.vrooms.nodes)

    @inlineCallbacks
    def test_wronglyDeclaredDead(self):
        """
        A node declared dead while alive, which may never learn it, gets
        the frames of its rooms again as soon as it is back.
        """
        node1, node2 = yield self.cluster(2)
        host = yield self.user(node1)
        vnode = yield host.vroomRegister()
        viewer = yield self.user(node2)
        yield viewer.vroomSubscribe(vnode)
        member = node1.cluster.member("node2")
        node1.vrooms._membershipChanged(MemberChange(ChangeKind.DIED, member, member))
        self.assertEqual(node1.vrooms.nodes[vnode], set())
        node1.vrooms._membershipChanged(MemberChange(ChangeKind.JOINED, member, member))
        self.assertEqual(node1.vrooms.nodes[vnode], {"node2"})
        host.pushStream(vnode, b"still here")
        self.assertEqual((yield viewer.next(STREAM)).body.body, b"still here")

    @inlineCallbacks
    def test_viewsDiffer(self):
        """
        A node that took a room over (it saw the holder die) while the
        holder is alive and still sends frames takes them for its own
        subscribers, in order, until the views agree again.
        """
        node1, node2 = yield self.cluster(2)
        host = yield self.user(node1)
        vnode = yield host.vroomRegister()
        viewer = yield self.user(node2)
        yield viewer.vroomSubscribe(vnode)
        host.pushStream(vnode, b"one")
        self.assertEqual((yield viewer.next(STREAM)).body.id, 1)
        # What node2 does when it sees node1 die: it takes the room over.
        vrooms = node2.vrooms
        vrooms._restore(RoomRules(roomRules(vrooms.registry.get(vnode))))
        vrooms._previous = Ownership(["node1"])
        self.assertIsNone(vrooms.registry.get(vnode).mirrorOf)
        host.pushStream(vnode, b"two")
        got = (yield viewer.next(STREAM)).body
        self.assertEqual((got.body, got.id), (b"two", 2))
        self.assertEqual(vrooms.refused, {})
        # Its own frames are not taken as another's.
        yield node2.cluster.send("node2", "room.frame", pack(vnode.encode(), b"9", b"\x00"))
        yield waitUntil(lambda: vrooms.refused.get("not-holder") == 1)

    @inlineCallbacks
    def test_slowNode(self):
        """
        A node that stops reading its link gets no more frames once what
        waits for it passes C{node_stream_buffer_bytes}; the publisher and
        the other nodes are not held up, and the slow node's subscribers
        learn how many they missed when it catches up.
        """
        nodes = yield self.cluster(3, vrooms={"node_stream_buffer_bytes": 256 * 1024})
        host = yield self.user(nodes[0])
        vnode = yield host.vroomRegister()
        fast = yield self.user(nodes[1])
        slow = yield self.user(nodes[2])
        for viewer in (fast, slow):
            yield viewer.vroomSubscribe(vnode)
        link = nodes[2].cluster._peers["node1"].link
        link.transport.pauseProducing()
        count, body = 200, b"v" * (64 * 1024)
        for _ in range(count):
            host.pushStream(vnode, body)
        got = yield self.frames(fast, count)
        self.assertEqual([f.id for f in got], list(range(1, count + 1)))
        dropped = nodes[0].vrooms.dropped.get("room.frame", 0)
        self.assertGreater(dropped, 0)
        link.transport.resumeProducing()
        host.pushStream(vnode, b"after")
        frames = []
        while not frames or frames[-1].body != b"after":
            frames.append((yield slow.next(STREAM)).body)
        last = frames[-1]
        self.assertEqual(last.id, count + 1)
        self.assertEqual(len(frames) + dropped, count + 1)
        self.assertEqual((yield slow.vroomMissed(vnode)), dropped)
        # The first frame after each gap says how many were missed so far.
        for got, frame in enumerate(frames):
            if frame.missed is not None:
                self.assertEqual(frame.missed, frame.id - 1 - got)
        self.assertTrue(any(frame.missed for frame in frames))


class HolderMovesTests(TestCase):
    """
    The node holding a room goes while frames flow.
    """

    timeout = 90

    cluster = routing.ClusterRoutingTests.cluster
    user = routing.ClusterRoutingTests.user
    encoding = Encoding.COMPACT

    @inlineCallbacks
    def framesGoOn(self, viewers, before, moved):
        """
        Each viewer, which got C{before}, goes on getting frames past
        C{moved} + 20 (the room's frame id when it moved), rising, each
        once.
        """
        for viewer, first in zip(viewers, before, strict=True):
            ids = [first.body.id]
            while ids[-1] <= moved + 20:
                ids.append((yield viewer.next(STREAM, timeout=20)).body.id)
            self.assertEqual(ids, sorted(set(ids)))

    @inlineCallbacks
    def holderGoesMidStream(self, **sections):
        nodes = yield self.cluster(3, **sections)
        holderNode = nodes[2]
        host = yield self.user(holderNode)
        vnode = yield host.vroomRegister(private=True)
        self.assertEqual(holderNode.cluster.ownership.owner(roomKey(vnode)), "node3")
        publisher = yield self.user(nodes[0])
        yield host.vroomGrant(vnode, publisher.uid)
        viewers = []
        for node in (nodes[0], nodes[1], nodes[1]):
            viewer = yield self.user(node)
            yield host.vroomAllow(vnode, viewer.uid)
            yield viewer.vroomSubscribe(vnode)
            viewers.append(viewer)
        local = yield self.user(holderNode)
        yield host.vroomAllow(vnode, local.uid)
        yield local.vroomSubscribe(vnode)
        pushes = LoopingCall(lambda: publisher.pushStream(vnode, b"frame"))
        pushes.start(0.02)
        self.addCleanup(lambda: pushes.running and pushes.stop())
        before = yield gatherResults([viewer.next(STREAM) for viewer in viewers])
        yield holderNode.stopService()
        yield waitUntil(lambda: all(len(n.cluster.liveMembers()) == 2 for n in nodes[:2]), 20)
        newHolder = byId(nodes, nodes[0].cluster.ownership.owner(roomKey(vnode)))
        self.assertIsNot(newHolder, holderNode)
        # The rules survived (the room is private, the publisher granted),
        # and every surviving subscriber keeps getting frames, in order,
        # each once.
        yield waitUntil(lambda: vnode in newHolder.vrooms.registry)
        room = newHolder.vrooms.registry.get(vnode)
        yield waitUntil(lambda: room.mirrorOf is None)
        yield self.framesGoOn(viewers, before, room.seq)
        pushes.stop()
        self.assertIsNone(room.mirrorOf)
        self.assertTrue(room.private)
        self.assertIn(publisher.uid, room.publishers)
        self.assertEqual(newHolder.vrooms.nodes[vnode], {"node1", "node2"} - {newHolder.cluster.nodeId})
        return newHolder

    def test_holderLeaves(self):
        """
        The holder stops (and leaves the cluster): the next holder rebuilds
        the room from what the surviving nodes hold.
        """
        return self.holderGoesMidStream()

    def test_holderDies(self):
        """
        The holder stops without leaving (as if killed): once the others
        declare it dead, the next holder takes the room.
        """
        return self.holderGoesMidStream(cluster={"leave_on_stop": False})

    @inlineCallbacks
    def test_rulesOnTheSuccessor(self):
        """
        A room nobody subscribes to yet survives its holder: the successor
        kept a copy of its rules, so the founder's leave and grants still
        hold after the move.
        """
        nodes = yield self.cluster(3)
        holderNode = nodes[2]
        host = yield self.user(holderNode)
        vnode = yield host.vroomRegister(private=True)
        publisher = yield self.user(nodes[0])
        viewer = yield self.user(nodes[1])
        yield host.vroomGrant(vnode, publisher.uid)
        yield host.vroomAllow(vnode, viewer.uid)
        successor = byId(nodes, holderNode.cluster.ownership.owners(roomKey(vnode), 2)[1])
        yield waitUntil(lambda: viewer.uid in getattr(successor.vrooms.replicas.get(vnode), "allowed", ()))
        yield holderNode.stopService()
        yield waitUntil(lambda: vnode in successor.vrooms.registry)
        yield viewer.vroomSubscribe(vnode)
        outsider = yield self.user(nodes[0])
        failure = yield self.assertFailure(outsider.vroomSubscribe(vnode), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        publisher.pushStream(vnode, b"after the move")
        got = (yield viewer.next(STREAM)).body
        self.assertEqual((got.body, got.fromNode), (b"after the move", publisher.uid))

    @inlineCallbacks
    def test_nodeJoinsAndTakesTheRoom(self):
        """
        A node that joins and now owns a room gets it handed over while
        frames flow; the old holder keeps its subscribers as a mirror.
        """
        nodes = yield self.cluster(2)
        three = Ownership(["node1", "node2", "node3"])
        while True:
            vnode = new_random_id(16)
            key = roomKey(vnode)
            if nodes[0].cluster.ownership.owner(key) == "node1" and three.owner(key) == "node3":
                break
        nodes[0].vrooms._drawId = lambda: vnode
        host = yield self.user(nodes[0])
        self.assertEqual((yield host.vroomRegister()), vnode)
        viewers = []
        for node in nodes:
            viewer = yield self.user(node)
            yield viewer.vroomSubscribe(vnode)
            viewers.append(viewer)
        pushes = LoopingCall(lambda: host.pushStream(vnode, b"frame"))
        pushes.start(0.02)
        self.addCleanup(lambda: pushes.running and pushes.stop())
        before = yield gatherResults([viewer.next(STREAM) for viewer in viewers])
        config = testConfig(
            self.mktemp(),
            backend="postgresql",
            store={"dsn": nodes[0].config.store.dsn},
            devices={"limit": 0, "type_limit": 0},
            cluster={
                "listen": "tcp:0:interface=127.0.0.1",
                "secret": routing.SECRET,
                "node_id": "node3",
                "seeds": (nodes[0].cluster.address,),
            },
        )
        node3 = yield startNode(self, reactor, config)
        for node in (*nodes, node3):
            yield routing.untilMembers(node, 3)
        yield waitUntil(lambda: vnode in node3.vrooms.registry)
        room = node3.vrooms.registry.get(vnode)
        yield waitUntil(lambda: room.mirrorOf is None)
        yield self.framesGoOn(viewers, before, room.seq)
        pushes.stop()
        self.assertEqual(nodes[0].vrooms.registry.get(vnode).mirrorOf, "node3")
        self.assertEqual(node3.vrooms.nodes[vnode], {"node1", "node2"})
        # The new holder keeps a copy of the rules on its successor.
        successor = next(n for n in (*nodes, node3) if n.cluster.nodeId == three.owners(roomKey(vnode), 2)[1])
        yield waitUntil(lambda: vnode in successor.vrooms.replicas)
