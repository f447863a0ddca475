# -*- test-case-name: timtx.test.test_admin -*-
"""
What an operator can do to a running node, shared by the REST API, tim's
server API and the dashboard.

Operations on behalf of a user (create a group as its founder, change a
profile, open a virtual room) run the node's own handler for the frame a
client would send, with a session that belongs to no connection
(L{actAs}): the rules, limits and notices are exactly a client's, and the
answer is the ack the handler sent.

System messages (tim's C{/timMessage}) are C{msType 1, odType 1}
messages written to each recipient's inbox and pushed through the router,
as the node's notices are: delivered at least once, kept until
acknowledged, not added to any conversation's history (as in tim).
"""

from __future__ import annotations

import copy
import secrets
from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from zope.interface import implementer

from timtx.admin.web import ApiError, badRequest, notFound
from timtx.chat.messagerules import contentSize
from timtx.delivery.sessions import Session
from timtx.interfaces import IFrameSink
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, GroupType, MsType, OdType, TimType, VRoomOp
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import parse_server_frame
from timtx.protocols.structs import Tid, TimAck, TimAuth, TimMessage, TimReq, TimStruct

if TYPE_CHECKING:
    from timtx.node import Node

#: Store calls one broadcast keeps under way at once.
BROADCAST_PARALLEL = 64


@implementer(IFrameSink)
class CaptureSink:
    """
    Where the frames a handler sends to an operator's stand-in session go:
    kept, to be read as the answer.
    """

    frameKind = "admin"
    congested = False
    backlog = 0
    peerAddress = "admin"

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def writeFrame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def writeFrameParts(self, header: bytes, payload: bytes) -> None:
        self.frames.append(header + payload)

    def prepareFrame(self, frame: bytes) -> bytes:
        return frame

    def writePrepared(self, prepared: Any, size: int) -> None:
        self.frames.append(prepared)

    def closeConnection(self, reason: str) -> None:
        pass

    def acks(self) -> list[TimAck]:
        """
        The TIMACKs sent, decoded.
        """
        found = []
        for data in self.frames:
            frame = parse_server_frame(data)
            if frame.timType == TimType.TIMACK:
                found.append(codec.decode(TimAck, frame.payload, Encoding.JSON))
        return found


def timError(error: TimProtocolError) -> ApiError:
    """
    A tim error code as an API error: 404 for a missing account, 409 for
    one that exists, 400 for the rest of what a client got wrong.
    """
    status: int = {
        ErrorCode.ERR_ACCOUNT: 404,
        ErrorCode.ERR_NOEXIST: 404,
        ErrorCode.ERR_HASEXIST: 409,
        ErrorCode.ERR_DATABASE: 503,
        ErrorCode.ERR_OVERLOAD: 503,
    }.get(ErrorCode(error.code) if error.code in ErrorCode._value2member_map_ else ErrorCode.ERR_PARAMS, 400)
    try:
        name = ErrorCode(error.code).name.lower()
    except ValueError:
        name = "tim_error"
    return ApiError(status, name, error.text or name, timCode=error.code)


def describeSession(session: Session, now: float) -> dict[str, Any]:
    sink = session.sink
    address = getattr(sink, "peerAddress", None) or None
    return {
        "uid": session.uid,
        "domain": session.domain or None,
        "resource": session.resource,
        "termtyp": session.termtyp,
        "transport": getattr(sink, "frameKind", None),
        "encoding": session.encoding.value,
        "generation": session.generation.value,
        "address": address,
        "since": session.loginTime,
        "seconds": now - session.loginTime,
        "unacknowledged": session.unacknowledged,
        "congested": bool(getattr(sink, "congested", False)),
    }


