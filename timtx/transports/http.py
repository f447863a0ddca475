# -*- test-case-name: timtx.test.test_login -*-
"""
HTTP POST C{/tim2}: registration and login tokens, and the twisted.web site
that serves it beside the WebSocket at C{/tim}.

The request body is one frame in the WebSocket layout; the response body is
C{[TIMACK]} followed by a TimAck in the request's encoding (the flag bit is
not echoed), as tim 2.0 answers.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from timtx.interfaces import IClientNode
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import parse_client_frame, server_frame
from timtx.protocols.structs import TimAck, TimAuth
from timtx.transports.admission import ConnectionGate, Ticket
from timtx.transports.server import errorAck
from timtx.util.ratelimit import KeyedBuckets


class Tim2Resource(Resource):
    """
    C{/tim2}: TIMREGISTER and TIMTOKEN.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, node: IClientNode):
        super().__init__()
        self.node = node
        accounts = node.config.accounts
        self._buckets = KeyedBuckets(accounts.http_rate, accounts.http_burst, node.clock)

    def render_POST(self, request: Any) -> Any:
        client = self.node.config.client
        origin = request.getHeader("origin")
        if origin and "*" not in client.allowed_origins and origin not in client.allowed_origins:
            request.setResponseCode(http.FORBIDDEN)
            return b""
        body = request.content.read()
        # Every answer is a binary frame (twisted.web would say text/html).
        request.setHeader(b"content-type", b"application/octet-stream")
        try:
            frame = parse_client_frame(body)
        except TimProtocolError as e:
            return self._reply(request, errorAck(0, e), Encoding.COMPACT)
        peer = str(request.getClientAddress().host)
        if not self._buckets.take(peer):
            request.setResponseCode(429)  # Too Many Requests
            error = TimProtocolError(ErrorCode.ERR_OVERHZ, "too many requests")
            return self._reply(request, errorAck(frame.timType, error), frame.encoding)
        accounts = self.node.config.accounts
        if frame.timType == TimType.TIMREGISTER:
            if accounts.forbid_register:
                request.setResponseCode(http.FORBIDDEN)
                return b""
            work: Callable[[TimAuth], Deferred[Any]] = self.node.register
        elif frame.timType == TimType.TIMTOKEN:
            if accounts.forbid_token:
                request.setResponseCode(http.FORBIDDEN)
                return b""
            work = lambda auth: self.node.issueToken(auth, peer)  # noqa: E731
        else:
            error = TimProtocolError(ErrorCode.ERR_INTERFACE, f"frame type {frame.timType} is not served on /tim2")
            return self._reply(request, errorAck(frame.timType, error), frame.encoding)
        try:
            auth = codec.decode(TimAuth, frame.payload, frame.encoding)
            d = work(auth)
        except TimProtocolError as e:
            return self._reply(request, errorAck(frame.timType, e), frame.encoding)
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

        def done(result: Any) -> None:
            if not finished[0]:
                ack = TimAck(ok=True, timType=frame.timType, **_answer(frame.timType, result))
                request.write(self._body(ack, frame.encoding))
                request.finish()

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, TimProtocolError):
                ack = errorAck(frame.timType, failure.value)
                if failure.value.code == ErrorCode.ERR_OVERHZ and not finished[0]:
                    request.setResponseCode(429)  # backing off after failed logins
            else:
                self.log.failure("/tim2 request failed", failure)
                ack = errorAck(frame.timType, TimProtocolError(ErrorCode.ERR_UNDEFINED, "internal error"))
            if not finished[0]:
                request.write(self._body(ack, frame.encoding))
                request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    def _reply(self, request: Any, ack: TimAck, encoding: Encoding) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        return self._body(ack, encoding)

    @staticmethod
    def _body(ack: TimAck, encoding: Encoding) -> bytes:
        return server_frame(TimType.TIMACK, codec.encode(ack, encoding))


def _answer(timType: int, result: Any) -> dict[str, Any]:
    """
    The fields of the ok ack to a /tim2 request.
    """
    if timType == TimType.TIMTOKEN:
        # t for tim 2.0 (an i64), n for tim 2.1 (a string).
        return {"t": result, "n": str(result)}
    return {"n": result}


