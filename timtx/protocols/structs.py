# -*- test-case-name: timtx.test.test_codec -*-
"""
tim's client structs, declared once with their Thrift field ids and types.

No C{.thrift} file was ever published for tim; the ids and types below were
read from the generated Go code of tim 2.0.0 (C{stub/stub.go}), with the tim
2.1 additions that do not clash with 2.0 (C{TimAck.t2/n2},
C{TimMessage.toList}).  Each class gets a C{thrift_spec} in the layout the
C{thrift} package's C codec expects, and a JSON key table with the names Go's
C{encoding/json} gives these structs.

Where tim 2.1 numbers a struct differently (L{TimRoomBean}) or types a field
differently (C{TimAuth.token}), the class declares that L{Generation}'s
layout in C{LAYOUTS}; L{TimStruct.spec_for} gives the Thrift spec of either
generation, nested structs included.  The default, C{thrift_spec}, is tim
2.0's.  JSON has no layout: its keys are names.

Each L{Field} also says what it means, who sends it and whether it is tim's
or a timtx extension: C{docs/protocol.md} is generated from these
declarations (L{timtx.protocols.reference}).

Fields are plain attributes that default to C{None} ("not set").  Nothing
here imports Twisted.
"""

from __future__ import annotations

import base64
import binascii
from enum import Enum
from typing import Any, ClassVar, Mapping

from thrift.Thrift import TType

from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError


def _bad(path: str, expected: str) -> TimProtocolError:
    return TimProtocolError(ErrorCode.ERR_FORMAT, f"{path}: expected {expected}")


class Generation(Enum):
    """
    The tim release a client was built for.  Their structs differ in two
    places a server can see: tim 2.1 renumbered L{TimRoomBean} (C{kind} at
    7, then C{createtime}, C{extend}, C{extra} at 8, 9, 10) and made
    C{TimAuth.token} a string.
    """

    TIM20 = "2.0"
    TIM21 = "2.1"


#: Who sends a field: the client, the server, or both.
CLIENT = "c→s"
SERVER = "s→c"
BOTH = "both"

#: Where a field comes from.
TIM = "tim 2.0"
TIM21 = "tim 2.1"
TIMTX = "timtx"


