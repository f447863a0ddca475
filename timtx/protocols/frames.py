# -*- test-case-name: timtx.test.test_frames -*-
"""
tim's frame layout, without I/O.

A WebSocket message, an HTTP C{/tim2} body and (inside a length prefix) a raw
TCP record all hold one frame::

    client -> server:  [T | J] [payload]
    server -> client:  [T | A] [4-byte big-endian ack id, only if A] [payload]

C{T} is the frame type (low 7 bits).  From a client, C{J} (0x80) means the
payload is JSON rather than Thrift compact.  From the server, C{A} (0x80)
means "acknowledge this": the client answers C{[TIMACK][same 4 bytes]},
with or without 0x80 (timjs sets it on everything).

Raw TCP, a timtx extension, prefixes each frame with its length as a 4-byte
big-endian integer; L{LengthPrefixedDecoder} splits a byte stream into frames.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from timtx.protocols.codec import Encoding
from timtx.protocols.constants import FLAG_BIT, TYPE_MASK, ErrorCode, TimType
from timtx.protocols.errors import FrameTooLarge, TimProtocolError

_ACK_ID = struct.Struct(">I")
_LENGTH = struct.Struct(">I")

#: The largest ack id; ids wrap around within 32 bits.
MAX_ACK_ID = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """
    One frame from a client.

    @ivar timType: the frame type; may be a value L{TimType} does not know.
    @ivar encoding: the payload's encoding, from bit 0x80.
    @ivar payload: everything after the type byte.
    """

    timType: int
    encoding: Encoding
    payload: bytes

    def ackId(self) -> int:
        """
        The id a TIMACK frame acknowledges.

        @raise TimProtocolError: C{ERR_FORMAT} if the payload is shorter than
            4 bytes.  Bytes after the id are ignored, as tim does.
        """
        if len(self.payload) < 4:
            raise TimProtocolError(ErrorCode.ERR_FORMAT, "TIMACK needs a 4-byte id")
        return int(_ACK_ID.unpack_from(self.payload)[0])


@dataclass(frozen=True, slots=True)
class ServerFrame:
    """
    One frame from the server, as a client sees it.
    """

    timType: int
    ackId: int | None
    payload: bytes


def parse_client_frame(data: bytes) -> ClientFrame:
    """
    @raise TimProtocolError: C{ERR_FORMAT} for an empty frame.
    """
    if not data:
        raise TimProtocolError(ErrorCode.ERR_FORMAT, "empty frame")
    first = data[0]
    encoding = Encoding.JSON if first & FLAG_BIT else Encoding.COMPACT
    return ClientFrame(first & TYPE_MASK, encoding, bytes(data[1:]))


def client_frame(timType: int, payload: bytes = b"", encoding: Encoding = Encoding.COMPACT) -> bytes:
    """
    The bytes of a frame a client sends.
    """
    first = timType | (FLAG_BIT if encoding is Encoding.JSON else 0)
    return bytes((first,)) + payload


def client_ack(ackId: int, json: bool = False) -> bytes:
    """
    A client's acknowledgement of server frame C{ackId}.
    """
    first = TimType.TIMACK | (FLAG_BIT if json else 0)
    return bytes((first,)) + _ACK_ID.pack(ackId)


def server_frame(timType: int, payload: bytes = b"", ackId: int | None = None) -> bytes:
    """
    The bytes of a frame the server sends; with C{ackId} the client must
    acknowledge it.
    """
    if ackId is None:
        return bytes((timType,)) + payload
    return server_header(timType, ackId) + payload


def server_header(timType: int, ackId: int) -> bytes:
    """
    The 5 header bytes of an ack-required frame, for callers that write the
    payload separately.
    """
    return bytes((timType | FLAG_BIT,)) + _ACK_ID.pack(ackId)


def parse_server_frame(data: bytes) -> ServerFrame:
    """
    @raise TimProtocolError: C{ERR_FORMAT} for an empty frame or a missing
        ack id.
    """
    if not data:
        raise TimProtocolError(ErrorCode.ERR_FORMAT, "empty frame")
    first = data[0]
    if first & FLAG_BIT:
        if len(data) < 5:
            raise TimProtocolError(ErrorCode.ERR_FORMAT, "frame too short for its ack id")
        return ServerFrame(first & TYPE_MASK, int(_ACK_ID.unpack_from(data, 1)[0]), bytes(data[5:]))
    return ServerFrame(first, None, bytes(data[1:]))


def length_prefixed(frame: bytes) -> bytes:
    """
    C{frame} with the 4-byte length prefix of the raw TCP transport.
    """
    return _LENGTH.pack(len(frame)) + frame


class LengthPrefixedDecoder:
    """
    Splits a byte stream into frames of C{[4-byte big-endian length][frame]}.

    Feed it bytes as they arrive and call L{next_frame} until it returns
    C{None}.  The buffer is consumed by offset and compacted once per frame,
    so a stream cut into single bytes costs linear time, not quadratic.

    @ivar maxFrameBytes: the largest frame accepted.  A longer length prefix
        raises L{FrameTooLarge} before any of the frame is buffered.
    """

    def __init__(self, maxFrameBytes: int):
        self.maxFrameBytes = maxFrameBytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """
        The next whole frame, or C{None} if more bytes are needed.

        @raise FrameTooLarge: if the next frame is announced as longer than
            L{maxFrameBytes}.
        """
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        (size,) = _LENGTH.unpack_from(buffer)
        if size > self.maxFrameBytes:
            raise FrameTooLarge(size, self.maxFrameBytes)
        end = 4 + size
        if len(buffer) < end:
            return None
        frame = bytes(buffer[4:end])
        del buffer[:end]
        return frame

    @property
    def buffered(self) -> int:
        """
        How many bytes wait for the rest of their frame.
        """
        return len(self._buffer)
