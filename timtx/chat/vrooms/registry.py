# -*- test-case-name: timtx.test.test_vrooms -*-
"""
Virtual rooms held by this node: who founded them, who may push and
subscribe, which sessions are subscribed, and their counters.

Rooms live in memory only, as in tim: they are for live streams, and a
stream that outlives its node has nobody left to send it.  A room ends when
its founder removes it or after C{[vrooms] idle_expiry} seconds without a
stream frame.

This module knows rules and state, not the wire: its methods take account
ids and sessions and raise L{TimProtocolError} with tim's codes; the
service in L{timtx.chat.vrooms.service} turns requests into calls and results into
replies.  Every operation names its room, so that a cluster can later
route each call to the node that holds the room; only subscriptions need
the local L{Session}.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime

from timtx.crypto.ids import new_random_id
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.util.meters import RateMeter

if TYPE_CHECKING:
    from timtx.config import VRoomsConfig
    from timtx.delivery.sessions import Session

#: Bytes of randomness in a room id.  Anyone who knows the id of an open
#: room may subscribe (tim's rule), so ids must not be guessable: tim's are
#: 64-bit, these are 128-bit.
ROOM_ID_BYTES = 16


def _error(code: int, text: str, n: str | None = None) -> TimProtocolError:
    error = TimProtocolError(code, text)
    if n is not None:
        error.ackFields["n"] = n
    return error


class Subscription:
    """
    One session subscribed to one room.

    @ivar binary: whether frames go out raw as TIMBIGBINARYSTREAM (tim's
        C{VirtualroomSubBinary}) instead of as TimStreams.
    @ivar missed: frames skipped since subscribing because the session was
        congested.
    @ivar reported: the value of L{missed} the subscriber was last told, in
        a TimStream's C{missed} field.
    @ivar delivered: frames written to the session.
    """

    __slots__ = ("session", "room", "binary", "missed", "reported", "delivered")

    def __init__(self, session: Session, room: VRoom, binary: bool):
        self.session = session
        self.room = room
        self.binary = binary
        self.missed = 0
        self.reported = 0
        self.delivered = 0

    def __repr__(self) -> str:
        return f"<Subscription {self.session!r} to {self.room.vnode} missed={self.missed}>"


class VRoom:
    """
    One virtual room.

    @ivar founder: the account that registered it; it alone manages it.
    @ivar private: whether subscribing needs the founder's leave (a timtx
        extension; tim's rooms are all open).
    @ivar publishers: accounts the founder granted push permission.
    @ivar allowed: accounts the founder allowed to subscribe to a private
        room.  The founder and publishers may always subscribe.
    @ivar subscribers: the subscriptions, by session, in subscription order.
    @ivar seq: the id of the last frame pushed: frames are numbered 1, 2,
        3... so that a subscriber can see gaps and order.
    @ivar lastActivity: clock seconds of the last frame pushed, or of the
        registration.
    @ivar version: raised by every change of the rules (publishers,
        allowed), so that copies on other nodes can tell the newer.
    @ivar mirrorOf: C{None} for a room this node holds; for a copy of a
        room held by another node of the cluster, that node's id.
    @ivar stamps: in a cluster, the number in the stamp of the last frame
        taken here from each publishing session, by its source, the one
        heard from longest ago first (L{timtx.cluster.rooms}).
    """

    __slots__ = (
        "vnode",
        "founder",
        "private",
        "created",
        "lastActivity",
        "publishers",
        "allowed",
        "subscribers",
        "seq",
        "frames",
        "bytes",
        "delivered",
        "dropped",
        "version",
        "mirrorOf",
        "stamps",
    )

    def __init__(self, vnode: str, founder: str, private: bool, clock: IReactorTime):
        self.vnode = vnode
        self.founder = founder
        self.private = private
        self.created = self.lastActivity = clock.seconds()
        self.publishers: set[str] = set()
        self.allowed: set[str] = set()
        self.subscribers: dict[Session, Subscription] = {}
        self.seq = 0
        self.frames = RateMeter(clock)
        self.bytes = RateMeter(clock)
        self.delivered = 0
        self.dropped = 0
        self.version = 0
        self.mirrorOf: str | None = None
        self.stamps: OrderedDict[str, int] = OrderedDict()

    def __repr__(self) -> str:
        return f"<VRoom {self.vnode} founder={self.founder} subscribers={len(self.subscribers)}>"

    def mayPublish(self, uid: str) -> bool:
        return uid == self.founder or uid in self.publishers

    def maySubscribe(self, uid: str) -> bool:
        return not self.private or self.mayPublish(uid) or uid in self.allowed


@dataclass(frozen=True)
class RoomStats:
    """
    A snapshot of one room, for operators.

    @ivar age: seconds since the room was registered.
    @ivar idle: seconds since the last frame (or the registration).
    @ivar publishers: accounts that may push, the founder included.
    @ivar frames: frames pushed since the room began.
    @ivar bytes: body bytes pushed since the room began.
    @ivar framesPerSecond: frames pushed per second over the last 10 s.
    @ivar bytesPerSecond: body bytes pushed per second over the last 10 s
        (before fan-out: multiply by subscribers for what goes out).
    @ivar delivered: frame copies written to subscribers since the room
        began.
    @ivar dropped: frame copies skipped for congested subscribers.
    """

    vnode: str
    founder: str
    private: bool
    age: float
    idle: float
    subscribers: int
    binarySubscribers: int
    publishers: int
    frames: int
    bytes: int
    framesPerSecond: float
    bytesPerSecond: float
    delivered: int
    dropped: int


class VRoomRegistry:
    """
    The virtual rooms of this node and the subscriptions of its sessions.
    """

    def __init__(self, config: VRoomsConfig, clock: IReactorTime):
        self.config = config
        self.clock = clock
        self._rooms: dict[str, VRoom] = {}
        self._founded: dict[str, int] = {}
        self._bySession: dict[Session, dict[str, Subscription]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, vnode: object) -> bool:
        return vnode in self._rooms

    # Rooms.

    def register(self, founder: str, private: bool = False, vnode: str | None = None) -> VRoom:
        """
        A new room founded by C{founder}.

        @param vnode: its id, if the caller drew one (a cluster draws ids
            this node owns); a fresh random id by default.
        @raise TimProtocolError: C{ERR_OVERENTRY} past C{max_rooms_per_user},
            C{ERR_PARAMS} for an id already in use.
        """
        limit = self.config.max_rooms_per_user
        if limit and self._founded.get(founder, 0) >= limit:
            raise _error(ErrorCode.ERR_OVERENTRY, f"at most {limit} virtual rooms per user")
        if vnode is None:
            vnode = new_random_id(ROOM_ID_BYTES)
            while vnode in self._rooms:  # pragma: no cover - 128 random bits
                vnode = new_random_id(ROOM_ID_BYTES)
        elif vnode in self._rooms:
            raise _error(ErrorCode.ERR_PARAMS, "virtual room id in use", vnode)
        room = self._rooms[vnode] = VRoom(vnode, founder, private, self.clock)
        self._founded[founder] = self._founded.get(founder, 0) + 1
        return room

    def rooms(self) -> list[VRoom]:
        """
        Every room here, mirrors included.
        """
        return list(self._rooms.values())

    def adopt(self, vnode: str, founder: str, private: bool, mirrorOf: str | None) -> VRoom:
        """
        Room C{vnode} as another node described it: a mirror of a room
        C{mirrorOf} holds, or (C{mirrorOf} C{None}) one this node now holds
        in its place.  An existing room is kept, with C{mirrorOf} set.
        Limits are not applied: the room exists already.
        """
        room = self._rooms.get(vnode)
        if room is None:
            room = self._rooms[vnode] = VRoom(vnode, founder, private, self.clock)
            room.mirrorOf = mirrorOf
            if mirrorOf is None:
                self._founded[founder] = self._founded.get(founder, 0) + 1
        else:
            self.setMirror(room, mirrorOf)
        return room

    def setMirror(self, room: VRoom, mirrorOf: str | None) -> None:
        """
        Make C{room} a mirror of the room C{mirrorOf} holds, or (C{None})
        a room held here; only held rooms count toward their founder's
        limit.
        """
        held, room.mirrorOf = room.mirrorOf is None, mirrorOf
        if held and mirrorOf is not None:
            self._unfound(room.founder)
        elif not held and mirrorOf is None:
            self._founded[room.founder] = self._founded.get(room.founder, 0) + 1

    def applyRules(
        self, room: VRoom, private: bool, publishers: set[str], allowed: set[str], version: int
    ) -> list[Subscription]:
        """
        Take the rules another node sent for C{room}, if newer than what is
        here; end the subscriptions of users who may no longer subscribe.

        @return: the subscriptions that ended.
        """
        if version < room.version:
            return []
        room.private, room.publishers, room.allowed, room.version = private, set(publishers), set(allowed), version
        ended = [s for s in room.subscribers.values() if not room.maySubscribe(s.session.uid)]
        for subscription in ended:
            del room.subscribers[subscription.session]
            self._forget(subscription)
        return ended

    def forget(self, vnode: str) -> list[Subscription]:
        """
        Drop room C{vnode} whoever founded it (its holder removed it, or
        it moved away from this node).

        @return: the subscriptions that ended with it.
        """
        room = self._rooms.get(vnode)
        return [] if room is None else self._drop(room)

    def get(self, vnode: str) -> VRoom | None:
        return self._rooms.get(vnode)

    def require(self, vnode: str) -> VRoom:
        """
        @raise TimProtocolError: C{ERR_NOEXIST}, naming the room in C{n}.
        """
        room = self._rooms.get(vnode)
        if room is None:
            raise _error(ErrorCode.ERR_NOEXIST, "no such virtual room", vnode)
        return room

    def managed(self, uid: str, vnode: str) -> VRoom:
        """
        Room C{vnode}, for its founder C{uid}.

        @raise TimProtocolError: C{ERR_NOEXIST}, or C{ERR_AUTH} for anyone
            but the founder.
        """
        room = self.require(vnode)
        if room.founder != uid:
            raise _error(ErrorCode.ERR_AUTH, "only the founder manages a virtual room", vnode)
        return room

    def remove(self, uid: str, vnode: str) -> list[Subscription]:
        """
        Remove a room its founder no longer wants.

        @return: the subscriptions that ended with it.
        @raise TimProtocolError: C{ERR_NOEXIST}, or C{ERR_AUTH} for anyone
            but the founder.
        """
        return self._drop(self.managed(uid, vnode))

    def _unfound(self, founder: str) -> None:
        left = self._founded.get(founder, 1) - 1
        if left:
            self._founded[founder] = left
        else:
            self._founded.pop(founder, None)

    def _drop(self, room: VRoom) -> list[Subscription]:
        del self._rooms[room.vnode]
        if room.mirrorOf is None:
            self._unfound(room.founder)
        ended = list(room.subscribers.values())
        for subscription in ended:
            self._forget(subscription)
        room.subscribers.clear()
        return ended

    def expire(self) -> list[tuple[VRoom, list[Subscription]]]:
        """
        Remove every room idle for C{idle_expiry} seconds or more.

        @return: each room removed, with the subscriptions that ended.
        """
        if not self.config.idle_expiry:
            return []
        deadline = self.clock.seconds() - self.config.idle_expiry
        idle = [r for r in self._rooms.values() if r.lastActivity <= deadline and r.mirrorOf is None]
        return [(room, self._drop(room)) for room in idle]

    # Permissions.

    def grant(self, uid: str, vnode: str, user: str) -> None:
        """
        Let C{user} push into the room (tim's add push permission).

        @raise TimProtocolError: C{ERR_NOEXIST}, C{ERR_AUTH} for anyone but
            the founder, C{ERR_OVERENTRY} past C{max_publishers}.
        """
        room = self.managed(uid, vnode)
        limit = self.config.max_publishers
        if user == room.founder or user in room.publishers:
            return
        if limit and len(room.publishers) >= limit:
            raise _error(ErrorCode.ERR_OVERENTRY, f"at most {limit} publishers per virtual room", user)
        room.publishers.add(user)
        room.version += 1

    def revoke(self, uid: str, vnode: str, user: str) -> None:
        """
        Take push permission back.  Subscriptions stay.
        """
        room = self.managed(uid, vnode)
        room.publishers.discard(user)
        room.version += 1

    def allow(self, uid: str, vnode: str, user: str) -> None:
        """
        Let C{user} subscribe to a private room.
        """
        room = self.managed(uid, vnode)
        room.allowed.add(user)
        room.version += 1

    def disallow(self, uid: str, vnode: str, user: str) -> list[Subscription]:
        """
        Take the leave to subscribe back; in a private room, C{user}'s
        subscriptions end unless it may push.

        @return: the subscriptions that ended.
        """
        room = self.managed(uid, vnode)
        room.allowed.discard(user)
        room.version += 1
        if room.maySubscribe(user):
            return []
        ended = [s for s in room.subscribers.values() if s.session.uid == user]
        for subscription in ended:
            del room.subscribers[subscription.session]
            self._forget(subscription)
        return ended

    # Subscriptions.

    def subscribe(self, session: Session, vnode: str, binary: bool = False) -> Subscription:
        """
        Subscribe C{session}, or change how an existing subscription gets
        its frames.

        @raise TimProtocolError: C{ERR_NOEXIST}; C{ERR_AUTH} for a private
            room without leave; C{ERR_OVERENTRY} past C{max_subscribers} or
            C{max_subscriptions}.
        """
        room = self.require(vnode)
        if not room.maySubscribe(session.uid):
            raise _error(ErrorCode.ERR_AUTH, "this virtual room needs the founder's leave", vnode)
        existing = room.subscribers.get(session)
        if existing is not None:
            existing.binary = binary
            return existing
        limit = self.config.max_subscribers
        if limit and len(room.subscribers) >= limit:
            raise _error(ErrorCode.ERR_OVERENTRY, "virtual room full", vnode)
        mine = self._bySession.get(session)
        if mine is not None and len(mine) >= self.config.max_subscriptions:
            raise _error(ErrorCode.ERR_OVERENTRY, "too many subscriptions on this connection", vnode)
        subscription = room.subscribers[session] = Subscription(session, room, binary)
        self._bySession.setdefault(session, {})[vnode] = subscription
        return subscription

    def subscription(self, session: Session, vnode: str) -> Subscription | None:
        return self._bySession.get(session, {}).get(vnode)

    def unsubscribe(self, session: Session, vnode: str) -> Subscription | None:
        """
        End C{session}'s subscription, if any.

        @return: the subscription ended.
        """
        subscription = self._bySession.get(session, {}).get(vnode)
        if subscription is None:
            return None
        subscription.room.subscribers.pop(session, None)
        self._forget(subscription)
        return subscription

    def _forget(self, subscription: Subscription) -> None:
        mine = self._bySession.get(subscription.session)
        if mine is not None:
            mine.pop(subscription.room.vnode, None)
            if not mine:
                del self._bySession[subscription.session]

    def sessionEnded(self, session: Session) -> list[Subscription]:
        """
        End every subscription of a session that closed.

        @return: the subscriptions that ended.
        """
        ended = list(self._bySession.pop(session, {}).values())
        for subscription in ended:
            subscription.room.subscribers.pop(session, None)
        return ended

    # Statistics.

    def stats(self, vnode: str) -> RoomStats | None:
        """
        A snapshot of room C{vnode}, or C{None} if there is no such room.
        """
        room = self._rooms.get(vnode)
        if room is None:
            return None
        now = self.clock.seconds()
        return RoomStats(
            vnode=room.vnode,
            founder=room.founder,
            private=room.private,
            age=now - room.created,
            idle=now - room.lastActivity,
            subscribers=len(room.subscribers),
            binarySubscribers=sum(1 for s in room.subscribers.values() if s.binary),
            publishers=len(room.publishers) + 1,
            frames=room.frames.total,
            bytes=room.bytes.total,
            framesPerSecond=room.frames.rate(),
            bytesPerSecond=room.bytes.rate(),
            delivered=room.delivered,
            dropped=room.dropped,
        )

    def allStats(self) -> list[RoomStats]:
        """
        A snapshot of every room, busiest (most subscribers) first.
        """
        snapshots = [self.stats(vnode) for vnode in list(self._rooms)]
        return sorted((s for s in snapshots if s is not None), key=lambda s: -s.subscribers)
