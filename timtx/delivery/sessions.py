# -*- test-case-name: timtx.test.test_sessions -*-
"""
Authenticated sessions.

A L{Session} is one logged-in connection: who it is, how it wants its
frames encoded, and the frames it still has to acknowledge.  It writes to
its connection through L{timtx.interfaces.IFrameSink} and never sees the
transport behind it.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from timtx.interfaces import IFrameSink, ISession
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import MAX_ACK_ID, server_frame, server_header
from timtx.protocols.structs import Generation, Tid, TimAck, TimError, TimStruct


class AckIds:
    """
    Ack ids for server frames, unique within a node for 2**32 frames.

    One counter for the whole node, not one per session: a frame fanned out
    to many sessions then carries the same id everywhere, so its bytes are
    identical and can be prepared once.
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = self._last + 1 if self._last < MAX_ACK_ID else 1
        return self._last


@implementer(ISession)
class Session:
    """
    One authenticated connection.

    @ivar uid: the account id.
    @ivar tid: the L{Tid} the server puts in C{fromTid} of what this session
        sends.
    @ivar encoding: the encoding of every frame pushed to this session, fixed
        by its TIMAUTH frame.
    @ivar generation: the tim generation whose Thrift layouts this session
        reads and writes, decided at login; a tim 2.0 session becomes 2.1
        once a frame proves it (see L{timtx.protocols.generations}).
    @ivar loginTime: when it logged in (reactor seconds), for "kick oldest".
    """

    log = Logger()

    def __init__(
        self,
        sink: IFrameSink,
        uid: str,
        domain: str,
        resource: str | None,
        termtyp: int,
        encoding: Encoding,
        loginTime: float,
        ackIds: AckIds,
        extend: dict[str, str] | None = None,
        generation: Generation = Generation.TIM20,
    ):
        self.sink = sink
        self.uid = uid
        self.domain = domain
        self.resource = resource
        self.termtyp = termtyp
        self.encoding = encoding
        self.generation = generation
        self.loginTime = loginTime
        self.tid = Tid(node=uid, domain=domain or None, resource=resource, termtyp=termtyp, extend=extend)
        #: Sessions with the same key take the same prepared frame.  The
        #: generation is not part of it: what is fanned out (TimMessage,
        #: TimStream) has one layout in both.
        self.frameKey = (getattr(sink, "frameKind", "raw"), encoding)
        self._ackIds = ackIds
        self._pendingAcks: dict[int, Callable[[Session], object]] = {}
        self.closed = False

    def __repr__(self) -> str:
        return f"<Session {self.uid} termtyp={self.termtyp} {self.encoding.value} tim {self.generation.value}>"

    @property
    def congested(self) -> bool:
        """
        Whether the client is behind in reading: stream data may be skipped.
        """
        return bool(self.sink.congested)

    # Sending.

    def encode(self, struct: TimStruct) -> bytes:
        return codec.encode(struct, self.encoding, self.generation)

    def send(
        self, timType: int, struct: TimStruct | None = None, onAck: Callable[[Session], object] | None = None
    ) -> int | None:
        """
        Encode C{struct} for this session and send it as a C{timType} frame.

        @param onAck: if given, the frame asks for an acknowledgement and
            C{onAck(session)} runs when it arrives.
        @return: the ack id, if one was asked for.
        """
        payload = b"" if struct is None else self.encode(struct)
        return self.sendPayload(timType, payload, onAck)

    def sendPayload(self, timType: int, payload: bytes, onAck: Callable[[Session], object] | None = None) -> int | None:
        """
        Like L{send} for a payload already encoded in L{encoding}.
        """
        if self.closed:
            return None
        if onAck is None:
            self.sink.writeFrame(server_frame(timType, payload))
            return None
        ackId = self._ackIds.next()
        self.expectAck(ackId, onAck)
        self.sink.writeFrameParts(server_header(timType, ackId), payload)
        return ackId

    def expectAck(self, ackId: int, onAck: Callable[[Session], object]) -> None:
        """
        Run C{onAck(session)} when the client acknowledges C{ackId}; for
        frames prepared elsewhere with a shared id.  One handler object can
        serve every session a frame was fanned out to.
        """
        self._pendingAcks[ackId] = onAck

    def sendAck(self, timType: int, **fields: object) -> None:
        """
        Send C{TimAck{ok: true, timType, ...fields}} in a TIMACK frame.
        """
        self.send(TimType.TIMACK, TimAck(ok=True, timType=timType, **fields))

    def sendError(self, timType: int, error: TimProtocolError, **fields: object) -> None:
        """
        Send C{TimAck{ok: false, timType, error: {code, info}}}.
        """
        self.send(TimType.TIMACK, error_ack(timType, error, **fields))

    # Receiving.

    def ackReceived(self, ackId: int) -> None:
        """
        The client acknowledged C{ackId}.  Unknown or repeated ids are
        ignored: a client may ack twice, or ack a frame of a session that
        was replaced.
        """
        onAck = self._pendingAcks.pop(ackId, None)
        if onAck is None:
            return
        try:
            onAck(self)
        except Exception:
            self.log.failure("ack handler for {session} failed", session=self)

    @property
    def unacknowledged(self) -> int:
        return len(self._pendingAcks)

    # Ending.

    def kick(self) -> None:
        """
        Tell the client it was logged out (TIMLOGOUT, as tim sends it inside
        a TIMACK frame) and close the connection.
        """
        if self.closed:
            return
        self.sendAck(TimType.TIMLOGOUT)
        self.sink.closeConnection("logged out by a newer session")

    def connectionLost(self) -> None:
        self.closed = True
        self._pendingAcks.clear()


def error_ack(timType: int, error: TimProtocolError, **fields: object) -> TimAck:
    return TimAck(ok=False, timType=timType, error=TimError(code=error.code, info=error.text), **fields)
