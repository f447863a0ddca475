"""
End-to-end tests of virtual rooms: every TIMVROOM operation and its
refusals, TIMSTREAM fan-out, N:N rooms, binary subscriptions, private
rooms, idle expiry, statistics, and a slow subscriber among a thousand.
"""

import json
import socket

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.chat.vrooms.service import VROOM_STATUS, sweepInterval
from timtx.client import TimRequestFailed, register
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.test.base import NodeTestCase, waitUntil
from timtx.testing import fitDescriptors, httpURL, loggedInClient, uniqueName
from timtx.util.meters import RateMeter


def isStream(vnode=None):
    return lambda i: i.timType == TimType.TIMSTREAM and (vnode is None or i.body.VNode == vnode)


def errorFor(timType):
    return lambda i: i.timType == TimType.TIMACK and i.body.timType == timType and not i.body.ok


def notice(t):
    return lambda i: i.timType == TimType.TIMACK and i.body.timType == TimType.TIMVROOM and i.body.t == t


class VRoomTestsMixin:
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def refused(self, d):
        error = yield self.assertFailure(d, TimRequestFailed)
        self.assertEqual(error.ack.timType, TimType.TIMVROOM)
        return error

    @inlineCallbacks
    def test_lifecycle(self):
        """
        Register, subscribe, push, unsubscribe and remove, each answered as
        tim answers: TimAck{ok, timType 22, t: rtype, n: room}.  Frames
        carry the room, the publisher, the body, dtype and an id counting
        the room's frames.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        vnode = yield alice.vroomRegister()
        self.assertTrue(vnode)
        ack = yield bob.vroomSubscribe(vnode)
        self.assertEqual((ack.ok, ack.timType, ack.t, ack.n), (True, 22, 5, vnode))
        alice.pushStream(vnode, b"\x00\x01frame", dtype=3)
        alice.pushStream(vnode, b"second")
        first = (yield bob.next(isStream(vnode))).body
        second = (yield bob.next(isStream(vnode))).body
        self.assertEqual((first.id, first.VNode, first.fromNode), (1, vnode, alice.uid))
        self.assertEqual((first.body, first.dtype, first.missed), (b"\x00\x01frame", 3, None))
        self.assertEqual((second.id, second.body, second.dtype), (2, b"second", None))
        ack = yield bob.vroomUnsubscribe(vnode)
        self.assertEqual((ack.ok, ack.t, ack.n, ack.t2), (True, 6, vnode, 0))
        alice.pushStream(vnode, b"unseen")
        yield alice.ping()
        yield bob.ping()
        self.assertEqual(bob.take(isStream()), [])
        self.assertEqual(alice.take(lambda i: i.timType == TimType.TIMACK), [])
        ack = yield alice.vroomRemove(vnode)
        self.assertEqual((ack.ok, ack.t, ack.n), (True, 2, vnode))
        self.assertNotIn(vnode, node.vrooms.registry)
        # Unsubscribing from a room one is not in, or that is gone, is fine.
        ack = yield bob.vroomUnsubscribe(vnode)
        self.assertEqual((ack.ok, ack.t2), (True, None))

    @inlineCallbacks
    def test_refusals(self):
        """
        Unknown rooms are 4109, missing or bad fields 4104, managing a room
        one did not found 4105, unknown users 4106; each names the room or
        user in n where there is one, and changes nothing.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        vnode = yield alice.vroomRegister()
        cases = [
            (lambda: bob.vroomSubscribe("NoSuchRoom"), ErrorCode.ERR_NOEXIST, "NoSuchRoom"),
            (lambda: bob.vroomRemove("NoSuchRoom"), ErrorCode.ERR_NOEXIST, "NoSuchRoom"),
            (lambda: bob.vroomRemove(vnode), ErrorCode.ERR_AUTH, vnode),
            (lambda: bob.vroomGrant(vnode, bob.uid), ErrorCode.ERR_AUTH, vnode),
            (lambda: bob.vroomRevoke(vnode, alice.uid), ErrorCode.ERR_AUTH, vnode),
            (lambda: alice.vroomGrant(vnode, "NoSuchUser"), ErrorCode.ERR_ACCOUNT, "NoSuchUser"),
            (lambda: alice.vroomGrant("NoSuchRoom", bob.uid), ErrorCode.ERR_NOEXIST, "NoSuchRoom"),
            (lambda: bob.vroom(5), ErrorCode.ERR_PARAMS, None),
            (lambda: bob.vroom(3, vnode), ErrorCode.ERR_PARAMS, None),
            (lambda: bob.vroom(5, vnode, reqInt=2), ErrorCode.ERR_PARAMS, None),
            (lambda: bob.vroom(1, reqInt=7), ErrorCode.ERR_PARAMS, None),
            (lambda: bob.vroom(99, vnode), ErrorCode.ERR_PARAMS, None),
            (lambda: bob.vroom(VROOM_STATUS, vnode), ErrorCode.ERR_PARAMS, vnode),
        ]
        for request, code, n in cases:
            error = yield self.refused(request())
            self.assertEqual((error.code, error.ack.n), (code, n))
        bob.send(TimType.TIMVROOM)
        self.assertEqual(self.errorOf((yield bob.next(errorFor(22))), 22), ErrorCode.ERR_FORMAT)
        stats = node.vrooms.stats(vnode)
        self.assertEqual((stats.subscribers, stats.publishers), (0, 1))
        self.assertEqual(len(node.vrooms.registry), 1)

    @inlineCallbacks
    def test_pushPermission(self):
        """
        Only the founder and users it granted may push: anyone else gets
        TimAck{ok: false, timType 94, error 4105, n: room}, an unknown room
        4109, and nothing reaches subscribers.  Taking permission back
        works at once.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        vnode = yield alice.vroomRegister()
        yield carol.vroomSubscribe(vnode)
        bob.pushStream(vnode, b"intruder")
        error = (yield bob.next(errorFor(TimType.TIMSTREAM))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_AUTH, vnode))
        bob.pushStream("NoSuchRoom", b"lost")
        error = (yield bob.next(errorFor(TimType.TIMSTREAM))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_NOEXIST, "NoSuchRoom"))
        ack = yield alice.vroomGrant(vnode, bob.uid)
        self.assertEqual((ack.ok, ack.t, ack.n), (True, 3, bob.uid))
        bob.pushStream(vnode, b"granted")
        got = (yield carol.next(isStream(vnode))).body
        self.assertEqual((got.id, got.fromNode, got.body), (1, bob.uid, b"granted"))
        ack = yield alice.vroomRevoke(vnode, bob.uid)
        self.assertEqual((ack.ok, ack.t, ack.n), (True, 4, bob.uid))
        bob.pushStream(vnode, b"revoked")
        self.assertEqual((yield bob.next(errorFor(94))).body.error.code, ErrorCode.ERR_AUTH)
        yield carol.ping()
        self.assertEqual(carol.take(isStream()), [])
        self.assertEqual(node.vrooms.stats(vnode).frames, 1)

    @inlineCallbacks
    def test_nToN(self):
        """
        Several granted publishers push into one room (a conference): every
        subscriber gets every frame, in the room's order, each with its
        publisher in fromNode.
        """
        node = yield self.node()
        host = yield self.user(node)
        guests = yield gatherResults([self.user(node) for _ in range(2)])
        viewers = yield gatherResults([self.user(node) for _ in range(3)])
        vnode = yield host.vroomRegister()
        for guest in guests:
            yield host.vroomGrant(vnode, guest.uid)
        for viewer in viewers:
            yield viewer.vroomSubscribe(vnode)
        publishers = [host, *guests]
        sent = []
        for i in range(12):
            publisher = publishers[i % 3]
            publisher.pushStream(vnode, f"f{i}".encode())
            sent.append((publisher.uid, f"f{i}".encode()))
            yield publisher.ping()  # a definite order across connections
        for viewer in viewers:
            got = yield gatherResults([viewer.next(isStream(vnode)) for _ in sent])
            got = [i.body for i in got]
            self.assertEqual([(s.fromNode, s.body) for s in got], sent)
            self.assertEqual([s.id for s in got], list(range(1, 13)))
        self.assertEqual(node.vrooms.stats(vnode).publishers, 3)

    @inlineCallbacks
    def test_binarySubscription(self):
        """
        A subscription with reqInt 1 (tim's VirtualroomSubBinary) gets
        every frame raw, as TIMBIGBINARYSTREAM [97][room][131][body],
        whether it was pushed with TIMSTREAM or TIMBIGBINARYSTREAM; a plain
        subscriber gets both as TimStreams.
        """
        node = yield self.node()
        alice = yield self.user(node)
        raw = yield self.user(node)
        plain = yield self.user(node)
        vnode = yield alice.vroomRegister()
        yield raw.vroomSubscribe(vnode, binary=True)
        yield plain.vroomSubscribe(vnode)
        alice.pushStream(vnode, b"\x83|struct", dtype=1)
        alice.bigBinaryStream(vnode, b"\x00raw\x83bytes")
        frames = yield gatherResults([raw.next(TimType.TIMBIGBINARYSTREAM) for _ in range(2)])
        self.assertEqual(frames[0].payload, vnode.encode() + b"\x83\x83|struct")
        self.assertEqual([raw.bigDataOf(f) for f in frames], [(vnode, b"\x83|struct"), (vnode, b"\x00raw\x83bytes")])
        streams = [i.body for i in (yield gatherResults([plain.next(isStream(vnode)) for _ in range(2)]))]
        self.assertEqual(
            [(s.id, s.body, s.fromNode) for s in streams],
            [(1, b"\x83|struct", alice.uid), (2, b"\x00raw\x83bytes", alice.uid)],
        )
        # Subscribing again switches the form.
        yield raw.vroomSubscribe(vnode)
        alice.pushStream(vnode, b"now a struct")
        self.assertEqual((yield raw.next(isStream(vnode))).body.body, b"now a struct")
        self.assertEqual(node.vrooms.stats(vnode).subscribers, 2)

    @inlineCallbacks
    def test_privateRoom(self):
        """
        A room registered with reqInt 1 takes only subscribers the founder
        allowed (rtype 101), besides the founder and its publishers.
        Disallowing (rtype 102) ends the subscription and tells the
        subscriber with TimAck{t: 6}.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        guest = yield self.user(node)
        vnode = yield alice.vroomRegister(private=True)
        error = yield self.refused(bob.vroomSubscribe(vnode))
        self.assertEqual((error.code, error.ack.n), (ErrorCode.ERR_AUTH, vnode))
        yield alice.vroomSubscribe(vnode)
        yield alice.vroomGrant(vnode, guest.uid)
        yield guest.vroomSubscribe(vnode)
        ack = yield alice.vroomAllow(vnode, bob.uid)
        self.assertEqual((ack.t, ack.n), (101, bob.uid))
        yield bob.vroomSubscribe(vnode)
        alice.pushStream(vnode, b"members only")
        for client in (alice, bob, guest):
            self.assertEqual((yield client.next(isStream(vnode))).body.body, b"members only")
        ack = yield alice.vroomDisallow(vnode, bob.uid)
        self.assertEqual((ack.t, ack.n), (102, bob.uid))
        told = (yield bob.next(notice(6))).body
        self.assertEqual((told.ok, told.n, told.t2), (True, vnode, 0))
        alice.pushStream(vnode, b"after")
        self.assertEqual((yield guest.next(isStream(vnode))).body.body, b"after")
        yield bob.ping()
        self.assertEqual(bob.take(isStream()), [])
        self.assertEqual((yield self.refused(bob.vroomSubscribe(vnode))).code, ErrorCode.ERR_AUTH)
        # Disallowing a publisher leaves it subscribed: it may push.
        yield alice.vroomDisallow(vnode, guest.uid)
        self.assertEqual(node.vrooms.stats(vnode).subscribers, 2)

    @inlineCallbacks
    def test_removeTellsSubscribers(self):
        """
        When the founder removes a room, its subscribers get TimAck{ok,
        timType 22, t: 2, n: room}, and the room is gone for everyone.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        vnode = yield alice.vroomRegister()
        yield bob.vroomSubscribe(vnode)
        yield alice.vroomRemove(vnode)
        told = (yield bob.next(notice(2))).body
        self.assertEqual((told.ok, told.n), (True, vnode))
        self.assertEqual((yield self.refused(bob.vroomSubscribe(vnode))).code, ErrorCode.ERR_NOEXIST)
        alice.pushStream(vnode, b"late")
        self.assertEqual((yield alice.next(errorFor(94))).body.error.code, ErrorCode.ERR_NOEXIST)

    @inlineCallbacks
    def test_limits(self):
        """
        Rooms per user, subscribers per room, publishers per room and
        subscriptions per connection are bounded (4111); stream bodies too
        (4114).
        """
        node = yield self.node(
            vrooms={
                "max_rooms_per_user": 2,
                "max_subscribers": 2,
                "max_publishers": 1,
                "max_subscriptions": 2,
                "max_stream_bytes": 8,
            }
        )
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        rooms = [(yield alice.vroomRegister()), (yield alice.vroomRegister())]
        self.assertEqual((yield self.refused(alice.vroomRegister())).code, ErrorCode.ERR_OVERENTRY)
        yield alice.vroomRemove(rooms.pop())
        rooms.append((yield alice.vroomRegister()))
        yield alice.vroomGrant(rooms[0], bob.uid)
        yield alice.vroomGrant(rooms[0], bob.uid)  # again: no new slot
        self.assertEqual((yield self.refused(alice.vroomGrant(rooms[0], carol.uid))).code, ErrorCode.ERR_OVERENTRY)
        yield alice.vroomSubscribe(rooms[0])
        yield bob.vroomSubscribe(rooms[0])
        yield bob.vroomSubscribe(rooms[0])  # again: no new slot
        self.assertEqual((yield self.refused(carol.vroomSubscribe(rooms[0]))).code, ErrorCode.ERR_OVERENTRY)
        yield carol.vroomSubscribe(rooms[1])
        room3 = yield bob.vroomRegister()
        yield carol.vroomSubscribe(room3)
        fourth = yield bob.vroomRegister()
        self.assertEqual((yield self.refused(carol.vroomSubscribe(fourth))).code, ErrorCode.ERR_OVERENTRY)
        alice.pushStream(rooms[0], b"123456789")
        error = (yield alice.next(errorFor(94))).body
        self.assertEqual((error.error.code, error.n), (ErrorCode.ERR_BIGDATA, rooms[0]))
        alice.pushStream(rooms[0], b"12345678")
        self.assertEqual((yield bob.next(isStream())).body.body, b"12345678")

    @inlineCallbacks
    def test_sessionEndUnsubscribes(self):
        """
        A connection that closes leaves every room it was subscribed to;
        the founder leaving does not end the room.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        vnode = yield alice.vroomRegister()
        other = yield alice.vroomRegister()
        yield bob.vroomSubscribe(vnode)
        yield bob.vroomSubscribe(other, binary=True)
        yield alice.vroomSubscribe(vnode)
        self.assertEqual(node.vrooms.stats(vnode).subscribers, 2)
        yield bob.disconnect()
        yield waitUntil(lambda: node.vrooms.stats(vnode).subscribers == 1)
        self.assertEqual(node.vrooms.stats(other).subscribers, 0)
        yield alice.disconnect()
        yield waitUntil(lambda: node.vrooms.stats(vnode).subscribers == 0)
        self.assertIn(vnode, node.vrooms.registry)

    @inlineCallbacks
    def test_ownFrames(self):
        """
        A publisher subscribed to its own room gets its frames too, as in
        tim; another session of the same user as well.
        """
        node = yield self.node()
        alice = yield self.user(node, termtyp=1)
        alice2 = yield self.user(node, name=alice.loginName, registerFirst=False, termtyp=2)
        vnode = yield alice.vroomRegister()
        yield alice.vroomSubscribe(vnode)
        yield alice2.vroomSubscribe(vnode)
        alice.pushStream(vnode, b"me")
        for client in (alice, alice2):
            self.assertEqual((yield client.next(isStream(vnode))).body.fromNode, alice.uid)

    @inlineCallbacks
    def test_timjsStream(self):
        """
        timjs's JSON: vNode in lower case, null id and fromNode, null node2
        in the TimReq; it works as tim's keys do.
        """
        node = yield self.node()
        alice = yield self.user(node, encoding=Encoding.JSON)
        bob = yield self.user(node)
        vnode = yield alice.vroomRegister()
        bob_req = {"rtype": 5, "node": vnode, "node2": None, "reqInt": None}
        bob.sendRaw(bytes([TimType.TIMVROOM | 0x80]) + json.dumps(bob_req).encode())
        yield bob.next(notice(5))
        push = {"id": None, "vNode": vnode, "dtype": None, "body": "AQID", "fromNode": None}
        alice.sendRaw(bytes([TimType.TIMSTREAM | 0x80]) + json.dumps(push).encode())
        got = (yield bob.next(isStream(vnode))).body
        self.assertEqual((got.body, got.fromNode, got.id), (b"\x01\x02\x03", alice.uid, 1))


class WebSocketCompactVRoomTests(VRoomTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT


class WebSocketJSONVRoomTests(VRoomTestsMixin, NodeTestCase):
    encoding = Encoding.JSON


class TCPCompactVRoomTests(VRoomTestsMixin, NodeTestCase):
    transport = "tcp"
    encoding = Encoding.COMPACT


class ClockedVRoomTests(NodeTestCase):
    """
    Time-based behaviour, on a fake clock.
    """

    @inlineCallbacks
    def test_idleExpiry(self):
        """
        A room without a frame for idle_expiry seconds is removed at the
        next sweep (every tenth of the expiry) and its subscribers are
        told; frames keep a room alive.
        """
        clock = Clock()
        node = yield self.node(clock=clock, vrooms={"idle_expiry": 100})
        alice = yield self.user(node)
        bob = yield self.user(node)
        vnode = yield alice.vroomRegister()
        quiet = yield alice.vroomRegister()
        yield bob.vroomSubscribe(vnode)
        yield bob.vroomSubscribe(quiet)
        clock.advance(60)
        alice.pushStream(vnode, b"alive")
        yield bob.next(isStream(vnode))
        clock.advance(50)
        self.assertNotIn(quiet, node.vrooms.registry)
        self.assertEqual((yield bob.next(notice(2))).body.n, quiet)
        self.assertIn(vnode, node.vrooms.registry)
        clock.advance(60)
        self.assertNotIn(vnode, node.vrooms.registry)
        self.assertEqual((yield bob.next(notice(2))).body.n, vnode)
        error = yield self.assertFailure(bob.vroomSubscribe(vnode), TimRequestFailed)
        self.assertEqual(error.code, ErrorCode.ERR_NOEXIST)
        self.assertEqual((yield alice.vroomRegister()) is not None, True)

    @inlineCallbacks
    def test_noExpiry(self):
        """
        idle_expiry 0 keeps rooms until removed.
        """
        clock = Clock()
        node = yield self.node(clock=clock, vrooms={"idle_expiry": 0})
        alice = yield self.user(node)
        vnode = yield alice.vroomRegister()
        clock.advance(10**6)
        self.assertIn(vnode, node.vrooms.registry)

    @inlineCallbacks
    def test_stats(self):
        """
        Per-room statistics: subscribers (and how many binary), publishers,
        totals, rates over the last 10 s, frames delivered and dropped.
        """
        clock = Clock()
        clock.advance(1000)
        node = yield self.node(clock=clock)
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        vnode = yield alice.vroomRegister()
        yield alice.vroomGrant(vnode, bob.uid)
        yield bob.vroomSubscribe(vnode)
        yield carol.vroomSubscribe(vnode, binary=True)
        for _ in range(5):
            alice.pushStream(vnode, b"0123456789")
        yield alice.ping()
        clock.advance(3)
        stats = node.vrooms.stats(vnode)
        self.assertEqual((stats.founder, stats.private, stats.age, stats.idle), (alice.uid, False, 3, 3))
        self.assertEqual((stats.subscribers, stats.binarySubscribers, stats.publishers), (2, 1, 2))
        self.assertEqual((stats.frames, stats.bytes, stats.delivered, stats.dropped), (5, 50, 10, 0))
        self.assertEqual((stats.framesPerSecond, stats.bytesPerSecond), (0.5, 5.0))
        clock.advance(10)
        stats = node.vrooms.stats(vnode)
        self.assertEqual((stats.framesPerSecond, stats.bytesPerSecond, stats.frames), (0.0, 0.0, 5))
        self.assertEqual([s.vnode for s in node.vrooms.allStats()], [vnode])
        self.assertIsNone(node.vrooms.stats("NoSuchRoom"))


class RateMeterTests(SynchronousTestCase):
    def test_window(self):
        """
        The rate covers the last window seconds, the current one included.
        """
        clock = Clock()
        meter = RateMeter(clock, window=4)
        meter.mark(4)
        clock.advance(1.5)
        meter.mark(2)
        meter.mark(2)
        self.assertEqual((meter.rate(), meter.total), (2.0, 8))
        clock.advance(3)
        self.assertEqual(meter.rate(), 1.0)
        clock.advance(1)
        self.assertEqual(meter.rate(), 0.0)
        clock.advance(4)  # the same ring slots, seconds later
        meter.mark(1)
        self.assertEqual(meter.rate(), 0.25)

    def test_sweepInterval(self):
        self.assertEqual([sweepInterval(s) for s in (1, 100, 600, 6000)], [1.0, 10.0, 60.0, 60.0])


class FanOutTests(NodeTestCase):
    """
    One stream to a thousand subscribers, one of which stops reading.
    """

    transport = "tcp"
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def test_thousandSubscribersOneStalled(self):
        """
        A subscriber that stops reading is skipped once its connection is
        congested, and its missed counter grows; the 999 others get every
        frame in order, and the publisher is never paused.  Once the
        stalled one reads again it continues with the next frame, which
        tells it how many it missed.
        """
        # No stream buffer beyond Twisted's own, so that congestion alone
        # decides (test_streamBufferBound covers the buffer).
        node = yield self.node(vrooms={"max_subscribers": 0, "stream_buffer_bytes": 0})
        publisher = yield self.user(node)
        vnode = yield publisher.vroomRegister()
        filler = yield publisher.vroomRegister()
        names = [uniqueName("viewer") for _ in range(20)]
        yield gatherResults([register(reactor, httpURL(node), name, "secret") for name in names])
        # Each subscriber holds two descriptors in this process (client and
        # node side); under a low `ulimit -n` fewer run, with a warning.
        total = fitDescriptors(1000, perUnit=2)
        others = []
        while len(others) < total - 1:
            # In batches: the listen backlog is 50 connections.
            batch = min(50, total - 1 - len(others))
            others += yield gatherResults(
                [
                    loggedInClient(reactor, node, names[i % 20], transport="tcp", testCase=self, registerFirst=False)
                    for i in range(batch)
                ]
            )
        stalled = yield self.user(node)
        viewers = [stalled, *others]
        yield gatherResults([viewer.vroomSubscribe(vnode) for viewer in viewers])
        yield stalled.vroomSubscribe(filler)
        self.assertEqual(node.vrooms.stats(vnode).subscribers, total)

        # The publisher's side must never be paused.
        publisherSide = node.sessions.sessionsOf(publisher.uid)[0].sink
        pauses = []
        original = publisherSide.transport.pauseProducing
        publisherSide.transport.pauseProducing = lambda: (pauses.append(1), original())

        # Stall one subscriber, and fill its connection until it is
        # congested (small socket buffers make that quick).
        stalledSide = node.sessions.sessionsOf(stalled.uid)[0]
        stalledSide.sink.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stalled._transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled._transport.transport.pauseProducing()
        chunk = b"f" * 65536
        for _ in range(400):
            if stalledSide.congested:
                break
            publisher.pushStream(filler, chunk)
            yield publisher.ping()
        self.assertTrue(stalledSide.congested)

        frames = [b"frame%d" % i for i in range(20)]
        for frame in frames:
            publisher.pushStream(vnode, frame)
        yield publisher.ping()
        for viewer in others:
            got = yield gatherResults([viewer.next(isStream(vnode)) for _ in frames])
            got = [i.body for i in got]
            self.assertEqual([s.body for s in got], frames)
            self.assertEqual([s.id for s in got], list(range(1, 21)))
        subscription = node.vrooms.registry.subscription(stalledSide, vnode)
        self.assertEqual(subscription.missed, 20)
        self.assertLessEqual(stalledSide.sink.backlog, node.vrooms.streamBufferBytes)
        stats = node.vrooms.stats(vnode)
        self.assertEqual((stats.delivered, stats.dropped), ((total - 1) * 20, 20))
        self.assertEqual(pauses, [])
        self.assertFalse(publisherSide._readingPaused)
        self.assertFalse(publisherSide.congested)

        # Reading again: the backlog drains, then the next frame arrives
        # with the missed count.
        stalled._transport.transport.resumeProducing()
        yield waitUntil(lambda: not stalledSide.congested)
        publisher.pushStream(vnode, b"again")
        publisher.pushStream(vnode, b"and again")
        resumed = (yield stalled.next(isStream(vnode), timeout=30)).body
        self.assertEqual((resumed.id, resumed.body, resumed.missed), (21, b"again", 20))
        following = (yield stalled.next(isStream(vnode))).body
        self.assertEqual((following.id, following.missed), (22, None))
        self.assertEqual((yield stalled.vroomMissed(vnode)), 20)
        ack = yield stalled.vroomUnsubscribe(vnode)
        self.assertEqual(ack.t2, 20)

    @inlineCallbacks
    def test_burstPassesFastReaders(self):
        """
        A burst larger than Twisted's 64 KiB write buffer marks a reading
        subscriber congested for a moment; within stream_buffer_bytes it
        still gets every frame.
        """
        node = yield self.node()
        publisher = yield self.user(node)
        viewers = yield gatherResults([self.user(node) for _ in range(3)])
        vnode = yield publisher.vroomRegister()
        yield gatherResults([viewer.vroomSubscribe(vnode) for viewer in viewers])
        frames = [bytes([i]) * 100_000 for i in range(8)]
        for frame in frames:
            publisher.pushStream(vnode, frame)
        for viewer in viewers:
            got = yield gatherResults([viewer.next(isStream(vnode)) for _ in frames])
            self.assertEqual([(i.body.body, i.body.missed) for i in got], [(f, None) for f in frames])
        self.assertEqual(node.vrooms.stats(vnode).dropped, 0)

    @inlineCallbacks
    def test_streamBufferBound(self):
        """
        What waits for a subscriber that stopped reading stays within
        stream_buffer_bytes (past Twisted's write buffer); the frames past
        it are dropped for it alone.
        """
        node = yield self.node(vrooms={"stream_buffer_bytes": 262144})
        publisher = yield self.user(node)
        reader = yield self.user(node)
        stalled = yield self.user(node)
        vnode = yield publisher.vroomRegister()
        yield reader.vroomSubscribe(vnode)
        yield stalled.vroomSubscribe(vnode)
        stalledSide = node.sessions.sessionsOf(stalled.uid)[0]
        stalledSide.sink.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stalled._transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled._transport.transport.pauseProducing()
        subscription = node.vrooms.registry.subscription(stalledSide, vnode)
        sent = 0
        while subscription.missed < 3 and sent < 200:
            publisher.pushStream(vnode, bytes([sent % 256]) * 16384)
            sent += 1
            yield publisher.ping()
        self.assertEqual(subscription.missed, 3)
        self.assertTrue(stalledSide.congested)
        self.assertLessEqual(stalledSide.sink.backlog, 262144)
        self.assertGreater(stalledSide.sink.backlog, 262144 - 2 * 16500)
        got = yield gatherResults([reader.next(isStream(vnode)) for _ in range(sent)])
        self.assertEqual([i.body.id for i in got], list(range(1, sent + 1)))
        self.assertEqual(node.vrooms.stats(vnode).dropped, 3)
