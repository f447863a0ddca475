# -*- test-case-name: timtx.test.test_sessions -*-
"""
Every session on this node, by user, and the device limits.

The L{SessionRegistry} knows every session of every user on this node and
decides, at login, whether a new session fits within C{[devices]}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence, TypeVar

from twisted.logger import Logger

from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError

if TYPE_CHECKING:
    from timtx.config import DevicesConfig
    from timtx.delivery.sessions import Session


class _HasTermtyp(Protocol):
    @property
    def termtyp(self) -> int: ...


S = TypeVar("S", bound=_HasTermtyp)


def overflow(devices: DevicesConfig, existing: Sequence[S], termtyp: int) -> list[S]:
    """
    The oldest of C{existing} (oldest first) that must go for one more
    session of C{termtyp} to fit within C{devices}; the cluster's user
    directory decides with it too, over a user's sessions on every node.
    """
    victims: list[S] = []
    typeLimit = devices.type_limit
    if typeLimit:
        sameType = [s for s in existing if s.termtyp == termtyp]
        excess = len(sameType) - typeLimit + 1
        if excess > 0:
            victims.extend(sameType[:excess])
    limit = devices.limit
    if limit:
        remaining = [s for s in existing if s not in victims]
        excess = len(remaining) - limit + 1
        if excess > 0:
            victims.extend(remaining[:excess])
    return victims


class SessionRegistry:
    """
    Every authenticated session on this node, by user.

    Limits are checked and enforced in L{admit}, synchronously on the
    reactor thread, so two logins racing for the last slot cannot both get
    it.  Counts are exact: C{limit = 2} allows two sessions (tim 2.0 allows
    one more than C{devicetype.limit}).

    @ivar onFirstSession: called with a user's first session when it arrives.
    @ivar onLastSession: called with a user's last session when it leaves.
    @ivar onSessionRemoved: called with every session that leaves.
    """

    log = Logger()

    def __init__(self, devices: DevicesConfig):
        self.devices = devices
        self._byUser: dict[str, list[Session]] = {}
        self._count = 0
        self.onFirstSession: list[Callable[[Session], object]] = []
        self.onLastSession: list[Callable[[Session], object]] = []
        self.onSessionRemoved: list[Callable[[Session], object]] = []

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Session]:
        for sessions in list(self._byUser.values()):
            yield from sessions

    def users(self) -> list[str]:
        return list(self._byUser)

    def sessionsOf(self, uid: str) -> list[Session]:
        """
        The sessions of C{uid}, oldest first.  The list is a copy.
        """
        return list(self._byUser.get(uid, ()))

    def sessionsView(self, uid: str) -> Sequence[Session]:
        """
        The sessions of C{uid} without copying, for fan-out loops; do not
        keep it, and do not add or remove sessions while iterating it.
        """
        return self._byUser.get(uid, ())

    def isOnline(self, uid: str) -> bool:
        return uid in self._byUser

    def admit(self, session: Session) -> list[Session]:
        """
        Add C{session} if the device limits allow it, applying the overflow
        policy.

        @return: the sessions kicked to make room (already told and closing).
        @raise TimProtocolError: C{ERR_OVERENTRY} if the policy is C{reject}
            and a limit is reached.
        """
        existing = self._byUser.get(session.uid, [])
        victims = self._overflow(existing, session.termtyp)
        if victims and self.devices.overflow == "reject":
            raise TimProtocolError(ErrorCode.ERR_OVERENTRY, "too many sessions for this account")
        for victim in victims:
            self.log.info("kicking {victim} to admit a new session", victim=victim)
            self.remove(victim)
            victim.kick()
        self._add(session)
        return victims

    def _overflow(self, existing: list[Session], termtyp: int) -> list[Session]:
        return overflow(self.devices, existing, termtyp)

    def _add(self, session: Session) -> None:
        sessions = self._byUser.setdefault(session.uid, [])
        sessions.append(session)
        self._count += 1
        if len(sessions) == 1:
            self._notify(self.onFirstSession, session)

    def remove(self, session: Session) -> None:
        """
        Forget C{session}; unknown sessions are ignored.
        """
        sessions = self._byUser.get(session.uid)
        if not sessions or session not in sessions:
            return
        sessions.remove(session)
        self._count -= 1
        self._notify(self.onSessionRemoved, session)
        if not sessions:
            del self._byUser[session.uid]
            self._notify(self.onLastSession, session)

    def _notify(self, observers: list[Callable[[Session], object]], session: Session) -> None:
        for observer in observers:
            try:
                observer(session)
            except Exception:
                self.log.failure("session observer failed for {session}", session=session)
