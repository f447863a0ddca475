# -*- test-case-name: timtx.test.test_codec -*-
"""
tim 2.0's client structs, declared once with their Thrift field ids and types.

No C{.thrift} file was ever published for tim; the ids and types below were
read from the generated Go code of tim 2.0.0 (C{stub/stub.go}), with the tim
2.1 additions that do not clash with 2.0 (C{TimAck.t2/n2},
C{TimMessage.toList}).  Each class gets a C{thrift_spec} in the layout the
C{thrift} package's C codec expects, and a JSON key table with the names Go's
C{encoding/json} gives these structs.

Fields are plain attributes that default to C{None} ("not set").  Nothing
here imports Twisted.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar

from thrift.Thrift import TType

from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError


def _bad(path: str, expected: str) -> TimProtocolError:
    return TimProtocolError(ErrorCode.ERR_FORMAT, f"{path}: expected {expected}")


class _Kind:
    """
    How one Thrift type is declared for the C codec and carried in JSON.
    """

    ttype: int = TType.STOP
    name = "?"

    def spec_args(self) -> Any:
        return None

    def to_json(self, value: Any) -> Any:
        return value

    def from_json(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def is_empty(self, value: Any) -> bool:
        """
        Whether Go's C{omitempty} would leave this value out of JSON.  It does
        so for nil pointers (None here) and for empty slices and maps.
        """
        return value is None


class _Int(_Kind):
    def __init__(self, ttype: int, bits: int, name: str):
        self.ttype = ttype
        self.name = name
        self.low = -(1 << (bits - 1))
        self.high = (1 << (bits - 1)) - 1

    def from_json(self, value: Any, path: str) -> int:
        if type(value) is not int or not (self.low <= value <= self.high):
            raise _bad(path, self.name)
        return value

    def check(self, value: Any) -> bool:
        return type(value) is int and self.low <= value <= self.high


class _Bool(_Kind):
    ttype = TType.BOOL
    name = "bool"

    def from_json(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise _bad(path, "a boolean")
        return value


class _String(_Kind):
    ttype = TType.STRING
    name = "string"

    def spec_args(self) -> Any:
        return "UTF8"

    def from_json(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _bad(path, "a string")
        return value


class _Binary(_Kind):
    """
    Thrift C{binary}; in JSON a standard base64 string, as Go encodes C{[]byte}.
    """

    ttype = TType.STRING
    name = "binary"

    def spec_args(self) -> Any:
        return "BINARY"

    def to_json(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    def from_json(self, value: Any, path: str) -> bytes:
        if not isinstance(value, str):
            raise _bad(path, "a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(path, "a base64 string") from None

    def is_empty(self, value: Any) -> bool:
        return not value


class _List(_Kind):
    ttype = TType.LIST

    def __init__(self, element: _Kind):
        self.element = element
        self.name = f"list<{element.name}>"

    def spec_args(self) -> Any:
        return (self.element.ttype, self.element.spec_args(), False)

    def to_json(self, value: list[Any]) -> list[Any]:
        return [None if v is None else self.element.to_json(v) for v in value]

    def from_json(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _bad(path, "a list")
        return [self.element.from_json(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def is_empty(self, value: Any) -> bool:
        return not value


class _Map(_Kind):
    ttype = TType.MAP

    def __init__(self, key: _Kind, value: _Kind):
        self.key = key
        self.value = value
        self.name = f"map<{key.name},{value.name}>"

    def spec_args(self) -> Any:
        return (self.key.ttype, self.key.spec_args(), self.value.ttype, self.value.spec_args(), False)

    def to_json(self, value: dict[Any, Any]) -> dict[Any, Any]:
        return {k: None if v is None else self.value.to_json(v) for k, v in value.items()}

    def from_json(self, value: Any, path: str) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise _bad(path, "an object")
        return {k: self.value.from_json(v, f"{path}.{k}") for k, v in value.items()}

    def is_empty(self, value: Any) -> bool:
        return not value


class _StructKind(_Kind):
    ttype = TType.STRUCT

    def __init__(self, cls: type[TimStruct]):
        self.cls = cls
        self.name = cls.__name__

    def spec_args(self) -> Any:
        return [self.cls, self.cls.thrift_spec]

    def to_json(self, value: TimStruct) -> dict[str, Any]:
        return value.to_json_dict()

    def from_json(self, value: Any, path: str) -> TimStruct:
        return self.cls.from_json_dict(value, path)


BOOL = _Bool()
BYTE = _Int(TType.BYTE, 8, "i8")
I16 = _Int(TType.I16, 16, "i16")
I32 = _Int(TType.I32, 32, "i32")
I64 = _Int(TType.I64, 64, "i64")
STRING = _String()
BINARY = _Binary()


def LIST(element: _Kind) -> _Kind:
    return _List(element)


def MAP(key: _Kind, value: _Kind) -> _Kind:
    return _Map(key, value)


def STRUCT(cls: type[TimStruct]) -> _Kind:
    return _StructKind(cls)


class Field:
    """
    One field: its Thrift id, attribute name, kind, and whether tim marks it
    required.  C{json} is the JSON key when it differs from the name.
    """

    __slots__ = ("fid", "name", "kind", "required", "json")

    def __init__(self, fid: int, name: str, kind: _Kind, required: bool = False, json: str | None = None):
        self.fid = fid
        self.name = name
        self.kind = kind
        self.required = required
        self.json = json or name


class TimStruct:
    """
    Base of all tim structs.  A subclass lists its L{Field}s in C{FIELDS} and
    the same names in C{__slots__}; the Thrift spec and the JSON key tables
    are derived when the class is created.
    """

    __slots__: ClassVar[tuple[str, ...]] = ()
    FIELDS: ClassVar[tuple[Field, ...]] = ()
    thrift_spec: ClassVar[tuple[Any, ...]]
    _by_json_key: ClassVar[dict[str, Field]]
    _by_folded_key: ClassVar[dict[str, Field]]

    def __init__(self, **values: Any) -> None:
        for field in self.FIELDS:
            setattr(self, field.name, values.pop(field.name, None))
        if values:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(values)}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in self.FIELDS)

    def __hash__(self) -> int:  # mutable, like the generated classes
        raise TypeError(f"unhashable type: {type(self).__name__}")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in self.FIELDS if getattr(self, f.name) is not None
        )
        return f"{type(self).__name__}({shown})"

    def copy(self, **changes: Any) -> TimStruct:
        """
        A shallow copy with some fields replaced.
        """
        values = {f.name: getattr(self, f.name) for f in self.FIELDS}
        values.update(changes)
        return type(self)(**values)

    # The two methods thrift's pure-Python protocol calls on nested structs
    # when the C codec is unavailable.

    def read(self, iprot: Any) -> None:
        iprot.readStruct(self, self.thrift_spec)

    def write(self, oprot: Any) -> None:
        oprot.writeStruct(self, self.thrift_spec)

    def missing_required(self) -> list[str]:
        """
        The names of required fields that are not set.
        """
        return [f.name for f in self.FIELDS if f.required and getattr(self, f.name) is None]

    def fill_required(self) -> None:
        """
        Give unset required fields their zero value, as Go's generated code
        always writes required fields.
        """
        for field in self.FIELDS:
            if field.required and getattr(self, field.name) is None:
                setattr(self, field.name, _ZERO.get(field.kind.ttype))

    # JSON, as Go's encoding/json writes and reads these structs.

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in self.FIELDS:
            value = getattr(self, field.name)
            if field.required:
                if value is None:
                    value = _ZERO.get(field.kind.ttype)
                out[field.json] = field.kind.to_json(value) if value is not None else None
            elif not field.kind.is_empty(value):
                out[field.json] = field.kind.to_json(value)
        return out

    @classmethod
    def from_json_dict(cls, data: Any, path: str | None = None) -> TimStruct:
        """
        Build a struct from a decoded JSON object.  Keys match exactly first,
        then case-insensitively, like Go's decoder (timjs sends C{vNode} for
        C{VNode}).  Unknown keys are ignored and C{null} means "not set".

        @raise TimProtocolError: C{ERR_FORMAT} for a value of the wrong type.
        """
        path = path or cls.__name__
        if not isinstance(data, dict):
            raise _bad(path, "an object")
        self = cls()
        for key, value in data.items():
            field = cls._by_json_key.get(key)
            if field is None and isinstance(key, str):
                field = cls._by_folded_key.get(key.lower())
            if field is None or value is None:
                continue
            setattr(self, field.name, cls._json_value(field, value, f"{path}.{field.json}"))
        return self

    @classmethod
    def _json_value(cls, field: Field, value: Any, path: str) -> Any:
        return field.kind.from_json(value, path)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "FIELDS" in cls.__dict__:
            cls._declare()

    @classmethod
    def _declare(cls) -> None:
        size = max((f.fid for f in cls.FIELDS), default=0) + 1
        spec: list[Any] = [None] * size
        for f in cls.FIELDS:
            spec[f.fid] = (f.fid, f.kind.ttype, f.name, f.kind.spec_args(), None)
        cls.thrift_spec = tuple(spec)
        cls._by_json_key = {f.json: f for f in cls.FIELDS}
        cls._by_folded_key = {f.json.lower(): f for f in cls.FIELDS}


_ZERO = {
    TType.BOOL: False,
    TType.BYTE: 0,
    TType.I16: 0,
    TType.I32: 0,
    TType.I64: 0,
    TType.STRING: "",
}


def _names(fields: tuple[Field, ...]) -> tuple[str, ...]:
    return tuple(f.name for f in fields)


# The declarations, in an order that lets nested structs name their class.


class TimError(TimStruct):
    FIELDS = (
        Field(1, "code", I32),
        Field(2, "info", STRING),
    )
    __slots__ = _names(FIELDS)
    code: int | None
    info: str | None


class TimAck(TimStruct):
    FIELDS = (
        Field(1, "ok", BOOL, required=True),
        Field(2, "timType", BYTE, required=True),
        Field(3, "error", STRUCT(TimError)),
        Field(4, "t", I64),
        Field(5, "n", STRING),
        Field(6, "t2", I64),  # tim 2.1
        Field(7, "n2", STRING),  # tim 2.1
    )
    __slots__ = _names(FIELDS)
    ok: bool | None
    timType: int | None
    error: TimError | None
    t: int | None
    n: str | None
    t2: int | None
    n2: str | None


class TimReq(TimStruct):
    FIELDS = (
        Field(1, "rtype", I32),
        Field(2, "node", STRING),
        Field(3, "node2", STRING),
        Field(4, "reqInt", I64),
        Field(5, "reqInt2", I64),
        Field(6, "reqStr", STRING),
        Field(7, "reqStr2", STRING),
    )
    __slots__ = _names(FIELDS)
    rtype: int | None
    node: str | None
    node2: str | None
    reqInt: int | None
    reqInt2: int | None
    reqStr: str | None
    reqStr2: str | None


class Tid(TimStruct):
    FIELDS = (
        Field(1, "node", STRING, required=True),
        Field(2, "domain", STRING),
        Field(3, "resource", STRING),
        Field(4, "termtyp", BYTE),
        Field(5, "extend", MAP(STRING, STRING)),
    )
    __slots__ = _names(FIELDS)
    node: str | None
    domain: str | None
    resource: str | None
    termtyp: int | None
    extend: dict[str, str] | None


class TimUserBean(TimStruct):
    FIELDS = (
        Field(1, "name", STRING),
        Field(2, "nickName", STRING),
        Field(4, "brithday", STRING),  # sic, tim's spelling
        Field(5, "gender", BYTE),
        Field(6, "cover", STRING),
        Field(7, "area", STRING),
        Field(8, "createtime", I64),
        Field(9, "photoTidAlbum", LIST(STRING)),
        Field(10, "extend", MAP(STRING, STRING)),
        Field(11, "extra", MAP(STRING, BINARY)),
    )
    __slots__ = _names(FIELDS)
    name: str | None
    nickName: str | None
    brithday: str | None
    gender: int | None
    cover: str | None
    area: str | None
    createtime: int | None
    photoTidAlbum: list[str] | None
    extend: dict[str, str] | None
    extra: dict[str, bytes] | None


# tim 2.0.0's layout.  tim 2.1 inserted "kind" at 7 and moved createtime,
# extend and extra to 8, 9 and 10; see docs/protocol.md.
class TimRoomBean(TimStruct):
    FIELDS = (
        Field(1, "founder", STRING),
        Field(2, "managers", LIST(STRING)),
        Field(3, "cover", STRING),
        Field(4, "topic", STRING),
        Field(5, "label", STRING),
        Field(6, "gtype", BYTE),
        Field(7, "createtime", I64),
        Field(8, "extend", MAP(STRING, STRING)),
        Field(9, "extra", MAP(STRING, BINARY)),
    )
    __slots__ = _names(FIELDS)
    founder: str | None
    managers: list[str] | None
    cover: str | None
    topic: str | None
    label: str | None
    gtype: int | None
    createtime: int | None
    extend: dict[str, str] | None
    extra: dict[str, bytes] | None


class _TimAuthBase(TimStruct):
    __slots__ = ()

    @classmethod
    def _json_value(cls, field: Field, value: Any, path: str) -> Any:
        # tim 2.0 carries the token as a JSON number, tim 2.1 as a string.
        if field.name == "token" and isinstance(value, str):
            return value
        return field.kind.from_json(value, path)


class TimAuth(_TimAuthBase):
    FIELDS = (
        Field(1, "name", STRING),
        Field(2, "pwd", STRING),
        Field(3, "domain", STRING),
        Field(4, "resource", STRING),
        Field(5, "termtyp", BYTE),
        Field(6, "token", I64),  # a string in tim 2.1, see TIMAUTH_TOKEN_STRING_SPEC
        Field(7, "extend", MAP(STRING, STRING)),
    )
    __slots__ = _names(FIELDS)
    name: str | None
    pwd: str | None
    domain: str | None
    resource: str | None
    termtyp: int | None
    token: int | str | None
    extend: dict[str, str] | None


#: TimAuth as tim 2.1 declares it (token is a string), for a second decoding
#: pass when the first left the token unset: compact carries each field's
#: type, so the two versions can be told apart.
TIMAUTH_TOKEN_STRING_SPEC = tuple(
    (6, TType.STRING, "token", "UTF8", None) if fid == 6 else entry for fid, entry in enumerate(TimAuth.thrift_spec)
)


class TimPresence(TimStruct):
    FIELDS = (
        Field(1, "id", I64),
        Field(2, "offline", BOOL),
        Field(3, "subStatus", BYTE),
        Field(4, "fromTid", STRUCT(Tid)),
        Field(5, "toTid", STRUCT(Tid)),
        Field(6, "toList", LIST(STRING)),
        Field(7, "show", I16),
        Field(8, "status", STRING),
        Field(9, "extend", MAP(STRING, STRING)),
        Field(10, "extra", MAP(STRING, BINARY)),
        Field(101, "invisible", BOOL),  # timtx: invisible mode, see docs/messaging.md
    )
    __slots__ = _names(FIELDS)
    id: int | None
    offline: bool | None
    subStatus: int | None
    fromTid: Tid | None
    toTid: Tid | None
    toList: list[str] | None
    show: int | None
    status: str | None
    extend: dict[str, str] | None
    extra: dict[str, bytes] | None
    invisible: bool | None


class TimMessage(TimStruct):
    FIELDS = (
        Field(1, "msType", BYTE, required=True),
        Field(2, "odType", BYTE, required=True),
        Field(3, "id", I64),
        Field(4, "mid", I64),
        Field(5, "bnType", I32),
        Field(6, "fromTid", STRUCT(Tid)),
        Field(7, "toTid", STRUCT(Tid)),
        Field(8, "roomTid", STRUCT(Tid)),
        Field(9, "dataBinary", BINARY),
        Field(10, "dataString", STRING),
        Field(11, "isOffline", BOOL),
        Field(12, "timestamp", I64),
        Field(13, "udtype", I16),
        Field(14, "udshow", I16),
        Field(15, "extend", MAP(STRING, STRING)),
        Field(16, "extra", MAP(STRING, BINARY)),
        Field(17, "toList", LIST(STRING), json="ToList"),  # tim 2.1
        Field(101, "seq", I64),  # timtx: place in the conversation, see docs/messaging.md
    )
    __slots__ = _names(FIELDS)
    msType: int | None
    odType: int | None
    id: int | None
    mid: int | None
    bnType: int | None
    fromTid: Tid | None
    toTid: Tid | None
    roomTid: Tid | None
    dataBinary: bytes | None
    dataString: str | None
    isOffline: bool | None
    timestamp: int | None
    udtype: int | None
    udshow: int | None
    extend: dict[str, str] | None
    extra: dict[str, bytes] | None
    toList: list[str] | None
    seq: int | None


class TimStream(TimStruct):
    FIELDS = (
        Field(1, "id", I64, required=True),
        Field(2, "VNode", STRING, required=True),
        Field(3, "dtype", BYTE),
        Field(4, "body", BINARY),
        Field(5, "fromNode", STRING, required=True),
        Field(101, "missed", I64),  # timtx: frames this subscriber missed, see docs/vrooms.md
    )
    __slots__ = _names(FIELDS)
    id: int | None
    VNode: str | None
    dtype: int | None
    body: bytes | None
    fromNode: str | None
    missed: int | None


class TimNodes(TimStruct):
    FIELDS = (
        Field(1, "ntype", I32, required=True),
        Field(2, "nodelist", LIST(STRING)),
        Field(3, "usermap", MAP(STRING, STRUCT(TimUserBean))),
        Field(4, "roommap", MAP(STRING, STRUCT(TimRoomBean))),
        Field(5, "node", STRING),
    )
    __slots__ = _names(FIELDS)
    ntype: int | None
    nodelist: list[str] | None
    usermap: dict[str, TimUserBean] | None
    roommap: dict[str, TimRoomBean] | None
    node: str | None


class TimMessageList(TimStruct):
    FIELDS = (
        Field(1, "id", I64),
        Field(2, "messageList", LIST(STRUCT(TimMessage))),
    )
    __slots__ = _names(FIELDS)
    id: int | None
    messageList: list[TimMessage] | None


ALL_STRUCTS: tuple[type[TimStruct], ...] = (
    TimError,
    TimAck,
    TimReq,
    Tid,
    TimUserBean,
    TimRoomBean,
    TimAuth,
    TimPresence,
    TimMessage,
    TimStream,
    TimNodes,
    TimMessageList,
)
