# -*- test-case-name: timtx.test.test_groups -*-
"""
Group membership: creating, joining (directly or by approval), pulling in,
kicking, leaving, dissolving and handing a group over, and the lists of
groups and members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from timtx.chat.accounts import AccountService
from timtx.chat.business import BusinessRouter, requireNode
from timtx.chat.groups.core import ROOMTRANSFERRED, TRANSFERROOM, Groups
from timtx.crypto.ids import new_random_id
from timtx.persistence.records import GROUP_ALIVE, GROUP_CANCELLED, ROLE_FOUNDER, ROLE_MANAGER, Group, Member
from timtx.protocols.constants import Business, ErrorCode, GroupType, NodeInfo, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimNodes, TimReq, TimRoomBean

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session


class GroupMembership:
    def __init__(self, groups: Groups, *, accounts: AccountService):
        self.groups = groups
        self.accounts = accounts

    def register(self, business: BusinessRouter) -> None:
        for rtype, handler in [
            (Business.USERROOM, self.myGroups),
            (Business.ROOMUSERS, self.members),
            (Business.NEWROOM, self.create),
            (Business.ADDROOM, self.join),
            (Business.NOPASSROOM, self.reject),
            (Business.PULLROOM, self.pullIn),
            (Business.KICKROOM, self.kick),
            (Business.LEAVEROOM, self.leave),
            (Business.CANCELROOM, self.dissolve),
            (TRANSFERROOM, self.transfer),
        ]:
            business.register(rtype, handler)

    # Lists.

    @inlineCallbacks
    def myGroups(self, session: Session, request: TimReq) -> Any:
        gids = yield self.groups.directory.groupsOf(session.uid)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROOM, nodelist=sorted(gids)))

    @inlineCallbacks
    def members(self, session: Session, request: TimReq) -> Any:
        groups = self.groups
        state = yield groups.group(request.node)
        groups.requireMember(state, session.uid, ErrorCode.ERR_PARAMS)  # tim answers 4104 here
        session.send(
            TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROOMMEMBER, nodelist=sorted(state.members), node=state.gid)
        )

    # Creating, joining, leaving.

    @inlineCallbacks
    def create(self, session: Session, request: TimReq) -> Any:
        """
        rtype 8: C{node} is the topic; C{reqInt} 1 makes the group private,
        anything else open.
        """
        groups = self.groups
        if request.node is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "TimReq.node (the topic) is required")
        founded = yield groups.store.countFounded(session.uid)
        if founded >= groups.config.max_created_per_user:
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "too many groups founded")
        gtype = GroupType.PRIVATE if request.reqInt == GroupType.PRIVATE else GroupType.OPEN
        gid = new_random_id()
        profile = groups.vault.sealRoom(gid, TimRoomBean(topic=request.node))
        group = Group(gid, session.domain, session.uid, gtype, GROUP_ALIVE, groups.now(), profile)
        yield groups.directory.create(group, Member(session.uid, ROLE_FOUNDER, groups.now()))
        groups.ack(session, Business.NEWROOM, n=gid)

    @inlineCallbacks
    def join(self, session: Session, request: TimReq) -> Any:
        """
        rtype 9: an open group is joined at once (acked); a private one gets
        a request that its founder and managers are told about (bnType 9).
        As in tim 2.0 the requester then hears nothing until the request is
        decided (bnType 10 or 11): tim clients read any ok ack to rtype 9 as
        "joined".  C{[groups] join_request_ack} sends an ack with C{n2}
        "pending" instead (extension).
        """
        groups = self.groups
        state = yield groups.group(request.node)
        uid = session.uid
        if state.blockedByGroup(uid) or state.blocksGroup(uid):
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        if uid in state.members:
            raise TimProtocolError(ErrorCode.ERR_HASEXIST, "already a member")
        if state.group.gtype == GroupType.OPEN:
            yield groups.admit(state, uid)
            groups.ack(session, Business.ADDROOM, n=state.gid)
            return
        if len(state.members) >= groups.capOf(state):
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "the group is full")
        yield groups.store.addJoinRequest(state.gid, uid, groups.now())
        for staff in state.staff():
            yield groups.notify(staff, groups.notice(state, Business.ADDROOM, session.tid, staff, request.reqStr))
        if groups.config.join_request_ack:
            groups.ack(session, Business.ADDROOM, n=state.gid, n2="pending")

    @inlineCallbacks
    def pullIn(self, session: Session, request: TimReq) -> Any:
        """
        rtype 12: approve a request or pull a user in.  In a private group
        only the founder and managers may; in an open group, any member
        (tim let anyone, members or not).
        """
        groups = self.groups
        state = yield groups.group(request.node)
        target = requireNode(request, "node2")
        if state.group.gtype == GroupType.PRIVATE:
            groups.requireStaff(state, session.uid)
        else:
            groups.requireMember(state, session.uid)
        if target == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not yourself")
        if target in state.members:
            raise TimProtocolError(ErrorCode.ERR_HASEXIST, "already a member")
        if not (yield self.accounts.exists(target)):
            raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")
        if state.blocksGroup(target) or state.blockedByGroup(target):
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        requested = yield groups.store.takeJoinRequest(state.gid, target)
        yield groups.admit(state, target)
        bnType = Business.PASSROOM if requested else Business.PULLROOM
        yield groups.notify(target, groups.notice(state, bnType, session.tid, target))
        # The group in n: tim's web client asks for the group's members and
        # profile with it (tim 2.0 put the user there, and the client then
        # got 4109).  The user is in n2.
        groups.ack(session, Business.PULLROOM, n=state.gid, n2=target)

    @inlineCallbacks
    def reject(self, session: Session, request: TimReq) -> Any:
        """
        rtype 11: refuse a pending request (4103 if there is none).
        """
        groups = self.groups
        state = yield groups.group(request.node)
        groups.requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        if not (yield groups.store.takeJoinRequest(state.gid, target)):
            raise TimProtocolError(ErrorCode.ERR_EXPIREOP, "no pending request")
        yield groups.notify(target, groups.notice(state, Business.NOPASSROOM, session.tid, target))
        groups.ack(session, Business.NOPASSROOM, n=target)

    @inlineCallbacks
    def kick(self, session: Session, request: TimReq) -> Any:
        """
        rtype 13: founder or manager; only the founder kicks managers.  The
        user's own block of the group, if any, stays (tim lost it).
        """
        groups = self.groups
        state = yield groups.group(request.node)
        groups.requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        groups.mayModerate(state, session.uid, target)
        yield groups.drop(state, target)
        yield groups.notify(target, groups.notice(state, Business.KICKROOM, session.tid, target))
        # As tim 2.0: the group in n (its web client refreshes the member
        # list with it); the user in n2.
        groups.ack(session, Business.KICKROOM, n=state.gid, n2=target)

    @inlineCallbacks
    def leave(self, session: Session, request: TimReq) -> Any:
        """
        rtype 16: any member but the founder, who transfers or dissolves.
        """
        groups = self.groups
        state = yield groups.group(request.node)
        groups.requireMember(state, session.uid)
        if state.group.founder == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "the founder transfers the group or dissolves it")
        yield groups.drop(state, session.uid)
        groups.ack(session, Business.LEAVEROOM, n=state.gid)

    @inlineCallbacks
    def dissolve(self, session: Session, request: TimReq) -> Any:
        """
        rtype 17: the founder dissolves the group; remaining members are
        told (bnType 17) through their inboxes.
        """
        groups = self.groups
        state = yield groups.group(request.node)
        if state.group.founder != session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder dissolves a group")
        others = [uid for uid in state.members if uid != session.uid]
        yield groups.directory.update(state, status=GROUP_CANCELLED)
        for uid in list(state.members):
            yield groups.directory.removeMember(state, uid)
        for uid in others:
            yield groups.notify(uid, groups.notice(state, Business.CANCELROOM, session.tid, uid))
        groups.ack(session, Business.CANCELROOM, n=state.gid)

    @inlineCallbacks
    def transfer(self, session: Session, request: TimReq) -> Any:
        """
        rtype 102 (extension): the founder hands the group to a member and
        stays as a manager.  Members are told (bnType 112).
        """
        groups = self.groups
        state = yield groups.group(request.node)
        if state.group.founder != session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder transfers a group")
        target = requireNode(request, "node2")
        member = groups.requireMember(state, target, ErrorCode.ERR_PARAMS)
        if target == session.uid:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "already the founder")
        directory = groups.directory
        yield directory.update(state, founder=target)
        yield directory.putMember(state, Member(target, ROLE_FOUNDER, member.joined, member.mutedUntil))
        old = state.members[session.uid]
        yield directory.putMember(state, Member(session.uid, ROLE_MANAGER, old.joined, old.mutedUntil))
        if groups.config.member_notices:
            yield groups.post(state, session.uid, groups.notice(state, ROOMTRANSFERRED, session.tid, text=target))
        groups.ack(session, TRANSFERROOM, n=target)