class BoundedRequest(server.Request):
    """
    A request whose body may not exceed the site's C{maxBodyBytes}: a longer
    one is answered with 413 and the connection closed at once, instead of
    being buffered to disk as twisted.web would.
    """

    _tooLarge = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.maxBodyBytes:  # type: ignore[attr-defined]
            self._refuseBody()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._tooLarge:
            return
        self._received += len(data)
        if self._received > self.channel.site.maxBodyBytes:  # type: ignore[attr-defined]
            self._refuseBody()
            return
        super().handleContentChunk(data)

    def _refuseBody(self) -> None:
        self._tooLarge = True
        transport = self.channel.transport
        if transport is not None:
            transport.write(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            transport.loseConnection()


class TimHTTPChannel(http.HTTPChannel):
    """
    An HTTP connection on the client port, which must deliver each request,
    head and body, within the site's C{requestTimeout} however slowly it
    writes; a WebSocket upgrade ends that (the WebSocket protocol's own
    timeouts take over), and so does a request being answered.

    @ivar ticket: the place this socket holds at the node's gate; it moves
        to the WebSocket protocol on upgrade.
    """

    ticket: Ticket | None = None
    site: TimSite
    transport: Any
    _deadline: IDelayedCall | None = None
    _upgraded = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._startDeadline()

    def _startDeadline(self) -> None:
        timeout = self.site.requestTimeout
        if timeout and self._deadline is None and not self._upgraded:
            self._deadline = self.site.clock.callLater(timeout, self._deadlinePassed)

    def _stopDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadlinePassed(self) -> None:
        self._deadline = None
        self.site.slowRequests += 1
        if self.transport is not None:
            self.transport.abortConnection()

    def allContentReceived(self) -> None:
        self._stopDeadline()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        # The next request on a kept-alive connection has its own deadline.
        if self.transport is not None and not self.transport.disconnecting:
            self._startDeadline()

    def upgraded(self) -> Ticket | None:
        """
        The connection became a WebSocket: no more HTTP deadlines here.

        @return: the ticket, which the WebSocket protocol now holds.
        """
        self._upgraded = True
        self._stopDeadline()
        ticket, self.ticket = self.ticket, None
        return ticket

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopDeadline()
        super().connectionLost(reason)
        if self.ticket is not None:
            self.ticket.release()
            self.ticket = None


class GatedSite(server.Site):
    """
    A twisted.web site with bounds: every socket is admitted by a
    L{ConnectionGate} first, a body over C{maxBodyBytes} is refused with
    413 (L{BoundedRequest}), a request must arrive whole within
    C{requestTimeout} (L{TimHTTPChannel}), and there is no access log.

    @ivar slowRequests: connections cut off for not delivering a request
        within C{requestTimeout}.
    """

    requestFactory = BoundedRequest
    # HTTP/1.1 channels of our own, not Twisted's HTTP/2-capable wrapper,
    # which would hide the channel's hooks; tim clients speak HTTP/1.1.
    protocol = TimHTTPChannel  # type: ignore[assignment]

    def __init__(
        self,
        root: Resource,
        *,
        reactor: Any,
        clock: Any,
        gate: ConnectionGate,
        maxBodyBytes: int,
        requestTimeout: float,
    ):
        super().__init__(root, reactor=reactor)
        self.gate = gate
        self.clock = clock
        self.maxBodyBytes = maxBodyBytes
        self.requestTimeout = requestTimeout
        # Between requests of a kept-alive connection.
        self.timeOut = requestTimeout or None
        self.slowRequests = 0
        self.noisy = False
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> Any:
        ticket = self.gate.admit(getattr(addr, "host", ""))
        if ticket is None:
            return None
        channel = super().buildProtocol(addr)
        channel.ticket = ticket
        return channel

    def log(self, request: Any) -> None:
        # No access log per request: it would carry client addresses for
        # every login; operators who want one can subclass.
        pass


class TimSite(GatedSite):
    """
    The client port: C{/tim} (WebSocket), C{/tim2} (HTTP POST) and a short
    text at C{/} so that a browser pointed at the port sees what it is.
    Every socket it accepts is admitted by the node's L{ConnectionGate}
    first.
    """

    def __init__(self, node: IClientNode, websocket: Any, gate: ConnectionGate):
        root = Resource()
        root.putChild(b"", _Banner())
        root.putChild(b"tim", websocket)
        root.putChild(b"tim2", Tim2Resource(node))
        client = node.config.client
        super().__init__(
            root,
            reactor=node.reactor,
            clock=node.clock,
            gate=gate,
            maxBodyBytes=client.max_frame_bytes,
            requestTimeout=client.request_timeout,
        )


class _Banner(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"timtx node: WebSocket at /tim, HTTP POST at /tim2\n"
