# -*- test-case-name: timtx.test.test_codec -*-
"""
Encode and decode tim structs: Thrift compact through the C{thrift} package's
C codec (C{fastbinary}), and JSON as Go's C{encoding/json} writes them.

Payloads carry no Thrift message envelope, as in tim.  Every decode error
becomes a L{TimProtocolError}; nothing else escapes from here.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, TypeVar

from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TType
from thrift.transport.TTransport import TMemoryBuffer

from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Generation, TimAuth, TimStruct

try:
    from thrift.protocol import fastbinary as _fastbinary
except ImportError:  # pragma: no cover - depends on how thrift was built
    _fastbinary = None

#: Whether the C codec is in use.  Without it timtx still works through
#: thrift's pure-Python protocol, many times slower; the node logs a critical
#: message at startup (see L{timtx.node}).
ACCELERATED = _fastbinary is not None

S = TypeVar("S", bound=TimStruct)


class Encoding(Enum):
    """
    How a payload is encoded.  A client picks it per frame with bit 0x80;
    a session's pushes use the encoding of its TIMAUTH frame.
    """

    COMPACT = "compact"
    JSON = "json"


class _DecodeSource:
    """
    What C{fastbinary.decode_compact} reads from: a readable transport and
    the protocol's size limits.  Limits equal to the payload length keep a
    hostile length prefix from allocating more than the frame could hold.
    """

    __slots__ = ("trans", "string_length_limit", "container_length_limit")

    def __init__(self, data: bytes):
        self.trans = TMemoryBuffer(data)
        self.string_length_limit = len(data)
        self.container_length_limit = len(data)


def encode_compact(struct: TimStruct, generation: Generation = Generation.TIM20) -> bytes:
    """
    Thrift compact bytes of C{struct}, with no envelope, in C{generation}'s
    layout (see L{Generation}).
    """
    struct.fill_required()
    cls = type(struct)
    spec = cls.thrift_spec if generation is Generation.TIM20 else cls.spec_for(generation)
    if _fastbinary is not None:
        return bytes(_fastbinary.encode_compact(struct, [cls, spec]))
    return _slow_encode(struct, spec)


def decode_compact(cls: type[S], data: bytes, generation: Generation = Generation.TIM20) -> S:
    """
    Decode Thrift compact bytes, in C{generation}'s layout, into a new
    C{cls}.  Bytes after the struct's end are ignored, as Thrift does.
    Fields of an unexpected wire type are skipped (Thrift's rule for schema
    evolution); a required field left unset is reported by
    L{check_required}.  A TimAuth's token is read as either generation
    sends it.

    @raise TimProtocolError: C{ERR_FORMAT} for truncated or malformed bytes.
    """
    spec = cls.thrift_spec if generation is Generation.TIM20 else cls.spec_for(generation)
    result = _decode_with_spec(cls, data, spec)
    if cls is TimAuth and result.token is None:  # type: ignore[attr-defined]
        # Perhaps the other generation: tim 2.0's token is an i64, 2.1's a string.
        other = Generation.TIM21 if generation is Generation.TIM20 else Generation.TIM20
        again = _decode_with_spec(cls, data, cls.spec_for(other))
        result.token = again.token  # type: ignore[attr-defined]
    return result


def _decode_with_spec(cls: type[S], data: bytes, spec: tuple[Any, ...]) -> S:
    result = cls()
    try:
        if _fastbinary is not None:
            _fastbinary.decode_compact(result, _DecodeSource(data), [cls, spec])
        else:
            _slow_decode(result, data, spec)
    except RecursionError:
        raise TimProtocolError(ErrorCode.ERR_FORMAT, f"malformed {cls.__name__}") from None
    except Exception as e:
        # The C codec raises EOFError, TypeError, OverflowError and others;
        # the pure-Python one raises TProtocolException.  All mean "bad bytes".
        raise TimProtocolError(ErrorCode.ERR_FORMAT, f"malformed {cls.__name__}: {_why(e)}") from None
    if _fastbinary is not None and _replaced(result):
        # The C codec replaces bytes that are not UTF-8 with U+FFFD instead
        # of failing.  Whether the client sent U+FFFD itself or bytes that
        # are no text, the strict pure-Python codec tells (rarely needed).
        try:
            _slow_decode(cls(), data, spec)
        except UnicodeError:
            raise TimProtocolError(ErrorCode.ERR_FORMAT, f"malformed {cls.__name__}: invalid UTF-8") from None
        except Exception:
            pass
    return result


_TEXT_FIELDS: dict[type, tuple[str, ...]] = {}


def _textFields(cls: type[TimStruct]) -> tuple[str, ...]:
    """
    The fields of C{cls} that can hold text: strings, and containers and
    structs that may hold strings.
    """
    names = _TEXT_FIELDS.get(cls)
    if names is None:
        names = _TEXT_FIELDS[cls] = tuple(
            f.name
            for f in cls.FIELDS
            if f.kind.ttype in (TType.LIST, TType.SET, TType.MAP, TType.STRUCT)
            or (f.kind.ttype == TType.STRING and f.kind.spec_args() == "UTF8")
        )
    return names


def _replaced(value: Any) -> bool:
    """
    Whether a decoded struct holds U+FFFD in any string, however nested.
    """
    if isinstance(value, str):
        return "\ufffd" in value
    if isinstance(value, TimStruct):
        for name in _textFields(type(value)):
            item = getattr(value, name)
            if item is not None and _replaced(item):
                return True
        return False
    if isinstance(value, list):
        return any(_replaced(v) for v in value)
    if isinstance(value, dict):
        return any(_replaced(k) or _replaced(v) for k, v in value.items())
    return False


def _why(error: Exception) -> str:
    """
    What a codec exception says about the bytes, in words for the client:
    never the exception's class name or the codec's own text.
    """
    if isinstance(error, EOFError):
        return "truncated"
    if isinstance(error, UnicodeError):
        return "invalid UTF-8"
    if isinstance(error, OverflowError):
        return "a length beyond the end of the frame"
    if isinstance(error, TypeError):
        return "an unknown Thrift type"
    if isinstance(error, ValueError):
        return "a negative length"
    return "not Thrift compact"


def check_required(struct: TimStruct) -> None:
    """
    @raise TimProtocolError: C{ERR_PARAMS} naming the first required field
        that is not set.
    """
    missing = struct.missing_required()
    if missing:
        raise TimProtocolError(ErrorCode.ERR_PARAMS, f"{type(struct).__name__}.{missing[0]} is required")


def encode_json(struct: TimStruct) -> bytes:
    """
    UTF-8 JSON of C{struct}, with Go's key names: required fields always,
    optional fields only when set and (for lists, maps and bytes) non-empty.
    """
    return json.dumps(struct.to_json_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_json(cls: type[S], data: bytes) -> S:
    """
    @raise TimProtocolError: C{ERR_FORMAT} for invalid UTF-8 or JSON, or a
        value of the wrong type.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TimProtocolError(ErrorCode.ERR_FORMAT, f"invalid JSON for {cls.__name__}") from None
    if "\\u" in text:
        # A \uD800-style escape decodes to a lone surrogate, which is no
        # Unicode text: it would fail later, when the string is encoded.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise TimProtocolError(
                ErrorCode.ERR_FORMAT, f"invalid Unicode (a lone surrogate escape) in JSON for {cls.__name__}"
            ) from None
    return cls.from_json_dict(value)  # type: ignore[return-value]


