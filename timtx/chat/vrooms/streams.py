# -*- test-case-name: timtx.test.test_vrooms -*-
"""
Stream fan-out: one frame to every subscriber of a room, without letting
any subscriber hold up the publisher or the others.

Each subscriber has a bounded stream buffer.  Once more than Twisted's
64 KiB wait in a connection's write buffer, the transport pauses its
producer (the connection's protocol) and the session reports itself
I{congested}; from then on the protocol counts the bytes written to it
(its C{backlog}) until the buffer drains.  A congested subscriber still
gets stream frames while its backlog stays within the stream buffer, so a
burst passes a subscriber that reads fast enough; past it, a frame is not
written at all: it is counted in the subscription's C{missed} and the
room's C{dropped}, and the loop moves on.  So the bytes waiting for a slow
subscriber are bounded, the publisher is never paused, and nothing else on
the connection is touched: messages and acks are written as before and
only stream frames are skipped.  Live streams are worthless late; a
subscriber that catches up continues with the next frame and learns how
many it missed (the C{missed} field, see C{docs/vrooms.md}).

A frame is encoded once per encoding however many subscribers get it;
only the first frame after a gap is encoded for its subscriber alone, to
carry that subscriber's count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from twisted.logger import Logger

from timtx.delivery.encoded import Encoded
from timtx.protocols import codec
from timtx.protocols.bigframes import serverBigDataHeader
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.structs import TimStream

if TYPE_CHECKING:
    from timtx.chat.vrooms.registry import Subscription

_STREAM_HEADER = bytes((TimType.TIMSTREAM,))
#: At most what the C{missed} field adds to an encoded TimStream.
_MISSED_FIELD_BYTES = 24

#: What orders one publishing session's frames across the nodes of a
#: cluster: that session's source (unique in the cluster, across restarts)
#: and a number that rises with each of its pushes (see
#: L{timtx.cluster.rooms}).
Stamp = tuple[str, int]

log = Logger()


class StreamFrame(Encoded):
    """
    One stream frame in the forms subscribers take it: a TimStream per
    encoding, and raw TIMBIGBINARYSTREAM bytes for binary subscribers.
    Each form is built at most once.
    """

    __slots__ = ("_rawHeader", "stamp")

    def __init__(self, stream: TimStream):
        super().__init__(stream)
        self._rawHeader: bytes | None = None
        #: The publishing session's stamp (L{Stamp}), in a cluster.
        self.stamp: Stamp | None = None

    @property
    def stream(self) -> TimStream:
        stream: TimStream = self.message
        return stream

    def payloadWithMissed(self, encoding: Encoding, missed: int) -> bytes:
        """
        The TimStream for one subscriber, carrying its missed count.
        """
        return codec.encode(self.stream.copy(missed=missed), encoding)

    def rawHeader(self) -> bytes:
        """
        C{[97][room id][131]}: what precedes the body for binary
        subscribers, as tim sends it (without the publisher: tim's layout
        has no place for it).
        """
        if self._rawHeader is None:
            self._rawHeader = serverBigDataHeader(TimType.TIMBIGBINARYSTREAM, self.stream.VNode or "")
        return self._rawHeader


def fanOut(subscriptions: Iterable[Subscription], frame: StreamFrame, bufferBytes: int) -> tuple[int, int]:
    """
    Write C{frame} to every subscription whose session keeps up; count a
    miss for every other.

    @param bufferBytes: the most a congested connection may have waiting
        (counted from when it became congested) after this frame is
        written to it.
    @return: how many subscriptions got the frame and how many missed it.
    """
    delivered = dropped = 0
    for subscription in subscriptions:
        session = subscription.session
        if session.closed:
            continue
        sink = session.sink
        if subscription.binary:
            header, payload = frame.rawHeader(), frame.stream.body or b""
        else:
            header, payload = _STREAM_HEADER, frame.payload(session.encoding)
        if sink.congested and sink.backlog + len(header) + len(payload) + _MISSED_FIELD_BYTES > bufferBytes:
            subscription.missed += 1
            dropped += 1
            continue
        if not subscription.binary and subscription.missed != subscription.reported:
            subscription.reported = subscription.missed
            payload = frame.payloadWithMissed(session.encoding, subscription.missed)
        try:
            sink.writeFrameParts(header, payload)
        except Exception:
            # One broken connection must not cost the others their frame.
            log.failure("writing a stream frame to {session} failed", session=session)
            continue
        subscription.delivered += 1
        delivered += 1
    return delivered, dropped
