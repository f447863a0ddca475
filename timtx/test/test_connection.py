"""
Tests for L{timtx.protocols.connection}, the sans-IO connection state.
"""

from twisted.trial.unittest import SynchronousTestCase

from timtx.protocols.codec import Encoding
from timtx.protocols.connection import (
    AUTHENTICATED,
    AWAITING_AUTH,
    CLOSED,
    AckReceived,
    PingReceived,
    RequestReceived,
    TimConnection,
)
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError


class TimConnectionTests(SynchronousTestCase):
    def test_beforeLogin(self):
        """
        Before login only TIMAUTH and TIMPING pass; anything else is a fatal
        ERR_AUTH.
        """
        connection = TimConnection(3)
        self.assertEqual(connection.state, AWAITING_AUTH)
        self.assertEqual(connection.receive(b"\x8d"), PingReceived(Encoding.JSON))
        event = connection.receive(b"\x90{}")
        self.assertIsInstance(event, RequestReceived)
        self.assertEqual(event.frame.timType, 16)
        for data in (b"\x5a\x00", b"\x0c\x00\x00\x00\x01", b"\x29\x00"):
            error = self.assertRaises(TimProtocolError, connection.receive, data)
            self.assertEqual((error.code, error.fatal), (ErrorCode.ERR_AUTH, True))

    def test_afterLogin(self):
        """
        After login acks are recognised and every other frame is a request;
        replies use the login encoding.
        """
        connection = TimConnection(3)
        connection.loggedIn(Encoding.JSON)
        self.assertEqual(connection.state, AUTHENTICATED)
        self.assertEqual(connection.receive(b"\x0c\x00\x00\x01\x00"), AckReceived(256))
        self.assertEqual(connection.receive(b"\x7f").frame.timType, 127)
        self.assertEqual(connection.replyEncoding(connection.receive(b"\x5a").frame), Encoding.JSON)

    def test_badFrames(self):
        """
        The connection should close at the configured count of bad frames.
        """
        connection = TimConnection(2)
        self.assertFalse(connection.badFrame())
        self.assertTrue(connection.badFrame())

    def test_closed(self):
        connection = TimConnection(2)
        connection.closed()
        self.assertEqual(connection.state, CLOSED)
        self.assertRaises(TimProtocolError, connection.receive, b"\x0d")
