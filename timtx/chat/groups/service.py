# -*- test-case-name: timtx.test.test_groups -*-
"""
Groups (tim's "rooms"): membership, roles, moderation, messages, profiles.

tim's rules are kept — a founder and managers; private groups need approval,
open groups are joined directly; a user can block a group and a group can
block a member — with these deliberate changes (see docs/groups.md):

  - kicking a member keeps that member's own block of the group;
  - a join request is acknowledged to the requester;
  - pulling someone into an open group requires being a member;
  - the founder can dissolve a group that still has members, who are told.

Extensions: ownership transfer, member caps, muting a member or everyone,
notices when members join or leave, recall by managers.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from timtx.chat.business import BusinessRouter, requireNode
from timtx.chat.conversations import Appended, Conversations
from timtx.delivery.inbox import Delivery, Encoded
from timtx.chat.duplicates import DuplicateFilter
from timtx.delivery.fanout import GroupFanout, groupConversation
from timtx.crypto.ids import new_random_id
from timtx.persistence.records import (
    BLOCK_BY_GROUP,
    BLOCK_BY_USER,
    GROUP_ALIVE,
    GROUP_CANCELLED,
    MESSAGE_NORMAL,
    MESSAGE_RECALLED,
    ROLE_FOUNDER,
    ROLE_MANAGER,
    ROLE_MEMBER,
    Group,
    Member,
)
from timtx.protocols.constants import Business, ErrorCode, GroupType, MsType, NodeInfo, OdType, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Tid, TimMessage, TimNodes, TimReq, TimRoomBean
from timtx.chat.groups.directory import GroupDirectory, GroupState
from timtx.crypto.vault import StanzaVault

if TYPE_CHECKING:
    from timtx.chat.accounts import AccountService
    from timtx.config import GroupsConfig, MessagesConfig
    from timtx.chat.messaging import MessagingService
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


class GroupService:
    log = Logger()

    def __init__(
        self,
        config: GroupsConfig,
        messagesConfig: MessagesConfig,
        store: Any,
        vault: StanzaVault,
        directory: GroupDirectory,
        fanout: GroupFanout,
        conversations: Conversations,
        delivery: Delivery,
        duplicates: DuplicateFilter,
        accounts: AccountService,
        messaging: MessagingService,
        clock: IReactorTime,
    ):
        self.config = config
        self.messagesConfig = messagesConfig
        self.store = store
        self.vault = vault
        self.directory = directory
        self.fanout = fanout
        self.conversations = conversations
        self.delivery = delivery
        self.duplicates = duplicates
        self.accounts = accounts
        self.messaging = messaging
        self.clock = clock

    def register(self, business: BusinessRouter) -> None:
        for rtype, handler in [
            (Business.USERROOM, self.myGroups),
            (Business.ROOMUSERS, self.members),
            (Business.NEWROOM, self.create),
            (Business.ADDROOM, self.join),
            (Business.NOPASSROOM, self.reject),
            (Business.PULLROOM, self.pullIn),
            (Business.KICKROOM, self.kick),
            (Business.BLOCKROOM, self.blockGroup),
            (Business.BLOCKROOMMEMBER, self.blockMember),
            (Business.LEAVEROOM, self.leave),
            (Business.CANCELROOM, self.dissolve),
            (Business.BLOCKROOMLIST, self.blockedGroups),
            (Business.BLOCKROOMMEMBERLIST, self.blockedMembers),
            (TRANSFERROOM, self.transfer),
            (SETROOMCAP, self.setCap),
            (MUTEMEMBER, self.mute),
            (MUTEALL, self.muteAll),
        ]:
            business.register(rtype, handler)

    # Helpers.

    def now(self) -> float:
        return self.clock.seconds()

    def _ack(self, session: Session, rtype: int, **fields: Any) -> None:
        session.sendAck(TimType.TIMBUSINESS, t=rtype, **fields)

    @inlineCallbacks
    def _group(self, gid: str | None, alive: bool = True) -> Any:
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

    def _requireStaff(self, state: GroupState, uid: str) -> None:
        if not state.isManager(uid):
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder or a manager may do this")

    def _requireMember(self, state: GroupState, uid: str, code: int = ErrorCode.ERR_AUTH) -> Member:
        member = state.members.get(uid)
        if member is None:
            raise TimProtocolError(code, "not a member of this group")
        return member

    def _capOf(self, state: GroupState) -> int:
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

    @inlineCallbacks
    def _announce(self, state: GroupState, bnType: int, who: str) -> Any:
        """
        A notice to all members about C{who}, kept in the group's history so
        that offline members see it in order.
        """
        limit = self.config.member_notices_max
        if not self.config.member_notices or (limit and len(state.members) > limit):
            return
        notice = self.notice(state, bnType, Tid(node=who))
        notice.msType = MsType.SOURCE_ROOM
        appended = yield self.conversations.append(groupConversation(state.gid), who, notice, ())
        self.fanout.deliver(state, appended.message)

    @inlineCallbacks
    def _admit(self, state: GroupState, uid: str) -> Any:
        """
        Make C{uid} a member, reading from now on.
        """
        if len(state.members) >= self._capOf(state):
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "the group is full")
        last, _ = yield self.store.lastMessage(groupConversation(state.gid))
        yield self.fanout.place(uid, state.gid, last)
        yield self.directory.putMember(state, Member(uid, ROLE_MEMBER, self.now()))
        yield self._announce(state, MEMBERJOINED, uid)

    @inlineCallbacks
    def _drop(self, state: GroupState, uid: str) -> Any:
        yield self.directory.removeMember(state, uid)
        yield self._announce(state, MEMBERLEFT, uid)

    # Lists.

    @inlineCallbacks
    def myGroups(self, session: Session, request: TimReq) -> Any:
        gids = yield self.directory.groupsOf(session.uid)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROOM, nodelist=sorted(gids)))

    @inlineCallbacks
    def members(self, session: Session, request: TimReq) -> Any:
        state = yield self._group(request.node)
        self._requireMember(state, session.uid, ErrorCode.ERR_PARAMS)  # tim answers 4104 here
        session.send(
            TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROOMMEMBER, nodelist=sorted(state.members), node=state.gid)
        )

    @inlineCallbacks
    def blockedGroups(self, session: Session, request: TimReq) -> Any:
        gids = yield self.store.userGroupBlocks(session.uid)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.BLOCKROOMLIST, nodelist=sorted(gids)))

    @inlineCallbacks
    def blockedMembers(self, session: Session, request: TimReq) -> Any:
        state = yield self._group(request.node)
        self._requireStaff(state, session.uid)
        blocked = sorted(uid for uid, flags in state.blocks.items() if BLOCK_BY_GROUP in flags)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.BLOCKROOMMEMBERLIST, nodelist=blocked, node=state.gid))

    # Creating, joining, leaving.

    @inlineCallbacks
    def create(self, session: Session, request: TimReq) -> Any:
        """
        rtype 8: C{node} is the topic; C{reqInt} 1 makes the group private,
        anything else open.
        """
        if request.node is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "TimReq.node (the topic) is required")
        founded = yield self.store.countFounded(session.uid)
        if founded >= self.config.max_created_per_user:
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "too many groups founded")
        gtype = GroupType.PRIVATE if request.reqInt == GroupType.PRIVATE else GroupType.OPEN
        gid = new_random_id()
        profile = self.vault.sealRoom(gid, _profileOnly(TimRoomBean(topic=request.node)))
        group = Group(gid, session.domain, session.uid, gtype, GROUP_ALIVE, self.now(), profile)
        yield self.directory.create(group, Member(session.uid, ROLE_FOUNDER, self.now()))
        self._ack(session, Business.NEWROOM, n=gid)

    @inlineCallbacks
    def join(self, session: Session, request: TimReq) -> Any:
        """
        rtype 9: an open group is joined at once; a private one gets a
        request that its founder and managers are told about (bnType 9).
        The requester gets an ack either way; C{n2} is "pending" while a
        request waits.
        """
        state = yield self._group(request.node)
        uid = session.uid
        if state.blockedByGroup(uid) or state.blocksGroup(uid):
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        if uid in state.members:
            raise TimProtocolError(ErrorCode.ERR_HASEXIST, "already a member")
        if state.group.gtype == GroupType.OPEN:
            yield self._admit(state, uid)
            self._ack(session, Business.ADDROOM, n=state.gid)
            return
        if len(state.members) >= self._capOf(state):
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "the group is full")
        yield self.store.addJoinRequest(state.gid, uid, self.now())
        for staff in state.staff():
            yield self.delivery.notify(staff, self.notice(state, Business.ADDROOM, session.tid, staff, request.reqStr))
        self._ack(session, Business.ADDROOM, n=state.gid, n2="pending")

    @inlineCallbacks
    def pullIn(self, session: Session, request: TimReq) -> Any:
        """
        rtype 12: approve a request or pull a user in.  In a private group
        only the founder and managers may; in an open group, any member
        (tim let anyone, members or not).
        """
        state = yield self._group(request.node)
        target = requireNode(request, "node2")
        if state.group.gtype == GroupType.PRIVATE:
            self._requireStaff(state, session.uid)
        else:
            self._requireMember(state, session.uid)
        if target == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not yourself")
        if target in state.members:
            raise TimProtocolError(ErrorCode.ERR_HASEXIST, "already a member")
        if not (yield self.accounts.exists(target)):
            raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")
        if state.blocksGroup(target) or state.blockedByGroup(target):
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        requested = yield self.store.takeJoinRequest(state.gid, target)
        yield self._admit(state, target)
        bnType = Business.PASSROOM if requested else Business.PULLROOM
        yield self.delivery.notify(target, self.notice(state, bnType, session.tid, target))
        self._ack(session, Business.PULLROOM, n=target)

    @inlineCallbacks
    def reject(self, session: Session, request: TimReq) -> Any:
        """
        rtype 11: refuse a pending request (4103 if there is none).
        """
        state = yield self._group(request.node)
        self._requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        if not (yield self.store.takeJoinRequest(state.gid, target)):
            raise TimProtocolError(ErrorCode.ERR_EXPIREOP, "no pending request")
        yield self.delivery.notify(target, self.notice(state, Business.NOPASSROOM, session.tid, target))
        self._ack(session, Business.NOPASSROOM, n=target)

    @inlineCallbacks
    def kick(self, session: Session, request: TimReq) -> Any:
        """
        rtype 13: founder or manager; only the founder kicks managers.  The
        user's own block of the group, if any, stays (tim lost it).
        """
        state = yield self._group(request.node)
        self._requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        self._mayModerate(state, session.uid, target)
        yield self._drop(state, target)
        yield self.delivery.notify(target, self.notice(state, Business.KICKROOM, session.tid, target))
        self._ack(session, Business.KICKROOM, n=target)

    def _mayModerate(self, state: GroupState, actor: str, target: str) -> None:
        if target == actor:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not yourself")
        member = state.members.get(target)
        if member is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "not a member")
        if member.role == ROLE_FOUNDER or (member.role == ROLE_MANAGER and state.group.founder != actor):
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder may do this to a manager")

    @inlineCallbacks
    def leave(self, session: Session, request: TimReq) -> Any:
        """
        rtype 16: any member but the founder, who transfers or dissolves.
        """
        state = yield self._group(request.node)
        self._requireMember(state, session.uid)
        if state.group.founder == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "the founder transfers the group or dissolves it")
        yield self._drop(state, session.uid)
        self._ack(session, Business.LEAVEROOM, n=state.gid)

    @inlineCallbacks
    def blockGroup(self, session: Session, request: TimReq) -> Any:
        """
        rtype 14: the user leaves and can no longer be pulled in.
        """
        state = yield self._group(request.node, alive=False)
        if state.group.founder == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "the founder cannot block its own group")
        if session.uid in state.members:
            yield self._drop(state, session.uid)
        yield self.directory.setBlock(state, session.uid, BLOCK_BY_USER, True)
        self._ack(session, Business.BLOCKROOM, n=state.gid)

    @inlineCallbacks
    def blockMember(self, session: Session, request: TimReq) -> Any:
        """
        rtype 15: founder or manager; the user leaves and cannot return.
        """
        state = yield self._group(request.node)
        self._requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        if target in state.members:
            self._mayModerate(state, session.uid, target)
            yield self._drop(state, target)
        elif target == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not yourself")
        yield self.directory.setBlock(state, target, BLOCK_BY_GROUP, True)
        self._ack(session, Business.BLOCKROOMMEMBER, n=target)

    @inlineCallbacks
    def dissolve(self, session: Session, request: TimReq) -> Any:
        """
        rtype 17: the founder dissolves the group; remaining members are
        told (bnType 17) through their inboxes.
        """
        state = yield self._group(request.node)
        if state.group.founder != session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder dissolves a group")
        others = [uid for uid in state.members if uid != session.uid]
        yield self.directory.update(state, status=GROUP_CANCELLED)
        for uid in list(state.members):
            yield self.directory.removeMember(state, uid)
        for uid in others:
            yield self.delivery.notify(uid, self.notice(state, Business.CANCELROOM, session.tid, uid))
        self._ack(session, Business.CANCELROOM, n=state.gid)

    # Extensions.

    @inlineCallbacks
    def transfer(self, session: Session, request: TimReq) -> Any:
        """
        rtype 102: the founder hands the group to a member and stays as a
        manager.  Members are told (bnType 112).
        """
        state = yield self._group(request.node)
        if state.group.founder != session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder transfers a group")
        target = requireNode(request, "node2")
        member = self._requireMember(state, target, ErrorCode.ERR_PARAMS)
        if target == session.uid:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "already the founder")
        yield self.directory.update(state, founder=target)
        yield self.directory.putMember(state, Member(target, ROLE_FOUNDER, member.joined, member.mutedUntil))
        old = state.members[session.uid]
        yield self.directory.putMember(state, Member(session.uid, ROLE_MANAGER, old.joined, old.mutedUntil))
        if self.config.member_notices:
            notice = self.notice(state, ROOMTRANSFERRED, session.tid, text=target)
            notice.msType = MsType.SOURCE_ROOM
            appended = yield self.conversations.append(groupConversation(state.gid), session.uid, notice, ())
            self.fanout.deliver(state, appended.message)
        self._ack(session, TRANSFERROOM, n=target)

    @inlineCallbacks
    def setCap(self, session: Session, request: TimReq) -> Any:
        """
        rtype 103: the founder sets the member cap (C{reqInt}; 0 for the
        node's default).
        """
        state = yield self._group(request.node)
        if state.group.founder != session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder sets the cap")
        cap = request.reqInt or 0
        if cap < 0 or cap > self.config.max_member_cap or (cap and cap < len(state.members)):
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "cap out of range or below the member count")
        yield self.directory.update(state, memberCap=cap)
        self._ack(session, SETROOMCAP, n=state.gid)

    @inlineCallbacks
    def mute(self, session: Session, request: TimReq) -> Any:
        """
        rtype 104: founder or manager mutes C{node2} for C{reqInt} seconds
        (0 unmutes, -1 until unmuted).
        """
        state = yield self._group(request.node)
        self._requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        self._mayModerate(state, session.uid, target)
        seconds = request.reqInt or 0
        until = 0.0 if seconds == 0 else float("inf") if seconds < 0 else self.now() + seconds
        member = state.members[target]
        yield self.directory.putMember(state, Member(target, member.role, member.joined, until))
        self._ack(session, MUTEMEMBER, n=target)

    @inlineCallbacks
    def muteAll(self, session: Session, request: TimReq) -> Any:
        """
        rtype 105: founder or manager; C{reqInt} 1 lets only them send, 0
        lets everyone.
        """
        state = yield self._group(request.node)
        self._requireStaff(state, session.uid)
        yield self.directory.update(state, mutedAll=bool(request.reqInt))
        self._ack(session, MUTEALL, n=state.gid)

    # Messages.

    def __call__(self, session: Session, message: TimMessage) -> Any:
        """
        Messages with a C{roomTid}: group messages (msType 3) and private
        messages between two members (msType 2 with C{toTid}).
        """
        if message.roomTid is None or not message.roomTid.node:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "roomTid is required")
        if message.msType == MsType.SOURCE_USER:
            return self._private(session, message)
        if message.toTid is not None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "a group message has no toTid")
        od = message.odType
        if od == OdType.ORDER_INOF:
            return self._send(session, message)
        if od == OdType.ORDER_REVOKE:
            return self._recall(session, message)
        if od == OdType.ORDER_STREAM:
            return self._stream(session, message)
        raise TimProtocolError(ErrorCode.ERR_PARAMS, f"odType {od} is not allowed in groups")

    @inlineCallbacks
    def _memberState(self, session: Session, message: TimMessage) -> Any:
        state = yield self._group(message.roomTid.node)  # type: ignore[union-attr]
        member = self._requireMember(state, session.uid)
        if member.role == ROLE_MEMBER and (state.group.mutedAll or member.mutedUntil > self.now()):
            raise TimProtocolError(ErrorCode.ERR_AUTH, "muted")
        return state

    @inlineCallbacks
    def _private(self, session: Session, message: TimMessage) -> Any:
        if message.toTid is None or not message.toTid.node:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "toTid is required")
        state = yield self._memberState(session, message)
        self._requireMember(state, message.toTid.node)
        yield self.messaging.sendPrivate(session, message)

    @inlineCallbacks
    def _send(self, session: Session, message: TimMessage) -> Any:
        state = yield self._memberState(session, message)
        clientId = message.id
        self.messaging.stamp(session, message)
        message.roomTid = Tid(node=state.gid)
        dedupe = None
        if clientId is not None and self.duplicates.enabled:
            seen = yield self.duplicates.check(session.uid, clientId)
            if seen is not None:
                yield self.messaging.answerResend(session, seen)
                return
            dedupe = (session.uid, clientId)
        appending = self.conversations.append(groupConversation(state.gid), session.uid, message, (), dedupe=dedupe)
        if dedupe is not None:
            self.duplicates.remember(session.uid, dedupe[1], appending)
        appending.addCallbacks(
            self._appended,
            self.messaging.notAppended,
            callbackArgs=(state, session.uid),
            errbackArgs=(session, message),
        )

    def _appended(self, appended: Appended, state: GroupState, sender: str) -> Appended:
        message = appended.message
        encoded = Encoded(message)
        self.messaging.echo(sender, encoded)
        # The sender has its own message: move its cursor if it had all
        # before it, so it does not get it back as offline.
        if self.fanout.cursor(sender, state.gid) == (message.seq or 0) - 1:
            self.fanout.advance(sender, state.gid, message.seq or 0)
        self.fanout.deliver(state, message, skip=sender, encoded=encoded)
        return appended

    @inlineCallbacks
    def _stream(self, session: Session, message: TimMessage) -> Any:
        state = yield self._memberState(session, message)
        self.messaging.stamp(session, message)
        self.fanout.sendNow(state, message, skip=session.uid)

    @inlineCallbacks
    def _recall(self, session: Session, message: TimMessage) -> Any:
        """
        The sender recalls its message within the recall window; the founder
        and managers may recall any (extension).  The message becomes a
        tombstone, and a recall notice joins the group's history.
        """
        state = yield self._group(message.roomTid.node)  # type: ignore[union-attr]
        self._requireMember(state, session.uid)
        if not message.mid:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "mid is required")
        conv = groupConversation(state.gid)
        row = yield self.store.getMessage(conv, message.mid)
        if row is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "no such message")
        if row.state != MESSAGE_NORMAL:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "already recalled")
        staff = self.config.manager_recall and state.isManager(session.uid)
        if row.sender != session.uid and not staff:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not your message")
        window = self.messagesConfig.recall_window
        if row.sender == session.uid and not staff and window and self.now() - row.created > window:
            raise TimProtocolError(ErrorCode.ERR_EXPIREOP, f"messages can be recalled for {window:g} seconds")
        original = self.vault.openMessage(conv, row.seq, row.stanza)
        tombstone = TimMessage(
            msType=MsType.SOURCE_ROOM,
            odType=OdType.ORDER_REVOKE,
            id=original.id,
            mid=original.mid,
            seq=original.seq,
            fromTid=original.fromTid,
            roomTid=original.roomTid,
            timestamp=original.timestamp,
        )
        notice = TimMessage(
            msType=MsType.SOURCE_ROOM,
            odType=OdType.ORDER_REVOKE,
            id=message.id if message.id is not None else secrets.randbits(53),
            mid=original.mid,
            seq=original.seq,
            fromTid=session.tid,
            roomTid=Tid(node=state.gid),
            timestamp=int(self.now() * 1e9),
        )
        # Members who have not read the message get the tombstone from the
        # history; the notice goes to every member's inbox, like a 1:1
        # recall notice, so those who did read it learn it is gone.
        others = [uid for uid in state.members if uid != session.uid]
        qids = yield self.store.replaceMessage(
            conv,
            row.seq,
            self.vault.sealMessage(conv, row.seq, tombstone),
            MESSAGE_RECALLED,
            [(uid, self.vault.sealFor(uid, notice)) for uid in others],
            self.now(),
        )
        encoded = Encoded(notice)
        self.messaging.echo(session.uid, encoded)
        for uid, qid in zip(others, qids, strict=True):
            self.delivery.deliver(uid, qid, encoded)

    # History.

    @inlineCallbacks
    def historyConversation(self, session: Session, request: TimReq) -> Any:
        state = yield self._group(request.node, alive=False)
        self._requireMember(state, session.uid)
        return groupConversation(state.gid)

    # Room profiles (TIMNODES 5 and 7).

    def handleNodes(self, session: Session, nodes: TimNodes) -> Any:
        if nodes.ntype == NodeInfo.ROOMINFO:
            return self._readProfiles(session, nodes)
        return self._modifyProfile(session, nodes)

    @inlineCallbacks
    def _readProfiles(self, session: Session, nodes: TimNodes) -> Any:
        wanted = list(dict.fromkeys(nodes.nodelist or ()))
        if not wanted:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "nodelist is required")
        if len(wanted) > 100:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "at most 100 groups at once")
        roommap = {}
        for gid in wanted:
            state = yield self.directory.get(gid)
            if state is not None and state.alive:
                roommap[gid] = self.profileOf(state)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROOMINFO, roommap=roommap))

    def profileOf(self, state: GroupState) -> TimRoomBean:
        group = state.group
        bean = self.vault.openRoom(group.gid, group.profile) if group.profile else TimRoomBean()
        return TimRoomBean(
            founder=group.founder,
            managers=state.managers(),
            cover=bean.cover,
            topic=bean.topic,
            label=bean.label,
            gtype=group.gtype,
            createtime=int(group.created * 1e9),
            extend=bean.extend,
            extra=bean.extra,
        )

    @inlineCallbacks
    def _modifyProfile(self, session: Session, nodes: TimNodes) -> Any:
        """
        The founder or a manager merges cover, topic, label, extend and
        extra; only the founder changes C{managers}, which must be members.
        """
        if not nodes.roommap or len(nodes.roommap) != 1:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "roommap must hold exactly one group")
        ((gid, bean),) = nodes.roommap.items()
        if bean is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "roommap must hold a profile")
        state = yield self._group(gid)
        self._requireStaff(state, session.uid)
        if bean.founder is not None or bean.createtime is not None or bean.gtype is not None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "founder, gtype and createtime cannot be changed here")
        if bean.managers is not None:
            if state.group.founder != session.uid:
                raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder appoints managers")
            unknown = [uid for uid in bean.managers if uid not in state.members or uid == state.group.founder]
            if unknown:
                raise TimProtocolError(ErrorCode.ERR_PARAMS, "managers must be members other than the founder")
        current = self.profileOf(state)
        for name in ("cover", "topic", "label", "extend", "extra"):
            value = getattr(bean, name)
            if value is not None:
                setattr(current, name, value)
        sealed = self.vault.sealRoom(gid, _profileOnly(current))
        if len(sealed) > 65536:
            raise TimProtocolError(ErrorCode.ERR_BIGDATA, "group profile too large")
        yield self.directory.update(state, profile=sealed)
        if bean.managers is not None:
            wanted = set(bean.managers)
            for uid, member in list(state.members.items()):
                role = ROLE_FOUNDER if member.role == ROLE_FOUNDER else ROLE_MANAGER if uid in wanted else ROLE_MEMBER
                if role != member.role:
                    yield self.directory.putMember(state, Member(uid, role, member.joined, member.mutedUntil))
        session.sendAck(TimType.TIMNODES, t=NodeInfo.MODIFYROOM)


def _profileOnly(bean: TimRoomBean) -> TimRoomBean:
    """
    The part of a room profile kept sealed; founder, managers, gtype and
    createtime come from the group's records.
    """
    return TimRoomBean(cover=bean.cover, topic=bean.topic, label=bean.label, extend=bean.extend, extra=bean.extra)
