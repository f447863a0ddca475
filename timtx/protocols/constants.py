# -*- test-case-name: timtx.test.test_codec -*-
"""
The numbers of tim 2.0's client protocol: frame types, error codes and the
enumerations carried inside structs.

Values are tim 2.0.0's (C{sys/timEg.go}, C{sys/var.go}, C{sys/err.go}); 4113-4115
and the big-data frame types 95-97 arrived in tim 2.0.1 and are understood by
the clients this engine serves.
"""

from enum import IntEnum


class TimType(IntEnum):
    """
    The low 7 bits of every frame's first byte.
    """

    TIMACK = 12
    TIMPING = 13
    TIMREGISTER = 14
    TIMTOKEN = 15
    TIMAUTH = 16
    TIMOFFLINEMSG = 17
    TIMOFFLINEMSGEND = 18
    TIMBROADPRESENCE = 19
    TIMLOGOUT = 20
    TIMPULLMESSAGE = 21
    TIMVROOM = 22
    TIMBUSINESS = 41
    TIMNODES = 42
    TIMMESSAGE = 90
    TIMPRESENCE = 91
    TIMREVOKEMESSAGE = 92
    TIMBURNMESSAGE = 93
    TIMSTREAM = 94
    TIMBIGSTRING = 95
    TIMBIGBINARY = 96
    TIMBIGBINARYSTREAM = 97


# Bit 0x80 of the first byte: "payload is JSON" from a client, "ack
# required, a 4-byte id follows" from the server.
FLAG_BIT = 0x80
TYPE_MASK = 0x7F


class ErrorCode(IntEnum):
    """
    Codes carried in C{TimAck.error.code}.
    """

    ERR_HASEXIST = 4101
    ERR_NOPASS = 4102
    ERR_EXPIREOP = 4103
    ERR_PARAMS = 4104
    ERR_AUTH = 4105
    ERR_ACCOUNT = 4106
    ERR_INTERFACE = 4107
    ERR_CANCEL = 4108
    ERR_NOEXIST = 4109
    ERR_BLOCK = 4110
    ERR_OVERENTRY = 4111
    ERR_MODIFYAUTH = 4112
    ERR_FORMAT = 4113
    ERR_BIGDATA = 4114
    ERR_TOKEN = 4115
    ERR_UNDEFINED = 5101
    ERR_BLOCKHANDLE = 5102
    ERR_DATABASE = 5103
    ERR_OVERLOAD = 5104
    ERR_OVERHZ = 5105


#: tim's own info texts, sent when a handler has nothing more specific to say.
ERROR_TEXT = {
    ErrorCode.ERR_HASEXIST: "has exist",
    ErrorCode.ERR_NOPASS: "no pass",
    ErrorCode.ERR_EXPIREOP: "expire operate",
    ErrorCode.ERR_PARAMS: "parameter incorrect",
    ErrorCode.ERR_AUTH: "limited authority",
    ErrorCode.ERR_ACCOUNT: "account incorrect",
    ErrorCode.ERR_INTERFACE: "interface incorrect",
    ErrorCode.ERR_CANCEL: "must not be a cancle object",
    ErrorCode.ERR_NOEXIST: "must not be a no exist object",
    ErrorCode.ERR_BLOCK: "blocked object",
    ErrorCode.ERR_OVERENTRY: "over entry",
    ErrorCode.ERR_MODIFYAUTH: "modify password failed",
    ErrorCode.ERR_FORMAT: "format error",
    ErrorCode.ERR_BIGDATA: "data too big",
    ErrorCode.ERR_TOKEN: "token error",
    ErrorCode.ERR_UNDEFINED: "undefined error",
    ErrorCode.ERR_BLOCKHANDLE: "blocked handle",
    ErrorCode.ERR_DATABASE: "database error",
    ErrorCode.ERR_OVERLOAD: "heavy server load",
    ErrorCode.ERR_OVERHZ: "freq out of limit",
}


class MsType(IntEnum):
    SOURCE_OS = 1
    SOURCE_USER = 2
    SOURCE_ROOM = 3


class OdType(IntEnum):
    ORDER_INOF = 1
    ORDER_REVOKE = 2
    ORDER_BURN = 3
    ORDER_BUSINESS = 4
    ORDER_STREAM = 5
    ORDER_BIGSTRING = 6
    ORDER_BIGBINARY = 7


#: odTypes 6..30 are reserved by tim; 31..127 belong to applications.
ORDER_RESERVED_MAX = 30
ORDER_CUSTOM_MAX = 127


class Business(IntEnum):
    """
    C{TimReq.rtype} of a TIMBUSINESS request, and C{bnType} of the notices it
    causes.
    """

    ROSTER = 1
    USERROOM = 2
    ROOMUSERS = 3
    ADDROSTER = 4
    FRIEND = 5
    REMOVEROSTER = 6
    BLOCKROSTER = 7
    NEWROOM = 8
    ADDROOM = 9
    PASSROOM = 10
    NOPASSROOM = 11
    PULLROOM = 12
    KICKROOM = 13
    BLOCKROOM = 14
    BLOCKROOMMEMBER = 15
    LEAVEROOM = 16
    CANCELROOM = 17
    BLOCKROSTERLIST = 18
    BLOCKROOMLIST = 19
    BLOCKROOMMEMBERLIST = 20
    MODIFYAUTH = 21


class NodeInfo(IntEnum):
    """
    C{TimNodes.ntype}.
    """

    ROSTER = 1
    ROOM = 2
    ROOMMEMBER = 3
    USERINFO = 4
    ROOMINFO = 5
    MODIFYUSER = 6
    MODIFYROOM = 7
    BLOCKROSTERLIST = 8
    BLOCKROOMLIST = 9
    BLOCKROOMMEMBERLIST = 10


class VRoomOp(IntEnum):
    """
    C{TimReq.rtype} of a TIMVROOM request.
    """

    REGISTER = 1
    REMOVE = 2
    ADDAUTH = 3
    DELAUTH = 4
    SUB = 5
    SUBCANCEL = 6


class GroupType(IntEnum):
    PRIVATE = 1
    OPEN = 2
