# -*- test-case-name: timtx.test.test_bigdata -*-
"""
Big payloads: TIMBIGSTRING (95) and TIMBIGBINARY (96) to a user,
TIMBIGBINARYSTREAM (97) into a virtual room.

tim 2.1 added them for data too big to wrap in a struct.  Their layout and
reassembly are in L{timtx.protocols.bigframes}, and a connection's deadline
for a payload spread over several messages in
L{timtx.transports.reassembly}; here a whole payload goes where it is
addressed:

  - 95 and 96 go to every online session of the target user, raw, as tim
    sends them: C{[T][sender][separator][data]}.  Like a stream message
    (odType 5) they are not stored: an offline user does not get them.
    Unlike tim, which checks nothing, the rules of 1:1 messages apply:
    blocks (4110), unknown users (4106), friendship unless C{[messages]
    noauth} (4105).  Success is silent, as in tim.
  - 97 is a stream frame pushed into a room, under the rules of TIMSTREAM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.python.failure import Failure

from timtx.chat.permissions import MessagePermissions
from timtx.chat.vrooms.service import VRoomService
from timtx.interfaces import IRouter
from timtx.protocols.bigframes import serverBigDataHeader, splitBigData
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import BadFrame, TimProtocolError

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session


def _named(failure: Failure, target: str) -> Failure:
    if isinstance(failure.value, TimProtocolError):
        failure.value.ackFields.setdefault("n", target)
    return failure


class BigDataService:
    """
    Routes whole big payloads.
    """

    def __init__(self, *, permissions: MessagePermissions, router: IRouter, vrooms: VRoomService):
        self.permissions = permissions
        self.router = router
        self.vrooms = vrooms

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
        self.vrooms.push(session, vnode, data, timType=TimType.TIMBIGBINARYSTREAM)

    # To users.

    def _toUser(self, session: Session, timType: int, target: str, data: bytes) -> Any:
        d = self._deliver(session, timType, target, data)
        d.addErrback(_named, target)
        return d

    @inlineCallbacks
    def _deliver(self, session: Session, timType: int, target: str, data: bytes) -> Any:
        yield self.permissions.check(session.uid, target)
        # Written as two parts, so several MiB are not copied per session.
        self.router.sendFrame(target, serverBigDataHeader(timType, session.uid), data)
