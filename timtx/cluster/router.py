# -*- test-case-name: timtx.test.test_clusterrouting -*-
"""
The cluster's L{IRouter}: this node's sessions, and one hop to the nodes
holding a user's other sessions.

A 1:1 message is stored (in the store every node shares) before anything
is routed, by the node its sender is on; then the router pushes it to the
recipient's sessions here and sends it, already encoded both ways, to each
other node holding sessions of the recipient (L{UserDirectory} says which).
That node pushes it to its sessions through its own inbox delivery, with
the same flow control and acks as a local push: an ack removes the inbox
entry from the shared store, and what a session misses waits in its inbox
until it reads it.  So nothing new is guaranteed by the hop, and nothing is
lost to it: a node that dies with a message in flight leaves the entry in
the inbox.

Messages to one node go over one link in the order they were routed, so a
recipient gets what one node stored for it in that order.

A push the router cannot be sure reached every session of its recipient
makes the recipient I{doubtful} here, up to that push's inbox id: the
user's owner could not be asked, or answered while not the owner in its
own view (views differ for a moment after a membership change), a push to
a live node failed, or the user's owner moved soon after a push went by
the old answer (a kept answer may have been stale by then: the user's
sessions registered with the new owner only), or the owner held this node
dead for a while and did not tell it of the user's moves (C{dir.back},
L{UserDirectory.forgotten}).  Pushes to a doubtful user
wait in its inbox until the router is sure where its sessions are (it
looks the user up again at each membership change, else with backoff, and
at the user's next push); then it tells each node holding them to look in
the user's inbox (C{route.reread} with that inbox id,
L{InboxDelivery.recheck <timtx.delivery.inbox.InboxDelivery.recheck>})
before pushing anything newer.  A session that missed nothing sees
nothing of it; one that did gets what it missed as offline lists, in
order, before what is pushed from then on.  Nothing stays in the inbox of
a live session until its next login.

A resend recognised by its id (L{reread}) has the recipient's nodes look
in its inbox too, a moment later: its first copy may have been stored by
a node that died before pushing it.

Group messages go once to each node holding members, which fans them out
to its own sessions: L{pushToGroup} and L{sendToGroup} hand them to
L{timtx.cluster.groups.GroupRouting} when a node has one (it sets
L{ClusterRouter.groups}).  Virtual rooms route their frames themselves,
through the room's holder (L{timtx.cluster.rooms}).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.cluster.directory import Located, UserDirectory
from timtx.cluster.membership import ClusterService
from timtx.cluster.ownership import NoOwner, Ownership, userKey
from timtx.cluster.swim import MemberChange
from timtx.cluster.wire import BadPayload, integer, pack, text, unpack
from timtx.delivery.encoded import Encoded
from timtx.delivery.inbox import higherBound
from timtx.interfaces import IRouter
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.structs import TimMessage, TimPresence

if TYPE_CHECKING:
    from timtx.delivery.fanout import GroupFanout
    from timtx.delivery.router import LocalRouter

KIND_PUSH = "route.push"
KIND_SEND = "route.send"
KIND_FRAME = "route.frame"
KIND_REREAD = "route.reread"
#: Offered by a node that reads C{route.push} and C{route.send} of
#: messages and presence with their JSON left out (empty): it makes JSON
#: itself, from the compact encoding, for its JSON sessions only.
COMPACT_FEATURE = "route.compact"
#: The frame types sent with their JSON left out to such nodes, and their
#: structs.
_COMPACT_ONLY: dict[int, type] = {TimType.TIMMESSAGE: TimMessage, TimType.TIMPRESENCE: TimPresence}


class GroupRoute(Protocol):
    """
    What the router hands group messages to
    (L{timtx.cluster.groups.GroupRouting}, which imports this module).
    """

    fanout: GroupFanout

    def route(
        self, gid: str, members: Iterable[str], encoded: Encoded, seq: int, skip: str | None, echo: bool
    ) -> None: ...

    def sendToGroup(self, members: Iterable[str], timType: int, message: Encoded, skip: str | None) -> None: ...


@implementer(IRouter)
class ClusterRouter:
    """
    Routes to this node's sessions through C{local}, and to other nodes'
    through C{cluster}.

    @ivar forwarded: messages sent to other nodes, by kind.
    @ivar received: messages from other nodes delivered here, by kind.
    @ivar doubted: times a user became doubtful (see the module docstring).
    @ivar rereads: C{route.reread} sent, one per node and user.
    """

    log = Logger()

    #: Seconds before a doubtful user is looked up again, doubled while
    #: the answers are not sure, up to L{rerouteMaxDelay}.
    rerouteDelay = 0.25
    rerouteMaxDelay = 2.0
    #: Pushes routed this many seconds before their recipient's owner
    #: moved are doubted: the seconds a membership change may take to reach
    #: every node (a registration with the new owner may have come first).
    movedHorizon = 10.0
    #: Seconds after a resend is recognised before the recipient's inbox
    #: is looked in (L{reread}): pushes of the first copy under way arrive
    #: meanwhile, and are not taken for missed.
    resendGrace = 1.0

    def __init__(self, local: LocalRouter, directory: UserDirectory, cluster: ClusterService):
        self.local = local
        self.directory = directory
        self.cluster = cluster
        self.clock = cluster.clock
        self.forwarded: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.doubted = 0
        self.rereads = 0
        #: Routes group messages once per node (set by L{GroupRouting}).
        self.groups: GroupRoute | None = None
        #: Users whose pushes may have missed sessions, in doubt order, with
        #: the highest inbox id in doubt (C{None}: any).
        self._doubtful: dict[str, int | None] = {}
        self._graces: set[IDelayedCall] = set()
        self._resolving: set[str] = set()
        self._resolveCall: IDelayedCall | None = None
        self._delay = self.rerouteDelay
        self._stopped = False
        #: When a push to each user was last routed by a directory answer,
        #: and its inbox id, oldest first, for L{movedHorizon}.
        self._routedAt: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._ownership = cluster.ownership
        cluster.addHandler(KIND_PUSH, self._pushReceived)
        cluster.addHandler(KIND_SEND, self._sendReceived)
        cluster.addHandler(KIND_FRAME, self._frameReceived)
        cluster.addHandler(KIND_REREAD, self._rereadReceived)
        cluster.offer(COMPACT_FEATURE)
        cluster.addObserver(self._membershipChanged)
        directory.forgotten.append(self._forgotten)

    def stop(self) -> None:
        """
        The node stops: look nothing up again.
        """
        self._stopped = True
        if self._resolveCall is not None and self._resolveCall.active():
            self._resolveCall.cancel()
        self._resolveCall = None
        for call in self._graces:
            if call.active():
                call.cancel()
        self._graces.clear()

    # IRouter.

    def push(self, uid: str, qid: int, message: Encoded) -> None:
        self.local.push(uid, qid, message)
        self._route(uid, qid, message, look=False)

    def pushAfterLook(self, uid: str, qid: int, message: Encoded) -> None:
        self.local.pushAfterLook(uid, qid, message)
        self._route(uid, qid, message, look=True)

    def _route(self, uid: str, qid: int, message: Encoded, look: bool) -> None:
        payload = self._encoded(message, True, uid.encode(), b"%d" % qid)
        nodes = self.directory.nodes(uid)
        if nodes is None:
            self.directory.route(uid).addCallback(self._routed, uid, qid, payload, look)
        else:
            self._pushTo(uid, qid, nodes, payload, look)

    def send(self, uid: str, timType: int, message: Encoded) -> None:
        self.local.send(uid, timType, message)
        self._forward(uid, KIND_SEND, self._sent(uid, timType, message))

    def sendExcept(self, uid: str, timType: int, message: Encoded, node: str) -> bool:
        """
        L{send}, leaving C{node} out if this node would send there at once
        (C{node} then sends to its own sessions of C{uid} itself,
        L{sendHere}).  Where this node must first ask where C{uid} is, what
        it pushes there waits for the answer, and this must not overtake
        it: then it goes to C{node} too.

        @return: whether C{node} was left out.
        """
        self.local.send(uid, timType, message)
        payload = self._sent(uid, timType, message)
        nodes = self.directory.nodes(uid)
        if nodes is None:
            self.directory.locate(uid).addCallback(self._sendTo, KIND_SEND, payload)
            return False
        skip = node if node in nodes else None
        self._sendTo(nodes, KIND_SEND, payload, skip)
        return skip is not None

    def _sent(self, uid: str, timType: int, message: Encoded) -> Callable[[str], bytes]:
        return self._encoded(message, timType in _COMPACT_ONLY, uid.encode(), b"%d" % timType)

    def _encoded(self, message: Encoded, compactOnly: bool, *fields: bytes) -> Callable[[str], bytes]:
        """
        The payload for each node: C{message} in compact and JSON, then
        C{fields}; with C{compactOnly}, its JSON left out for the nodes
        that offer L{COMPACT_FEATURE} (most sessions use compact: JSON is
        made only where a session needs it).  Each made at most once.
        """
        made: dict[bool, bytes] = {}

        def payload(node: str) -> bytes:
            lean = compactOnly and COMPACT_FEATURE in self.cluster.peerFeatures(node)
            data = made.get(lean)
            if data is None:
                json = b"" if lean else message.payload(Encoding.JSON)
                data = made[lean] = pack(message.payload(Encoding.COMPACT), json, *fields)
            return data

        return payload

    def sendHere(self, uid: str, timType: int, message: Encoded) -> None:
        """
        Send to this node's sessions of C{uid} only.
        """
        self.local.send(uid, timType, message)

    def sendFrame(self, uid: str, header: bytes, payload: bytes) -> None:
        self.local.sendFrame(uid, header, payload)
        data = _lazy(lambda: pack(header, payload, uid.encode()))
        self._forward(uid, KIND_FRAME, lambda node: data())

    def pushToGroup(self, gid: str, members: Iterable[str], message: Encoded, skip: str | None = None) -> int:
        if self.groups is None:
            return self.local.pushToGroup(gid, members, message, skip)
        fanout = self.groups.fanout
        before = fanout.delivered
        self.groups.route(gid, members, message, message.message.seq, skip, echo=False)
        return fanout.delivered - before

    def sendToGroup(self, members: Iterable[str], timType: int, message: Encoded, skip: str | None = None) -> None:
        if self.groups is not None:
            self.groups.sendToGroup(members, timType, message, skip)
            return
        for uid in members:
            if uid != skip:
                self.send(uid, timType, message)

    def reread(self, uid: str) -> None:
        if self._stopped:
            return

        def look() -> None:
            self._graces.discard(call)
            self.local.reread(uid)
            self._doubt(uid, None)
            self._resolveLater(0)

        call = self.clock.callLater(self.resendGrace, look)
        self._graces.add(call)

    def isOnline(self, uid: str) -> bool:
        if self.local.isOnline(uid):
            return True
        nodes = self.directory.nodes(uid)
        if nodes is None:
            # Not known here yet: ask, so that the next answer is right.
            self.directory.locate(uid)
            return False
        return bool(nodes)

    # Sending.

    def _forward(self, uid: str, kind: str, payload: Callable[[str], bytes]) -> None:
        nodes = self.directory.nodes(uid)
        if nodes is None:
            self.directory.locate(uid).addCallback(self._sendTo, kind, payload)
        else:
            self._sendTo(nodes, kind, payload)

    def _sendTo(
        self, nodes: frozenset[str], kind: str, payload: Callable[[str], bytes], skip: str | None = None
    ) -> None:
        me = self.cluster.nodeId
        for node in nodes:
            if node == me or node == skip:
                continue
            self.forwarded[kind] = self.forwarded.get(kind, 0) + 1
            self.cluster.send(node, kind, payload(node)).addErrback(self._sendFailed, node, kind)

    def _sendFailed(self, failure: Failure, node: str, kind: str) -> None:
        # What is sent unstored (presence, echoes) is worthless later.
        self.log.info("{kind} to node {node} failed: {why}", kind=kind, node=node, why=failure.getErrorMessage())

    # Pushing, and doubt.

    def _routed(self, located: Located, uid: str, qid: int, payload: Callable[[str], bytes], look: bool) -> None:
        if not located.sure:
            # It waits in the inbox until the router is sure.
            self._doubt(uid, qid)
            return
        self._pushTo(uid, qid, located.nodes, payload, look)

    def _pushTo(
        self, uid: str, qid: int, nodes: frozenset[str], payload: Callable[[str], bytes], look: bool = False
    ) -> None:
        if uid in self._doubtful:
            self._settle(uid, nodes)
        self._noteRouted(uid, qid)
        me = self.cluster.nodeId
        # A look first, for a push that may overtake another writer's: the
        # same link carries both, in order, and the push waits for the look.
        lookFirst = pack(uid.encode(), b"%d" % (qid - 1)) if look else None
        for node in nodes:
            if node == me:
                continue
            if lookFirst is not None:
                self.rereads += 1
                self.cluster.send(node, KIND_REREAD, lookFirst).addErrback(
                    self._pushFailed, node, uid, qid - 1, KIND_REREAD
                )
            self.forwarded[KIND_PUSH] = self.forwarded.get(KIND_PUSH, 0) + 1
            d = self.cluster.send(node, KIND_PUSH, payload(node))
            d.addErrback(self._pushFailed, node, uid, qid, KIND_PUSH)

    def _settle(self, uid: str, nodes: frozenset[str]) -> None:
        """
        Sure now that C{nodes} hold C{uid}'s sessions: have each look in the
        user's inbox for what it may have missed, before anything newer is
        pushed to it (same links, in order).
        """
        upTo = self._doubtful.pop(uid)
        if not self._doubtful:
            self._delay = self.rerouteDelay
        me = self.cluster.nodeId
        payload = pack(uid.encode(), b"" if upTo is None else b"%d" % upTo)
        for node in nodes:
            if node == me:
                # Sessions here got every push (LocalRouter).
                continue
            self.rereads += 1
            d = self.cluster.send(node, KIND_REREAD, payload)
            d.addErrback(self._pushFailed, node, uid, upTo, KIND_REREAD)

    def _noteRouted(self, uid: str, qid: int) -> None:
        routedAt = self._routedAt
        now = self.clock.seconds()
        routedAt[uid] = (now, qid)
        routedAt.move_to_end(uid)
        horizon = now - self.movedHorizon
        while routedAt:
            oldest, (when, _) = next(iter(routedAt.items()))
            if when >= horizon:
                break
            del routedAt[oldest]

    def _pushFailed(self, failure: Failure, node: str, uid: str, qid: int | None, kind: str) -> None:
        """
        A push (or reread) did not reach C{node}: its entry waits in the
        inbox.  A node still live may hold sessions of C{uid} that are to
        read it; a dead one's sessions are gone.
        """
        member = self.cluster.member(node)
        live = member is not None and member.live
        self.log.info(
            "{kind} to node {node} failed{doubt}: {why}",
            kind=kind,
            node=node,
            doubt=" (its user is doubtful now)" if live else "",
            why=failure.getErrorMessage(),
        )
        if live:
            self._doubt(uid, qid)

    def _doubt(self, uid: str, qid: int | None) -> None:
        if uid in self._doubtful:
            self._doubtful[uid] = higherBound(self._doubtful[uid], qid)
        else:
            self.doubted += 1
            self._doubtful[uid] = qid
        self._resolveLater(self._delay)

    def _resolveLater(self, delay: float) -> None:
        if self._stopped or not self._doubtful:
            return
        call = self._resolveCall
        if call is not None and call.active():
            if call.getTime() - self.clock.seconds() > delay:
                call.reset(delay)
            return
        self._resolveCall = self.clock.callLater(delay, self._resolve)

    def _resolve(self) -> None:
        """
        Look every doubtful user up again.
        """
        self._resolveCall = None
        for uid in list(self._doubtful):
            if uid not in self._resolving:
                self._resolving.add(uid)
                self.directory.route(uid).addCallback(self._resolved, uid)

    def _resolved(self, located: Located, uid: str) -> None:
        self._resolving.discard(uid)
        if uid not in self._doubtful:
            return
        if not located.sure:
            self._delay = min(self._delay * 2, self.rerouteMaxDelay)
            self._resolveLater(self._delay)
            return
        self._settle(uid, located.nodes)

    def _membershipChanged(self, change: MemberChange) -> None:
        """
        Doubt the users pushed to lately whose owner moved; look the
        doubtful up again soon.
        """
        new = self.cluster.ownership
        old, self._ownership = self._ownership, new
        if old != new:
            for uid, (_, qid) in list(self._routedAt.items()):
                if _moved(old, new, uid):
                    self._doubt(uid, qid)
        self._delay = self.rerouteDelay
        self._resolveLater(self._delay)

    def _forgotten(self, uids: list[str]) -> None:
        """
        The directory dropped the nodes it kept of C{uids}: their owner had
        held this node dead, and was not telling it of their moves.  Doubt
        those pushed to lately: a push may have gone by a stale answer.
        """
        for uid in uids:
            routed = self._routedAt.get(uid)
            if routed is not None:
                self._doubt(uid, routed[1])

    # Receiving.

    def _count(self, kind: str) -> None:
        self.received[kind] = self.received.get(kind, 0) + 1

    def _pushReceived(self, node: str, payload: bytes) -> None:
        compact, json, uid, qid = unpack(payload, 4)
        self._count(KIND_PUSH)
        self.local.push(text(uid), integer(qid), _received(TimType.TIMMESSAGE, compact, json))

    def _sendReceived(self, node: str, payload: bytes) -> None:
        compact, json, uid, timType = unpack(payload, 4)
        self._count(KIND_SEND)
        kind = integer(timType)
        self.local.send(text(uid), kind, _received(kind, compact, json))

    def _frameReceived(self, node: str, payload: bytes) -> None:
        header, body, uid = unpack(payload, 3)
        self._count(KIND_FRAME)
        self.local.sendFrame(text(uid), header, body)

    def _rereadReceived(self, node: str, payload: bytes) -> None:
        uid, upTo = unpack(payload, 2)
        self._count(KIND_REREAD)
        count = self.local.inbox.recheck(text(uid), integer(upTo) if upTo else None)
        self.log.info(
            "node {node} asks {count} sessions of {uid} here to look in the inbox for what it may not have pushed",
            node=node,
            uid=text(uid),
            count=count,
        )


def _moved(old: Ownership, new: Ownership, uid: str) -> bool:
    key = userKey(uid)
    try:
        return old.owner(key) != new.owner(key)
    except NoOwner:
        return True


def _lazy(make: Callable[[], bytes]) -> Callable[[], bytes]:
    """
    C{make}, called at most once.
    """
    made: list[bytes] = []

    def get() -> bytes:
        if not made:
            made.append(make())
        return made[0]

    return get


def _received(timType: int, compact: bytes, json: bytes) -> Encoded:
    """
    A message from another node: in both encodings, or in compact alone
    (JSON left out, L{COMPACT_FEATURE}).

    @raise BadPayload: for JSON left out of a frame type that may not.
    """
    if json:
        return Encoded.prepared(compact, json)
    kind = _COMPACT_ONLY.get(timType)
    if kind is None:
        raise BadPayload(f"frame type {timType} sent without its JSON")
    return Encoded.fromCompact(kind, compact)
