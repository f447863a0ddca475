# -*- test-case-name: timtx.test.test_presence -*-
"""
Presence: TIMPRESENCE to users, TIMBROADPRESENCE to the roster, automatic
offline presence, and invisible mode.

Presence is never stored: it goes to the target's online sessions or
nowhere.  The server sets C{id}, C{fromTid} and C{offline}; a client that
sets C{offline} gets 4104.  Unless C{[presence] open}, presence goes only to
friends.

Invisible mode (timtx extension, C{TimPresence.invisible}, field 101):
sending C{invisible: true} makes the user appear offline to its friends and
keeps it so: the node drops the user's presence frames and sends no offline
presence when its last session ends, until it sends C{invisible: false}.
The flag is stored, so it outlives sessions and restarts.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from timtx.chat.roster import RelationCache, areFriends
from timtx.delivery.encoded import Encoded
from timtx.interfaces import IRouter
from timtx.persistence.interfaces import IMessageStore
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Tid, TimPresence
from timtx.util.cache import LoadingCache

if TYPE_CHECKING:
    from timtx.chat.accounts import AccountService
    from timtx.config import PresenceConfig
    from timtx.delivery.sessions import Session


class PresenceService:
    log = Logger()

    def __init__(
        self,
        config: PresenceConfig,
        *,
        store: IMessageStore,
        relations: RelationCache,
        accounts: AccountService,
        router: IRouter,
    ):
        self.config = config
        self.store = store
        self.relations = relations
        self.accounts = accounts
        self.router = router
        self._invisible: LoadingCache[str, bool] = LoadingCache(store.getInvisible, 100_000)
        #: Called with C{(uid, invisible)} when a user turns invisible or
        #: visible here (the cluster mirrors it in the other nodes' caches).
        self.onInvisible: list[Callable[[str, bool], object]] = []

    def isInvisible(self, uid: str) -> Any:
        return self._invisible.get(uid)

    def applyInvisible(self, uid: str, invisible: bool) -> None:
        """
        Note C{uid}'s invisible flag, stored here or by another node.
        """
        self._invisible.put(uid, invisible)

    def forgetCached(self) -> None:
        """
        Drop every cached invisible flag (they are read again when needed):
        this node may have missed changes made elsewhere.
        """
        self._invisible.clear()

    def _outgoing(self, session: Session, presence: TimPresence) -> TimPresence:
        if presence.offline:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "offline is set by the server; use invisible mode")
        return TimPresence(
            id=secrets.randbits(53),
            fromTid=session.tid,
            subStatus=presence.subStatus,
            show=presence.show,
            status=presence.status,
            extend=presence.extend,
            extra=presence.extra,
        )

    def _targets(self, presence: TimPresence) -> list[str]:
        targets = []
        if presence.toTid is not None and presence.toTid.node:
            targets.append(presence.toTid.node)
        targets.extend(presence.toList or ())
        if len(targets) > self.config.max_targets:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"at most {self.config.max_targets} targets")
        return list(dict.fromkeys(t for t in targets if t))

    @inlineCallbacks
    def _visibility(self, session: Session, presence: TimPresence) -> Any:
        """
        Apply an C{invisible} flag; return whether the presence may go out.
        """
        if presence.invisible is not None:
            was = yield self.isInvisible(session.uid)
            if presence.invisible != was:
                yield self.store.setInvisible(session.uid, presence.invisible)
                self.applyInvisible(session.uid, presence.invisible)
                for observer in self.onInvisible:
                    observer(session.uid, presence.invisible)
                if presence.invisible:
                    yield self.announceOffline(session.uid, session.domain, force=True)
            return not presence.invisible
        invisible = yield self.isInvisible(session.uid)
        return not invisible

    @inlineCallbacks
    def handlePresence(self, session: Session, presence: TimPresence) -> Any:
        """
        TIMPRESENCE: to C{toTid} and C{toList}.
        """
        outgoing = self._outgoing(session, presence)
        targets = self._targets(presence)
        if not targets and presence.invisible is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "toTid or toList is required")
        yield self._checkTargets(session, targets)
        if (yield self._visibility(session, presence)):
            self._send(outgoing, targets)

    @inlineCallbacks
    def handleBroadcast(self, session: Session, presence: TimPresence) -> Any:
        """
        TIMBROADPRESENCE: to the given targets, or to every friend.
        """
        outgoing = self._outgoing(session, presence)
        targets = self._targets(presence)
        if targets:
            yield self._checkTargets(session, targets)
        else:
            targets = yield self.relations.friends(session.uid)
        if (yield self._visibility(session, presence)):
            self._send(outgoing, targets)

    @inlineCallbacks
    def _checkTargets(self, session: Session, targets: list[str]) -> Any:
        known = yield self.relations.of(session.uid)
        for target in targets:
            relation = known.get(target)
            if relation is not None and areFriends(relation):
                continue
            if not self.config.open:
                raise TimProtocolError(ErrorCode.ERR_AUTH, "presence goes to friends only")
            if relation is not None and 2 in (relation.mine, relation.theirs):
                raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
            if not (yield self.accounts.exists(target)):
                raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")

    def _send(self, presence: TimPresence, targets: list[str]) -> None:
        for target in targets:
            presence.toTid = Tid(node=target)
            self.router.send(target, TimType.TIMPRESENCE, Encoded(presence))

    @inlineCallbacks
    def announceOffline(self, uid: str, domain: str, force: bool = False) -> Any:
        """
        Tell C{uid}'s friends it went offline: when its last session ended,
        or (C{force}) when it turned invisible.
        """
        if not force:
            if self.config.offline_block or (yield self.isInvisible(uid)):
                return
        friends = yield self.relations.friends(uid)
        presence = TimPresence(id=secrets.randbits(53), offline=True, fromTid=Tid(node=uid, domain=domain or None))
        self._send(presence, friends)
