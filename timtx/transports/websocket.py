# -*- test-case-name: timtx.test.test_login -*-
"""
tim over WebSocket: binary messages at C{/tim}, one frame per message.

The protocol is autobahn's L{WebSocketServerProtocol} with
L{TimServerProtocolMixin} doing the work and the speed-ups of
L{timtx.transports.wsspeed}.  It is served by a twisted.web C{Site} (see
L{timtx.transports.http}) so that C{/tim2} can share the port.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny

from timtx.interfaces import IClientNode
from timtx.transports.admission import Ticket
from timtx.transports.eager import writeNow
from timtx.transports.server import TimServerProtocolMixin
from timtx.transports.wsspeed import FastUnmasking, QuietReads, QuietSettings

#: Close code for a message over the size limit (RFC 6455).
CLOSE_TOO_BIG = 1009


def binaryFrameHeader(size: int) -> bytes:
    """
    The header of one final, unmasked binary frame of C{size} bytes, as
    autobahn writes it (RFC 6455, 5.2: the shortest length encoding).
    """
    if size < 126:
        return bytes((0x82, size))
    if size < 0x10000:
        return bytes((0x82, 126)) + size.to_bytes(2, "big")
    return bytes((0x82, 127)) + size.to_bytes(8, "big")


class TimWebSocketServerProtocol(  # type: ignore[misc]
    TimServerProtocolMixin, FastUnmasking, QuietReads, QuietSettings, WebSocketServerProtocol
):
    """
    A tim client over WebSocket.
    """

    _timOpened = False
    #: Whether the node counts this connection.
    _admitted = False
    #: The place this socket holds at the node's gate, given back on close.
    ticket: Ticket | None = None
    #: The close code L{loseTransport} sends.
    _closeCode = 1000

    def connectionMade(self) -> None:
        # autobahn's own limit of a message is this connection's: until
        # login, what a login needs.
        self.limits = self.connectionLimits()
        self.maxMessagePayloadSize = self.maxFramePayloadSize = self.limits.maxFrameBytesBeforeLogin
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self.ticket is not None:
            self.ticket.release()
            self.ticket = None

    def onConnect(self, request: Any) -> None:
        client = self.node.config.client
        origin = request.headers.get("origin")
        if not origin:
            if not client.allow_missing_origin:
                raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "an Origin header is required")
        elif "*" not in client.allowed_origins and origin not in client.allowed_origins:
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        if not self.node.connectionOpened(self):
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "the node is not taking connections")
        self._admitted = True
        return None

    def onOpen(self) -> None:
        self._timOpened = True
        self.timConnectionMade()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # timjs and timgo send binary messages; a text message carries the
        # same bytes and is treated alike.
        limit = self.limits.maxFrameBytes if self.session is not None else self.limits.maxFrameBytesBeforeLogin
        if len(payload) > limit and not self.acceptsLargeMessage(payload):
            self._closeCode = CLOSE_TOO_BIG
            self.closeConnection(f"message over {limit} bytes")
            return
        self.frameReceived(payload)

    def onLogin(self, session: Any) -> None:
        # timjs sends a big payload (TIMBIGBINARY...) as one message: once
        # logged in, messages may be that large, and onMessage holds every
        # other frame to max_frame_bytes.
        limit = max(self.limits.maxFrameBytes, self.node.config.vrooms.bigdata_max_bytes)
        self.maxMessagePayloadSize = self.maxFramePayloadSize = limit
        super().onLogin(session)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._timOpened:
            self.timConnectionLost()
        elif self._admitted:
            # Counted at the handshake, closed before it completed.
            self.node.connectionClosed(self)
        self._admitted = False

    frameKind = "ws"

    def sendBytes(self, parts: list[bytes]) -> None:
        # Between the peer's close frame and onClose, autobahn refuses to
        # send (it raises); what would go out then is lost either way.
        if self.state != self.STATE_OPEN:
            return
        if self._perMessageCompress is None and not self.send_queue:
            # Framed here: the bytes autobahn's sendMessage would write
            # (one final binary frame, unmasked from a server), without its
            # debug text or the PreparedMessage a single session does not
            # share.
            self.transport.write(b"".join((binaryFrameHeader(sum(map(len, parts))), *parts)))
            return
        self.sendPrepared(self.prepareFrame(parts[0] if len(parts) == 1 else b"".join(parts)))

    def prepareFrame(self, frame: bytes) -> Any:
        # Framed once by autobahn, written as is to every WebSocket session.
        return self.factory.prepareMessage(frame, isBinary=True)

    def sendPrepared(self, prepared: Any) -> None:
        if self.state != self.STATE_OPEN:
            return
        if self._perMessageCompress is None and not self.send_queue:
            # What autobahn's sendData does for a ready frame, without the
            # debug text it formats for every frame (a fan-out hot spot).
            writeNow(self.transport, prepared.payloadHybi)
        else:
            self.sendPreparedMessage(prepared)

    def loseTransport(self, reason: str) -> None:
        if self._closeCode == CLOSE_TOO_BIG:
            # sendClose takes only application codes; this is how autobahn
            # itself refuses a message over its limit.
            self._fail_connection(CLOSE_TOO_BIG, reason[:100])
            return
        self.sendClose(code=self._closeCode, reason=reason[:100])


class TimWebSocketServerFactory(WebSocketServerFactory):
    """
    Builds L{TimWebSocketServerProtocol}s (or the class registered as
    C{client-ws}) bound to a node.
    """

    def __init__(self, node: IClientNode, protocol: type[TimWebSocketServerProtocol], url: str = "ws://localhost/tim"):
        super().__init__(url, reactor=node.reactor)
        self.node = node
        self.protocol = protocol
        config = node.config.client
        self.setProtocolOptions(
            maxFramePayloadSize=config.max_frame_bytes,
            maxMessagePayloadSize=config.max_frame_bytes,
            openHandshakeTimeout=config.auth_timeout,
            closeHandshakeTimeout=2,
            # Say why (1009 for an oversize message) before closing.
            failByDrop=False,
            # tim clients ping on their own (TIMPING frames).
            autoPingInterval=0,
            # Frames are unmasked by FastUnmasking.onFrameBegin instead.
            applyMask=False,
        )

    #: The gate ticket of the HTTP connection being upgraded, handed to the
    #: protocol built for it (set by L{TimWebSocketResource.render}).
    upgrading: Ticket | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol: Any = super().buildProtocol(addr)
        protocol.node = self.node
        protocol.ticket, self.upgrading = self.upgrading, None
        return protocol


class TimWebSocketResource(WebSocketResource):
    """
    autobahn's resource, minus the HTTP channel's hold on the connection it
    hands over: its idle timer, which would fire hours later, and its place
    as the transport's producer, which the WebSocket protocol takes to learn
    when the peer stops reading.
    """

    _factory: TimWebSocketServerFactory

    def render(self, request: Any) -> Any:
        channel = request.channel
        channel.setTimeout(None)
        if channel.transport is not None:
            channel.transport.unregisterProducer()
        # The socket keeps its place at the gate as a WebSocket.
        upgraded = getattr(channel, "upgraded", None)
        self._factory.upgrading = upgraded() if upgraded is not None else None
        try:
            return super().render(request)
        finally:
            ticket, self._factory.upgrading = self._factory.upgrading, None
            if ticket is not None:
                # No protocol took it (the upgrade failed).
                ticket.release()
