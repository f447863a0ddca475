# -*- test-case-name: timtx.test.test_login -*-
"""
tim over raw TCP (a timtx extension): each frame is prefixed by its length
as a 4-byte big-endian integer, in both directions.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.protocol import Factory, Protocol

from timtx.interfaces import IClientNode
from timtx.protocols.errors import FrameTooLarge
from timtx.protocols.frames import LengthPrefixedDecoder
from timtx.transports.admission import ConnectionGate, Ticket
from timtx.transports.eager import writeNow
from timtx.transports.nodelay import sendSmallWritesAtOnce
from timtx.transports.server import TimServerProtocolMixin

_LENGTH = struct.Struct(">I")


class TimTcpServerProtocol(TimServerProtocolMixin, Protocol):
    """
    A tim client over a raw TCP stream.
    """

    #: The place this socket holds at the node's gate, given back on close.
    ticket: Ticket | None = None
    _decoder: LengthPrefixedDecoder | None = None

    def connectionMade(self) -> None:
        if not self.node.connectionOpened(self):
            self._closing = True
            self.transport.abortConnection()
            return
        sendSmallWritesAtOnce(self.transport)
        self.limits = self.connectionLimits()
        # Until login, a frame may be no larger than a login needs.
        self._decoder = LengthPrefixedDecoder(self.limits.maxFrameBytesBeforeLogin)
        self.timConnectionMade()

    def dataReceived(self, data: bytes) -> None:
        decoder = self._decoder
        if self._closing or decoder is None:
            return
        decoder.feed(data)
        while not self._closing:
            try:
                frame = decoder.next_frame()
            except FrameTooLarge as e:
                # The rest of the stream cannot be framed.
                self.frameTooLarge(e.size, e.limit)
                return
            if frame is None:
                return
            self.frameReceived(frame)

    def onLogin(self, session: Any) -> None:
        if self._decoder is not None:
            self._decoder.maxFrameBytes = self.limits.maxFrameBytes
        super().onLogin(session)

    def connectionLost(self, reason: Any = None) -> None:
        # What was buffered of a frame goes now, not when a garbage
        # collection finds this protocol.
        self._decoder = None
        self.timConnectionLost()
        if self.ticket is not None:
            self.ticket.release()

    frameKind = "tcp"

    def sendBytes(self, parts: list[bytes]) -> None:
        self.transport.writeSequence([_LENGTH.pack(sum(map(len, parts))), *parts])

    def prepareFrame(self, frame: bytes) -> Any:
        return _LENGTH.pack(len(frame)) + frame

    def sendPrepared(self, prepared: Any) -> None:
        writeNow(self.transport, prepared)

    def loseTransport(self, reason: str) -> None:
        self.transport.loseConnection()


class TimTcpServerFactory(Factory):
    """
    Builds L{TimTcpServerProtocol}s (or the class registered as
    C{client-tcp}) for the sockets the gate admits.
    """

    noisy = False

    def __init__(self, node: IClientNode, protocol: type[TimTcpServerProtocol], gate: ConnectionGate):
        self.node = node
        self.protocol = protocol
        self.gate = gate

    def buildProtocol(self, addr: Any) -> Any:
        ticket = self.gate.admit(getattr(addr, "host", ""))
        if ticket is None:
            return None
        protocol: Any = self.protocol()  # type: ignore[misc]
        protocol.ticket = ticket
        protocol.factory = self
        protocol.node = self.node
        return protocol