def encode(struct: TimStruct, encoding: Encoding, generation: Generation = Generation.TIM20) -> bytes:
    """
    C{struct} in C{encoding}; compact in C{generation}'s layout (JSON has
    none: its keys are names).
    """
    if encoding is Encoding.JSON:
        return encode_json(struct)
    return encode_compact(struct, generation)


def decode(cls: type[S], data: bytes, encoding: Encoding, generation: Generation = Generation.TIM20) -> S:
    """
    Decode C{data} into a C{cls} and check its required fields; compact in
    C{generation}'s layout.

    @raise TimProtocolError: see L{decode_compact}, L{decode_json} and
        L{check_required}.
    """
    if encoding is Encoding.JSON:
        result = decode_json(cls, data)
    else:
        result = decode_compact(cls, data, generation)
    check_required(result)
    return result


# The pure-Python fallback, used only when fastbinary failed to build.


class _SpecCompactProtocol(TCompactProtocol):  # type: ignore[misc]
    """
    thrift's pure-Python compact protocol, reading and writing nested structs
    in the spec given (a generation's layout) instead of their class's
    C{thrift_spec}.
    """

    def readContainerStruct(self, spec: Any) -> Any:
        cls, structSpec = spec
        obj = cls()
        self.readStruct(obj, structSpec)
        return obj

    def writeContainerStruct(self, val: Any, spec: Any) -> None:
        self.writeStruct(val, spec[1])


def _slow_encode(struct: TimStruct, spec: tuple[Any, ...]) -> bytes:
    buf = TMemoryBuffer()
    _SpecCompactProtocol(buf).writeStruct(struct, spec)
    return bytes(buf.getvalue())


def _slow_decode(result: TimStruct, data: bytes, spec: tuple[Any, ...]) -> None:
    _SpecCompactProtocol(TMemoryBuffer(data), len(data), len(data)).readStruct(result, spec)


__all__ = [
    "ACCELERATED",
    "Encoding",
    "check_required",
    "decode",
    "decode_compact",
    "decode_json",
    "encode",
    "encode_compact",
    "encode_json",
]