class Operations:
    """
    The operator's actions on C{node}.
    """

    def __init__(self, node: Node):
        self.node = node

    # Accounts.

    @inlineCallbacks
    def account(self, uid: str) -> Any:
        """
        The account C{uid}, or an L{ApiError} 404.
        """
        account = yield self.node.store.getAccount(uid)
        if account is None:
            raise notFound(f"no account {uid}")
        return account

    @inlineCallbacks
    def user(self, uid: str) -> Any:
        account = yield self.account(uid)
        node = self.node
        now = node.clock.seconds()
        groups = yield node.directory.groupsOf(uid)
        return {
            "uid": uid,
            "domain": account.domain or None,
            "created": account.created,
            "online": node.router.isOnline(uid),
            "sessions": [describeSession(s, now) for s in node.sessions.sessionsOf(uid)],
            "blockedUntil": node.bans.blockedUntil(uid),
            "groups": len(groups),
        }

    def sessions(self, offset: int, limit: int) -> dict[str, Any]:
        node = self.node
        now = node.clock.seconds()
        every = list(node.sessions)
        page = every[offset : offset + limit]
        return {"total": len(every), "offset": offset, "sessions": [describeSession(s, now) for s in page]}

    def kick(self, uid: str) -> int:
        """
        Log out every session of C{uid} on this node (TIMLOGOUT, then the
        connection closes).
        """
        sessions = self.node.sessions.sessionsOf(uid)
        for session in sessions:
            session.kick()
        return len(sessions)

    def block(self, uid: str, seconds: float) -> float:
        """
        Block C{uid} from logging in for C{seconds} and log it out now.
        """
        try:
            until = self.node.bans.block(uid, seconds)
        except ValueError as e:
            raise badRequest(str(e)) from None
        self.kick(uid)
        return until

    def unblock(self, uid: str) -> bool:
        return self.node.bans.unblock(uid)

    @inlineCallbacks
    def register(self, name: str, password: str, domain: str | None) -> Any:
        try:
            uid = yield self.node.accounts.register(TimAuth(name=name, pwd=password, domain=domain or None))
        except TimProtocolError as e:
            raise timError(e) from None
        return uid

    @inlineCallbacks
    def token(self, uid: str) -> Any:
        account = yield self.account(uid)
        token = yield self.node.accounts.grantToken(account.uid, account.domain)
        return token

    @inlineCallbacks
    def resetPassword(self, uid: str, password: str) -> Any:
        try:
            yield self.node.accounts.resetPassword(uid, password)
        except TimProtocolError as e:
            raise timError(e) from None

    # Messages.

    def systemMessage(self, uid: str, template: TimMessage) -> Deferred[None]:
        """
        Put a system message (msType 1, odType 1) in C{uid}'s inbox and
        push it to its sessions.
        """
        node = self.node
        message = copy.copy(template)
        message.msType = MsType.SOURCE_OS
        message.odType = OdType.ORDER_INOF
        message.id = secrets.randbits(53)
        message.toTid = Tid(node=uid)
        message.timestamp = int(node.clock.seconds() * 1e9)
        message.mid = message.seq = None
        return node.notices.notify(uid, message)

    def checkMessage(self, message: TimMessage) -> None:
        limit = self.node.config.messages.max_body_bytes
        if contentSize(message) > limit:
            raise ApiError(413, "too_large", f"the message content is over {limit} bytes ([messages] max_body_bytes)")
        if message.roomTid is not None:
            raise badRequest("a system message goes to accounts, not to a group (roomTid)")
        try:
            # What tim's JSON lets through but Thrift cannot carry (an i16
            # out of range, say) is refused here, not when it is stored.
            codec.encode_compact(message)
        except (OverflowError, ValueError, TypeError) as e:
            raise badRequest(f"the message cannot be encoded: {e}") from None

    @inlineCallbacks
    def sendSystemMessage(self, uids: Iterable[str], message: TimMessage) -> Any:
        """
        Send C{message} to every account of C{uids}; all must exist (tim's
        rule), or nothing is sent.

        @return: how many accounts it was sent to.
        """
        self.checkMessage(message)
        wanted = list(dict.fromkeys(uids))
        limit = self.node.config.admin.max_targets
        if len(wanted) > limit:
            raise badRequest(f"at most {limit} accounts at once ([admin] max_targets)")
        for uid in wanted:
            exists = yield self.node.accounts.exists(uid)
            if not exists:
                raise notFound(f"no account {uid}")
        yield self._sendAll(wanted, message)
        return len(wanted)

    @inlineCallbacks
    def broadcast(self, message: TimMessage) -> Any:
        """
        Send C{message} to every account with a session on this node.

        @return: how many accounts it was sent to.
        """
        self.checkMessage(message)
        users = self.node.sessions.users()
        yield self._sendAll(users, message)
        return len(users)

    @inlineCallbacks
    def _sendAll(self, uids: list[str], message: TimMessage) -> Any:
        # A bounded number of inbox writes under way at once, so that a
        # broadcast to every user online does not queue thousands of store
        # calls ahead of everyone's messages.
        for start in range(0, len(uids), BROADCAST_PARALLEL):
            chunk = uids[start : start + BROADCAST_PARALLEL]
            results = yield DeferredList([self.systemMessage(uid, message) for uid in chunk], consumeErrors=True)
            for ok, failure in results:
                if not ok:
                    failure.raiseException()

    # On behalf of a user.

    @inlineCallbacks
    def actAs(self, uid: str, timType: int, body: TimStruct) -> Any:
        """
        Handle C{body} as a frame of C{timType} from a session of C{uid}, a
        session on no connection; return the first ack it got.

        @raise ApiError: 404 if there is no such account; the handler's
            tim error as L{timError}.
        """
        node = self.node
        account = yield self.account(uid)
        route = node.dispatcher.lookup(timType)
        if route is None:  # pragma: no cover: the node routes every type used here
            raise ApiError(500, "internal", f"frame type {timType} is not routed")
        sink = CaptureSink()
        session = Session(
            sink,
            account.uid,
            account.domain,
            "admin",
            0,
            Encoding.JSON,
            node.clock.seconds(),
            node.ackIds,
        )
        try:
            yield route.handler(session, body)
        except TimProtocolError as e:
            raise timError(e) from None
        finally:
            session.connectionLost()
        acks = sink.acks()
        for ack in acks:
            if ack.ok is False and ack.error is not None:
                raise timError(TimProtocolError(ack.error.code or ErrorCode.ERR_UNDEFINED, ack.error.info or ""))
        return acks[0] if acks else TimAck(ok=True)

    # Groups and virtual rooms.

    @inlineCallbacks
    def createGroup(self, founder: str, topic: str, private: bool) -> Any:
        """
        A group founded by C{founder}, as its client would make it.

        @return: the group id.
        """
        request = TimReq(rtype=Business.NEWROOM, node=topic, reqInt=GroupType.PRIVATE if private else GroupType.OPEN)
        ack = yield self.actAs(founder, TimType.TIMBUSINESS, request)
        return ack.n

    @inlineCallbacks
    def createVRoom(self, founder: str, private: bool) -> Any:
        """
        A virtual room founded by C{founder}.

        @return: the room id.
        """
        ack = yield self.actAs(founder, TimType.TIMVROOM, TimReq(rtype=VRoomOp.REGISTER, reqInt=1 if private else 0))
        return ack.n

    @inlineCallbacks
    def group(self, gid: str, limit: int) -> Any:
        node = self.node
        state = yield node.directory.get(gid)
        if state is None:
            raise notFound(f"no group {gid}")
        group = state.group
        profile = node.vault.openRoom(gid, group.profile) if group.profile else None
        members = sorted(state.members)
        return {
            "gid": gid,
            "domain": group.domain or None,
            "founder": group.founder,
            "type": "private" if group.gtype == 1 else "open",
            "alive": state.alive,
            "created": group.created,
            "topic": getattr(profile, "topic", None),
            "managers": state.managers(),
            "memberCount": len(members),
            "members": members[:limit],
        }

    def vroom(self, vnode: str) -> dict[str, Any]:
        stats = self.node.vrooms.stats(vnode)
        if stats is None:
            raise notFound(f"no virtual room {vnode}")
        return roomStats(stats)


def roomStats(stats: Any) -> dict[str, Any]:
    return {
        "vnode": stats.vnode,
        "founder": stats.founder,
        "private": stats.private,
        "age": stats.age,
        "idle": stats.idle,
        "subscribers": stats.subscribers,
        "binarySubscribers": stats.binarySubscribers,
        "publishers": stats.publishers,
        "frames": stats.frames,
        "bytes": stats.bytes,
        "framesPerSecond": stats.framesPerSecond,
        "bytesPerSecond": stats.bytesPerSecond,
        "delivered": stats.delivered,
        "dropped": stats.dropped,
    }
