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
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.frames import parse_server_frame
from timtx.protocols.structs import TimMessage


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
        store = MemoryStore()
        vault = StanzaVault(NodeKeys(b"r" * 32))
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
