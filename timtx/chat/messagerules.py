# -*- test-case-name: timtx.test.test_messaging -*-
"""
What every TIMMESSAGE from a client must satisfy, and what the server fills
in, for 1:1 and group messages alike.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from twisted.python.failure import Failure

from timtx.persistence.errors import StoreOutcomeUnknown, StoreUnavailable
from timtx.protocols.constants import ORDER_CUSTOM_MAX, ORDER_RESERVED_MAX, ErrorCode, MsType, OdType, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session


def contentSize(message: TimMessage) -> int:
    """
    Bytes of a message's content, the part C{max_body_bytes} bounds.
    """
    size = len(message.dataString.encode("utf-8")) if message.dataString else 0
    size += len(message.dataBinary or b"")
    for key, value in (message.extend or {}).items():
        size += len(key) + len(value)
    for key, blob in (message.extra or {}).items():
        size += len(key) + len(blob)
    return size


def target(message: TimMessage) -> str:
    """
    The user a message is addressed to (checked to be there on arrival).
    """
    return message.toTid.node if message.toTid is not None and message.toTid.node else ""


def checkFromClient(session: Session, message: TimMessage, maxBodyBytes: int) -> None:
    """
    Refuse what a client may not send, before anything is looked up.

    @raise TimProtocolError: 4104 for fields only the server sets or values
        out of range, 4112 for content over C{maxBodyBytes}.
    """
    if message.msType == MsType.SOURCE_OS:
        raise TimProtocolError(ErrorCode.ERR_PARAMS, "system messages come from the server")
    if message.msType not in (MsType.SOURCE_USER, MsType.SOURCE_ROOM):
        raise TimProtocolError(ErrorCode.ERR_PARAMS, f"msType {message.msType} is not known")
    od = message.odType or 0
    if od == OdType.ORDER_BUSINESS:
        raise TimProtocolError(ErrorCode.ERR_PARAMS, "business notices come from the server")
    if od < OdType.ORDER_INOF or od > ORDER_CUSTOM_MAX or (OdType.ORDER_STREAM < od <= ORDER_RESERVED_MAX):
        raise TimProtocolError(ErrorCode.ERR_PARAMS, f"odType {od} is reserved or out of range")
    if message.bnType is not None or message.isOffline or message.seq is not None:
        raise TimProtocolError(ErrorCode.ERR_PARAMS, "bnType, isOffline and seq are set by the server")
    if message.fromTid is not None and message.fromTid.node not in (None, "", session.uid):
        raise TimProtocolError(ErrorCode.ERR_PARAMS, "fromTid is set by the server")
    if message.mid is not None and od not in (OdType.ORDER_REVOKE, OdType.ORDER_BURN):
        raise TimProtocolError(ErrorCode.ERR_PARAMS, "mid is set by the server")
    if contentSize(message) > maxBodyBytes:
        raise TimProtocolError(ErrorCode.ERR_BIGDATA, f"message content over {maxBodyBytes} bytes", fatal=False)


def stamp(session: Session, message: TimMessage, now: float) -> None:
    """
    Fill in what only the server sets: the sender, the time in nanoseconds
    (as tim), and an id if the client gave none.
    """
    message.fromTid = session.tid
    message.timestamp = int(now * 1e9)
    if message.id is None:
        message.id = secrets.randbits(53)


def tagged(failure: Failure, clientId: int) -> Failure:
    """
    Carry the client's message id in the error ack (C{t}), so that a client
    can tell which of its messages was refused.
    """
    if failure.check(StoreUnavailable):
        failure = Failure(refusal(failure))
    if isinstance(failure.value, TimProtocolError):
        failure.value.ackFields.setdefault("t", clientId)
    return failure


def refuseUnstored(failure: Failure, session: Session, message: TimMessage) -> None:
    """
    A message could not be stored: tell its sender, by its id, with the
    store's reason or 5103.
    """
    error = failure.value if isinstance(failure.value, TimProtocolError) else refusal(failure)
    session.sendError(TimType.TIMMESSAGE, error, t=message.id)


class MaybeStored(TimProtocolError):
    """
    The store lost its connection while committing: the message may have
    been stored.  Never confirmed; the client is asked to send it again.
    """


def refusal(failure: Failure) -> TimProtocolError:
    """
    What a client is told about a message the store did not take: always
    retryable, worded by what is known.
    """
    if failure.check(StoreOutcomeUnknown):
        # A resend is matched by its duplicate key if the first did land.
        return MaybeStored(ErrorCode.ERR_DATABASE, "message may not be stored, send it again")
    if failure.check(StoreUnavailable):
        return TimProtocolError(ErrorCode.ERR_DATABASE, "store unavailable, try again")
    return TimProtocolError(ErrorCode.ERR_DATABASE, "message not stored, try again")
