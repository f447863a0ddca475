"""
End-to-end tests of groups: every operation and rule, group messages and
their offline delivery by reference, moderation extensions, room profiles,
and fan-out to 1,000 online members with one that stops reading.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks

from timtx.chat.groups.core import MEMBERJOINED, MEMBERLEFT, MUTEALL, MUTEMEMBER, SETROOMCAP, TRANSFERROOM
from timtx.client import TimRequestFailed, connect, register
from timtx.delivery.fanout import groupConversation
from timtx.persistence.records import MESSAGE_RECALLED, ROLE_MEMBER, Member
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, GroupType, NodeInfo, TimType
from timtx.protocols.structs import Tid, TimReq, TimRoomBean
from timtx.test.base import NodeTestCase, waitUntil, within
from timtx.testing import fitDescriptors, httpURL, wsURL


def notice(bnType):
    return lambda i: i.timType == TimType.TIMMESSAGE and i.body.bnType == bnType


def groupMessage(i):
    return i.timType == TimType.TIMMESSAGE and i.body.msType == 3 and i.body.odType != 4


def refused(timType):
    return lambda i: i.timType == TimType.TIMACK and i.body.timType == timType and not i.body.ok


def nodesReply(i):
    return i.timType == TimType.TIMNODES


class GroupTestsMixin:
    sections = {"devices": {"limit": 0, "type_limit": 0}}

    @inlineCallbacks
    def create(self, client, gtype=GroupType.OPEN, topic="topic"):
        ack = yield client.business(Business.NEWROOM, node=topic, reqInt=gtype)
        self.assertEqual(ack.t, Business.NEWROOM)
        return ack.n

    @inlineCallbacks
    def failsWith(self, code, d):
        failure = yield self.assertFailure(d, TimRequestFailed)
        self.assertEqual(failure.code, code)

    def say(self, client, gid, text, **fields):
        return client.sendMessage(None, text, msType=3, roomTid=Tid(node=gid), **fields)

    @inlineCallbacks
    def test_openGroup(self):
        """
        Create an open group, join it, list members and groups; members see
        join notices.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        gid = yield self.create(alice)
        ack = yield bob.business(Business.ADDROOM, node=gid, reqStr="hello")
        self.assertEqual((ack.t, ack.n, ack.n2), (Business.ADDROOM, gid, None))
        joined = (yield alice.next(notice(MEMBERJOINED))).body
        self.assertEqual((joined.fromTid.node, joined.roomTid.node, joined.msType), (bob.uid, gid, 3))
        members = yield alice.business(Business.ROOMUSERS, node=gid, reply=nodesReply)
        self.assertEqual((sorted(members.nodelist), members.node), (sorted([alice.uid, bob.uid]), gid))
        mine = yield bob.business(Business.USERROOM, reply=nodesReply)
        self.assertEqual(mine.nodelist, [gid])
        yield self.failsWith(ErrorCode.ERR_HASEXIST, bob.business(Business.ADDROOM, node=gid))
        yield self.failsWith(ErrorCode.ERR_NOEXIST, bob.business(Business.ADDROOM, node="NoSuchGroup"))
        stranger = yield self.user(node)
        yield self.failsWith(ErrorCode.ERR_PARAMS, stranger.business(Business.ROOMUSERS, node=gid))

    @inlineCallbacks
    def test_privateGroupRequests(self):
        """
        Joining a private group makes a request: as in tim 2.0 the
        requester gets nothing (tim clients read an ack as "joined"), founder
        and managers a bnType 9 notice; approving is pulling in (bnType 10 to
        the requester, and an ack naming the group in n so that tim's web
        client can list its members); rejecting sends bnType 11, and a
        second reject is 4103.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        gid = yield self.create(alice, GroupType.PRIVATE)
        bob.send(TimType.TIMBUSINESS, TimReq(rtype=Business.ADDROOM, node=gid, reqStr="let me in"))
        request = (yield alice.next(notice(Business.ADDROOM))).body
        self.assertEqual((request.fromTid.node, request.roomTid.node, request.dataString), (bob.uid, gid, "let me in"))
        yield bob.ping()
        self.assertEqual(bob.take(TimType.TIMACK), [], "no ack to a join request")
        yield self.failsWith(ErrorCode.ERR_AUTH, carol.business(Business.PULLROOM, node=gid, node2=bob.uid))
        approved = yield alice.business(Business.PULLROOM, node=gid, node2=bob.uid)
        self.assertEqual((approved.n, approved.n2), (gid, bob.uid))
        # What webtim does next with the ack's n works.
        yield alice.business(Business.ROOMUSERS, node=approved.n, reply=nodesReply)
        passed = (yield bob.next(notice(Business.PASSROOM))).body
        self.assertEqual(passed.roomTid.node, gid)
        carol.send(TimType.TIMBUSINESS, TimReq(rtype=Business.ADDROOM, node=gid))
        yield alice.next(notice(Business.ADDROOM))
        yield alice.business(Business.NOPASSROOM, node=gid, node2=carol.uid)
        yield carol.next(notice(Business.NOPASSROOM))
        yield self.failsWith(ErrorCode.ERR_EXPIREOP, alice.business(Business.NOPASSROOM, node=gid, node2=carol.uid))
        members = yield alice.business(Business.ROOMUSERS, node=gid, reply=nodesReply)
        self.assertEqual(sorted(members.nodelist), sorted([alice.uid, bob.uid]))

    @inlineCallbacks
    def test_joinRequestAck(self):
        """
        With C{join_request_ack} (extension), the requester gets an ack with
        n2 "pending".
        """
        node = yield self.node(groups={"join_request_ack": True})
        alice = yield self.user(node)
        bob = yield self.user(node)
        gid = yield self.create(alice, GroupType.PRIVATE)
        ack = yield bob.business(Business.ADDROOM, node=gid, reqStr="let me in")
        self.assertEqual((ack.n, ack.n2), (gid, "pending"))

    @inlineCallbacks
    def test_foundedLimit(self):
        """
        A user founds at most max_created_per_user groups at a time.
        """
        node = yield self.node(groups={"max_created_per_user": 2})
        alice = yield self.user(node)
        first = yield self.create(alice)
        yield self.create(alice)
        yield self.failsWith(ErrorCode.ERR_OVERENTRY, alice.business(Business.NEWROOM, node="third", reqInt=2))
        yield alice.business(Business.CANCELROOM, node=first)
        yield self.create(alice)

    @inlineCallbacks
    def test_pullingIn(self):
        """
        In an open group a member may pull someone in (bnType 12 to them);
        a non-member may not (tim let anyone).
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        gid = yield self.create(alice)
        yield self.failsWith(ErrorCode.ERR_AUTH, bob.business(Business.PULLROOM, node=gid, node2=carol.uid))
        yield alice.business(Business.PULLROOM, node=gid, node2=bob.uid)
        pulled = (yield bob.next(notice(Business.PULLROOM))).body
        self.assertEqual((pulled.fromTid.node, pulled.roomTid.node), (alice.uid, gid))
        yield bob.business(Business.PULLROOM, node=gid, node2=carol.uid)
        yield self.failsWith(ErrorCode.ERR_HASEXIST, bob.business(Business.PULLROOM, node=gid, node2=carol.uid))
        yield self.failsWith(ErrorCode.ERR_ACCOUNT, bob.business(Business.PULLROOM, node=gid, node2="NoSuchUser"))

    @inlineCallbacks
    def test_kickAndLeave(self):
        """
        Managers kick members, only the founder kicks managers; kicked users
        get bnType 13; members leave (members see bnType 111), the founder
        cannot.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        dave = yield self.user(node)
        gid = yield self.create(alice)
        for client in (bob, carol, dave):
            yield client.business(Business.ADDROOM, node=gid)
        yield alice.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(managers=[bob.uid, carol.uid])})
        yield self.failsWith(ErrorCode.ERR_AUTH, bob.business(Business.KICKROOM, node=gid, node2=carol.uid))
        yield self.failsWith(ErrorCode.ERR_AUTH, dave.business(Business.KICKROOM, node=gid, node2=carol.uid))
        yield self.failsWith(ErrorCode.ERR_AUTH, bob.business(Business.KICKROOM, node=gid, node2=bob.uid))
        ack = yield bob.business(Business.KICKROOM, node=gid, node2=dave.uid)
        self.assertEqual((ack.t, ack.n, ack.n2), (Business.KICKROOM, gid, dave.uid))
        yield dave.next(notice(Business.KICKROOM))
        yield alice.business(Business.KICKROOM, node=gid, node2=carol.uid)
        yield self.failsWith(ErrorCode.ERR_AUTH, alice.business(Business.LEAVEROOM, node=gid))
        yield bob.business(Business.LEAVEROOM, node=gid)
        left = yield alice.next(lambda i: notice(MEMBERLEFT)(i) and i.body.fromTid.node == bob.uid)
        self.assertEqual(left.body.roomTid.node, gid)
        members = yield alice.business(Business.ROOMUSERS, node=gid, reply=nodesReply)
        self.assertEqual(members.nodelist, [alice.uid])

    @inlineCallbacks
    def test_blocks(self):
        """
        A user who blocks a group leaves and cannot be pulled in; a member
        the group blocks is removed and cannot return; kicking never lifts
        a user's own block; lists show both, the second to staff only.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        gid = yield self.create(alice)
        yield bob.business(Business.ADDROOM, node=gid)
        yield carol.business(Business.ADDROOM, node=gid)
        yield bob.business(Business.BLOCKROOM, node=gid)
        mine = yield bob.business(Business.BLOCKROOMLIST, reply=nodesReply)
        self.assertEqual(mine.nodelist, [gid])
        yield self.failsWith(ErrorCode.ERR_PARAMS, alice.business(Business.KICKROOM, node=gid, node2=bob.uid))
        yield self.failsWith(ErrorCode.ERR_BLOCK, alice.business(Business.PULLROOM, node=gid, node2=bob.uid))
        yield self.failsWith(ErrorCode.ERR_BLOCK, bob.business(Business.ADDROOM, node=gid))
        yield alice.business(Business.BLOCKROOMMEMBER, node=gid, node2=carol.uid)
        yield self.failsWith(ErrorCode.ERR_BLOCK, carol.business(Business.ADDROOM, node=gid))
        blocked = yield alice.business(Business.BLOCKROOMMEMBERLIST, node=gid, reply=nodesReply)
        self.assertEqual((blocked.nodelist, blocked.node), ([carol.uid], gid))
        dave = yield self.user(node)
        yield dave.business(Business.ADDROOM, node=gid)
        yield self.failsWith(ErrorCode.ERR_AUTH, dave.business(Business.BLOCKROOMMEMBERLIST, node=gid))

    @inlineCallbacks
    def test_dissolveWithMembers(self):
        """
        The founder dissolves a group that still has members; they are told
        (bnType 17); the group then refuses messages and joins with 4108.
        """
        node = yield self.node()
        alice = yield self.user(node)
        bob = yield self.user(node)
        gid = yield self.create(alice)
        yield bob.business(Business.ADDROOM, node=gid)
        yield self.failsWith(ErrorCode.ERR_AUTH, bob.business(Business.CANCELROOM, node=gid))
        ack = yield alice.business(Business.CANCELROOM, node=gid)
        self.assertEqual(ack.t, Business.CANCELROOM)
        told = (yield bob.next(notice(Business.CANCELROOM))).body
        self.assertEqual(told.roomTid.node, gid)
        self.say(bob, gid, "anyone?")
        self.assertEqual((yield bob.next(refused(TimType.TIMMESSAGE))).body.error.code, ErrorCode.ERR_CANCEL)
        yield self.failsWith(ErrorCode.ERR_CANCEL, bob.business(Business.ADDROOM, node=gid))
        self.assertEqual((yield bob.business(Business.USERROOM, reply=nodesReply)).nodelist or [], [])

    @inlineCallbacks
    def test_messages(self):
        """
        Members get group messages in one order with the ack bit; the sender
        its echo; non-members and forbidden odTypes are refused; streams go
        to online members only; history is for members.
        """
        node = yield self.node(groups={"member_notices": False})
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        stranger = yield self.user(node)
        gid = yield self.create(alice)
        yield bob.business(Business.ADDROOM, node=gid)
        yield carol.business(Business.ADDROOM, node=gid)
        for i in range(5):
            self.say(alice if i % 2 else bob, gid, f"g{i}")
        orders = []
        for client in (alice, bob, carol):
            got = []
            for _ in range(5):
                got.append((yield client.next(groupMessage)).body)
            # Two senders on two connections: the server's order is the
            # order of arrival, and everyone sees that same order.
            self.assertEqual(sorted(m.dataString for m in got), [f"g{i}" for i in range(5)])
            self.assertEqual([m.seq for m in got], [1, 2, 3, 4, 5])
            self.assertTrue(all(m.roomTid.node == gid for m in got))
            orders.append([m.dataString for m in got])
        self.assertEqual(orders[0], orders[1])
        self.assertEqual(orders[0], orders[2])
        self.say(stranger, gid, "let me talk")
        self.assertEqual((yield stranger.next(refused(90))).body.error.code, ErrorCode.ERR_AUTH)
        for od in (3, 4, 40):
            self.say(alice, gid, "no", odType=od)
            self.assertEqual((yield alice.next(refused(90))).body.error.code, ErrorCode.ERR_PARAMS, od)
        self.say(alice, gid, "live frame", odType=5)
        stream = yield bob.next(groupMessage)
        self.assertEqual((stream.body.odType, stream.ackId), (5, None))
        history = yield carol.history(gid, rtype=2)
        self.assertEqual([m.dataString for m in history], list(reversed(orders[0])))
        failure = yield self.assertFailure(stranger.history(gid, rtype=2), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)

    @inlineCallbacks
    def test_offlineByReference(self):
        """
        A member offline while the group talks gets every message in order
        when it comes back, from the group's history: no inbox copies.
        """
        node = yield self.node(groups={"member_notices": False}, messages={"offline_batch": 2})
        alice = yield self.user(node)
        bob = yield self.user(node)
        gid = yield self.create(alice)
        yield bob.business(Business.ADDROOM, node=gid)
        yield bob.disconnect()
        for i in range(5):
            self.say(alice, gid, f"while away {i}")
            yield alice.next(groupMessage)
        self.assertEqual((yield node.store.countInbox(bob.uid)), 0)
        again = yield self.user(node, name=bob.loginName, registerFirst=False)
        offline = yield again.offlineMessages()
        self.assertEqual([m.dataString for m in offline], [f"while away {i}" for i in range(5)])
        self.assertTrue(all(m.isOffline for m in offline))
        # Its acks of those went before the ping: across nodes, a node that
        # sees a gap before "live again" repairs only what is unacknowledged.
        yield again.ping()
        self.say(alice, gid, "live again")
        # At least once: across nodes a gap repair may push an older one
        # again first; the client keeps one per seq.
        live = yield again.next(lambda i: groupMessage(i) and i.body.dataString == "live again")
        self.assertEqual(live.body.seq, 6)
        yield again.ping()  # its ack went before the ping
        yield node.fanout.flush()
        self.assertEqual((yield node.store.cursorsOf(bob.uid))[gid], 6)
        yield again.disconnect()
        back = yield self.user(node, name=bob.loginName, registerFirst=False)
        self.assertEqual((yield back.offlineMessages()), [])

    @inlineCallbacks
    def test_recall(self):
        """
        The sender recalls its message; members get the notice with the
        message's mid; the store keeps a tombstone.  Managers may recall
        others' messages; members may not.
        """
        node = yield self.node(groups={"member_notices": False})
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        gid = yield self.create(alice)
        yield bob.business(Business.ADDROOM, node=gid)
        yield carol.business(Business.ADDROOM, node=gid)
        self.say(bob, gid, "regret")
        sent = (yield bob.next(groupMessage)).body
        yield carol.next(groupMessage)
        self.say(carol, gid, None, odType=2, mid=sent.mid)
        self.assertEqual((yield carol.next(refused(90))).body.error.code, ErrorCode.ERR_AUTH)
        self.say(bob, gid, None, odType=2, mid=sent.mid)
        recall = (yield carol.next(groupMessage)).body
        self.assertEqual((recall.odType, recall.mid, recall.fromTid.node), (2, sent.mid, bob.uid))
        row = yield node.store.getMessage(groupConversation(gid), sent.mid)
        self.assertEqual(row.state, MESSAGE_RECALLED)
        self.assertIsNone(node.vault.openMessage(row.conv, row.seq, row.stanza).dataString)
        self.say(carol, gid, "rude")
        rude = (yield carol.next(groupMessage)).body
        self.say(alice, gid, None, odType=2, mid=rude.mid)
        self.assertEqual((yield carol.next(groupMessage)).body.mid, rude.mid)

    @inlineCallbacks
    def test_privateMessageInGroup(self):
        """
        Two members who are not friends may message each other inside a
        group (msType 2, toTid and roomTid); a non-member may not be reached.
        """
        node = yield self.node(groups={"member_notices": False})
        alice = yield self.user(node)
        bob = yield self.user(node)
        stranger = yield self.user(node)
        gid = yield self.create(alice)
        yield bob.business(Business.ADDROOM, node=gid)
        alice.sendMessage(bob.uid, "psst", roomTid=Tid(node=gid))
        got = (yield bob.next(TimType.TIMMESSAGE)).body
        self.assertEqual((got.dataString, got.msType, got.roomTid.node), ("psst", 2, gid))
        alice.sendMessage(stranger.uid, "psst", roomTid=Tid(node=gid))
        self.assertEqual((yield alice.next(refused(90))).body.error.code, ErrorCode.ERR_AUTH)

    @inlineCallbacks
    def test_moderationExtensions(self):
        """
        Transfer of ownership (102), member cap (103), muting a member
        (104) and everyone (105).
        """
        node = yield self.node(groups={"member_notices": False})
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        dave = yield self.user(node)
        gid = yield self.create(alice)
        yield bob.business(Business.ADDROOM, node=gid)
        yield carol.business(Business.ADDROOM, node=gid)
        yield alice.business(SETROOMCAP, node=gid, reqInt=3)
        yield self.failsWith(ErrorCode.ERR_OVERENTRY, dave.business(Business.ADDROOM, node=gid))
        yield self.failsWith(ErrorCode.ERR_PARAMS, alice.business(SETROOMCAP, node=gid, reqInt=2))
        yield alice.business(MUTEMEMBER, node=gid, node2=carol.uid, reqInt=-1)
        self.say(carol, gid, "hello?")
        self.assertEqual((yield carol.next(refused(90))).body.error.code, ErrorCode.ERR_AUTH)
        yield alice.business(MUTEMEMBER, node=gid, node2=carol.uid, reqInt=0)
        self.say(carol, gid, "thanks")
        yield carol.next(groupMessage)
        yield alice.business(MUTEALL, node=gid, reqInt=1)
        self.say(bob, gid, "hi")
        self.assertEqual((yield bob.next(refused(90))).body.error.code, ErrorCode.ERR_AUTH)
        self.say(alice, gid, "only me")
        yield alice.next(lambda i: groupMessage(i) and i.body.dataString == "only me")
        yield self.failsWith(ErrorCode.ERR_AUTH, bob.business(TRANSFERROOM, node=gid, node2=carol.uid))
        yield alice.business(TRANSFERROOM, node=gid, node2=bob.uid)
        profile = (yield dave.nodes(NodeInfo.ROOMINFO, nodelist=[gid])).roommap[gid]
        self.assertEqual((profile.founder, profile.managers), (bob.uid, [alice.uid]))
        yield alice.business(Business.LEAVEROOM, node=gid)

    @inlineCallbacks
    def test_roomProfiles(self):
        """
        Anyone reads a room profile; founder and managers change it; only
        the founder appoints managers, who must be members.
        """
        node = yield self.node(groups={"member_notices": False})
        alice = yield self.user(node)
        bob = yield self.user(node)
        carol = yield self.user(node)
        gid = yield self.create(alice, GroupType.PRIVATE, topic="first")
        yield alice.business(Business.PULLROOM, node=gid, node2=bob.uid)
        profile = (yield carol.nodes(NodeInfo.ROOMINFO, nodelist=[gid, "NoSuchGroup"])).roommap
        self.assertEqual(list(profile), [gid])
        self.assertEqual((profile[gid].topic, profile[gid].gtype, profile[gid].founder), ("first", 1, alice.uid))
        yield self.failsWith(ErrorCode.ERR_AUTH, bob.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(topic="x")}))
        yield self.failsWith(
            ErrorCode.ERR_PARAMS, alice.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(managers=[carol.uid])})
        )
        ack = yield alice.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(managers=[bob.uid], label="l")})
        self.assertEqual((ack.timType, ack.t), (TimType.TIMNODES, NodeInfo.MODIFYROOM))
        yield bob.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(topic="second", extend={"k": "v"})})
        yield self.failsWith(
            ErrorCode.ERR_AUTH, bob.nodes(NodeInfo.MODIFYROOM, roommap={gid: TimRoomBean(managers=[alice.uid])})
        )
        profile = (yield carol.nodes(NodeInfo.ROOMINFO, nodelist=[gid])).roommap[gid]
        self.assertEqual(
            (profile.topic, profile.label, profile.extend, profile.managers), ("second", "l", {"k": "v"}, [bob.uid])
        )
        group = yield node.store.getGroup(gid)
        self.assertNotIn(b"second", group.profile)


