# -*- test-case-name: timtx.test.test_connection -*-
"""
The state of one client connection, without I/O: frames in, events out.

Theory of operation: a connection starts in L{AWAITING_AUTH}, where only
TIMAUTH and TIMPING are accepted; anything else is a fatal
L{TimProtocolError}.  After L{TimConnection.loggedIn} it is L{AUTHENTICATED}
and every frame type passes to the caller, which knows the handlers.  Each
frame the caller finds bad is reported with L{TimConnection.badFrame}; once
C{maxBadFrames} is reached the connection should be closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import ClientFrame, parse_client_frame


class ConnectionState(Enum):
    AWAITING_AUTH = "awaiting-auth"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


AWAITING_AUTH = ConnectionState.AWAITING_AUTH
AUTHENTICATED = ConnectionState.AUTHENTICATED
CLOSED = ConnectionState.CLOSED


@dataclass(frozen=True, slots=True)
class PingReceived:
    """
    A TIMPING; the answer is an empty TIMPING.
    """

    encoding: Encoding


@dataclass(frozen=True, slots=True)
class AckReceived:
    """
    The client acknowledged the server frame with this id.
    """

    ackId: int


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """
    Any other frame, for a handler.
    """

    frame: ClientFrame


Event = PingReceived | AckReceived | RequestReceived


class TimConnection:
    """
    @ivar maxBadFrames: bad frames tolerated before the connection should be
        closed.
    @ivar encoding: the encoding of frames pushed to this connection; set at
        login from the TIMAUTH frame's flag.
    """

    def __init__(self, maxBadFrames: int):
        self.maxBadFrames = maxBadFrames
        self.state = AWAITING_AUTH
        self.badFrames = 0
        self.encoding: Encoding | None = None

    def receive(self, data: bytes) -> Event:
        """
        Classify one whole frame.

        @raise TimProtocolError: C{ERR_FORMAT} for an empty frame or a short
            ack; a fatal C{ERR_AUTH} for a frame other than TIMAUTH or
            TIMPING before login.
        """
        if self.state is CLOSED:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "connection closed", fatal=True)
        frame = parse_client_frame(data)
        timType = frame.timType
        if timType == TimType.TIMPING:
            return PingReceived(frame.encoding)
        if self.state is AWAITING_AUTH and timType != TimType.TIMAUTH:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "log in first", fatal=True)
        if timType == TimType.TIMACK:
            return AckReceived(frame.ackId())
        return RequestReceived(frame)

    def loggedIn(self, encoding: Encoding) -> None:
        self.state = AUTHENTICATED
        self.encoding = encoding

    def badFrame(self) -> bool:
        """
        Count one bad frame.

        @return: whether the connection should now be closed.
        """
        self.badFrames += 1
        return self.badFrames >= self.maxBadFrames

    def closed(self) -> None:
        self.state = CLOSED

    def replyEncoding(self, frame: ClientFrame | None) -> Encoding:
        """
        The encoding for a reply: the session's once logged in, else the
        request's own.
        """
        if self.encoding is not None:
            return self.encoding
        return frame.encoding if frame is not None else Encoding.COMPACT
