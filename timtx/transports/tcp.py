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
from timtx.transports.server import TimServerProtocolMixin

_LENGTH = struct.Struct(">I")


class TimTcpServerProtocol(TimServerProtocolMixin, Protocol):
    """
    A tim client over a raw TCP stream.
    """

    def connectionMade(self) -> None:
        if not self.node.connectionOpened(self):
            self._closing = True
            self.transport.abortConnection()
            return
        self.limits = self.connectionLimits()
        self._decoder = LengthPrefixedDecoder(self.limits.maxFrameBytes)
        self.timConnectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._decoder.feed(data)
        while not self._closing:
            try:
                frame = self._decoder.next_frame()
            except FrameTooLarge as e:
                # The rest of the stream cannot be framed.
                self.frameTooLarge(e.size)
                return
            if frame is None:
                return
            self.frameReceived(frame)

    def connectionLost(self, reason: Any = None) -> None:
        self.timConnectionLost()

    frameKind = "tcp"

    def sendBytes(self, parts: list[bytes]) -> None:
        self.transport.writeSequence([_LENGTH.pack(sum(map(len, parts))), *parts])

    def prepareFrame(self, frame: bytes) -> Any:
        return _LENGTH.pack(len(frame)) + frame

    def sendPrepared(self, prepared: Any) -> None:
        self.transport.write(prepared)

    def loseTransport(self, reason: str) -> None:
        self.transport.loseConnection()


class TimTcpServerFactory(Factory):
    def __init__(self, node: IClientNode, protocol: type[TimTcpServerProtocol]):
        self.node = node
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        protocol: Any = self.protocol()  # type: ignore[misc]
        protocol.factory = self
        protocol.node = self.node
        return protocol
