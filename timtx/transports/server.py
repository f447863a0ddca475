# -*- test-case-name: timtx.test.test_login -*-
"""
The half of a client connection that does not depend on the transport.

L{TimServerProtocolMixin} turns frames into work: it answers pings, routes
acks, logs the client in, and runs every other frame through the handler
that L{TimServerProtocolMixin.handlerFor} names.  WebSocket and raw TCP
protocols (L{timtx.transports.websocket}, L{timtx.transports.tcp}) only move
bytes.  Everything a connection needs from the node comes through
L{timtx.interfaces.IClientNode}; it sees its session as an
L{timtx.interfaces.ISession}.

Frames of one connection are handled strictly in arrival order: a frame's
handler starts after the previous handler's L{Deferred} has fired, even when
the work it waits for (a database write) finishes out of order elsewhere.
Pings and acks do not wait in that queue.

Hooks for subclasses (see C{docs/extending.md}):

  - L{handlerFor}: which callable handles a frame type.  Override it to add
    frame types of your own.
  - L{onLogin} and L{onLogout}: a session began or ended.
  - The limits of a connection (L{ConnectionLimits}): class attributes such
    as C{maxFrameBytes}, or L{connectionLimits} for all of them; and what
    happens at a limit: L{frameTooLarge}, L{outputLimitExceeded},
    L{tooManyBadFrames}.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.interfaces import IClientNode, IFrameSink, ISession, Route
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.connection import CLOSED, AckReceived, PingReceived, RequestReceived, TimConnection
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import BadFrame, TimProtocolError
from timtx.protocols.frames import ClientFrame, server_frame
from timtx.protocols.generations import decode_for_session
from timtx.protocols.structs import TimAck, TimAuth, TimError, TimMessage, TimStruct
from timtx.transports.reassembly import BigDataReceiver
from timtx.util.ratelimit import TokenBucket

S = TypeVar("S", bound=TimStruct)
FrameHandler = Callable[[ClientFrame], Any]


def frameEncoding(data: bytes) -> Encoding:
    """
    The encoding a client chose for a frame, by its flag bit.
    """
    return Encoding.JSON if data and data[0] & 0x80 else Encoding.COMPACT


def errorAck(timType: int, error: TimProtocolError, **fields: object) -> TimAck:
    """
    C{TimAck{ok: false, timType, error: {code, info}}} for C{error}.
    """
    return TimAck(ok=False, timType=timType, error=TimError(code=error.code, info=error.text), **fields)


#: Frame types whose payload is a TimMessage with the client's id.
_MESSAGE_TYPES = frozenset((TimType.TIMMESSAGE, TimType.TIMREVOKEMESSAGE, TimType.TIMBURNMESSAGE))


def _messageId(frame: ClientFrame) -> int | None:
    """
    The client's id of the message in C{frame}, if it is one and has one.
    """
    if frame.timType not in _MESSAGE_TYPES:
        return None
    try:
        message: TimMessage = codec.decode(TimMessage, frame.payload, frame.encoding)
    except TimProtocolError:
        return None
    return message.id


@dataclass(frozen=True)
class ConnectionLimits:
    """
    The limits of one client connection (see C{[client]} in
    C{docs/configuration.md} for each).

    @ivar maxFrameBytes: the largest frame; a larger one closes the
        connection (L{TimServerProtocolMixin.frameTooLarge}).
    @ivar maxFrameBytesBeforeLogin: the largest frame before login: what
        TIMAUTH and TIMPING need, so that an unauthenticated client cannot
        make the node buffer much.
    @ivar maxBadFrames: bad frames tolerated before closing.
    @ivar maxQueuedFrames: frames waiting for their handler before the
        connection stops reading.
    @ivar maxOutputBytes: bytes that may wait for a peer that stopped
        reading before the connection is dropped.
    @ivar authTimeout: seconds to log in.
    @ivar idleTimeout: seconds without a frame before a logged-in
        connection is closed; 0 for never.
    @ivar requestRate: frames per second on average; 0 for no limit.
    @ivar requestBurst: frames allowed at once above the rate.
    @ivar maxLoginAttempts: failed logins before closing.
    """

    maxFrameBytes: int
    maxFrameBytesBeforeLogin: int
    maxBadFrames: int
    maxQueuedFrames: int
    maxOutputBytes: int
    authTimeout: float
    idleTimeout: float
    requestRate: float
    requestBurst: int
    maxLoginAttempts: int


@implementer(IFrameSink)
class TimServerProtocolMixin:
    """
    Subclasses provide C{sendBytes} and C{loseTransport}, and a
    C{transport} with C{pauseProducing}/C{resumeProducing}; they call
    L{timConnectionMade}, L{frameReceived} and L{timConnectionLost}.

    Output is bounded: the protocol registers itself as the producer of its
    transport, so it learns when the peer stops reading (the transport's
    buffer is full).  While it is I{congested}, what is written is counted;
    past C{maxOutputBytes} the connection is dropped.  Stream data can look
    at L{congested} and skip a frame instead.

    @ivar node: the L{IClientNode} this connection serves, set by the
        factory.
    @ivar session: the L{ISession} once logged in, else C{None}.
    @ivar limits: the L{ConnectionLimits} of this connection, set when it
        opens.
    """

    logger = Logger()
    node: IClientNode
    transport: Any
    session: Any = None
    limits: ConnectionLimits

    #: Limits of this connection.  C{None} takes the node's C{[client]}
    #: setting; a subclass sets a number to override it for its
    #: connections, as Twisted's C{IntNStringReceiver.MAX_LENGTH}.
    maxFrameBytes: int | None = None
    maxFrameBytesBeforeLogin: int | None = None
    maxBadFrames: int | None = None
    maxQueuedFrames: int | None = None
    maxOutputBytes: int | None = None

    def connectionLimits(self) -> ConnectionLimits:
        """
        The limits of a new connection: each class attribute above that is
        set, else the node's C{[client]} setting.  Override to decide them
        per connection.
        """
        client = self.node.config.client

        def chosen(mine: int | None, default: int) -> int:
            return default if mine is None else mine

        return ConnectionLimits(
            maxFrameBytes=chosen(self.maxFrameBytes, client.max_frame_bytes),
            maxFrameBytesBeforeLogin=min(
                chosen(self.maxFrameBytesBeforeLogin, client.max_frame_bytes_before_login),
                chosen(self.maxFrameBytes, client.max_frame_bytes),
            ),
            maxBadFrames=chosen(self.maxBadFrames, client.max_bad_frames),
            maxQueuedFrames=chosen(self.maxQueuedFrames, client.max_queued_frames),
            maxOutputBytes=chosen(self.maxOutputBytes, client.max_output_bytes),
            authTimeout=client.auth_timeout,
            idleTimeout=client.idle_timeout,
            requestRate=client.request_rate,
            requestBurst=client.request_burst,
            maxLoginAttempts=client.max_login_attempts,
        )

    #: Whether the peer is not reading fast enough: the transport asked its
    #: producer (this protocol) to pause.
    congested = False
    #: Bytes written since the connection became congested.
    backlog = 0
    #: Whether it was dropped for leaving more than C{maxOutputBytes} unread
    #: (the node counts slow readers dropped when it closes).
    droppedUnread = False

    # Provided by the transport-specific subclass.

    def sendBytes(self, parts: list[bytes]) -> None:
        """
        Write one frame given in parts.
        """
        raise NotImplementedError

    def loseTransport(self, reason: str) -> None:
        """
        Close the transport cleanly after what was written.
        """
        raise NotImplementedError

    # Output.

    #: See L{IFrameSink.frameKind}.
    frameKind = "raw"
    #: See L{IFrameSink.peerAddress}; set when the connection opens.
    peerAddress = ""

    def writeFrame(self, frame: bytes) -> None:
        if self._admit(len(frame)):
            self.sendBytes([frame])

    def writeFrameParts(self, header: bytes, payload: bytes) -> None:
        if self._admit(len(header) + len(payload)):
            self.sendBytes([header, payload])

    def prepareFrame(self, frame: bytes) -> Any:
        return frame

    def writePrepared(self, prepared: Any, size: int) -> None:
        if self._admit(size):
            self.sendPrepared(prepared)

    def sendPrepared(self, prepared: Any) -> None:
        self.sendBytes([prepared])

    def _admit(self, size: int) -> bool:
        """
        Whether C{size} more bytes may be written; drops the connection when
        a congested peer would have more than C{max_output_bytes} waiting.
        """
        if self._closing:
            return False
        if self.congested:
            self.backlog += size
            if self.backlog > self.limits.maxOutputBytes:
                self.outputLimitExceeded()
                return False
        return True

    def outputLimitExceeded(self) -> None:
        """
        The peer left more than C{maxOutputBytes} unread: drop the
        connection at once (what it did not read of its messages waits in
        its inbox).
        """
        self.logger.info(
            "dropping {session}: over {limit} bytes unread", session=self.session, limit=self.limits.maxOutputBytes
        )
        self.droppedUnread = True
        self._closing = True
        self._queue.clear()
        self.transport.abortConnection()

    def frameTooLarge(self, size: int, limit: int) -> None:
        """
        A frame of C{size} bytes is over C{limit} (C{maxFrameBytes}, or
        C{maxFrameBytesBeforeLogin} before login): the rest of the stream
        cannot be trusted.  Says why, then closes.
        """
        error = TimProtocolError(
            ErrorCode.ERR_BIGDATA, f"frame of {size} bytes exceeds the limit of {limit}", fatal=True
        )
        self._sendError(0, error, self.tim.encoding)
        self.closeConnection(error.text)

    def tooManyBadFrames(self, error: TimProtocolError) -> None:
        """
        The last of C{maxBadFrames} bad frames (or a fatal one) arrived:
        close.
        """
        self.logger.info("closing a connection after a bad frame: {error}", error=str(error))
        self.closeConnection(error.text)

    def pauseProducing(self) -> None:
        """
        The transport's buffer is full: the peer reads slower than we write.
        """
        self.congested = True

    def resumeProducing(self) -> None:
        self.congested = False
        self.backlog = 0

    def stopProducing(self) -> None:
        pass

    # Lifecycle.

    def closeConnection(self, reason: str) -> None:
        """
        Stop handling this connection's frames and close it.  The session
        ends when the transport reports the close.
        """
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        self._cancelTimer()
        self.loseTransport(reason)

    _closing = False

    def timConnectionMade(self) -> None:
        """
        Start serving a connection the node admitted (see
        L{IClientNode.connectionOpened}).
        """
        if not hasattr(self, "limits"):
            self.limits = self.connectionLimits()
        limits = self.limits
        node = self.node
        self.peerAddress = str(getattr(self.transport.getPeer(), "host", ""))
        self.tim = TimConnection(limits.maxBadFrames)
        self.session = None
        self._queue: deque[tuple[ClientFrame, FrameHandler]] = deque()
        self._busy = False
        self._pumping = False
        self._readingPaused = False
        self._loginFailures = 0
        self._bucket = TokenBucket(limits.requestRate, limits.requestBurst, node.clock)
        self._timer: IDelayedCall | None = node.clock.callLater(limits.authTimeout, self._authTimedOut)
        vrooms = node.config.vrooms
        self._bigData = BigDataReceiver(
            vrooms.bigdata_max_bytes, vrooms.bigdata_timeout, node.clock, self._bigDataTimedOut
        )
        self.transport.registerProducer(self, True)

    def timConnectionLost(self) -> None:
        if getattr(self, "tim", None) is None or self.tim.state is CLOSED:
            return
        self.tim.closed()
        self._closing = True
        self._queue.clear()
        self._cancelTimer()
        self._bigData.close()
        session, self.session = self.session, None
        if session is not None:
            session.connectionLost()
            try:
                self.onLogout(session)
            except Exception:
                self.logger.failure("onLogout failed for {session}", session=session)
        self.node.connectionClosed(self)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _authTimedOut(self) -> None:
        self._timer = None
        self.logger.info("closing a connection that did not log in within {seconds}s", seconds=self.limits.authTimeout)
        self.closeConnection("login timeout")

    def _idleTimedOut(self) -> None:
        self._timer = None
        self.logger.info("closing idle {session}", session=self.session)
        self.closeConnection("idle timeout")

    # Input.

    def frameReceived(self, data: bytes) -> None:
        """
        Handle one whole frame from the client.
        """
        if self._closing:
            return
        session = self.session
        if session is not None and len(data) >= 5 and data[0] & 0x7F == TimType.TIMACK and not self._bigData.pending:
            # An ack: the most frequent frame by far (one per member and
            # message in a group), so it skips the general path.
            if self._timer is not None:
                self._timer.reset(self.limits.idleTimeout)
            session.ackReceived(int.from_bytes(data[1:5], "big"))
            return
        if session is not None and self._bigData.claims(data):
            whole = self._receiveBigData(data)
            if whole is None:
                return
            data = whole
        try:
            event = self.tim.receive(data)
        except TimProtocolError as e:
            timType, encoding = (data[0] & 0x7F, self.tim.encoding or frameEncoding(data)) if data else (0, None)
            self._refuse(timType, BadFrame.wrap(e), encoding)
            return
        if self.session is not None and self._timer is not None:
            self._timer.reset(self.limits.idleTimeout)
        if isinstance(event, AckReceived):
            if self.session is not None:
                self.session.ackReceived(event.ackId)
            return
        if not self._bucket.take():
            timType = event.frame.timType if isinstance(event, RequestReceived) else TimType.TIMPING
            error = TimProtocolError(ErrorCode.ERR_OVERHZ, "too many requests")
            if isinstance(event, RequestReceived):
                # The client resends what was refused: tell it which message.
                clientId = _messageId(event.frame)
                if clientId is not None:
                    error.ackFields["t"] = clientId
            self._sendError(timType, error, self.tim.encoding or frameEncoding(data))
            return
        if isinstance(event, PingReceived):
            self.writeFrame(server_frame(TimType.TIMPING))
            return
        frame = event.frame
        handler = self.handlerFor(frame.timType)
        if handler is None:
            known = frame.timType in TimType._value2member_map_
            error = TimProtocolError(
                ErrorCode.ERR_INTERFACE if known else ErrorCode.ERR_PARAMS,
                f"frame type {frame.timType} is not {'accepted here' if known else 'known'}",
            )
            self._refuse(frame.timType, BadFrame.wrap(error), self.tim.replyEncoding(frame))
            return
        self._queue.append((frame, handler))
        if len(self._queue) >= self.limits.maxQueuedFrames and not self._readingPaused:
            self._readingPaused = True
            self.transport.pauseProducing()
        self._pump()

    def _receiveBigData(self, data: bytes) -> bytes | None:
        """
        Pass a message to the big payload (types 95-97) it starts or
        continues; return the whole frame once complete.  See
        L{timtx.chat.bigpayloads}.
        """
        try:
            return self._bigData.feed(data)
        except TimProtocolError as e:
            self._refuse(self._bigData.timType, BadFrame.wrap(e), self.tim.encoding)
            return None

    def _bigDataTimedOut(self, timType: int) -> None:
        if self._closing:
            return
        error = TimProtocolError(ErrorCode.ERR_FORMAT, "big payload incomplete in time")
        self._sendError(timType, error, self.tim.encoding)
        self.closeConnection(error.text)

    def acceptsLargeMessage(self, data: bytes) -> bool:
        """
        Whether a message over C{maxFrameBytes} may be taken: it starts or
        continues a big payload of a logged-in client, which
        C{[vrooms] bigdata_max_bytes} bounds instead.
        """
        return self.session is not None and self._bigData.claims(data)

    def handlerFor(self, timType: int) -> FrameHandler | None:
        """
        The callable that handles frames of C{timType}, or C{None} if this
        connection does not accept them.  It is called with the
        L{ClientFrame} and may return a L{Deferred}; the next frame waits for
        it.  A L{TimProtocolError} it raises becomes an error ack.

        Override to handle frame types of your own, and call up for the
        rest.
        """
        if timType == TimType.TIMAUTH:
            return self.handleAuth
        if self.session is None:
            return None
        route = self.node.routeFor(timType)
        if route is None:
            return None
        return lambda frame: self._routed(route, frame)

    def _routed(self, route: Route, frame: ClientFrame) -> Any:
        session = self.session
        if session is None:  # logged out while the frame waited
            return None
        body: Any = frame.payload if route.bodyType is None else self.decodeBody(frame, route.bodyType)
        return route.handler(session, body)

    def decodeBody(self, frame: ClientFrame, bodyType: type[S]) -> S:
        """
        Decode a frame's payload in the frame's own encoding and, once
        logged in, in the session's tim generation, which the frame may
        raise to 2.1 (L{timtx.protocols.generations.decode_for_session}).

        @raise BadFrame: if it does not decode or lacks a required field.
        """
        session = self.session
        try:
            if session is None:
                return codec.decode(bodyType, frame.payload, frame.encoding)
            body, session.generation = decode_for_session(bodyType, frame.payload, frame.encoding, session.generation)
            return body
        except TimProtocolError as e:
            raise BadFrame.wrap(e) from None

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue and not self._busy and not self._closing:
                frame, handler = self._queue.popleft()
                # Most frames are handled at once; only those whose handler
                # returns a Deferred make the next one wait.
                try:
                    result = handler(frame)
                except BaseException:
                    self._handlerFailed(Failure(), frame)
                    continue
                # Deferred is an ABC: isinstance(None, Deferred) runs
                # Python code, so the usual None is tested first.
                if result is None or not isinstance(result, Deferred):
                    continue
                self._busy = True
                result.addErrback(self._handlerFailed, frame)
                result.addBoth(self._handled)
        finally:
            self._pumping = False
        if self._readingPaused and len(self._queue) <= self.limits.maxQueuedFrames // 2:
            self._readingPaused = False
            if not self._closing:
                self.transport.resumeProducing()

    def _handled(self, _: object) -> None:
        self._busy = False
        if not self._pumping:
            self._pump()

    def _handlerFailed(self, failure: Failure, frame: ClientFrame) -> None:
        if self._closing:
            return
        error = failure.value
        encoding = self.tim.replyEncoding(frame)
        if isinstance(error, BadFrame):
            self._refuse(frame.timType, error, encoding)
        elif isinstance(error, TimProtocolError):
            self._sendError(frame.timType, error, encoding)
            if error.fatal:
                self.closeConnection(error.text)
        else:
            self.logger.failure("handling a type {timType} frame failed", failure, timType=frame.timType)
            self._sendError(frame.timType, TimProtocolError(ErrorCode.ERR_UNDEFINED, "internal error"), encoding)

    def _refuse(self, timType: int, error: TimProtocolError, encoding: Encoding | None) -> None:
        """
        Answer a bad frame with an error ack, and close if it was fatal or
        one too many.
        """
        self._sendError(timType, error, encoding)
        if error.fatal or self.tim.badFrame():
            self.tooManyBadFrames(error)

    def _sendError(self, timType: int, error: TimProtocolError, encoding: Encoding | None) -> None:
        ack = errorAck(timType, error, **error.ackFields)
        self.writeFrame(server_frame(TimType.TIMACK, codec.encode(ack, encoding or Encoding.COMPACT)))

    # Login.

    def handleAuth(self, frame: ClientFrame) -> Deferred[None] | None:
        """
        Log in with the TimAuth in C{frame}.  A second TIMAUTH on a logged-in
        connection is answered with ok and changes nothing, as in tim.
        """
        if self.session is not None:
            self.session.sendAck(TimType.TIMAUTH, n=self.session.uid)
            return None
        auth = self.decodeBody(frame, TimAuth)
        d = self.node.login(self, auth, frame.encoding)
        d.addCallback(self._authenticated)
        d.addErrback(self._loginFailed, frame)
        return d

    def _authenticated(self, session: ISession) -> None:
        if self._closing:
            # Closed while logging in: the session never starts.
            session.connectionLost()
            self.node.sessionEnded(session)
            return
        self.session = session
        self.tim.loggedIn(session.encoding)
        self._cancelTimer()
        idle = self.limits.idleTimeout
        if idle:
            self._timer = self.node.clock.callLater(idle, self._idleTimedOut)
        session.sendAck(TimType.TIMAUTH, n=session.uid)
        self.onLogin(session)

    def _loginFailed(self, failure: Failure, frame: ClientFrame) -> None:
        failure.trap(TimProtocolError)
        if isinstance(failure.value, BadFrame):
            failure.raiseException()
        self._loginFailures += 1
        error: TimProtocolError = failure.value  # type: ignore[assignment]
        self._sendError(frame.timType, error, self.tim.replyEncoding(frame))
        if self._loginFailures >= self.limits.maxLoginAttempts:
            self.closeConnection("too many failed logins")

    # Hooks.

    def onLogin(self, session: Any) -> None:
        """
        Called once the client is logged in and has its TIMAUTH ack.
        """
        self.node.sessionReady(session)

    def onLogout(self, session: Any) -> None:
        """
        Called once when a logged-in connection ends, for any reason.
        """
        self.node.sessionEnded(session)
