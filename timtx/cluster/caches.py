# -*- test-case-name: timtx.test.test_clusterrouting -*-
"""
Keeping the nodes' caches of shared state alike.

Every node caches some of what the store holds, to answer without a round
trip: relations (friends and blocks, L{RelationCache}) and invisible flags
(L{PresenceService}).  When one changes on a node, the node tells every
other live member the change itself (C{cache.stance}, C{cache.invisible});
each applies it to what it has cached and reads nothing.  Sending the change
rather than "forget this" matters: a node that forgot and read the store
before the write committed would cache the old value again.

A node misses changes only while another node holds it dead: nothing is
sent to a dead member.  So when a member comes back (L{ChangeKind.JOINED}
with a previous state: a healed partition, a node that was wrongly declared
dead, or a restart), each node that sees it tells it to drop what it cached
(C{cache.flush}): relations, invisible flags and groups, which it reads
from the store again as it needs them.  The notice
goes from the side that did the holding, which matters when only one side
held the other dead: the one that missed changes may never have seen a
change in its own view.  A new node starts empty and gets nothing.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.chat.groups.directory import GroupDirectory
from timtx.chat.presence import PresenceService
from timtx.chat.roster import RelationCache
from timtx.cluster.membership import ClusterService
from timtx.cluster.swim import ChangeKind, MemberChange
from timtx.cluster.wire import BadPayload, dumps, loads

KIND_STANCE = "cache.stance"
KIND_INVISIBLE = "cache.invisible"
KIND_FLUSH = "cache.flush"


class CacheMirror:
    """
    Sends this node's cache changes to the other nodes and applies theirs.
    """

    log = Logger()

    def __init__(
        self,
        cluster: ClusterService,
        *,
        relations: RelationCache,
        presence: PresenceService,
        groups: GroupDirectory | None = None,
    ):
        self.cluster = cluster
        self.relations = relations
        self.presence = presence
        self.groups = groups
        relations.onChange.append(self._stanceChanged)
        presence.onInvisible.append(self._invisibleChanged)
        cluster.addHandler(KIND_STANCE, self._stanceReceived)
        cluster.addHandler(KIND_INVISIBLE, self._invisibleReceived)
        cluster.addHandler(KIND_FLUSH, self._flushReceived)
        cluster.addObserver(self._membershipChanged)
        #: Times this node dropped its caches when told to.
        self.flushes = 0

    def _broadcast(self, kind: str, payload: bytes) -> None:
        me = self.cluster.nodeId
        for member in self.cluster.liveMembers():
            if member.nodeId != me:
                d = self.cluster.send(member.nodeId, kind, payload)
                d.addErrback(self._sendFailed, member.nodeId, kind)

    def _sendFailed(self, failure: Failure, node: str, kind: str) -> None:
        self.log.info("{kind} to node {node} failed: {why}", kind=kind, node=node, why=failure.getErrorMessage())

    def _stanceChanged(self, owner: str, other: str, stance: int) -> None:
        self._broadcast(KIND_STANCE, dumps({"owner": owner, "other": other, "stance": stance}))

    def _invisibleChanged(self, uid: str, invisible: bool) -> None:
        self._broadcast(KIND_INVISIBLE, dumps({"uid": uid, "invisible": invisible}))

    def _stanceReceived(self, node: str, payload: bytes) -> None:
        change = loads(payload)
        owner, other, stance = change.get("owner"), change.get("other"), change.get("stance")
        if not isinstance(owner, str) or not isinstance(other, str) or not isinstance(stance, int):
            raise BadPayload("owner, other and stance are required")
        self.relations.applyStance(owner, other, stance)

    def _invisibleReceived(self, node: str, payload: bytes) -> None:
        change = loads(payload)
        uid, invisible = change.get("uid"), change.get("invisible")
        if not isinstance(uid, str) or not isinstance(invisible, bool):
            raise BadPayload("uid and invisible are required")
        self.presence.applyInvisible(uid, invisible)

    def _membershipChanged(self, change: MemberChange) -> None:
        node = change.member.nodeId
        if change.kind is ChangeKind.JOINED and change.previous is not None and node != self.cluster.nodeId:
            self.cluster.send(node, KIND_FLUSH, b"").addErrback(self._sendFailed, node, KIND_FLUSH)

    def _flushReceived(self, node: str, payload: bytes) -> None:
        self.log.info("node {node} held this node dead: dropping cached relations, flags and groups", node=node)
        self.flushes += 1
        self.relations.forgetCached()
        self.presence.forgetCached()
        if self.groups is not None:
            self.groups.forgetCached()
