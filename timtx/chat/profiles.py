# -*- test-case-name: timtx.test.test_profiles -*-
"""
User profiles: TIMNODES ntype 4 (read) and 6 (modify one's own).

Profiles are stored sealed.  Reading is open to anyone or to friends only
(C{[profiles] read}); users always read their own.  Users without a profile,
and those the reader may not see, are left out of the answer, as tim leaves
out users without one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from timtx.chat.roster import RelationCache, areFriends
from timtx.crypto.vault import StanzaVault
from timtx.persistence.interfaces import IMessageStore
from timtx.protocols import codec
from timtx.protocols.constants import ErrorCode, NodeInfo, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimNodes, TimUserBean

if TYPE_CHECKING:
    from timtx.config import ProfilesConfig
    from timtx.delivery.sessions import Session


class RoomProfiles(Protocol):
    """
    What serves group profiles (L{timtx.chat.groups.profiles.GroupProfiles}).
    """

    def handleNodes(self, session: Session, nodes: TimNodes) -> Any: ...


_TEXT_FIELDS = ("name", "nickName", "brithday", "cover", "area")
_MERGED_FIELDS = (*_TEXT_FIELDS, "gender", "photoTidAlbum", "extend", "extra")


class ProfileService:
    """
    User profiles (TIMNODES ntype 1 and 4); group profiles (ntype 5 and 7)
    go to C{rooms}.
    """

    def __init__(
        self,
        config: ProfilesConfig,
        *,
        store: IMessageStore,
        vault: StanzaVault,
        relations: RelationCache,
        clock: IReactorTime,
        rooms: RoomProfiles,
    ):
        self.config = config
        self.store = store
        self.vault = vault
        self.relations = relations
        self.clock = clock
        self.rooms = rooms

    def handleNodes(self, session: Session, nodes: TimNodes) -> Any:
        if nodes.ntype == NodeInfo.USERINFO:
            return self.read(session, nodes)
        if nodes.ntype == NodeInfo.MODIFYUSER:
            return self.modify(session, nodes)
        if nodes.ntype in (NodeInfo.ROOMINFO, NodeInfo.MODIFYROOM):
            return self.rooms.handleNodes(session, nodes)
        raise TimProtocolError(ErrorCode.ERR_PARAMS, f"unknown TimNodes ntype {nodes.ntype}")

    @inlineCallbacks
    def read(self, session: Session, nodes: TimNodes) -> Any:
        wanted = list(dict.fromkeys(nodes.nodelist or ()))
        if not wanted:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "nodelist is required")
        if len(wanted) > self.config.max_batch:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"at most {self.config.max_batch} users at once")
        known = yield self.relations.of(session.uid)
        usermap = {}
        for uid in wanted:
            if uid != session.uid and self.config.read == "friends":
                relation = known.get(uid)
                if relation is None or not areFriends(relation):
                    continue
            blob = yield self.store.getProfile(uid)
            if blob is not None:
                usermap[uid] = self.vault.openProfile(uid, blob)
        session.send(TimType.TIMNODES, TimNodes(ntype=NodeInfo.USERINFO, usermap=usermap))

    def _check(self, bean: TimUserBean) -> None:
        limit = self.config.max_field_chars
        for name in _TEXT_FIELDS:
            value = getattr(bean, name)
            if value is not None and len(value) > limit:
                raise TimProtocolError(ErrorCode.ERR_BIGDATA, f"{name} is over {limit} characters")
        for value in bean.photoTidAlbum or ():
            if len(value) > limit:
                raise TimProtocolError(ErrorCode.ERR_BIGDATA, f"photoTidAlbum entry over {limit} characters")
        if bean.createtime is not None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "createtime is set by the server")

    @inlineCallbacks
    def modify(self, session: Session, nodes: TimNodes) -> Any:
        """
        Merge the fields set in the one bean of C{usermap} into the caller's
        profile (the key is ignored, as in tim).
        """
        if not nodes.usermap or len(nodes.usermap) != 1:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "usermap must hold exactly one profile")
        (bean,) = nodes.usermap.values()
        if bean is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "usermap must hold a profile")
        self._check(bean)
        blob = yield self.store.getProfile(session.uid)
        current = self.vault.openProfile(session.uid, blob) if blob is not None else TimUserBean()
        for name in _MERGED_FIELDS:
            value = getattr(bean, name)
            if value is not None:
                setattr(current, name, value)
        if current.createtime is None:
            current.createtime = int(self.clock.seconds() * 1e9)
        if len(codec.encode_compact(current)) > self.config.max_profile_bytes:
            raise TimProtocolError(ErrorCode.ERR_BIGDATA, f"profile over {self.config.max_profile_bytes} bytes")
        yield self.store.putProfile(session.uid, self.vault.sealProfile(session.uid, current))
        session.sendAck(TimType.TIMNODES, t=NodeInfo.MODIFYUSER)
