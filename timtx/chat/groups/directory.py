# -*- test-case-name: timtx.test.test_groups -*-
"""
Groups in memory: who is in a group, in what role, and who is blocked.

tim reads a group's member list from the database for every message.  Here a
group's state is read once, kept while in use (at most C{maxGroups} groups),
and changed in memory and in the store together, so fan-out and permission
checks never wait on the store.

In a cluster other nodes cache the same groups: L{GroupDirectory.onChange}
tells who listens (L{timtx.cluster.groups}) of each change once it is
durable, and L{GroupDirectory.forget} drops what another node changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, gatherResults

from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import (
    BLOCK_BY_GROUP,
    BLOCK_BY_USER,
    GROUP_ALIVE,
    ROLE_FOUNDER,
    ROLE_MANAGER,
    Group,
    Member,
)
from timtx.util.cache import LoadingCache


@dataclass
class GroupState:
    """
    One group as held in memory.

    @ivar blocks: uid -> the set of block flags between the group and the
        user (L{BLOCK_BY_USER}, L{BLOCK_BY_GROUP}).
    """

    group: Group
    members: dict[str, Member]
    blocks: dict[str, set[int]] = field(default_factory=dict)

    @property
    def gid(self) -> str:
        return self.group.gid

    @property
    def alive(self) -> bool:
        return self.group.status == GROUP_ALIVE

    def isManager(self, uid: str) -> bool:
        member = self.members.get(uid)
        return member is not None and member.role in (ROLE_MANAGER, ROLE_FOUNDER)

    def managers(self) -> list[str]:
        return sorted(uid for uid, m in self.members.items() if m.role == ROLE_MANAGER)

    def staff(self) -> list[str]:
        """
        The founder and the managers: who decides on join requests.
        """
        return sorted(uid for uid, m in self.members.items() if m.role in (ROLE_MANAGER, ROLE_FOUNDER))

    def blockedByGroup(self, uid: str) -> bool:
        return BLOCK_BY_GROUP in self.blocks.get(uid, ())

    def blocksGroup(self, uid: str) -> bool:
        return BLOCK_BY_USER in self.blocks.get(uid, ())


class GroupDirectory:
    """
    The groups this node works with, cached, and each user's memberships.
    """

    def __init__(self, store: IMessageStore, maxGroups: int = 10_000, maxUsers: int = 100_000):
        self.store = store
        self._groups: LoadingCache[str, GroupState] = LoadingCache(self._read, maxGroups)
        self._userGroups: LoadingCache[str, set[str]] = LoadingCache(self._readGroupsOf, maxUsers)
        #: Called with C{(gid, uids)} once a change of group C{gid} (and of
        #: the memberships of C{uids}) is in the store; a L{Deferred} it
        #: returns is waited for before the change is done.
        self.onChange: list[Callable[[str, tuple[str, ...]], object]] = []

    # Reading.

    def get(self, gid: str) -> Deferred[GroupState | None]:
        """
        The group's state, or C{None} if there is no such group; at once
        when cached.
        """
        return self._groups.get(gid)  # type: ignore[return-value]

    def _read(self, gid: str) -> Deferred[Any]:
        reads: list[Deferred[Any]] = [
            self.store.getGroup(gid),
            self.store.groupMembers(gid),
            self.store.groupBlocks(gid),
        ]
        d = gatherResults(reads, consumeErrors=True)

        def build(results: list[Any]) -> GroupState | None:
            group, members, blocks = results
            return None if group is None else GroupState(group, {m.uid: m for m in members}, blocks)

        d.addCallback(build)
        return d

    def groupsOf(self, uid: str) -> Deferred[set[str]]:
        """
        The groups C{uid} is a member of; at once when cached.
        """
        return self._userGroups.get(uid)

    def _readGroupsOf(self, uid: str) -> Deferred[Any]:
        d: Deferred[Any] = self.store.groupsOf(uid)
        d.addCallback(set)
        return d

    def forget(self, gid: str, uids: Iterable[str] = ()) -> None:
        """
        Another node changed group C{gid} (and the memberships of C{uids})
        in the store: read them again when next needed.
        """
        self._groups.invalidate(gid)
        for uid in uids:
            self._userGroups.invalidate(uid)

    def forgetCached(self) -> None:
        """
        Drop every cached group and membership list (read again when next
        needed): this node may have missed changes made elsewhere.
        """
        self._groups.clear()
        self._userGroups.clear()

    def _changed(self, d: Deferred[Any], gid: str, *uids: str, state: GroupState | None = None) -> Deferred[Any]:
        """
        Once C{d} (a change of C{state}, written to the store) is done,
        tell L{onChange}.  If C{state} is no longer the cached state of
        C{gid} (another node's change dropped it while this one was under
        way), the cached one may have been read before this change was
        stored, and would miss it for good: it is read again.
        """

        def tell(result: Any) -> Any:
            if state is not None and self._groups.peek(gid) is not state:
                self._groups.invalidate(gid)
            waits = [w for w in (listener(gid, uids) for listener in self.onChange) if isinstance(w, Deferred)]
            if not waits:
                return result
            return gatherResults(waits, consumeErrors=True).addCallback(lambda _: result)

        return d.addCallback(tell)

    # Changing: memory and store together.

    def create(self, group: Group, founder: Member) -> Deferred[GroupState]:
        d = self.store.createGroup(group, founder)
        state = GroupState(group, {founder.uid: founder})

        def created(_: object) -> GroupState:
            self._groups.put(group.gid, state)
            self._joined(founder.uid, group.gid)
            return state

        return self._changed(d.addCallback(created), group.gid, founder.uid)

    def update(self, state: GroupState, **changes: Any) -> Deferred[None]:
        state.group = replace(state.group, **changes)
        return self._changed(self.store.updateGroup(state.group), state.gid, state=state)

    def putMember(self, state: GroupState, member: Member) -> Deferred[None]:
        state.members[member.uid] = member
        self._joined(member.uid, state.gid)
        return self._changed(self.store.putMember(state.gid, member), state.gid, member.uid, state=state)

    def removeMember(self, state: GroupState, uid: str) -> Deferred[int]:
        state.members.pop(uid, None)
        known = self._userGroups.peek(uid)
        if known is not None:
            known.discard(state.gid)
        return self._changed(self.store.removeMembers(state.gid, [uid]), state.gid, uid, state=state)

    def setBlock(self, state: GroupState, uid: str, by: int, blocked: bool) -> Deferred[None]:
        flags = state.blocks.setdefault(uid, set())
        if blocked:
            flags.add(by)
        else:
            flags.discard(by)
        if not flags:
            del state.blocks[uid]
        return self._changed(self.store.setGroupBlock(state.gid, uid, by, blocked), state.gid, uid, state=state)

    def _joined(self, uid: str, gid: str) -> None:
        known = self._userGroups.peek(uid)
        if known is not None:
            known.add(gid)
