"""
Tests for L{timtx.delivery.sessions} and L{timtx.delivery.registry}: device limits and acks.
"""

from twisted.trial.unittest import SynchronousTestCase

from timtx.config import DevicesConfig
from timtx.delivery.registry import SessionRegistry
from timtx.delivery.sessions import AckIds, Session
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import parse_server_frame
from timtx.protocols.structs import TimAck


class FakeSink:
    def __init__(self):
        self.frames = []
        self.closed = None

    def writeFrame(self, frame):
        self.frames.append(parse_server_frame(frame))

    def writeFrameParts(self, header, payload):
        self.writeFrame(header + payload)

    def closeConnection(self, reason):
        self.closed = reason


def makeSession(uid="u", termtyp=0, t=0.0):
    return Session(FakeSink(), uid, "", None, termtyp, Encoding.COMPACT, t, AckIds())


class SessionRegistryTests(SynchronousTestCase):
    def test_exactLimits(self):
        """
        C{type_limit = 2} admits exactly two sessions of a type; C{limit = 3}
        exactly three in all (tim 2.0 lets one more through).
        """
        registry = SessionRegistry(DevicesConfig(limit=3, type_limit=2, overflow="reject"))
        registry.admit(makeSession(termtyp=1))
        registry.admit(makeSession(termtyp=1))
        error = self.assertRaises(TimProtocolError, registry.admit, makeSession(termtyp=1))
        self.assertEqual(error.code, ErrorCode.ERR_OVERENTRY)
        registry.admit(makeSession(termtyp=2))
        self.assertRaises(TimProtocolError, registry.admit, makeSession(termtyp=3))
        self.assertEqual(len(registry), 3)
        registry.admit(makeSession(uid="other", termtyp=1))

    def test_kickOldest(self):
        """
        Over a limit, the oldest session concerned gets TIMLOGOUT and is
        closed.
        """
        registry = SessionRegistry(DevicesConfig(limit=2, type_limit=1, overflow="kick-oldest"))
        phone1 = makeSession(termtyp=1, t=1)
        web = makeSession(termtyp=2, t=2)
        registry.admit(phone1)
        registry.admit(web)
        phone2 = makeSession(termtyp=1, t=3)
        self.assertEqual(registry.admit(phone2), [phone1])
        self.assertEqual(phone1.sink.closed, "logged out by a newer session")
        frame = phone1.sink.frames[-1]
        self.assertEqual(frame.timType, TimType.TIMACK)
        self.assertEqual(codec.decode_compact(TimAck, frame.payload), TimAck(ok=True, timType=TimType.TIMLOGOUT))
        desktop = makeSession(termtyp=3, t=4)
        self.assertEqual(registry.admit(desktop), [web])
        self.assertEqual(registry.sessionsOf("u"), [phone2, desktop])

    def test_unlimited(self):
        registry = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        for _ in range(50):
            registry.admit(makeSession())
        self.assertEqual(len(registry.sessionsOf("u")), 50)

    def test_firstAndLast(self):
        registry = SessionRegistry(DevicesConfig(limit=0, type_limit=0))
        events = []
        registry.onFirstSession.append(lambda session: events.append(("first", session.uid)))
        registry.onLastSession.append(lambda session: events.append(("last", session.uid)))
        a, b = makeSession(), makeSession()
        registry.admit(a)
        registry.admit(b)
        registry.remove(a)
        registry.remove(a)
        registry.remove(b)
        self.assertEqual(events, [("first", "u"), ("last", "u")])
        self.assertFalse(registry.isOnline("u"))


class SessionAckTests(SynchronousTestCase):
    def test_ackRunsCallbackOnce(self):
        session = makeSession()
        acked = []
        ackId = session.send(TimType.TIMMESSAGE, None, onAck=lambda s: acked.append(s))
        frame = session.sink.frames[-1]
        self.assertEqual(frame.ackId, ackId)
        session.ackReceived(ackId)
        session.ackReceived(ackId)
        session.ackReceived(12345)
        self.assertEqual(acked, [session])
        self.assertEqual(session.unacknowledged, 0)

    def test_ackIdsWrap(self):
        ids = AckIds()
        ids._last = 0xFFFFFFFF - 1
        self.assertEqual([ids.next(), ids.next()], [0xFFFFFFFF, 1])
