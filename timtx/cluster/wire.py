# -*- test-case-name: timtx.test.test_clusterrouting -*-
"""
The payloads of the routing kinds between nodes: a fixed number of
length-prefixed byte fields (big-endian 32-bit lengths), and small JSON
objects for the directory.

Peer frames are already authenticated and bounded by the peer protocol;
what is checked here is only that a payload has the shape its kind
promises, so that a node running other code fails one message with a log
line, not the link.
"""

from __future__ import annotations

import json
import struct
from typing import Any, TypeVar

from timtx.cluster.membership import PeerRequestError
from timtx.protocols import codec
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimStruct

_LENGTH = struct.Struct(">I")
T = TypeVar("T", bound=TimStruct)


class BadPayload(PeerRequestError, ValueError):
    """
    A routing payload does not have the shape its kind promises.  A
    request carrying one is answered with this error (no traceback logged
    here: the other node is at fault).
    """


def pack(*fields: bytes) -> bytes:
    """
    The fields, each after its length.
    """
    parts = []
    for field in fields:
        parts.append(_LENGTH.pack(len(field)))
        parts.append(field)
    return b"".join(parts)


def unpack(data: bytes, count: int, optional: int = 0) -> list[bytes]:
    """
    The C{count} fields of a payload made by L{pack}, and the C{optional}
    ones after them if it has them (a field a newer node adds at the end):
    all of those or none.

    @raise BadPayload: if it holds another number of fields or is cut short.
    """
    fields: list[bytes] = []
    view = memoryview(data)
    offset = 0
    for i in range(count + optional):
        if i == count and offset == len(view):
            return fields
        if offset + 4 > len(view):
            expected = f"{count} or {count + optional}" if optional else f"{count}"
            raise BadPayload(f"expected {expected} fields, got {len(fields)}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadPayload("a field runs past the end")
        fields.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise BadPayload("trailing bytes")
    return fields


def text(field: bytes) -> str:
    """
    A field as text.

    @raise BadPayload: if it is not UTF-8.
    """
    try:
        return field.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPayload(f"not UTF-8: {field[:20]!r}") from None


def integer(field: bytes) -> int:
    """
    A field as a signed 64-bit decimal integer (no sign but C{-}, no
    spaces, no exponent: what L{pack}'s callers write with C{b"%d"}).

    @raise BadPayload: if it is anything else.
    """
    digits = field[1:] if field[:1] == b"-" else field
    if not (digits.isdigit() and len(digits) <= 19):
        raise BadPayload(f"not an integer: {field[:20]!r}")
    value = int(field)
    if not -(2**63) <= value < 2**63:
        raise BadPayload(f"integer out of range: {field[:20]!r}")
    return value


def thrift(kind: type[T], field: bytes) -> T:
    """
    A field as the Thrift struct C{kind}, compact-encoded.

    @raise BadPayload: if it is not one.
    """
    try:
        return codec.decode_compact(kind, field)
    except TimProtocolError as e:
        raise BadPayload(f"not a {kind.__name__}: {e.text}") from None


def dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def loads(data: bytes) -> dict[str, Any]:
    """
    @raise BadPayload: if C{data} is not a JSON object.
    """
    try:
        value = json.loads(data)
    except ValueError as e:
        raise BadPayload(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadPayload("not a JSON object")
    return value
