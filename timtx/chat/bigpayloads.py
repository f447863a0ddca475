# -*- test-case-name: timtx.test.test_bigdata -*-
"""
Big payloads: TIMBIGSTRING (95) and TIMBIGBINARY (96) to a user,
TIMBIGBINARYSTREAM (97) into a virtual room.

tim 2.1 added them for data too big to wrap in a struct.  Their layout and
reassembly are in L{timtx.protocols.bigframes}; here a connection gets a
deadline for a payload spread over several messages, and a whole payload
goes where it is addressed:

  - 95 and 96 go to every online session of the target user, raw, as tim
    sends them: C{[T][sender][separator][data]}.  Like a stream message
    (odType 5) they are not stored: an offline user does not get them.
    Unlike tim, which checks nothing, the rules of 1:1 messages apply:
    blocks (4110), unknown users (4106), friendship unless C{[messages]
    noauth} (4105).  Success is silent, as in tim.
  - 97 is a stream frame pushed into a room, under the rules of TIMSTREAM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from timtx.protocols.bigframes import BigDataAssembler, isBigDataFrame, serverBigDataHeader, splitBigData
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.transports.server import BadFrame
from timtx.chat.roster import areFriends, blocked

if TYPE_CHECKING:
    from timtx.chat.accounts import AccountService
    from timtx.config import MessagesConfig, VRoomsConfig
    from timtx.chat.roster import RelationCache
    from timtx.delivery.sessions import Session, SessionRegistry
    from timtx.chat.vrooms.service import VRoomService


class BigDataReceiver:
    """
    The big payload arriving on one connection: its reassembly, and the
    deadline by which it must be whole.

    @param timedOut: called with the payload's frame type when the deadline
        passes; the payload is already forgotten.
    """

    def __init__(self, config: VRoomsConfig, clock: IReactorTime, timedOut: Callable[[int], object]):
        self._assembler = BigDataAssembler(config.bigdata_max_bytes)
        self._timeout = config.bigdata_timeout
        self._clock = clock
        self._timedOut = timedOut
        self._timer: IDelayedCall | None = None

    @property
    def timType(self) -> int:
        """
        The frame type of the payload begun last.
        """
        return self._assembler.timType

    @property
    def pending(self) -> bool:
        """
        Whether a big payload is being reassembled: the next message
        continues it, whatever its first byte.
        """
        return bool(self._assembler.pending)

    def claims(self, data: bytes) -> bool:
        """
        Whether C{data} starts or continues a big payload.
        """
        return self._assembler.pending or isBigDataFrame(data)

    def feed(self, data: bytes) -> bytes | None:
        """
        @return: the whole frame, without its length field, once complete.
        @raise TimProtocolError: see L{BigDataAssembler.feed}.
        """
        try:
            frame = self._assembler.feed(data)
        except TimProtocolError:
            self.cancel()
            raise
        if not self._assembler.pending:
            self.cancel()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._expired)
        return frame

    def _expired(self) -> None:
        self._timer = None
        self._assembler.reset()
        self._timedOut(self._assembler.timType)

    def cancel(self) -> None:
        """
        Forget any pending payload and its deadline.
        """
        self._assembler.reset()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _named(failure: Failure, target: str) -> Failure:
    if isinstance(failure.value, TimProtocolError):
        failure.value.ackFields.setdefault("n", target)
    return failure


class BigDataService:
    """
    Routes whole big payloads.
    """

    def __init__(
        self,
        config: VRoomsConfig,
        messages: MessagesConfig,
        sessions: SessionRegistry,
        relations: RelationCache,
        accounts: AccountService,
        vrooms: VRoomService,
        clock: IReactorTime,
    ):
        self.config = config
        self.messages = messages
        self.sessions = sessions
        self.relations = relations
        self.accounts = accounts
        self.vrooms = vrooms
        self.clock = clock

    def receiver(self, timedOut: Callable[[int], object]) -> BigDataReceiver:
        """
        A L{BigDataReceiver} for a new connection.
        """
        return BigDataReceiver(self.config, self.clock, timedOut)

    def _split(self, timType: int, payload: bytes) -> tuple[str, bytes]:
        try:
            return splitBigData(timType, payload)
        except TimProtocolError as e:
            raise BadFrame.wrap(e) from None

    # Routes.

    def handleBigString(self, session: Session, payload: bytes) -> Any:
        """
        The route of TIMBIGSTRING: C{payload} is C{[user]|[UTF-8 text]}.
        """
        target, data = self._split(TimType.TIMBIGSTRING, payload)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadFrame(ErrorCode.ERR_FORMAT, "TIMBIGSTRING data is not UTF-8") from None
        return self._toUser(session, TimType.TIMBIGSTRING, target, data)

    def handleBigBinary(self, session: Session, payload: bytes) -> Any:
        """
        The route of TIMBIGBINARY: C{payload} is C{[user][131][bytes]}.
        """
        target, data = self._split(TimType.TIMBIGBINARY, payload)
        return self._toUser(session, TimType.TIMBIGBINARY, target, data)

    def handleBigBinaryStream(self, session: Session, payload: bytes) -> None:
        """
        The route of TIMBIGBINARYSTREAM: C{payload} is C{[room][131][bytes]},
        pushed into the room like a TIMSTREAM body (without C{dtype}).
        """
        vnode, data = self._split(TimType.TIMBIGBINARYSTREAM, payload)
        self.vrooms.push(session, vnode, data)

    # To users.

    def _toUser(self, session: Session, timType: int, target: str, data: bytes) -> Any:
        d = self._deliver(session, timType, target, data)
        d.addErrback(_named, target)
        return d

    @inlineCallbacks
    def _deliver(self, session: Session, timType: int, target: str, data: bytes) -> Any:
        yield self._mayReach(session.uid, target)
        header = serverBigDataHeader(timType, session.uid)
        for recipient in self.sessions.sessionsOf(target):
            if not recipient.closed:
                # Written as two parts, so several MiB are not copied per session.
                recipient.sink.writeFrameParts(header, data)

    @inlineCallbacks
    def _mayReach(self, uid: str, other: str) -> Any:
        """
        The rules of a 1:1 message.

        @raise TimProtocolError: 4110 if either blocks the other, 4106 if
            C{other} does not exist, 4105 if they are not friends (unless
            C{[messages] noauth}).
        """
        relation = yield self.relations.between(uid, other)
        if blocked(relation):
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        if areFriends(relation):
            return
        if not (yield self.accounts.exists(other)):
            raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")
        if not self.messages.noauth:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not friends")
