# -*- test-case-name: timtx.test.test_clusterdedupe -*-
"""
The answer an owner node gives to C{conv.append} or C{group.append} when
the store refused the message as a resend of one it holds
(L{AlreadyStored}): C{dup}, where that message is stored, so that the
sender's node answers its client with it as it answers any resend.

During a rolling upgrade, a sender's node older than this answer does
not know C{dup}: it tells its client the append failed (5103), and so
again for each resend that its own memory of ids does not recognise,
until the client logs in to an upgraded node.  Nothing is stored twice
either way.
"""

from __future__ import annotations

from timtx.chat.conversations import AlreadyStored
from timtx.cluster.wire import BadPayload, pack
from timtx.persistence.records import Duplicate

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
    except ValueError:
        raise BadPayload(f"not a stored message: {where[:40]!r}") from None
    return AlreadyStored(stored)
