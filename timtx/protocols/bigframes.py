# -*- test-case-name: timtx.test.test_bigdata -*-
"""
tim's big payloads, without I/O: TIMBIGSTRING (95), TIMBIGBINARY (96) and
TIMBIGBINARYSTREAM (97), which tim 2.1 added and timjs sends.

They do not carry a Thrift or JSON struct.  From a client::

    [T | J] [4-byte big-endian total length] [target] [separator] [data]

where the total length counts every byte of the frame, the type byte and
the length field included (timjs computes C{1 + 4 + len(target) + 1 +
len(data)}).  C{target} is an account id for 95 and 96 and a virtual room
id for 97; the separator is C{|} for 95 and byte 131 for 96 and 97.  The
frame may arrive in one message, or spread over several: the first carries
the header, the following ones carry nothing but more bytes, until the
announced length is reached.  While a payload is incomplete, every message
of the connection belongs to it (tim does the same: C{inet/util.go}
C{parseBigData}).

timgo's HEAD leaves the length field out (C{[T][target][separator][data]},
always in one message).  Both forms are accepted: the first byte of a
length field is at most C{0x10} for any length a node accepts (the cap is
at most 256 MiB), while a target is base58 text, whose characters are
C{0x31} and above.  So a base58 character after the type byte means
timgo's form.

From the server the length field is left out, as tim sends them::

    [T] [sender account id or room id] [separator] [data]
"""

from __future__ import annotations

import struct

from timtx.protocols.constants import TYPE_MASK, ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError

BIG_DATA_TYPES = frozenset((TimType.TIMBIGSTRING, TimType.TIMBIGBINARY, TimType.TIMBIGBINARYSTREAM))

#: The separator between target and data in a TIMBIGSTRING.
SEPARATOR_STRING = b"|"
#: The separator in TIMBIGBINARY and TIMBIGBINARYSTREAM (timjs's C{SEQ_BIN}).
SEPARATOR_BINARY = b"\x83"

#: Type byte and length field.
HEADER_BYTES = 5

#: The largest cap a node may configure: lengths below it start with a
#: zero nibble, which no base58 character has (see the module docstring).
MAX_BIG_DATA_BYTES = 256 << 20

#: Longest target looked for before the separator; account and room ids are
#: far shorter, and the bound keeps a missing separator from costing a scan
#: of megabytes.
MAX_TARGET_BYTES = 128

_LENGTH = struct.Struct(">I")
_BASE58 = frozenset(b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def isBigDataFrame(data: bytes) -> bool:
    """
    Whether a client message starts a big payload.
    """
    return bool(data) and (data[0] & TYPE_MASK) in BIG_DATA_TYPES


def separatorFor(timType: int) -> bytes:
    return SEPARATOR_STRING if timType == TimType.TIMBIGSTRING else SEPARATOR_BINARY


def splitBigData(timType: int, body: bytes) -> tuple[str, bytes]:
    """
    Split what follows the header of a big payload into its target and
    its data.

    @param body: C{[target][separator][data]}.
    @return: the target and the data bytes.
    @raise TimProtocolError: C{ERR_FORMAT} if there is no separator within
        L{MAX_TARGET_BYTES}, or the target is empty or not printable ASCII.
    """
    separator = separatorFor(timType)
    index = body.find(separator, 0, MAX_TARGET_BYTES + 1)
    if index <= 0:
        raise TimProtocolError(ErrorCode.ERR_FORMAT, "big payload without a target and separator")
    target = body[:index]
    if not all(0x21 <= byte < 0x7F for byte in target):
        raise TimProtocolError(ErrorCode.ERR_FORMAT, "big payload target is not an id")
    return target.decode("ascii"), body[index + 1 :]


def clientBigDataFrame(timType: int, target: str, data: bytes, json: bool = True) -> bytes:
    """
    A whole big payload as timjs sends it: length field included, bit 0x80
    set (timjs sets it on every frame; it means nothing here).
    """
    head = target.encode("ascii") + separatorFor(timType)
    total = HEADER_BYTES + len(head) + len(data)
    return bytes((timType | (0x80 if json else 0),)) + _LENGTH.pack(total) + head + data


def serverBigDataHeader(timType: int, source: str) -> bytes:
    """
    The bytes the server sends before the data: C{[T][source][separator]},
    where C{source} is the sender's account id (95, 96) or the room (97).
    """
    return bytes((timType,)) + source.encode("ascii") + separatorFor(timType)


class BigDataAssembler:
    """
    Reassembles the big payloads of one connection.

    Feed it every message that L{isBigDataFrame} recognises, and every
    message while L{pending}.  L{feed} returns the whole frame without its
    length field, C{[T | J][target][separator][data]}, once complete.

    Errors are L{TimProtocolError}s.  One that leaves the connection's
    byte stream in doubt (more messages of a refused payload would follow
    and cannot be told from frames) is C{fatal}: the caller should close.

    @ivar maxBytes: the largest payload accepted, length field included.
    """

    def __init__(self, maxBytes: int):
        self.maxBytes = maxBytes
        self._buffer: bytearray | None = None
        self._missing = 0
        self.timType = 0

    @property
    def pending(self) -> bool:
        """
        Whether a payload has begun and not ended: the next message
        continues it.
        """
        return self._buffer is not None

    @property
    def received(self) -> int:
        """
        Bytes of the pending payload buffered so far.
        """
        return len(self._buffer) if self._buffer is not None else 0

    def reset(self) -> None:
        """
        Forget a pending payload.
        """
        self._buffer = None
        self._missing = 0

    def feed(self, data: bytes) -> bytes | None:
        """
        @return: the whole frame once complete, else C{None}.
        @raise TimProtocolError: C{ERR_FORMAT} for a malformed payload,
            C{ERR_BIGDATA} for one over L{maxBytes}.
        """
        if self._buffer is None:
            return self._start(data)
        return self._continue(data)

    def _start(self, data: bytes) -> bytes | None:
        self.timType = data[0] & TYPE_MASK if data else 0
        if len(data) < HEADER_BYTES:
            raise TimProtocolError(ErrorCode.ERR_FORMAT, "big payload shorter than its header")
        if data[1] in _BASE58:
            # timgo's form: no length field, one message.
            if len(data) > self.maxBytes:
                raise self._tooBig(len(data), fatal=False)
            return bytes(data)
        (total,) = _LENGTH.unpack_from(data, 1)
        if total > self.maxBytes:
            raise self._tooBig(total, fatal=total > len(data))
        if total < len(data):
            raise TimProtocolError(ErrorCode.ERR_FORMAT, "big payload longer than its announced length")
        if total == len(data):
            return data[:1] + data[HEADER_BYTES:]
        buffer = bytearray(data[:1])
        buffer += memoryview(data)[HEADER_BYTES:]
        self._buffer = buffer
        self._missing = total - len(data)
        return None

    def _continue(self, data: bytes) -> bytes | None:
        assert self._buffer is not None
        if len(data) > self._missing:
            self.reset()
            raise TimProtocolError(ErrorCode.ERR_FORMAT, "big payload ran past its announced length", fatal=True)
        self._buffer += data
        self._missing -= len(data)
        if self._missing:
            return None
        frame = bytes(self._buffer)
        self.reset()
        return frame

    def _tooBig(self, size: int, fatal: bool) -> TimProtocolError:
        return TimProtocolError(
            ErrorCode.ERR_BIGDATA, f"big payload of {size} bytes exceeds the limit of {self.maxBytes}", fatal=fatal
        )
