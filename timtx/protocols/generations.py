# -*- test-case-name: timtx.test.test_generations -*-
"""
Which tim generation a session speaks, and how its frames are read.

tim 2.0 and tim 2.1 clients share every struct but two (see
L{Generation}): tim 2.1 renumbered L{TimRoomBean} and made
C{TimAuth.token} a string.  A server that serves both must know, per
session, which layout to write and read.  Theory of operation:

  - At login (L{login_generation}): a string token proves tim 2.1 (tim
    2.0's Go decoder cannot even read one); a numeric token proves tim 2.0.
    A name and password prove nothing (both generations send the same
    TimAuth), so the session gets the node's default, tim 2.0 unless
    configured.
  - Afterwards, once (L{decode_for_session}): a tim 2.0 session whose frame
    holds a TimRoomBean only tim 2.1 writes (an i64 in field 8, where 2.0
    has a map, or a field 10, which 2.0 lacks) is a tim 2.1 client that
    logged in with a password: it becomes a 2.1 session, that frame is read
    in 2.1's layout and so is everything sent to it from then on.  Nothing
    moves a session back to 2.0.
  - JSON has no layout (its keys are names), so JSON frames prove nothing
    and read the same in both generations.

Sans-IO: bytes and structs in, structs and a generation out.
"""

from __future__ import annotations

from typing import Any, TypeVar

from thrift.Thrift import TType

from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Generation, TimAuth, TimNodes, TimRoomBean, TimStruct

S = TypeVar("S", bound=TimStruct)

# What only tim 2.1 writes in a TimRoomBean, read into probe attributes:
# field 8 as an i64 (2.0 has a map there) and field 10 of any map (2.0 has
# none).  Binary values, so that no byte sequence fails to decode.
_PROBE_ROOM: tuple[Any, ...] = (
    *([None] * 8),
    (8, TType.I64, "createtime", None, None),
    None,
    (10, TType.MAP, "extra", (TType.STRING, "BINARY", TType.STRING, "BINARY", False), None),
)
_PROBE_NODES: tuple[Any, ...] = (
    *([None] * 4),
    (4, TType.MAP, "roommap", (TType.STRING, "BINARY", TType.STRUCT, [TimRoomBean, _PROBE_ROOM], False), None),
)
_PROBES: dict[type[TimStruct], tuple[Any, ...]] = {TimRoomBean: _PROBE_ROOM, TimNodes: _PROBE_NODES}


def login_generation(auth: TimAuth, default: Generation = Generation.TIM20) -> Generation:
    """
    The generation of a session that logged in with C{auth}: by the type of
    its token, else C{default}.
    """
    if isinstance(auth.token, str):
        return Generation.TIM21
    if isinstance(auth.token, int):
        return Generation.TIM20
    return default


def _proves21(bean: Any) -> bool:
    return isinstance(bean, TimRoomBean) and (bean.createtime is not None or bean.extra is not None)


def proven_generation(cls: type[TimStruct], data: bytes) -> Generation | None:
    """
    The generation compact C{data} of a C{cls} proves it was written in:
    L{Generation.TIM21} if it holds a TimRoomBean with an i64 in field 8 or
    with a field 10; else C{None} (the bytes read alike in both, or are
    malformed, which decoding them reports).
    """
    probe = _PROBES.get(cls)
    if probe is None:
        return None
    try:
        found = codec._decode_with_spec(cls, data, probe)
    except TimProtocolError:
        return None
    beans = (found.roommap or {}).values() if isinstance(found, TimNodes) else (found,)
    return Generation.TIM21 if any(_proves21(bean) for bean in beans) else None


def decode_for_session(cls: type[S], data: bytes, encoding: Encoding, generation: Generation) -> tuple[S, Generation]:
    """
    Decode a frame's payload as a session of C{generation} reads it.

    @return: the struct, and the session's generation from now on: tim 2.1
        if it was, or if these compact bytes prove it.
    @raise TimProtocolError: as L{codec.decode}.
    """
    if encoding is Encoding.COMPACT and generation is Generation.TIM20:
        if proven_generation(cls, data) is Generation.TIM21:
            generation = Generation.TIM21
    return codec.decode(cls, data, encoding, generation), generation


__all__ = ["Generation", "decode_for_session", "login_generation", "proven_generation"]
