# -*- test-case-name: timtx.test.test_vrooms -*-
"""
Virtual rooms for live streams: TIMVROOM (22) requests and TIMSTREAM (94)
pushes, as tim serves them, plus subscribe authorization and per-subscriber
isolation.

TIMVROOM carries a C{TimReq} whose C{rtype} names the operation:

  - 1 register (C{reqInt: 1} makes the room private, a timtx extension);
    2 remove; 3 and 4 grant and take back push permission (C{node2} is the
    user); 5 subscribe (C{reqInt: 1} for raw TIMBIGBINARYSTREAM frames,
    tim's C{VirtualroomSubBinary}); 6 unsubscribe.
  - timtx extensions: 101 and 102 allow and disallow a user to subscribe to
    a private room; 103 asks how many frames this session's subscription
    missed.

Replies are tim's: C{TimAck{ok, timType 22, t: rtype, n: room or user}}.
A pushed frame goes to every subscriber as C{TimStream{id, VNode, dtype,
body, fromNode}}, with C{id} numbering the room's frames 1, 2, 3...  See
C{docs/vrooms.md}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from timtx.chat.business import requireNode
from timtx.chat.vrooms.registry import RoomStats, Subscription, VRoom, VRoomRegistry
from timtx.chat.vrooms.streams import Stamp, StreamFrame, fanOut
from timtx.protocols.constants import ErrorCode, TimType, VRoomOp
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Field, TimReq, TimStream, TimStruct

if TYPE_CHECKING:
    from timtx.chat.accounts import AccountService
    from timtx.config import VRoomsConfig
    from timtx.delivery.sessions import Session

#: timtx's own TIMVROOM rtypes, above tim's 1..6.
VROOM_ALLOW = 101
VROOM_DISALLOW = 102
VROOM_STATUS = 103


class StreamPush(TimStruct):
    """
    A TimStream as clients push it: C{id} and C{fromNode} are the server's
    to set, and timjs sends them as C{null}, so none of tim's required
    fields is required here.  Same field ids and JSON keys as L{TimStream}.
    """

    FIELDS = tuple(Field(f.fid, f.name, f.kind, json=f.json) for f in TimStream.FIELDS)
    __slots__ = tuple(f.name for f in FIELDS)
    id: int | None
    VNode: str | None
    dtype: int | None
    body: bytes | None
    fromNode: str | None
    missed: int | None


def sweepInterval(idleExpiry: float) -> float:
    """
    How often idle rooms are looked for: a tenth of the expiry, between
    one second and one minute, so a room outlives its expiry by at most
    that much.
    """
    return min(max(idleExpiry / 10, 1.0), 60.0)


def _noPermission(vnode: str) -> TimProtocolError:
    error = TimProtocolError(ErrorCode.ERR_AUTH, "no push permission in this virtual room")
    error.ackFields["n"] = vnode
    return error


def flag(request: TimReq, meaning: str) -> bool:
    if request.reqInt in (None, 0):
        return False
    if request.reqInt == 1:
        return True
    raise TimProtocolError(ErrorCode.ERR_PARAMS, f"TimReq.reqInt must be 0 or 1 ({meaning})")


class VRoomService(Service):
    """
    Handles virtual-room requests and stream pushes for the sessions of
    this node, over a L{VRoomRegistry}.  As a service it looks for idle
    rooms while the node runs.
    """

    log = Logger()

    def __init__(
        self,
        config: VRoomsConfig,
        *,
        registry: VRoomRegistry,
        accounts: AccountService,
        clock: IReactorTime,
        maxOutputBytes: int,
    ):
        self.setName("vrooms")
        self.config = config
        #: What may wait for one slow subscriber: C{stream_buffer_bytes},
        #: but never more than half of what drops a connection.
        self.streamBufferBytes = min(config.stream_buffer_bytes, maxOutputBytes // 2)
        self.registry = registry
        self.accounts = accounts
        self.clock = clock
        self._ops: dict[int, Callable[[Session, TimReq], Any]] = {
            VRoomOp.REGISTER: self._register,
            VRoomOp.REMOVE: self._remove,
            VRoomOp.ADDAUTH: self._grant,
            VRoomOp.DELAUTH: self._revoke,
            VRoomOp.SUB: self._subscribe,
            VRoomOp.SUBCANCEL: self._unsubscribe,
            VROOM_ALLOW: self._allow,
            VROOM_DISALLOW: self._disallow,
            VROOM_STATUS: self._status,
        }
        self._sweep = LoopingCall(self.expire)
        self._sweep.clock = clock

    # Service.

    def startService(self) -> None:
        super().startService()
        if self.config.idle_expiry:
            self._sweep.start(sweepInterval(self.config.idle_expiry), now=False)

    def stopService(self) -> Any:
        if self._sweep.running:
            self._sweep.stop()
        return super().stopService()

    # TIMVROOM.

    def handleRequest(self, session: Session, request: TimReq) -> Any:
        """
        The route of TIMVROOM.
        """
        op = self._ops.get(request.rtype) if request.rtype is not None else None
        if op is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"unknown virtual room rtype {request.rtype}")
        return op(session, request)

    def _register(self, session: Session, request: TimReq) -> None:
        room = self.registry.register(session.uid, private=flag(request, "1 for a private room"))
        self.log.info("{uid} registered virtual room {vnode}", uid=session.uid, vnode=room.vnode)
        session.sendAck(TimType.TIMVROOM, n=room.vnode, t=VRoomOp.REGISTER)

    def _remove(self, session: Session, request: TimReq) -> None:
        vnode = requireNode(request)
        room = self.registry.managed(session.uid, vnode)
        ended = self.registry.remove(session.uid, vnode)
        self.log.info("{uid} removed virtual room {vnode}", uid=session.uid, vnode=vnode)
        session.sendAck(TimType.TIMVROOM, n=vnode, t=VRoomOp.REMOVE)
        self._tell(ended, VRoomOp.REMOVE)
        self.roomEnded(room)

    @inlineCallbacks
    def _existingUser(self, session: Session, request: TimReq) -> Any:
        """
        The room and user a founder's request names, once the user is
        known to exist.
        """
        vnode, user = requireNode(request), requireNode(request, "node2")
        self.registry.managed(session.uid, vnode)
        if not (yield self.accounts.exists(user)):
            error = TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")
            error.ackFields["n"] = user
            raise error
        return vnode, user

    @inlineCallbacks
    def _grant(self, session: Session, request: TimReq) -> Any:
        vnode, user = yield self._existingUser(session, request)
        self.registry.grant(session.uid, vnode, user)
        session.sendAck(TimType.TIMVROOM, n=user, t=VRoomOp.ADDAUTH)

    def _revoke(self, session: Session, request: TimReq) -> None:
        vnode, user = requireNode(request), requireNode(request, "node2")
        self.registry.revoke(session.uid, vnode, user)
        session.sendAck(TimType.TIMVROOM, n=user, t=VRoomOp.DELAUTH)

    @inlineCallbacks
    def _allow(self, session: Session, request: TimReq) -> Any:
        vnode, user = yield self._existingUser(session, request)
        self.registry.allow(session.uid, vnode, user)
        session.sendAck(TimType.TIMVROOM, n=user, t=VROOM_ALLOW)

    def _disallow(self, session: Session, request: TimReq) -> None:
        vnode, user = requireNode(request), requireNode(request, "node2")
        ended = self.registry.disallow(session.uid, vnode, user)
        session.sendAck(TimType.TIMVROOM, n=user, t=VROOM_DISALLOW)
        self._tell(ended, VRoomOp.SUBCANCEL)

    def _subscribe(self, session: Session, request: TimReq) -> None:
        vnode = requireNode(request)
        self.registry.subscribe(session, vnode, binary=flag(request, "1 for binary frames"))
        session.sendAck(TimType.TIMVROOM, n=vnode, t=VRoomOp.SUB)

    def _unsubscribe(self, session: Session, request: TimReq) -> None:
        vnode = requireNode(request)
        subscription = self.registry.unsubscribe(session, vnode)
        # As in tim, unsubscribing from a room one is not in is fine.
        missed = subscription.missed if subscription is not None else None
        session.sendAck(TimType.TIMVROOM, n=vnode, t=VRoomOp.SUBCANCEL, t2=missed)
        if subscription is not None:
            self.endSubscriptions([subscription])

    def _status(self, session: Session, request: TimReq) -> None:
        vnode = requireNode(request)
        subscription = self.registry.subscription(session, vnode)
        if subscription is None:
            self.registry.require(vnode)
            error = TimProtocolError(ErrorCode.ERR_PARAMS, "not subscribed")
            error.ackFields["n"] = vnode
            raise error
        session.sendAck(TimType.TIMVROOM, n=vnode, t=VROOM_STATUS, t2=subscription.missed)

    # TIMSTREAM.

    def handleStream(self, session: Session, stream: StreamPush) -> None:
        """
        The route of TIMSTREAM.  Success is silent, as in tim.
        """
        if not stream.VNode:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "TimStream.VNode is required")
        body = stream.body or b""
        if len(body) > self.config.max_stream_bytes:
            error = TimProtocolError(ErrorCode.ERR_BIGDATA, f"stream body over {self.config.max_stream_bytes} bytes")
            error.ackFields["n"] = stream.VNode
            raise error
        self.push(session, stream.VNode, body, stream.dtype)

    def push(
        self, session: Session, vnode: str, body: bytes, dtype: int | None = None, timType: int = TimType.TIMSTREAM
    ) -> tuple[int, int]:
        """
        Push one frame from C{session}'s user into room C{vnode}.

        @param timType: the frame type it came in (TIMSTREAM, or
            TIMBIGBINARYSTREAM), for a refusal that comes later (in a
            cluster, from the room's node).
        @return: how many subscriptions here got it and how many missed it.
        @raise TimProtocolError: C{ERR_NOEXIST} for an unknown room,
            C{ERR_AUTH} for a user without push permission; both name the
            room in C{n}.
        """
        room = self.registry.require(vnode)
        if not room.mayPublish(session.uid):
            raise _noPermission(vnode)
        return self.deliver(room, self.publish(room, session.uid, body, dtype, self.stamp(session)))

    def stamp(self, session: Session) -> Stamp | None:
        """
        The stamp of C{session}'s next push: none on one node, where a
        session's frames cannot overtake one another.
        """
        return None

    def publish(
        self, room: VRoom, publisher: str, body: bytes, dtype: int | None = None, stamp: Stamp | None = None
    ) -> StreamFrame:
        """
        Number the next frame of C{room}, from C{publisher} (its push
        stamped C{stamp}), and count it.
        """
        room.seq += 1
        room.lastActivity = self.clock.seconds()
        room.frames.mark()
        room.bytes.mark(len(body))
        frame = StreamFrame(TimStream(id=room.seq, VNode=room.vnode, dtype=dtype, body=body, fromNode=publisher))
        frame.stamp = stamp
        return frame

    def deliver(self, room: VRoom, frame: StreamFrame) -> tuple[int, int]:
        """
        Write C{frame} to this node's subscribers of C{room}.

        @return: how many subscriptions got it and how many missed it.
        """
        delivered, dropped = fanOut(list(room.subscribers.values()), frame, self.streamBufferBytes)
        room.delivered += delivered
        room.dropped += dropped
        return delivered, dropped

    # Endings.

    def sessionEnded(self, session: Session) -> None:
        self.endSubscriptions(self.registry.sessionEnded(session))

    def endSubscriptions(self, ended: list[Subscription]) -> None:
        """
        Subscriptions that ended here (unsubscribed, closed, disallowed,
        or their room ended): a hook for the cluster, whose room holder
        must learn when a node has no subscriber left.
        """

    def roomEnded(self, room: VRoom) -> None:
        """
        C{room} was removed or expired here: a hook for the cluster, which
        tells the other nodes that mirror it.
        """

    def expire(self) -> None:
        """
        Remove idle rooms and tell their subscribers.
        """
        for room, ended in self.registry.expire():
            self.log.info(
                "virtual room {vnode} expired after {idle}s idle", vnode=room.vnode, idle=self.config.idle_expiry
            )
            self._tell(ended, VRoomOp.REMOVE)
            self.roomEnded(room)

    def _tell(self, ended: Iterable[Subscription], rtype: int) -> None:
        """
        Tell sessions whose subscription ended without their asking, with
        the ack they would get for asking: C{t} 2 when the room is gone, 6
        when they may no longer subscribe.
        """
        ended = list(ended)
        for subscription in ended:
            subscription.session.sendAck(TimType.TIMVROOM, n=subscription.room.vnode, t=rtype, t2=subscription.missed)
        self.endSubscriptions(ended)

    # For operators.

    def stats(self, vnode: str) -> RoomStats | None:
        """
        A snapshot of one room: subscribers, frames and bytes per second,
        frames dropped for slow subscribers.  See L{RoomStats}.
        """
        return self.registry.stats(vnode)

    def allStats(self) -> list[RoomStats]:
        return self.registry.allStats()
