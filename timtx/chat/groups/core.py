# -*- test-case-name: timtx.test.test_groups -*-
"""
What every group operation shares: finding a group, checking roles,
notices, and admitting and dropping members.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.chat.conversations import AlreadyStored, Appended, Conversations
from timtx.chat.groups.directory import GroupDirectory, GroupState
from timtx.crypto.vault import StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.delivery.fanout import GroupFanout, groupConversation
from timtx.delivery.notices import Notices
from timtx.interfaces import IRouter
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import ROLE_FOUNDER, ROLE_MANAGER, ROLE_MEMBER, Duplicate, Member
from timtx.protocols.constants import ErrorCode, MsType, OdType, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Tid, TimMessage

if TYPE_CHECKING:
    from timtx.config import GroupsConfig
    from timtx.delivery.sessions import Session

#: timtx's group operations (TIMBUSINESS rtype), above tim's 1..21.
TRANSFERROOM = 102
SETROOMCAP = 103
MUTEMEMBER = 104
MUTEALL = 105

#: bnTypes of timtx's notices.
MEMBERJOINED = 110
MEMBERLEFT = 111
ROOMTRANSFERRED = 112


class Groups:
    """
    The collaborators and rules the group services share.
    """

    log = Logger()

    def __init__(
        self,
        config: GroupsConfig,
        *,
        store: IMessageStore,
        vault: StanzaVault,
        clock: IReactorTime,
        directory: GroupDirectory,
        fanout: GroupFanout,
        conversations: Conversations,
        router: IRouter,
        notices: Notices,
    ):
        self.config = config
        self.store = store
        self.vault = vault
        self.clock = clock
        self.directory = directory
        self.fanout = fanout
        self.conversations = conversations
        self.router = router
        self.notices = notices

    def now(self) -> float:
        return self.clock.seconds()

    def ack(self, session: Session, rtype: int, **fields: Any) -> None:
        session.sendAck(TimType.TIMBUSINESS, t=rtype, **fields)

    @inlineCallbacks
    def group(self, gid: str | None, alive: bool = True) -> Any:
        """
        @raise TimProtocolError: 4104 without an id, 4109 for an unknown
            group, 4108 for a dissolved one (when C{alive}).
        """
        if not gid:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "TimReq.node (the group) is required")
        state = yield self.directory.get(gid)
        if state is None:
            raise TimProtocolError(ErrorCode.ERR_NOEXIST, "no such group")
        if alive and not state.alive:
            raise TimProtocolError(ErrorCode.ERR_CANCEL, "the group was dissolved")
        return state

    def requireStaff(self, state: GroupState, uid: str) -> None:
        if not state.isManager(uid):
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder or a manager may do this")

    def requireMember(self, state: GroupState, uid: str, code: int = ErrorCode.ERR_AUTH) -> Member:
        member = state.members.get(uid)
        if member is None:
            raise TimProtocolError(code, "not a member of this group")
        return member

    def capOf(self, state: GroupState) -> int:
        return state.group.memberCap or self.config.member_cap

    def notice(
        self, state: GroupState, bnType: int, sender: Tid, to: str | None = None, text: str | None = None
    ) -> TimMessage:
        return TimMessage(
            id=secrets.randbits(53),
            msType=MsType.SOURCE_USER,
            odType=OdType.ORDER_BUSINESS,
            bnType=bnType,
            fromTid=sender,
            toTid=Tid(node=to) if to else None,
            roomTid=Tid(node=state.gid),
            dataString=text,
            timestamp=int(self.now() * 1e9),
        )

    def notify(self, uid: str, notice: TimMessage) -> Any:
        """
        A notice for one user, through its inbox.
        """
        return self.notices.notify(uid, notice)

    # Storing and routing group messages: the one seam the cluster changes
    # (L{timtx.cluster.groups.ClusterGroups} hands both to the group's
    # owner node).

    def appendAndRoute(
        self, state: GroupState, sender: str, message: TimMessage, dedupe: tuple[str, int] | None, echo: bool
    ) -> Deferred[Appended]:
        """
        Number and store C{message} in the group's history, then route it:
        to every member, or with C{echo} as an echo to the sender's sessions
        and a push to every other member.

        @return: a L{Deferred} firing with L{Appended} once durable and
            routed, in seq order.
        """
        d = self.conversations.append(groupConversation(state.gid), sender, message, (), dedupe=dedupe)
        d.addCallback(self._appended, state, sender if echo else None)
        return d.addErrback(self._resent, state)

    def _resent(self, failure: Failure, state: GroupState) -> Failure:
        """
        A resend the store refused as stored already: route the stored copy
        again (L{routeAgain}).
        """
        if isinstance(failure.value, AlreadyStored):
            self.routeAgain(state, failure.value.duplicate)
        return failure

    def routeAgain(self, state: GroupState, stored: Duplicate) -> None:
        """
        Route the stored message a resend is recognised as, to no echo.  Its
        first copy may never have been routed: its sender was told 5103
        when the store could not say whether the write was committed.
        Sessions that had it get it twice (at least once; clients keep one
        per seq), the others get it, before their cursors pass it.
        """
        if stored.seq is None:
            return
        d = self.store.getMessage(stored.conv, stored.mid)
        d.addCallback(self._routeStored, state)
        d.addErrback(lambda f: self.log.info("routing a resent message again failed: {why}", why=f.getErrorMessage()))

    def _routeStored(self, row: Any, state: GroupState) -> None:
        if row is not None:
            message = self.vault.openMessage(row.conv, row.seq, row.stanza)
            self.route(state, Encoded(message), row.seq, None)

    def _appended(self, appended: Appended, state: GroupState, echoTo: str | None) -> Appended:
        self.route(state, Encoded(appended.message), appended.message.seq or 0, echoTo)
        return appended

    def route(self, state: GroupState, encoded: Encoded, seq: int, echoTo: str | None) -> None:
        """
        Deliver a stored group message: the echo to C{echoTo}'s sessions (if
        any) and the push to every other member's.
        """
        if echoTo is not None:
            self.router.send(echoTo, TimType.TIMMESSAGE, encoded)
            self.echoed(state.gid, echoTo, seq)
        self.router.pushToGroup(state.gid, state.members, encoded, echoTo)

    def echoed(self, gid: str, sender: str, seq: int) -> None:
        """
        The sender has its own message: move its cursor if it had all
        before it, so it does not get it back as offline.
        """
        fanout = self.fanout
        if fanout.cursor(sender, gid) == seq - 1:
            fanout.advance(sender, gid, seq)

    def post(self, state: GroupState, sender: str, notice: TimMessage) -> Deferred[Appended]:
        """
        A notice to all members, kept in the group's history so that offline
        members see it in order.
        """
        notice.msType = MsType.SOURCE_ROOM
        return self.appendAndRoute(state, sender, notice, None, echo=False)

    @inlineCallbacks
    def announce(self, state: GroupState, bnType: int, who: str) -> Any:
        """
        Tell the members that C{who} joined or left, unless notices are off
        or the group is too big for them.
        """
        limit = self.config.member_notices_max
        if not self.config.member_notices or (limit and len(state.members) > limit):
            return
        yield self.post(state, who, self.notice(state, bnType, Tid(node=who)))

    @inlineCallbacks
    def admit(self, state: GroupState, uid: str) -> Any:
        """
        Make C{uid} a member, reading from now on.
        """
        if len(state.members) >= self.capOf(state):
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "the group is full")
        last, _ = yield self.store.lastMessage(groupConversation(state.gid))
        yield self.fanout.place(uid, state.gid, last)
        yield self.directory.putMember(state, Member(uid, ROLE_MEMBER, self.now()))
        yield self.announce(state, MEMBERJOINED, uid)

    @inlineCallbacks
    def drop(self, state: GroupState, uid: str) -> Any:
        yield self.directory.removeMember(state, uid)
        yield self.announce(state, MEMBERLEFT, uid)

    def mayModerate(self, state: GroupState, actor: str, target: str) -> None:
        """
        @raise TimProtocolError: unless C{actor} may kick, mute or block
            C{target}: not itself, not the founder, and a manager only if
            C{actor} is the founder.
        """
        if target == actor:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not yourself")
        member = state.members.get(target)
        if member is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "not a member")
        if member.role == ROLE_FOUNDER or (member.role == ROLE_MANAGER and state.group.founder != actor):
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder may do this to a manager")
