"""
Tests for L{timtx.chat.groups.directory}: the cached group state and the
changes made through it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from timtx.chat.groups.directory import GroupDirectory
from timtx.persistence.memory import MemoryStore
from timtx.persistence.records import GROUP_ALIVE, ROLE_FOUNDER, ROLE_MEMBER, Group, Member


class _HeldWrites(MemoryStore):
    """
    A store whose member writes are stored only when the test says so: a
    write under way, which reads do not see yet.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Callable[[], None]] = []
        self.groupReads = 0

    def getGroup(self, gid: str) -> Deferred[Group | None]:
        self.groupReads += 1
        return super().getGroup(gid)

    def putMember(self, gid: str, member: Member) -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def store() -> None:
            super(_HeldWrites, self).putMember(gid, member)
            d.callback(None)

        self.held.append(store)
        return d


def _members(directory: GroupDirectory, gid: str) -> set[str]:
    found: list[Any] = []
    directory.get(gid).addCallback(found.append)
    return set(found[0].members)


class ConcurrentChangesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = _HeldWrites()
        self.store.createGroup(Group("g1", "", "founder", 2, GROUP_ALIVE, 1.0), Member("founder", ROLE_FOUNDER, 1.0))
        self.directory = GroupDirectory(self.store)

    def join(self, uid: str) -> Deferred[Any]:
        """
        C{uid} joins as a node does it: the state it reads, then the change.
        """
        found: list[Any] = []
        self.directory.get("g1").addCallback(found.append)
        return self.directory.putMember(found[0], Member(uid, ROLE_MEMBER, 2.0))

    def test_joinOverTakenByAnotherNodesChange(self) -> None:
        """
        A join under way when another node's change drops the cached state,
        and the state read again before the join is stored: once it is
        stored, the members read here include the new member (before, the
        state read in between was kept, without it, for good).
        """
        self.join("alice")
        self.directory.forget("g1", ["bob"])
        self.assertEqual(_members(self.directory, "g1"), {"founder"})
        self.store.held.pop()()
        self.assertEqual(_members(self.directory, "g1"), {"founder", "alice"})

    def test_joinKeepsTheCachedState(self) -> None:
        """
        A join into the state still cached changes it in place: nothing is
        read again.
        """
        self.assertEqual(_members(self.directory, "g1"), {"founder"})
        self.join("alice")
        self.store.held.pop()()
        self.assertEqual(_members(self.directory, "g1"), {"founder", "alice"})
        self.assertEqual(self.store.groupReads, 1)