class _Kind:
    """
    How one Thrift type is declared for the C codec and carried in JSON.
    """

    ttype: int = TType.STOP
    name = "?"

    def spec_args(self, generation: Generation = Generation.TIM20) -> Any:
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

    def spec_args(self, generation: Generation = Generation.TIM20) -> Any:
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

    def spec_args(self, generation: Generation = Generation.TIM20) -> Any:
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

    def spec_args(self, generation: Generation = Generation.TIM20) -> Any:
        return (self.element.ttype, self.element.spec_args(generation), False)

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

    def spec_args(self, generation: Generation = Generation.TIM20) -> Any:
        return (
            self.key.ttype,
            self.key.spec_args(generation),
            self.value.ttype,
            self.value.spec_args(generation),
            False,
        )

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

    def spec_args(self, generation: Generation = Generation.TIM20) -> Any:
        return [self.cls, self.cls.spec_for(generation)]

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

    For the protocol reference: C{doc} says what it means, C{direction} who
    sends it (L{CLIENT}, L{SERVER}, L{BOTH}; C{None} for the struct's
    C{DIRECTION}), C{origin} where it comes from (L{TIM}, L{TIM21},
    L{TIMTX}).
    """

    __slots__ = ("fid", "name", "kind", "required", "json", "doc", "direction", "origin")

    def __init__(
        self,
        fid: int,
        name: str,
        kind: _Kind,
        required: bool = False,
        json: str | None = None,
        *,
        doc: str = "",
        direction: str | None = None,
        origin: str = TIM,
    ):
        self.fid = fid
        self.name = name
        self.kind = kind
        self.required = required
        self.json = json or name
        self.doc = doc
        self.direction = direction
        self.origin = origin


class TimStruct:
    """
    Base of all tim structs.  A subclass lists its L{Field}s in C{FIELDS} and
    the same names in C{__slots__}; the Thrift spec and the JSON key tables
    are derived when the class is created.
    """

    __slots__: ClassVar[tuple[str, ...]] = ()
    FIELDS: ClassVar[tuple[Field, ...]] = ()
    #: Wire layouts of other generations, where they differ from C{FIELDS}
    #: (tim 2.0's); their names are a subset of C{FIELDS}'.
    LAYOUTS: ClassVar[Mapping[Generation, tuple[Field, ...]]] = {}
    #: For the protocol reference: what the struct is for and who sends it.
    DOC: ClassVar[str] = ""
    DIRECTION: ClassVar[str] = BOTH
    thrift_spec: ClassVar[tuple[Any, ...]]
    _by_json_key: ClassVar[dict[str, Field]]
    _by_folded_key: ClassVar[dict[str, Field]]
    _specs: ClassVar[dict[Generation, tuple[Any, ...]]]

    #: The names of C{FIELDS}, in order (set with them).
    _names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **values: Any) -> None:
        if not values:
            # The decoder's case, for every struct it reads: all unset.
            for name in self._names:
                setattr(self, name, None)
            return
        for name in self._names:
            setattr(self, name, values.pop(name, None))
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
    def fields_in(cls, generation: Generation) -> tuple[Field, ...]:
        """
        The fields on the wire in C{generation}'s layout.
        """
        return cls.LAYOUTS.get(generation, cls.FIELDS)

    @classmethod
    def spec_for(cls, generation: Generation) -> tuple[Any, ...]:
        """
        The Thrift spec of C{generation}'s layout, nested structs in the same
        generation's layout.
        """
        spec = cls._specs.get(generation)
        if spec is None:
            spec = cls._specs[generation] = _spec(cls.fields_in(generation), generation)
        return spec

    @classmethod
    def _declare(cls) -> None:
        names = {f.name for f in cls.FIELDS}
        for generation, fields in cls.LAYOUTS.items():
            extra = {f.name for f in fields} - names
            if extra:
                raise TypeError(f"{cls.__name__}'s {generation.value} layout has fields not in FIELDS: {extra}")
        cls._names = tuple(f.name for f in cls.FIELDS)
        cls._specs = {}
        cls.thrift_spec = cls.spec_for(Generation.TIM20)
        cls._by_json_key = {f.json: f for f in cls.FIELDS}
        cls._by_folded_key = {f.json.lower(): f for f in cls.FIELDS}


def _spec(fields: tuple[Field, ...], generation: Generation) -> tuple[Any, ...]:
    size = max((f.fid for f in fields), default=0) + 1
    spec: list[Any] = [None] * size
    for f in fields:
        spec[f.fid] = (f.fid, f.kind.ttype, f.name, f.kind.spec_args(generation), None)
    return tuple(spec)


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


def _extend(fid: int) -> Field:
    return Field(fid, "extend", MAP(STRING, STRING), doc="Application-defined.")


def _extra(fid: int) -> Field:
    return Field(fid, "extra", MAP(STRING, BINARY), doc="Application-defined bytes.")


# The declarations, in an order that lets nested structs name their class.
# Field docs are rendered into docs/protocol.md: say what a client needs to
# know, in a sentence or two.


class TimError(TimStruct):
    DOC = "Why a request was refused, inside an error `TimAck`."
    DIRECTION = SERVER
    FIELDS = (
        Field(1, "code", I32, doc="The error code (4101–4115, 5101–5105; see the table of errors)."),
        Field(2, "info", STRING, doc="A short English reason, for people; never a traceback."),
    )
    __slots__ = _names(FIELDS)
    code: int | None
    info: str | None


class TimAck(TimStruct):
    DOC = (
        "The answer to a request, in a TIMACK (12) frame; also TIMLOGOUT (`timType` 20) and the end of a "
        "virtual room (`timType` 22), sent unasked."
    )
    DIRECTION = SERVER
    FIELDS = (
        Field(1, "ok", BOOL, required=True, doc="Whether the request succeeded."),
        Field(
            2,
            "timType",
            BYTE,
            required=True,
            doc="The frame type of the request answered (16 for a login, 41 for TIMBUSINESS, ...).",
        ),
        Field(3, "error", STRUCT(TimError), doc="Why it failed, when `ok` is false."),
        Field(
            4,
            "t",
            I64,
            doc="Depends on the request: the token (TIMTOKEN, tim 2.0's number); the `rtype` or `ntype` done "
            "(TIMBUSINESS, TIMVROOM, TIMNODES); the refused message's `id` (error answering a message, timtx).",
        ),
        Field(
            5,
            "n",
            STRING,
            doc="Depends on the request: the account id (register, login); the token as a string (TIMTOKEN, "
            "tim 2.1's); the user, group or room the request named.",
        ),
        Field(
            6,
            "t2",
            I64,
            origin=TIM21,
            doc="timtx uses it for the frames a virtual-room subscription missed (TIMVROOM rtypes 6, 103).",
        ),
        Field(
            7,
            "n2",
            STRING,
            origin=TIM21,
            doc='timtx uses it for `"pending"` when a join request waits for approval (TIMBUSINESS rtype 9).',
        ),
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
    DOC = (
        "A request: TIMBUSINESS (41), TIMPULLMESSAGE (21) and TIMVROOM (22). What each field carries "
        "depends on `rtype`; see the rtype tables in messaging.md, groups.md and vrooms.md."
    )
    DIRECTION = CLIENT
    FIELDS = (
        Field(1, "rtype", I32, doc="The operation (TIMBUSINESS: 1–21 and timtx's 101–105; TIMVROOM: 1–6, 101–103)."),
        Field(2, "node", STRING, doc="The user, group or room the operation is about."),
        Field(3, "node2", STRING, doc="A second user (the member to approve, kick, mute, ...)."),
        Field(4, "reqInt", I64, doc="A number: history cursor (`mid`), group type, mute seconds, ..."),
        Field(5, "reqInt2", I64, doc="A second number: the history page size."),
        Field(6, "reqStr", STRING, doc="A text: a greeting, the old password."),
        Field(7, "reqStr2", STRING, doc="A second text: the new password."),
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
    DOC = "Who: a user (or a group, in `roomTid`) and, for a sender, the device it sent from."
    FIELDS = (
        Field(1, "node", STRING, required=True, doc="The account id or group id (base58)."),
        Field(2, "domain", STRING, doc="The tenant the account belongs to, if any."),
        Field(3, "resource", STRING, doc="The sender's device, as its TimAuth named it.", direction=SERVER),
        Field(4, "termtyp", BYTE, doc="The sender's device type, as its TimAuth named it.", direction=SERVER),
        Field(5, "extend", MAP(STRING, STRING), doc="The sender's TimAuth `extend`.", direction=SERVER),
    )
    __slots__ = _names(FIELDS)
    node: str | None
    domain: str | None
    resource: str | None
    termtyp: int | None
    extend: dict[str, str] | None


class TimUserBean(TimStruct):
    DOC = "A user's profile, in `TimNodes.usermap` (ntype 4 read, 6 modify). All fields are free text to the server."
    FIELDS = (
        Field(1, "name", STRING, doc="Display name."),
        Field(2, "nickName", STRING, doc="Nickname."),
        Field(4, "brithday", STRING, doc="Birthday (tim's spelling)."),
        Field(5, "gender", BYTE, doc="Application-defined."),
        Field(6, "cover", STRING, doc="Picture URL or id."),
        Field(7, "area", STRING, doc="Region."),
        Field(8, "createtime", I64, doc="When the profile was first set, in ns; set by the server.", direction=SERVER),
        Field(9, "photoTidAlbum", LIST(STRING), doc="Application-defined list."),
        _extend(10),
        _extra(11),
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


_ROOM_KIND_DOC = "Application-defined group category (tim 2.1), kept with the profile; any session may set and read it."


class TimRoomBean(TimStruct):
    """
    A group profile.  C{FIELDS} is tim 2.0.0's layout plus C{kind} at 101,
    a timtx extension that lets 2.0 sessions and the store carry tim 2.1's
    C{kind}; C{LAYOUTS} holds tim 2.1's, which inserted C{kind} at 7 and
    moved C{createtime}, C{extend} and C{extra} to 8, 9 and 10.
    """

    DOC = "A group's profile, in `TimNodes.roommap` (ntype 5 read, 7 modify)."
    FIELDS = (
        Field(1, "founder", STRING, doc="The founder's account id; set by the server.", direction=SERVER),
        Field(2, "managers", LIST(STRING), doc="Managers' account ids; only the founder changes them."),
        Field(3, "cover", STRING, doc="Picture URL or id."),
        Field(4, "topic", STRING, doc="The group's name."),
        Field(5, "label", STRING, doc="Application-defined."),
        Field(6, "gtype", BYTE, doc="1 private (joins need approval), 2 open; set at creation.", direction=SERVER),
        Field(7, "createtime", I64, doc="When the group was created, in ns; set by the server.", direction=SERVER),
        _extend(8),
        _extra(9),
        Field(101, "kind", I64, doc=_ROOM_KIND_DOC, origin=TIMTX),
    )
    LAYOUTS = {
        Generation.TIM21: (
            *FIELDS[:6],
            Field(7, "kind", I64, doc=_ROOM_KIND_DOC, origin=TIM21),
            Field(8, "createtime", I64, direction=SERVER),
            _extend(9),
            _extra(10),
        )
    }
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
    kind: int | None


class _TimAuthBase(TimStruct):
    __slots__ = ()

    @classmethod
    def _json_value(cls, field: Field, value: Any, path: str) -> Any:
        # tim 2.0 carries the token as a JSON number, tim 2.1 as a string.
        if field.name == "token" and isinstance(value, str):
            return value
        return field.kind.from_json(value, path)


_TOKEN_DOC = (
    "A one-time token from TIMTOKEN, instead of `pwd`: a number in tim 2.0, a string in tim 2.1 "
    "(either is accepted, in either encoding; a string makes the session a tim 2.1 one)."
)


class TimAuth(_TimAuthBase):
    DOC = "Register and ask for a token (`/tim2`, TIMREGISTER 14 and TIMTOKEN 15), and log in (TIMAUTH 16)."
    DIRECTION = CLIENT
    FIELDS = (
        Field(1, "name", STRING, doc="The login name (1 to `name_max_length` characters)."),
        Field(2, "pwd", STRING, doc="The password."),
        Field(3, "domain", STRING, doc="The tenant; the same name in two domains is two accounts."),
        Field(4, "resource", STRING, doc="A free-text device name, copied into `fromTid.resource`."),
        Field(5, "termtyp", BYTE, doc="The device type, counted by `[devices] type_limit`."),
        Field(6, "token", I64, doc=_TOKEN_DOC),
        Field(7, "extend", MAP(STRING, STRING), doc="Device details, copied into `fromTid.extend`."),
    )
    LAYOUTS = {Generation.TIM21: (*FIELDS[:5], Field(6, "token", STRING, doc=_TOKEN_DOC, origin=TIM21), FIELDS[6])}
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
TIMAUTH_TOKEN_STRING_SPEC = TimAuth.spec_for(Generation.TIM21)


class TimPresence(TimStruct):
    DOC = (
        "Presence: TIMPRESENCE (91) to `toTid`/`toList`, TIMBROADPRESENCE (19) to every friend; "
        "the server delivers it as TIMPRESENCE."
    )
    FIELDS = (
        Field(1, "id", I64, doc="Application-defined."),
        Field(2, "offline", BOOL, doc="True when the user's last session ended; set by the server.", direction=SERVER),
        Field(3, "subStatus", BYTE, doc="Application-defined (timgo: 1 asks to subscribe, 2 accepts)."),
        Field(4, "fromTid", STRUCT(Tid), doc="The sender; set by the server.", direction=SERVER),
        Field(5, "toTid", STRUCT(Tid), doc="One recipient.", direction=CLIENT),
        Field(6, "toList", LIST(STRING), doc="More recipients (at most `[presence] max_targets`).", direction=CLIENT),
        Field(7, "show", I16, doc="Application-defined (away, busy, ...)."),
        Field(8, "status", STRING, doc="Application-defined status text."),
        _extend(9),
        _extra(10),
        Field(
            101,
            "invisible",
            BOOL,
            origin=TIMTX,
            direction=CLIENT,
            doc="true: appear offline to friends until false is sent (see messaging.md).",
        ),
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
    DOC = (
        "A message, a recall or burn, or a notice: TIMMESSAGE (90), TIMREVOKEMESSAGE (92), TIMBURNMESSAGE (93) "
        "from clients; always frame type 90 from the server."
    )
    FIELDS = (
        Field(
            1,
            "msType",
            BYTE,
            required=True,
            doc="1 system (server only), 2 to a user (`toTid`), 3 to a group (`roomTid`).",
        ),
        Field(
            2,
            "odType",
            BYTE,
            required=True,
            doc="1 message, 2 recall, 3 burn, 4 notice (server only), 5 stream (not stored), 6 and 7 big payloads, "
            "31–127 application-defined.",
        ),
        Field(
            3,
            "id",
            I64,
            doc="The client's id for the message, kept as sent: the echo and an error ack (`t`) carry it, and a "
            "resend with the same id is stored once. Set by the server when absent.",
        ),
        Field(
            4,
            "mid",
            I64,
            doc="The message's number in its conversation, set by the server; a client sends it only to recall "
            "or burn.",
        ),
        Field(5, "bnType", I32, doc="The kind of notice (odType 4); set by the server.", direction=SERVER),
        Field(6, "fromTid", STRUCT(Tid), doc="The sender's session; set by the server.", direction=SERVER),
        Field(7, "toTid", STRUCT(Tid), doc="The recipient, for msType 2."),
        Field(8, "roomTid", STRUCT(Tid), doc="The group, for msType 3 (and private messages inside a group)."),
        Field(9, "dataBinary", BINARY, doc="Content, bytes."),
        Field(10, "dataString", STRING, doc="Content, text."),
        Field(11, "isOffline", BOOL, doc="True when delivered as an offline message.", direction=SERVER),
        Field(
            12,
            "timestamp",
            I64,
            doc="When the server accepted it, in ns since 1970 (above 2^53: see JSON below).",
            direction=SERVER,
        ),
        Field(13, "udtype", I16, doc="Application-defined, passed through."),
        Field(14, "udshow", I16, doc="Application-defined, passed through."),
        _extend(15),
        _extra(16),
        Field(
            17,
            "toList",
            LIST(STRING),
            json="ToList",
            origin=TIM21,
            doc="tim 2.1 routes between its nodes with it; timtx ignores it.",
        ),
        Field(
            101,
            "seq",
            I64,
            origin=TIMTX,
            direction=SERVER,
            doc="The message's place in its conversation: 1, 2, 3... with no gaps (see messaging.md).",
        ),
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
    DOC = "A frame of a virtual room (TIMSTREAM 94): pushed by a publisher, fanned out to subscribers."
    FIELDS = (
        Field(
            1,
            "id",
            I64,
            required=True,
            doc="The frame's number in its room, 1, 2, 3... (set by the server; a publisher may leave it 0).",
        ),
        Field(2, "VNode", STRING, required=True, doc="The room id (timjs sends the key `vNode`)."),
        Field(
            3,
            "dtype",
            BYTE,
            doc="Application-defined type of `body`, passed through unchanged; neither tim nor timtx reads it.",
        ),
        Field(4, "body", BINARY, doc="The data."),
        Field(
            5,
            "fromNode",
            STRING,
            required=True,
            doc="The publisher's account id (set by the server; a publisher may leave it empty).",
        ),
        Field(
            101,
            "missed",
            I64,
            origin=TIMTX,
            direction=SERVER,
            doc="Frames this subscription missed so far, on the first frame after a gap (see vrooms.md).",
        ),
    )
    __slots__ = _names(FIELDS)
    id: int | None
    VNode: str | None
    dtype: int | None
    body: bytes | None
    fromNode: str | None
    missed: int | None


class TimNodes(TimStruct):
    DOC = (
        "Profiles (TIMNODES 42: ntype 4–7 both ways) and lists (the answer to TIMBUSINESS rtypes 1, 2, 3, 18, 19, 20)."
    )
    FIELDS = (
        Field(
            1,
            "ntype",
            I32,
            required=True,
            doc="1 roster, 2 my groups, 3 group members, 4 read users, 5 read groups, 6 modify my profile, "
            "7 modify a group, 8 blocked users, 9 blocked groups, 10 a group's blocked members.",
        ),
        Field(2, "nodelist", LIST(STRING), doc="Account or group ids: the list answered, or the ids to read."),
        Field(3, "usermap", MAP(STRING, STRUCT(TimUserBean)), doc="Profiles by account id (ntype 4, 6)."),
        Field(4, "roommap", MAP(STRING, STRUCT(TimRoomBean)), doc="Profiles by group id (ntype 5, 7)."),
        Field(5, "node", STRING, doc="The group a member list is of (ntype 3, 10).", direction=SERVER),
    )
    __slots__ = _names(FIELDS)
    ntype: int | None
    nodelist: list[str] | None
    usermap: dict[str, TimUserBean] | None
    roommap: dict[str, TimRoomBean] | None
    node: str | None


class TimMessageList(TimStruct):
    DOC = "Messages in bulk: offline messages (TIMOFFLINEMSG 17, with the ack bit) and history (TIMPULLMESSAGE 21)."
    DIRECTION = SERVER
    FIELDS = (
        Field(1, "id", I64, doc="A number for the list."),
        Field(2, "messageList", LIST(STRUCT(TimMessage)), doc="The messages, in order."),
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