class WebSocketCompactGroupTests(GroupTestsMixin, NodeTestCase):
    encoding = Encoding.COMPACT


class TCPJSONSQLiteGroupTests(GroupTestsMixin, NodeTestCase):
    encoding = Encoding.JSON
    transport = "tcp"
    backend = "sqlite"


class GroupFanoutTests(NodeTestCase):
    """
    Fan-out to 1,000 online members over real sockets.
    """

    timeout = 240

    @inlineCallbacks
    def members(self, node, count, encoding):
        names = [f"m{i}-{id(self)}" for i in range(count)]
        batch = 100
        clients = []
        for start in range(0, count, batch):
            chunk = names[start : start + batch]
            yield gatherResults([register(reactor, httpURL(node), name, "secret") for name in chunk])
            connected = yield gatherResults([connect(reactor, wsURL(node), encoding) for _ in chunk])
            yield gatherResults([c.login(name, "secret") for c, name in zip(connected, chunk, strict=True)])
            for client, name in zip(connected, chunk, strict=True):
                client.loginName = name
            clients.extend(connected)
        for client in clients:
            self.addCleanup(lambda c=client: c.disconnect() if not c.closed.called else None)
        return clients

    @inlineCallbacks
    def test_thousandOnlineMembers(self):
        """
        Every one of 1,000 online members (fewer under a low descriptor
        limit) gets every message in the same
        order, while one member that stopped reading is dropped without
        delaying the others, and later gets its messages from the group.
        """
        node = yield self.node(
            groups={"member_notices": False},
            client={"max_output_bytes": 64 * 1024},
            messages={"offline_batch": 100},
        )
        founder = yield self.user(node)
        gid = (yield founder.business(Business.NEWROOM, node="big", reqInt=2)).n
        # Each member holds two descriptors in this process (client and
        # node side); under a low `ulimit -n` the test runs with fewer
        # members and warns.
        clients = yield self.members(node, fitDescriptors(1000, perUnit=2), Encoding.COMPACT)
        state = yield node.directory.get(gid)
        for client in clients:
            yield node.directory.putMember(state, Member(client.uid, ROLE_MEMBER, 0.0))
        stalled, healthy = clients[-1], clients[:-1]
        # It stops reading, on a network with small socket buffers, so the
        # node notices soon.
        stalled._transport.transport.pauseProducing()
        stalled._transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        (session,) = node.sessions.sessionsOf(stalled.uid)
        session.sink.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        texts = [f"fan{i}-" + "x" * 4000 for i in range(50)]
        received = {client: [] for client in healthy}
        for text in texts:
            self.say(founder, gid, text)
            # Each message reaches all the others while the stalled one
            # holds nothing up.
            got = yield gatherResults([c.next(groupMessage, timeout=60) for c in healthy])
            for client, incoming in zip(healthy, got, strict=True):
                received[client].append(incoming.body.dataString)
        for client in healthy:
            self.assertEqual(received[client], texts)
        yield waitUntil(lambda: not node.sessions.isOnline(stalled.uid))
        # Reading again, it finds its connection gone.
        stalled._transport.transport.resumeProducing()
        yield within(stalled.closed, 30)
        again = yield connect(reactor, wsURL(node))
        self.addCleanup(again.disconnect)
        yield again.login(stalled.loginName, "secret")
        offline = yield again.offlineMessages(timeout=60)
        self.assertEqual([m.dataString for m in offline], texts)

    def say(self, client, gid, text):
        return client.sendMessage(None, text, msType=3, roomTid=Tid(node=gid))
