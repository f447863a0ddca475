# -*- test-case-name: timtx.test.test_roster -*-
"""
Friends and blocks (TIMBUSINESS 1, 4, 6, 7, 18 and timtx's 101).  Removing
a user (6) also unblocks it, as in tim 2.0 (C{[roster] unblock_on_remove}).

Each user has a stance toward another: none, friend (wants or accepts
friendship) or block.  Two users are friends when both stances are
"friend": tim's mutual add, where accepting a request is adding back.

Relations are read through a cache, so that the checks every message and
presence needs cost no store round trip; changes update the cache and the
store together.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from timtx.chat.business import UNBLOCKROSTER, BusinessRouter, requireNode
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import STANCE_BLOCK, STANCE_FRIEND, STANCE_NONE, Relation
from timtx.protocols.constants import Business, ErrorCode, MsType, NodeInfo, OdType, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Tid, TimMessage, TimNodes, TimReq
from timtx.util.cache import LoadingCache

if TYPE_CHECKING:
    from timtx.chat.accounts import AccountService
    from timtx.config import RosterConfig
    from timtx.delivery.notices import Notices
    from timtx.delivery.sessions import Session


def areFriends(relation: Relation) -> bool:
    return relation.mine == STANCE_FRIEND and relation.theirs == STANCE_FRIEND


def blocked(relation: Relation) -> bool:
    """
    Whether either side blocks the other.
    """
    return STANCE_BLOCK in (relation.mine, relation.theirs)


class RelationCache:
    """
    Each cached user's relations, by the other user.  At most C{maxUsers}
    users are kept; the least recently used go first.
    """

    def __init__(self, store: IMessageStore, maxUsers: int = 100_000):
        self.store = store
        self._users: LoadingCache[str, dict[str, Relation]] = LoadingCache(self._read, maxUsers)
        #: Called with C{(owner, other, stance)} after each L{setStance}
        #: (the cluster mirrors it in the other nodes' caches).
        self.onChange: list[Callable[[str, str, int], object]] = []

    def _read(self, uid: str) -> Deferred[dict[str, Relation]]:
        d: Deferred[Any] = self.store.relationsOf(uid)
        d.addCallback(lambda relations: {r.other: r for r in relations})
        return d

    def of(self, uid: str) -> Deferred[dict[str, Relation]]:
        """
        C{uid}'s relations; at once when cached.
        """
        return self._users.get(uid)

    def peek(self, uid: str) -> dict[str, Relation] | None:
        """
        C{uid}'s relations if cached, else C{None}.
        """
        return self._users.peek(uid)

    def between(self, uid: str, other: str) -> Deferred[Any]:
        d: Deferred[Any] = self.of(uid)
        d.addCallback(lambda known: known.get(other) or Relation(other, STANCE_NONE, STANCE_NONE))
        return d

    def friends(self, uid: str) -> Deferred[Any]:
        d: Deferred[Any] = self.of(uid)
        d.addCallback(lambda known: [other for other, r in known.items() if areFriends(r)])
        return d

    def setStance(self, owner: str, other: str, stance: int) -> Deferred[None]:
        """
        Store C{owner}'s new stance toward C{other} and update both users'
        cached views.
        """
        self.applyStance(owner, other, stance)
        for observer in self.onChange:
            observer(owner, other, stance)
        return self.store.setStance(owner, other, stance)

    def applyStance(self, owner: str, other: str, stance: int) -> None:
        """
        Update the cached views of a stance stored elsewhere (by another
        node of the cluster).
        """
        mine = self._users.peek(owner)
        if mine is not None:
            old = mine.get(other) or Relation(other, STANCE_NONE, STANCE_NONE)
            mine[other] = Relation(other, stance, old.theirs)
        theirs = self._users.peek(other)
        if theirs is not None:
            old = theirs.get(owner) or Relation(owner, STANCE_NONE, STANCE_NONE)
            theirs[owner] = Relation(owner, old.mine, stance)

    def forgetCached(self) -> None:
        """
        Drop every cached user's relations (they are read again when
        needed): this node may have missed changes made elsewhere.
        """
        self._users.clear()


class RosterService:
    def __init__(
        self,
        config: RosterConfig,
        *,
        relations: RelationCache,
        accounts: AccountService,
        notices: Notices,
        clock: IReactorTime,
    ):
        self.config = config
        self.relations = relations
        self.accounts = accounts
        self.notices = notices
        self.clock = clock

    def register(self, business: BusinessRouter) -> None:
        business.register(Business.ROSTER, self.roster)
        business.register(Business.ADDROSTER, self.addRoster)
        business.register(Business.REMOVEROSTER, self.removeRoster)
        business.register(Business.BLOCKROSTER, self.block)
        business.register(Business.BLOCKROSTERLIST, self.blockList)
        business.register(UNBLOCKROSTER, self.unblock)

    def notice(self, bnType: int, sender: Tid, to: str, text: str | None = None) -> TimMessage:
        """
        A business notice as tim sends them: msType 2, odType 4.
        """
        return TimMessage(
            id=secrets.randbits(53),
            msType=MsType.SOURCE_USER,
            odType=OdType.ORDER_BUSINESS,
            bnType=bnType,
            fromTid=sender,
            toTid=Tid(node=to),
            dataString=text,
            timestamp=int(self.clock.seconds() * 1e9),
        )

    @inlineCallbacks
    def _target(self, session: Session, request: TimReq) -> Any:
        other = requireNode(request)
        if other == session.uid:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not with yourself")
        relation = yield self.relations.between(session.uid, other)
        if relation.mine == STANCE_NONE and relation.theirs == STANCE_NONE:
            if not (yield self.accounts.exists(other)):
                raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")
        return other, relation

    def _ack(self, session: Session, rtype: int, other: str) -> None:
        session.sendAck(TimType.TIMBUSINESS, n=other, t=rtype)

    @inlineCallbacks
    def roster(self, session: Session, request: TimReq) -> Any:
        friends = yield self.relations.friends(session.uid)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.ROSTER, nodelist=sorted(friends)))

    @inlineCallbacks
    def blockList(self, session: Session, request: TimReq) -> Any:
        known = yield self.relations.of(session.uid)
        nodes = sorted(other for other, r in known.items() if r.mine == STANCE_BLOCK)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.BLOCKROSTERLIST, nodelist=nodes))

    @inlineCallbacks
    def addRoster(self, session: Session, request: TimReq) -> Any:
        """
        Ask for friendship, or accept it by asking back.  When both sides
        have asked, each gets a bnType 5 (FRIEND) notice; otherwise the other
        gets bnType 4 (ADDROSTER) with the greeting.  Unlike tim, the caller
        always gets an ack.
        """
        other, relation = yield self._target(session, request)
        if relation.theirs == STANCE_BLOCK:
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked by this user")
        if areFriends(relation):
            self._ack(session, Business.ADDROSTER, other)
            return
        yield self.relations.setStance(session.uid, other, STANCE_FRIEND)
        if relation.theirs == STANCE_FRIEND:
            yield self.notices.notify(other, self.notice(Business.FRIEND, session.tid, other, request.reqStr))
            yield self.notices.notify(session.uid, self.notice(Business.FRIEND, session.tid, other, request.reqStr))
        else:
            yield self.notices.notify(other, self.notice(Business.ADDROSTER, session.tid, other, request.reqStr))
        self._ack(session, Business.ADDROSTER, other)

    @inlineCallbacks
    def removeRoster(self, session: Session, request: TimReq) -> Any:
        """
        End a friendship (or withdraw a request) on both sides.  The
        caller's block on C{other} goes too, as in tim 2.0, where this is
        the only way to unblock (unless C{[roster] unblock_on_remove} is
        off); a block by C{other} stays.  The former friend gets bnType 6.
        """
        other, relation = yield self._target(session, request)
        lifted = relation.mine == STANCE_BLOCK and self.config.unblock_on_remove
        if relation.mine == STANCE_FRIEND or lifted:
            yield self.relations.setStance(session.uid, other, STANCE_NONE)
        if relation.theirs == STANCE_FRIEND:
            yield self.relations.setStance(other, session.uid, STANCE_NONE)
        if areFriends(relation):
            yield self.notices.notify(other, self.notice(Business.REMOVEROSTER, session.tid, other))
        self._ack(session, Business.REMOVEROSTER, other)

    @inlineCallbacks
    def block(self, session: Session, request: TimReq) -> Any:
        """
        Block a user: any friendship ends, messages and presence between the
        two stop, and (unless C{[roster] notify_block} is off) the user gets
        bnType 7, as in tim.
        """
        other, relation = yield self._target(session, request)
        yield self.relations.setStance(session.uid, other, STANCE_BLOCK)
        if relation.theirs == STANCE_FRIEND:
            yield self.relations.setStance(other, session.uid, STANCE_NONE)
        if self.config.notify_block and relation.mine != STANCE_BLOCK:
            yield self.notices.notify(other, self.notice(Business.BLOCKROSTER, session.tid, other))
        self._ack(session, Business.BLOCKROSTER, other)

    @inlineCallbacks
    def unblock(self, session: Session, request: TimReq) -> Any:
        """
        timtx extension (rtype 101): lift a block without anything else.
        """
        other, relation = yield self._target(session, request)
        if relation.mine == STANCE_BLOCK:
            yield self.relations.setStance(session.uid, other, STANCE_NONE)
        self._ack(session, UNBLOCKROSTER, other)
