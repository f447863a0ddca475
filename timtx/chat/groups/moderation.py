# -*- test-case-name: timtx.test.test_groups -*-
"""
Group moderation: blocks both ways, muting a member or everyone, and the
member cap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from timtx.chat.business import BusinessRouter, requireNode
from timtx.chat.groups.core import MUTEALL, MUTEMEMBER, SETROOMCAP, Groups
from timtx.persistence.records import BLOCK_BY_GROUP, BLOCK_BY_USER, Member
from timtx.protocols.constants import Business, ErrorCode, NodeInfo, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimNodes, TimReq

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session


class GroupModeration:
    def __init__(self, groups: Groups):
        self.groups = groups

    def register(self, business: BusinessRouter) -> None:
        for rtype, handler in [
            (Business.BLOCKROOM, self.blockGroup),
            (Business.BLOCKROOMMEMBER, self.blockMember),
            (Business.BLOCKROOMLIST, self.blockedGroups),
            (Business.BLOCKROOMMEMBERLIST, self.blockedMembers),
            (SETROOMCAP, self.setCap),
            (MUTEMEMBER, self.mute),
            (MUTEALL, self.muteAll),
        ]:
            business.register(rtype, handler)

    @inlineCallbacks
    def blockedGroups(self, session: Session, request: TimReq) -> Any:
        gids = yield self.groups.store.userGroupBlocks(session.uid)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.BLOCKROOMLIST, nodelist=sorted(gids)))

    @inlineCallbacks
    def blockedMembers(self, session: Session, request: TimReq) -> Any:
        state = yield self.groups.group(request.node)
        self.groups.requireStaff(state, session.uid)
        blocked = sorted(uid for uid, flags in state.blocks.items() if BLOCK_BY_GROUP in flags)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.BLOCKROOMMEMBERLIST, nodelist=blocked, node=state.gid))

    @inlineCallbacks
    def blockGroup(self, session: Session, request: TimReq) -> Any:
        """
        rtype 14: the user leaves and can no longer be pulled in.
        """
        groups = self.groups
        state = yield groups.group(request.node, alive=False)
        if state.group.founder == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "the founder cannot block its own group")
        if session.uid in state.members:
            yield groups.drop(state, session.uid)
        yield groups.directory.setBlock(state, session.uid, BLOCK_BY_USER, True)
        groups.ack(session, Business.BLOCKROOM, n=state.gid)

    @inlineCallbacks
    def blockMember(self, session: Session, request: TimReq) -> Any:
        """
        rtype 15: founder or manager; the user leaves and cannot return.
        """
        groups = self.groups
        state = yield groups.group(request.node)
        groups.requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        if target in state.members:
            groups.mayModerate(state, session.uid, target)
            yield groups.drop(state, target)
        elif target == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not yourself")
        yield groups.directory.setBlock(state, target, BLOCK_BY_GROUP, True)
        groups.ack(session, Business.BLOCKROOMMEMBER, n=state.gid, n2=target)

    @inlineCallbacks
    def setCap(self, session: Session, request: TimReq) -> Any:
        """
        rtype 103 (extension): the founder sets the member cap (C{reqInt}; 0
        for the node's default).
        """
        groups = self.groups
        state = yield groups.group(request.node)
        if state.group.founder != session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder sets the cap")
        cap = request.reqInt or 0
        if cap < 0 or cap > groups.config.max_member_cap or (cap and cap < len(state.members)):
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "cap out of range or below the member count")
        yield groups.directory.update(state, memberCap=cap)
        groups.ack(session, SETROOMCAP, n=state.gid)

    @inlineCallbacks
    def mute(self, session: Session, request: TimReq) -> Any:
        """
        rtype 104 (extension): founder or manager mutes C{node2} for
        C{reqInt} seconds (0 unmutes, -1 until unmuted).
        """
        groups = self.groups
        state = yield groups.group(request.node)
        groups.requireStaff(state, session.uid)
        target = requireNode(request, "node2")
        groups.mayModerate(state, session.uid, target)
        seconds = request.reqInt or 0
        until = 0.0 if seconds == 0 else float("inf") if seconds < 0 else groups.now() + seconds
        member = state.members[target]
        yield groups.directory.putMember(state, Member(target, member.role, member.joined, until))
        groups.ack(session, MUTEMEMBER, n=target)

    @inlineCallbacks
    def muteAll(self, session: Session, request: TimReq) -> Any:
        """
        rtype 105 (extension): founder or manager; C{reqInt} 1 lets only
        them send, 0 lets everyone.
        """
        groups = self.groups
        state = yield groups.group(request.node)
        groups.requireStaff(state, session.uid)
        yield groups.directory.update(state, mutedAll=bool(request.reqInt))
        groups.ack(session, MUTEALL, n=state.gid)
