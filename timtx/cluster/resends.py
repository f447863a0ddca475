# -*- test-case-name: timtx.test.test_clusterdedupe -*-
"""
The answers an owner node gives to C{conv.append} and C{group.append}
(L{appendOutcome} reads them, L{refusalAnswer} writes a refusal): C{ok} with
the stored message, its inbox id and, to a sender's node that offered to
echo it itself (C{conv.echo}), whether it is to; C{refused} or C{maybe} (possibly stored) with a tim
error; or, when the store refused the message as a resend of one it holds
(L{AlreadyStored}), C{dup}, where that message is stored, so that the
sender's node answers its client with it as it answers any resend.

During a rolling upgrade, a sender's node older than this answer does
not know C{dup}: it tells its client the append failed (5103), and so
again for each resend that its own memory of ids does not recognise,
until the client logs in to an upgraded node.  Nothing is stored twice
either way.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from timtx.chat.conversations import AlreadyStored, Appended
from timtx.chat.messagerules import MaybeStored, refusal
from timtx.cluster.wire import BadPayload, integer, pack, thrift, unpack
from timtx.persistence.records import Duplicate
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage

STATUS_RESENT = b"dup"


def packResent(duplicate: Duplicate) -> bytes:
    """
    The answer for a message refused as a resend of C{duplicate}.
    """
    seq = b"" if duplicate.seq is None else b"%d" % duplicate.seq
    return pack(
        STATUS_RESENT,
        duplicate.conv.encode(),
        b" ".join([seq, b"%d" % duplicate.mid, repr(duplicate.created).encode()]),
    )


def unpackResent(conv: bytes, where: bytes) -> AlreadyStored:
    """
    The L{AlreadyStored} of a C{dup} answer's fields.

    @raise BadPayload: if they are not such fields.
    """
    try:
        seq, mid, created = where.split(b" ")
        stored = Duplicate(conv.decode(), int(seq) if seq else None, int(mid), float(created))
    except ValueError:  # UnicodeDecodeError is one
        raise BadPayload(f"not a stored message: {where[:40]!r}") from None
    return AlreadyStored(stored)


def appendAnswer(answer: bytes) -> Appended:
    """
    The outcome of an append the owner answered with C{answer}
    (L{appendOutcome} without the echo).
    """
    return appendOutcome(answer)[0]


def appendOutcome(answer: bytes) -> tuple[Appended, bool]:
    """
    The outcome of an append the owner answered with C{answer}, and
    whether the owner left the echo to the sender's sessions on the asking
    node to it (L{timtx.cluster.messaging}, C{conv.echo}).

    @raise AlreadyStored: for a resend of a stored message.
    @raise MaybeStored: if the message may or may not be stored.
    @raise TimProtocolError: if the owner refused it.
    @raise BadPayload: if C{answer} is none of these.
    """
    status, first, second, *leftHere = unpack(answer, 3, optional=1)
    if status == STATUS_RESENT:
        raise unpackResent(first, second)
    if status == b"ok":
        return Appended(thrift(TimMessage, first), {}, compact=first), bool(leftHere and leftHere[0])
    error = MaybeStored if status == b"maybe" else TimProtocolError
    raise error(integer(first), second.decode("utf-8", "replace"))


def refusalAnswer(failure: Failure) -> bytes:
    """
    The answer to an append that failed with C{failure}.
    """
    if isinstance(failure.value, AlreadyStored):
        return packResent(failure.value.duplicate)
    error = failure.value if isinstance(failure.value, TimProtocolError) else refusal(failure)
    status = b"maybe" if isinstance(error, MaybeStored) else b"refused"
    return pack(status, b"%d" % error.code, error.text.encode("utf-8"))
