# -*- test-case-name: timtx.test.test_sessions -*-
"""
Authenticated sessions and the registry that enforces device limits.

A L{Session} is one logged-in connection: who it is, how it wants its
frames encoded, and the frames it still has to acknowledge.  The
L{SessionRegistry} knows every session of every user on this node and
decides, at login, whether a new session fits within C{[devices]}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from twisted.logger import Logger

from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import MAX_ACK_ID, server_frame, server_header
from timtx.protocols.structs import Tid, TimAck, TimError, TimStruct

if TYPE_CHECKING:
    from timtx.config import DevicesConfig


class FrameSink(Protocol):
    """
    What a L{Session} needs from its connection.
    """

    def writeFrame(self, frame: bytes) -> None:
        """
        Write one whole frame.
        """

    def writeFrameParts(self, header: bytes, payload: bytes) -> None:
        """
        Write one frame given as header and payload, so that a payload
        shared by many sessions is not copied per session where the
        transport can avoid it.
        """

    def closeConnection(self, reason: str) -> None:
        """
        Close cleanly after what was written.
        """

    #: Which way this sink frames bytes ("ws", "tcp"); sinks of one kind
    #: share prepared frames.
    frameKind: str

    def prepareFrame(self, frame: bytes) -> object:
        """
        Turn a frame into what L{writePrepared} writes, once for all sinks
        of this kind.
        """

    def writePrepared(self, prepared: object, size: int) -> None:
        """
        Write a frame made by L{prepareFrame}; C{size} is the frame's
        length.
        """

    @property
    def congested(self) -> bool:
        """
        Whether the peer is behind in reading what was written.
        """

    @property
    def backlog(self) -> int:
        """
        Bytes written since the connection became congested.
        """


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


class Session:
    """
    One authenticated connection.

    @ivar uid: the account id.
    @ivar tid: the L{Tid} the server puts in C{fromTid} of what this session
        sends.
    @ivar encoding: the encoding of every frame pushed to this session, fixed
        by its TIMAUTH frame.
    @ivar loginTime: when it logged in (reactor seconds), for "kick oldest".
    """

    log = Logger()

    def __init__(
        self,
        sink: FrameSink,
        uid: str,
        domain: str,
        resource: str | None,
        termtyp: int,
        encoding: Encoding,
        loginTime: float,
        ackIds: AckIds,
        extend: dict[str, str] | None = None,
    ):
        self.sink = sink
        self.uid = uid
        self.domain = domain
        self.resource = resource
        self.termtyp = termtyp
        self.encoding = encoding
        self.loginTime = loginTime
        self.tid = Tid(node=uid, domain=domain or None, resource=resource, termtyp=termtyp, extend=extend)
        #: Sessions with the same key take the same prepared frame.
        self.frameKey = (getattr(sink, "frameKind", "raw"), encoding)
        self._ackIds = ackIds
        self._pendingAcks: dict[int, Callable[[Session], object]] = {}
        self.closed = False

    def __repr__(self) -> str:
        return f"<Session {self.uid} termtyp={self.termtyp} {self.encoding.value}>"

    @property
    def congested(self) -> bool:
        """
        Whether the client is behind in reading: stream data may be skipped.
        """
        return bool(self.sink.congested)

    # Sending.

    def encode(self, struct: TimStruct) -> bytes:
        return codec.encode(struct, self.encoding)

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


class SessionRegistry:
    """
    Every authenticated session on this node, by user.

    Limits are checked and enforced in L{admit}, synchronously on the
    reactor thread, so two logins racing for the last slot cannot both get
    it.  Counts are exact: C{limit = 2} allows two sessions (tim 2.0 allows
    one more than C{devicetype.limit}).

    @ivar onFirstSession: called with a user's first session when it arrives.
    @ivar onLastSession: called with a user's last session when it leaves.
    @ivar onSessionRemoved: called with every session that leaves.
    """

    log = Logger()

    def __init__(self, devices: DevicesConfig):
        self.devices = devices
        self._byUser: dict[str, list[Session]] = {}
        self._count = 0
        self.onFirstSession: list[Callable[[Session], object]] = []
        self.onLastSession: list[Callable[[Session], object]] = []
        self.onSessionRemoved: list[Callable[[Session], object]] = []

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Session]:
        for sessions in list(self._byUser.values()):
            yield from sessions

    def users(self) -> list[str]:
        return list(self._byUser)

    def sessionsOf(self, uid: str) -> list[Session]:
        """
        The sessions of C{uid}, oldest first.  The list is a copy.
        """
        return list(self._byUser.get(uid, ()))

    def sessionsView(self, uid: str) -> Sequence[Session]:
        """
        The sessions of C{uid} without copying, for fan-out loops; do not
        keep it, and do not add or remove sessions while iterating it.
        """
        return self._byUser.get(uid, ())

    def isOnline(self, uid: str) -> bool:
        return uid in self._byUser

    def admit(self, session: Session) -> list[Session]:
        """
        Add C{session} if the device limits allow it, applying the overflow
        policy.

        @return: the sessions kicked to make room (already told and closing).
        @raise TimProtocolError: C{ERR_OVERENTRY} if the policy is C{reject}
            and a limit is reached.
        """
        existing = self._byUser.get(session.uid, [])
        victims = self._overflow(existing, session.termtyp)
        if victims and self.devices.overflow == "reject":
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "too many sessions for this account")
        for victim in victims:
            self.log.info("kicking {victim} to admit a new session", victim=victim)
            self.remove(victim)
            victim.kick()
        self._add(session)
        return victims

    def _overflow(self, existing: list[Session], termtyp: int) -> list[Session]:
        """
        The oldest sessions that must go for one more of C{termtyp} to fit.
        """
        victims: list[Session] = []
        typeLimit = self.devices.type_limit
        if typeLimit:
            sameType = [s for s in existing if s.termtyp == termtyp]
            excess = len(sameType) - typeLimit + 1
            if excess > 0:
                victims.extend(sameType[:excess])
        limit = self.devices.limit
        if limit:
            remaining = [s for s in existing if s not in victims]
            excess = len(remaining) - limit + 1
            if excess > 0:
                victims.extend(remaining[:excess])
        return victims

    def _add(self, session: Session) -> None:
        sessions = self._byUser.setdefault(session.uid, [])
        sessions.append(session)
        self._count += 1
        if len(sessions) == 1:
            self._notify(self.onFirstSession, session)

    def remove(self, session: Session) -> None:
        """
        Forget C{session}; unknown sessions are ignored.
        """
        sessions = self._byUser.get(session.uid)
        if not sessions or session not in sessions:
            return
        sessions.remove(session)
        self._count -= 1
        self._notify(self.onSessionRemoved, session)
        if not sessions:
            del self._byUser[session.uid]
            self._notify(self.onLastSession, session)

    def _notify(self, observers: list[Callable[[Session], object]], session: Session) -> None:
        for observer in observers:
            try:
                observer(session)
            except Exception:
                self.log.failure("session observer failed for {session}", session=session)
