# -*- test-case-name: timtx.test.test_groups -*-
"""
Group profiles: TIMNODES ntype 5 (read) and 7 (modify).

A profile's founder, managers, type and creation time come from the
group's records; cover, topic, label, kind, extend and extra are kept
sealed.  Each session reads and writes them in its own tim generation's
layout (the session's encoding does that, see
L{timtx.protocols.generations}): a tim 2.1 client's C{kind} is stored like
any other field, and read back by every session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from timtx.chat.groups.core import Groups
from timtx.chat.groups.directory import GroupState
from timtx.persistence.records import ROLE_FOUNDER, ROLE_MANAGER, ROLE_MEMBER, Member
from timtx.protocols.constants import ErrorCode, NodeInfo, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimNodes, TimRoomBean

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session

#: Most groups one TIMNODES 5 may ask about.
MAX_PROFILES = 100

#: The fields of a profile its founder and managers set.
_MERGED = ("cover", "topic", "label", "kind", "extend", "extra")


class GroupProfiles:
    def __init__(self, groups: Groups):
        self.groups = groups

    def handleNodes(self, session: Session, nodes: TimNodes) -> Any:
        if nodes.ntype == NodeInfo.ROOMINFO:
            return self._readProfiles(session, nodes)
        return self._modifyProfile(session, nodes)

    @inlineCallbacks
    def _readProfiles(self, session: Session, nodes: TimNodes) -> Any:
        wanted = list(dict.fromkeys(nodes.nodelist or ()))
        if not wanted:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "nodelist is required")
        if len(wanted) > MAX_PROFILES:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"at most {MAX_PROFILES} groups at once")
        roommap = {}
        for gid in wanted:
            state = yield self.groups.directory.get(gid)
            if state is not None and state.alive:
                roommap[gid] = self.profileOf(state)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROOMINFO, roommap=roommap))

    def profileOf(self, state: GroupState) -> TimRoomBean:
        group = state.group
        bean = self.groups.vault.openRoom(group.gid, group.profile) if group.profile else TimRoomBean()
        return TimRoomBean(
            founder=group.founder,
            managers=state.managers(),
            cover=bean.cover,
            topic=bean.topic,
            label=bean.label,
            gtype=group.gtype,
            createtime=int(group.created * 1e9),
            kind=bean.kind,
            extend=bean.extend,
            extra=bean.extra,
        )

    @inlineCallbacks
    def _modifyProfile(self, session: Session, nodes: TimNodes) -> Any:
        """
        The founder or a manager merges cover, topic, label, kind, extend
        and extra; only the founder changes C{managers}, which must be
        members.
        """
        if not nodes.roommap or len(nodes.roommap) != 1:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "roommap must hold exactly one group")
        ((gid, bean),) = nodes.roommap.items()
        if bean is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "roommap must hold a profile")
        state = yield self.groups.group(gid)
        self.groups.requireStaff(state, session.uid)
        if bean.founder is not None or bean.createtime is not None or bean.gtype is not None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "founder, gtype and createtime cannot be changed here")
        if bean.managers is not None:
            if state.group.founder != session.uid:
                raise TimProtocolError(ErrorCode.ERR_AUTH, "only the founder appoints managers")
            unknown = [uid for uid in bean.managers if uid not in state.members or uid == state.group.founder]
            if unknown:
                raise TimProtocolError(ErrorCode.ERR_PARAMS, "managers must be members other than the founder")
        current = self.profileOf(state)
        for name in _MERGED:
            value = getattr(bean, name)
            if value is not None:
                setattr(current, name, value)
        sealed = self.groups.vault.sealRoom(gid, _profileOnly(current))
        if len(sealed) > 65536:
            raise TimProtocolError(ErrorCode.ERR_BIGDATA, "group profile too large")
        yield self.groups.directory.update(state, profile=sealed)
        if bean.managers is not None:
            wanted = set(bean.managers)
            for uid, member in list(state.members.items()):
                role = ROLE_FOUNDER if member.role == ROLE_FOUNDER else ROLE_MANAGER if uid in wanted else ROLE_MEMBER
                if role != member.role:
                    yield self.groups.directory.putMember(state, Member(uid, role, member.joined, member.mutedUntil))
        session.sendAck(TimType.TIMNODES, t=NodeInfo.MODIFYROOM)


def _profileOnly(bean: TimRoomBean) -> TimRoomBean:
    """
    The part of a room profile kept sealed; founder, managers, gtype and
    createtime come from the group's records.
    """
    return TimRoomBean(**{name: getattr(bean, name) for name in _MERGED})
