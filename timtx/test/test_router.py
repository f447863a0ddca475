# -*- test-case-name: timtx.test.test_router -*-
"""
Tests for L{timtx.delivery.router}: the single-node router sends to this
node's sessions, through the same flow control for 1:1 and group pushes.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from timtx.config import DevicesConfig, MessagesConfig
from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.delivery.fanout import GroupFanout
from timtx.delivery.inbox import InboxDelivery
from timtx.delivery.registry import SessionRegistry
from timtx.delivery.router import LocalRouter
from timtx.delivery.sessions import AckIds, Session
from timtx.interfaces import IFrameSink, IRouter
from timtx.persistence.memory import MemoryStore
from timtx.persistence.worker import WorkerStopped
from timtx.protocols.codec import Encoding, decode_compact
from timtx.protocols.constants import TimType
from timtx.protocols.frames import parse_server_frame
from timtx.protocols.structs import TimMessage, TimMessageList


@implementer(IFrameSink)
class _Sink:
    frameKind = "raw"
    congested = False
    backlog = 0
    peerAddress = "127.0.0.1"

    def __init__(self):
        self.frames = []

    def writeFrame(self, frame):
        self.frames.append(parse_server_frame(frame))

    def writeFrameParts(self, header, payload):
        self.writeFrame(header + payload)

    def prepareFrame(self, frame):
        return frame

    def writePrepared(self, prepared, size):
        self.writeFrame(prepared)

    def closeConnection(self, reason):
        pass


class LocalRouterTests(SynchronousTestCase):
    def setUp(self):
        clock = Clock()
        store = self.store = MemoryStore()
        vault = self.vault = StanzaVault(NodeKeys(b"r" * 32))
        self.ackIds = AckIds()
        self.sessions = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        self.inbox = InboxDelivery(
            MessagesConfig(max_unacked=2),
            store=store,
            vault=vault,
            sessions=self.sessions,
            ackIds=self.ackIds,
            clock=clock,
        )
        fanout = GroupFanout(
            store=store,
            vault=vault,
            sessions=self.sessions,
            flow=self.inbox.flow,
            ackIds=self.ackIds,
            groupsOf=lambda uid: None,
        )
        self.router = LocalRouter(self.sessions, self.inbox, fanout)

    def live(self, uid):
        sink = _Sink()
        session = Session(sink, uid, "", None, len(self.sessions), Encoding.COMPACT, 0.0, self.ackIds)
        self.sessions.admit(session)
        self.inbox.flow.start(session).live = True
        return session, sink

    def test_interface(self):
        self.assertTrue(verifyObject(IRouter, self.router))

    def test_sendAndOnline(self):
        """
        L{LocalRouter.send} reaches every session of a user, without asking
        for acks; L{LocalRouter.isOnline} knows who has a session.
        """
        _, one = self.live("ann")
        _, two = self.live("ann")
        self.router.send("ann", TimType.TIMMESSAGE, Encoded(TimMessage(id=1)))
        self.assertEqual([(f.timType, f.ackId) for f in one.frames + two.frames], [(TimType.TIMMESSAGE, None)] * 2)
        self.assertTrue(self.router.isOnline("ann"))
        self.assertFalse(self.router.isOnline("bob"))

    def test_oneFlowForBoth(self):
        """
        1:1 pushes and group pushes count in the same window: a session with
        C{max_unacked} of them unacknowledged gets no more of either.
        """
        session, sink = self.live("ann")
        self.router.push("ann", 1, Encoded(TimMessage(id=1)))
        self.router.pushToGroup("g", ["ann", "bob"], Encoded(TimMessage(id=2, seq=1)), None)
        self.router.push("ann", 2, Encoded(TimMessage(id=3)))
        self.assertEqual(self.router.pushToGroup("g", ["ann"], Encoded(TimMessage(id=4, seq=2)), None), 0)
        self.assertEqual(len(sink.frames), 2)
        state = self.inbox.flow.state(session)
        self.assertEqual((state.unacked, state.backlogged), (2, True))
        session.ackReceived(sink.frames[1].ackId)
        self.assertEqual(state.unacked, 1)

    def stored(self, uid, text):
        """
        Put a message for C{uid} in its inbox; return it and its qid.
        """
        message = TimMessage(id=len(text), dataString=text)
        [qid] = self.successResultOf(self.store.addInbox([(uid, self.vault.sealFor(uid, message))], 0.0))
        return message, qid

    def texts(self, frame):
        """
        The texts of a pushed message or an offline list.
        """
        if frame.timType == TimType.TIMOFFLINEMSG:
            return [m.dataString for m in decode_compact(TimMessageList, frame.payload).messageList]
        return [decode_compact(TimMessage, frame.payload).dataString]

    def test_heldUntilReread(self):
        """
        A session held (its node registers it again with the user's owner,
        which did not know of it) gets no pushes, and a drain meanwhile does
        not make it live; once reread, what waited in the inbox comes first,
        in an offline list, then TIMOFFLINEMSGEND, and it is live again.
        Other users' sessions are not held.
        """
        session, sink = self.live("ann")
        other, otherSink = self.live("bob")
        held = self.inbox.hold("ann")
        self.assertEqual(held, [session])
        self.stored("ann", "missed")
        self.inbox.drain(session)
        [offline] = sink.frames
        self.assertEqual(self.texts(offline), ["missed"])
        session.ackReceived(offline.ackId)
        self.assertEqual(sink.frames[-1].timType, TimType.TIMOFFLINEMSGEND)
        self.assertFalse(self.inbox.flow.state(session).live)
        del sink.frames[:]

        message, qid = self.stored("ann", "while held")
        self.router.push("ann", qid, Encoded(message))
        self.router.push("bob", 99, Encoded(TimMessage(id=9, dataString="to bob")))
        self.assertEqual((sink.frames, len(otherSink.frames)), ([], 1))
        self.inbox.reread(held)
        self.assertEqual(self.texts(sink.frames[0]), ["while held"])
        self.assertFalse(self.inbox.flow.state(session).live)
        session.ackReceived(sink.frames[0].ackId)
        self.assertEqual(sink.frames[-1].timType, TimType.TIMOFFLINEMSGEND)
        self.assertTrue(self.inbox.flow.state(session).live)
        message, qid = self.stored("ann", "live")
        self.router.push("ann", qid, Encoded(message))
        self.assertEqual(self.texts(sink.frames[-1]), ["live"])
        self.assertEqual(sink.frames[-1].timType, TimType.TIMMESSAGE)

    def test_rereadDuringDrain(self):
        """
        A held session reread while a read of its inbox is under way goes
        live only when that read has found all that waits, what was stored
        during it included.
        """
        session, sink = self.live("ann")
        held = self.inbox.hold("ann")
        self.stored("ann", "first")
        self.inbox.drain(session)
        [offline] = sink.frames
        self.assertEqual(self.texts(offline), ["first"])
        self.stored("ann", "second")
        self.inbox.reread(held)
        session.ackReceived(offline.ackId)
        self.assertEqual(self.texts(sink.frames[-1]), ["second"])
        self.assertFalse(self.inbox.flow.state(session).live)
        session.ackReceived(sink.frames[-1].ackId)
        self.assertEqual(sink.frames[-1].timType, TimType.TIMOFFLINEMSGEND)
        self.assertTrue(self.inbox.flow.state(session).live)


class _StoppingStore(MemoryStore):
    """
    A store whose inbox reads wait until the test answers them.
    """

    def __init__(self):
        super().__init__()
        self.reads = []

    def readInbox(self, uid, after, limit):
        d = Deferred()
        self.reads.append(d)
        return d


class InboxReadAfterSessionTests(SynchronousTestCase):
    def test_storeStopsUnderRead(self):
        """
        A read of what a session missed that fails after the session ended
        (the node stopping closed its store under the read, as SIGTERM
        does) is no error: nothing is logged as one, and what the read
        would have delivered stays in the inbox.
        """
        store = _StoppingStore()
        ackIds = AckIds()
        sessions = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        inbox = InboxDelivery(
            MessagesConfig(),
            store=store,
            vault=StanzaVault(NodeKeys(b"r" * 32)),
            sessions=sessions,
            ackIds=ackIds,
            clock=Clock(),
        )
        session = Session(_Sink(), "ann", "", None, 0, Encoding.COMPACT, 0.0, ackIds)
        sessions.admit(session)
        inbox.flow.start(session)
        inbox.drain(session)
        self.assertEqual(len(store.reads), 1)
        session.connectionLost()
        inbox.sessionEnded(session)
        store.reads[0].errback(WorkerStopped())
        self.assertEqual(self.flushLoggedErrors(), [])


class _HeldReads(MemoryStore):
    """
    A memory store whose inbox reads wait until L{release}.
    """

    def __init__(self):
        super().__init__()
        self.reads = []

    def readInbox(self, uid, after, limit):
        d = Deferred()
        self.reads.append((uid, after, limit, d))
        return d

    def release(self):
        reads, self.reads = self.reads, []
        for uid, after, limit, d in reads:
            MemoryStore.readInbox(self, uid, after, limit).chainDeferred(d)


class RecheckTests(SynchronousTestCase):
    """
    L{InboxDelivery.recheck}: another node may not have pushed what it
    stored for a user here.
    """

    live = LocalRouterTests.live
    texts = LocalRouterTests.texts

    def setUp(self):
        LocalRouterTests.setUp(self)
        self.store = self.inbox.store = _HeldReads()

    def test_nothingMissed(self):
        """
        A live session whose inbox holds nothing it was not pushed sees
        nothing of the look: what was pushed meanwhile waited, and goes out
        live after it, in order; entries above the bound are not looked
        for.
        """
        session, sink = self.live("ann")
        message, qid = self.storedNow("ann", "pushed")
        self.router.push("ann", qid, Encoded(message))
        self.assertEqual(self.inbox.recheck("ann", upTo=qid), 1)
        self.storedNow("ann", "above the bound, on its way")
        during, duringQid = self.storedNow("ann", "during")
        self.router.push("ann", duringQid, Encoded(during))
        self.assertEqual(len(sink.frames), 1)
        self.store.release()
        self.assertEqual([self.texts(f) for f in sink.frames], [["pushed"], ["during"]])
        self.assertEqual({f.timType for f in sink.frames}, {TimType.TIMMESSAGE})
        self.assertTrue(self.inbox.flow.state(session).live)

    def test_missed(self):
        """
        An entry it was not pushed has the session drain: it comes in an
        offline list, with what was pushed meanwhile after it, then
        TIMOFFLINEMSGEND, and the session is live again.
        """
        session, sink = self.live("ann")
        self.storedNow("ann", "missed")
        self.inbox.recheck("ann")
        during, duringQid = self.storedNow("ann", "during")
        self.router.push("ann", duringQid, Encoded(during))
        self.store.release()
        self.store.release()
        [offline] = sink.frames
        self.assertEqual(self.texts(offline), ["missed", "during"])
        session.ackReceived(offline.ackId)
        self.store.release()
        self.assertEqual(sink.frames[-1].timType, TimType.TIMOFFLINEMSGEND)
        self.assertTrue(self.inbox.flow.state(session).live)

    def test_askedAgainWhileLooking(self):
        """
        A second look asked for while one is under way raises its bound (and
        reads again if the first finds nothing); a draining session looks
        once more before going live; a held one waits for its reread.
        """
        session, sink = self.live("ann")
        self.inbox.recheck("ann", upTo=0)
        _, qid = self.storedNow("ann", "missed")
        self.inbox.recheck("ann", upTo=qid)
        self.store.release()
        self.assertEqual(sink.frames, [])
        self.store.release()
        self.store.release()
        [offline] = sink.frames
        self.assertEqual(self.texts(offline), ["missed"])
        self.inbox.recheck("ann")
        self.assertTrue(self.inbox.flow.state(session).skipped)

        other, otherSink = self.live("bob")
        held = self.inbox.hold("bob")
        self.inbox.recheck("bob")
        self.assertEqual(self.store.reads, [])
        self.inbox.reread(held)
        self.assertEqual(len(self.store.reads), 1)

    def test_lookLive(self):
        """
        L{InboxDelivery.lookLive}: every user with live sessions looks, a
        chunk at a time; one that missed an entry drains, the others see
        nothing.
        """
        _, annSink = self.live("ann")
        _, bobSink = self.live("bob")
        self.storedNow("bob", "missed")
        self.assertEqual(self.inbox.lookLive(chunk=1, pause=0.1), 2)
        self.assertEqual([uid for uid, _, _, _ in self.store.reads], ["ann"])
        self.store.release()
        self.inbox.clock.advance(0.1)
        self.assertEqual([uid for uid, _, _, _ in self.store.reads], ["bob"])
        self.store.release()
        self.store.release()
        self.assertEqual(annSink.frames, [])
        self.assertEqual([self.texts(f) for f in bobSink.frames], [["missed"]])
        self.inbox.stop()

    def storedNow(self, uid, text):
        message = TimMessage(id=len(text), dataString=text)
        [qid] = self.successResultOf(self.store.addInbox([(uid, self.vault.sealFor(uid, message))], 0.0))
        return message, qid
