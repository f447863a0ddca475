# -*- test-case-name: timtx.test.test_clustergroups -*-
"""
Groups across nodes: each group has an owner node that stores and routes its
messages, and each other node fans them out to its own members.

B{Owner.} The owner of C{group:<gid>} among the live members
(L{timtx.cluster.ownership}) numbers and stores a group's messages, as the
owner of C{conv:<id>} does for 1:1 (L{timtx.cluster.messaging}).  The node a
sender is on checks a message (membership, mute, duplicates) and hands it to
the owner (C{group.append}); notices kept in the group's history (joined,
left, transferred) take the same path.  The owner stores it, fenced in the
store (a unique seq per conversation: two owners during a view change cost
a retry, never a duplicate seq or a gap), and once it is durable routes it
and answers the sender's node.  When the owner cannot be reached at all the
sender's node stores and routes the message itself; when it was asked and
did not answer, the client is told to send again (5103) and the resend is
recognised by its id.

B{Once per node.} The owner sends the stored message, encoded both ways,
once to each other node that holds sessions of a member (C{group.push}),
with the sender to echo to; each node fans it out to its own members'
sessions with L{GroupFanout} (encode once, cursors, flow control,
slow-reader isolation), and echoes it to the sender's sessions there.

Which nodes hold members: the owner asks the user directory
(L{UserDirectory.nodes}), which it keeps for the users it routes to, and
which is told of every login before the login completes (so a message
stored after a login reaches the new session's node, and one stored before
is in what the session reads).  While some members' nodes are not known
yet, the message goes to every live node instead, and the owner looks up
at most C{[cluster] group_locates} of the unknown members at a time; the
next messages go only where members are.  Asking the directory, rather than
having each node tell each group owner which of its groups it holds members
of, costs nothing new on login and keeps no per-group state on the owner
that could go stale when ownership moves: a new owner knows as much as the
old one once its directory cache fills.

B{In order, no gaps.} A node delivers a group's messages in seq order
(L{GroupDelivery}): one that arrives after a later one was delivered is
dropped (already delivered), and one that follows a gap (an owner died
after storing a message and before sending it here, or this node was not
sent messages while it held no members) is preceded by what is missing,
read from the store and pushed to the members here that have not
acknowledged it.  Without this, a member that acknowledged the later
message would move its cursor past the missing one and never get it.

B{Notices for one user} (join requests, kicks, dissolving) go through each
user's inbox and the router, as before.  Messages sent to members without
being stored (streams, L{ClusterRouter.sendToGroup}) go once to each node
holding some of them, with the list of those members (C{group.send}).

B{Caches.} Every node caches groups and memberships
(L{GroupDirectory}); a change made on one node is announced, once durable,
to every other live node (C{group.changed}), which reads the group, the
users' groups and their cursors again when next needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.chat.conversations import Appended
from timtx.chat.groups.core import Groups
from timtx.chat.groups.directory import GroupDirectory, GroupState
from timtx.chat.messagerules import MaybeStored
from timtx.cluster.membership import ClusterService
from timtx.cluster.ownership import NoOwner, groupKey
from timtx.cluster.resends import appendAnswer, refusalAnswer
from timtx.cluster.wire import BadPayload, dumps, integer, loads, pack, text, thrift, unpack
from timtx.crypto.vault import StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.delivery.fanout import GroupFanout, groupConversation
from timtx.persistence.interfaces import IMessageStore
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage

if TYPE_CHECKING:
    from timtx.cluster.router import ClusterRouter

KIND_APPEND = "group.append"
KIND_PUSH = "group.push"
KIND_SEND = "group.send"
KIND_CHANGED = "group.changed"


@dataclass
class GroupItem:
    """
    One stored group message to deliver on this node.

    @ivar skip: the member not pushed to (the sender of a message, who gets
        an echo instead).
    @ivar echo: whether C{skip}'s sessions here get the message as an echo.
    @ivar repaired: read from the store to fill a gap: pushed only to the
        members here that have not acknowledged it.
    """

    seq: int
    encoded: Encoded
    skip: str | None
    echo: bool
    repaired: bool = False


class GroupDelivery:
    """
    Delivers stored group messages to this node's members in seq order, one
    group at a time, filling gaps from the store.

    @ivar delivered: messages fanned out here, by groups.
    @ivar late: messages dropped because a later one was already delivered.
    @ivar repaired: messages read from the store to fill a gap.
    """

    log = Logger()

    def __init__(
        self,
        *,
        directory: GroupDirectory,
        fanout: GroupFanout,
        send: Any,
        store: IMessageStore,
        vault: StanzaVault,
        maxRepair: int = 256,
        maxGroups: int = 10_000,
    ):
        self.directory = directory
        self.fanout = fanout
        self.send = send
        self.store = store
        self.vault = vault
        self.maxRepair = maxRepair
        self.maxGroups = maxGroups
        #: The last seq delivered here of each group (the most recent
        #: groups; a group forgotten starts again from its next message).
        self._last: OrderedDict[str, int] = OrderedDict()
        #: Messages waiting while an earlier one of the group is delivered.
        self._queues: dict[str, deque[GroupItem]] = {}
        self.delivered = 0
        self.late = 0
        self.repaired = 0

    def arrived(self, gid: str, item: GroupItem) -> None:
        queue = self._queues.get(gid)
        if queue is not None:
            queue.append(item)
            return
        self._queues[gid] = deque([item])
        self._next(gid)

    def _next(self, gid: str) -> None:
        queue = self._queues[gid]
        while queue:
            item = queue.popleft()
            finished: list[object] = []
            d = self.directory.get(gid)
            d.addCallback(self._withState, gid, item)
            d.addErrback(self._failed, gid, item)
            d.addBoth(finished.append)
            if not finished:
                d.addCallback(lambda _: self._next(gid))
                return
        del self._queues[gid]

    def _failed(self, failure: Failure, gid: str, item: GroupItem) -> None:
        # The members here get it from the group's history.
        self.log.failure("delivering seq {seq} of group {gid} failed", failure, seq=item.seq, gid=gid)

    def _withState(self, state: GroupState | None, gid: str, item: GroupItem) -> Any:
        last = self._last.get(gid)
        if last is not None and item.seq <= last:
            self.late += 1
            return None
        if state is None:
            self._remember(gid, item.seq)
            return None
        if last is not None and item.seq > last + 1:
            return self._repair(state, item, last)
        self._deliver(state, item)
        return None

    def _repair(self, state: GroupState, item: GroupItem, last: int) -> Deferred[None]:
        after = max(last, item.seq - 1 - self.maxRepair)
        d = self.store.messagesAfter(groupConversation(state.gid), after, item.seq - 1 - after)

        def read(rows: list[Any]) -> None:
            for row in rows:
                if row.seq >= item.seq:
                    break
                message = self.vault.openMessage(row.conv, row.seq, row.stanza)
                self.repaired += 1
                self._deliver(state, GroupItem(row.seq, Encoded(message), None, False, repaired=True))
            self._deliver(state, item)

        return d.addCallback(read)

    def _deliver(self, state: GroupState, item: GroupItem) -> None:
        gid, seq, fanout = state.gid, item.seq, self.fanout
        self._remember(gid, seq)
        self.delivered += 1
        members: Iterable[str] = state.members
        if item.repaired:
            cursor = fanout.cursor
            members = [uid for uid in state.members if (cursor(uid, gid) or 0) < seq]
        elif item.echo and item.skip is not None:
            self.send(item.skip, TimType.TIMMESSAGE, item.encoded)
            # The sender has its own message: move its cursor if it had
            # all before it, so it does not get it back as offline.
            if fanout.cursor(item.skip, gid) == seq - 1:
                fanout.advance(item.skip, gid, seq)
        fanout.deliver(gid, members, item.encoded, item.skip, seq=seq)

    def _remember(self, gid: str, seq: int) -> None:
        self._last[gid] = seq
        self._last.move_to_end(gid)
        while len(self._last) > self.maxGroups:
            self._last.popitem(last=False)


class GroupRouting:
    """
    Sends group messages once to each node holding members, and delivers
    here those other nodes send; mirrors group changes between nodes.

    Counts go to the router's C{forwarded} and C{received}, by kind.

    @param maxLocates: unknown members looked up in the user directory at
        a time.
    """

    log = Logger()

    def __init__(
        self,
        router: ClusterRouter,
        *,
        directory: GroupDirectory,
        fanout: GroupFanout,
        store: IMessageStore,
        vault: StanzaVault,
        maxLocates: int = 256,
        maxGroups: int = 10_000,
    ):
        self.router = router
        self.cluster = router.cluster
        self.users = router.directory
        self.groups = directory
        self.fanout = fanout
        self.maxLocates = maxLocates
        self.delivery = GroupDelivery(
            directory=directory,
            fanout=fanout,
            send=router.local.send,
            store=store,
            vault=vault,
            maxGroups=maxGroups,
        )
        self._locating: set[str] = set()
        #: Messages sent to every live node because members' nodes were
        #: not known yet.
        self.broadcasts = 0
        router.groups = self
        directory.onChange.append(self._changed)
        self.cluster.addHandler(KIND_PUSH, self._pushReceived)
        self.cluster.addHandler(KIND_SEND, self._sendReceived)
        self.cluster.addHandler(KIND_CHANGED, self._changedReceived)

    # Where members are.

    def nodesOf(self, members: Iterable[str]) -> tuple[set[str], list[str]]:
        """
        The nodes holding sessions of C{members}, and the members whose
        nodes are not known here yet (each looked up, a few at a time).
        """
        nodes: set[str] = set()
        unknown: list[str] = []
        find = self.users.nodes
        for uid in members:
            found = find(uid)
            if found is None:
                unknown.append(uid)
            elif found:
                nodes.update(found)
        for uid in unknown:
            if len(self._locating) >= self.maxLocates:
                break
            if uid not in self._locating:
                self._locating.add(uid)
                self.users.locate(uid).addBoth(self._located, uid)
        return nodes, unknown

    def _located(self, result: object, uid: str) -> None:
        self._locating.discard(uid)

    def _othersFor(self, members: Iterable[str]) -> set[str]:
        nodes, unknown = self.nodesOf(members)
        if unknown:
            self.broadcasts += 1
            nodes = {member.nodeId for member in self.cluster.liveMembers()}
        nodes.discard(self.cluster.nodeId)
        return nodes

    # Stored messages.

    def route(self, gid: str, members: Iterable[str], encoded: Encoded, seq: int, skip: str | None, echo: bool) -> None:
        """
        Deliver a stored message of group C{gid} here and send it once to
        every other node holding members.
        """
        self.delivery.arrived(gid, GroupItem(seq, encoded, skip, echo))
        others = self._othersFor(members)
        if not others:
            return
        payload = pack(
            gid.encode(),
            encoded.payload(Encoding.COMPACT),
            encoded.payload(Encoding.JSON),
            b"%d" % seq,
            (skip or "").encode(),
            b"1" if echo else b"",
        )
        self._sendTo(others, KIND_PUSH, payload)

    def _pushReceived(self, node: str, payload: bytes) -> None:
        gid, compact, json, seq, skip, echo = unpack(payload, 6)
        self.router._count(KIND_PUSH)
        item = GroupItem(integer(seq), Encoded.prepared(compact, json), text(skip) or None, bool(echo))
        self.delivery.arrived(text(gid), item)

    # Unstored messages (streams).

    def sendToGroup(self, members: Iterable[str], timType: int, message: Encoded, skip: str | None) -> None:
        """
        Send C{message} to the sessions of C{members} (but C{skip}) here,
        and once to each other node holding some, with the list of those.
        """
        local = self.router.local
        me = self.cluster.nodeId
        byNode: dict[str, list[str]] = {}
        unknown: list[str] = []
        find = self.users.nodes
        for uid in members:
            if uid == skip:
                continue
            local.send(uid, timType, message)
            found = find(uid)
            if found is None:
                unknown.append(uid)
                continue
            for node in found:
                if node != me:
                    byNode.setdefault(node, []).append(uid)
        if unknown:
            self.nodesOf(unknown)
            for member in self.cluster.liveMembers():
                if member.nodeId != me:
                    byNode.setdefault(member.nodeId, []).extend(unknown)
        if not byNode:
            return
        compact, json = message.payload(Encoding.COMPACT), message.payload(Encoding.JSON)
        for node, uids in byNode.items():
            payload = pack(b"%d" % timType, compact, json, "\n".join(uids).encode())
            self._sendTo({node}, KIND_SEND, payload)

    def _sendReceived(self, node: str, payload: bytes) -> None:
        timType, compact, json, uids = unpack(payload, 4)
        self.router._count(KIND_SEND)
        encoded = Encoded.prepared(compact, json)
        send, kind = self.router.local.send, integer(timType)
        for uid in text(uids).split("\n"):
            if uid:
                send(uid, kind, encoded)

    # Changes to groups.

    def _changed(self, gid: str, uids: tuple[str, ...]) -> Deferred[Any]:
        """
        Tell every other live node, and wait for their answers (or their
        failures): the client that made the change is answered after, so
        that whatever it or anyone it tells does next, through any node,
        sees the change.
        """
        payload = dumps({"gid": gid, "uids": list(uids)})
        me = self.cluster.nodeId
        asked = []
        forwarded = self.router.forwarded
        for member in self.cluster.liveMembers():
            if member.nodeId != me:
                forwarded[KIND_CHANGED] = forwarded.get(KIND_CHANGED, 0) + 1
                d = self.cluster.request(member.nodeId, KIND_CHANGED, payload)
                asked.append(d.addErrback(self._sendFailed, member.nodeId, KIND_CHANGED))
        return gatherResults(asked)

    def _changedReceived(self, node: str, payload: bytes) -> bytes:
        change = loads(payload)
        gid, uids = change.get("gid"), change.get("uids")
        if not isinstance(gid, str) or not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
            raise BadPayload("gid and uids are required")
        self.router._count(KIND_CHANGED)
        self.groups.forget(gid, uids)
        for uid in uids:
            self.fanout.forgetCursors(uid)
        return b""

    def _sendTo(self, nodes: Iterable[str], kind: str, payload: bytes) -> None:
        forwarded = self.router.forwarded
        for node in nodes:
            forwarded[kind] = forwarded.get(kind, 0) + 1
            self.cluster.send(node, kind, payload).addErrback(self._sendFailed, node, kind)

    def _sendFailed(self, failure: Failure, node: str, kind: str) -> None:
        # A group message not delivered there waits in the group's history
        # (and the node's next message of the group fills the gap).
        self.log.info("{kind} to node {node} failed: {why}", kind=kind, node=node, why=failure.getErrorMessage())


class ClusterGroups(Groups):
    """
    L{Groups} whose stored messages are appended and routed by the group's
    owner node.

    @ivar forwarded: messages handed to another node's group owner.
    @ivar appendedForOthers: messages stored here for senders on other
        nodes.
    """

    def __init__(
        self, *args: Any, cluster: ClusterService, routing: GroupRouting, duplicates: Any = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.cluster = cluster
        self.routing = routing
        self.duplicates = duplicates
        self.forwarded = 0
        self.appendedForOthers = 0
        cluster.addHandler(KIND_APPEND, self._appendReceived)

    def owner(self, gid: str) -> str:
        try:
            return self.cluster.ownership.owner(groupKey(gid))
        except NoOwner:
            return self.cluster.nodeId

    def appendAndRoute(
        self, state: GroupState, sender: str, message: TimMessage, dedupe: tuple[str, int] | None, echo: bool
    ) -> Deferred[Appended]:
        owner = self.owner(state.gid)
        if owner == self.cluster.nodeId:
            return self._appendHere(state, sender, message, dedupe, echo)
        payload = pack(
            state.gid.encode(),
            sender.encode(),
            codec.encode_compact(message),
            b"%d" % dedupe[1] if dedupe is not None else b"",
            b"1" if echo else b"",
        )
        sent = False

        def failed(failure: Failure) -> Any:
            if not sent:
                # Refused before anything left this node (the owner is not
                # a live member here, or too busy): store it here.
                return self._appendHere(state, sender, message, dedupe, echo)
            if failure.check(TimProtocolError):
                return failure
            return Failure(MaybeStored(ErrorCode.ERR_DATABASE, "message may not be stored, send it again"))

        d: Deferred[Any] = self.cluster.request(owner, KIND_APPEND, payload)
        d.addCallbacks(appendAnswer, failed)
        sent = True
        self.forwarded += 1
        return d

    def route(self, state: GroupState, encoded: Encoded, seq: int, echoTo: str | None) -> None:
        self.routing.route(state.gid, state.members, encoded, seq, echoTo, echoTo is not None)

    def _appendHere(
        self, state: GroupState, sender: str, message: TimMessage, dedupe: tuple[str, int] | None, echo: bool
    ) -> Deferred[Appended]:
        return Groups.appendAndRoute(self, state, sender, message, dedupe, echo)

    def _appendReceived(self, node: str, payload: bytes) -> Deferred[bytes]:
        gid, sender, body, clientId, echo = unpack(payload, 5)
        message = thrift(TimMessage, body)
        uid = text(sender)
        dedupe = (uid, integer(clientId)) if clientId else None
        self.appendedForOthers += 1
        d: Deferred[Any] = self.directory.get(text(gid))

        def found(state: GroupState | None) -> Any:
            if state is None:
                raise TimProtocolError(ErrorCode.ERR_NOEXIST, "no such group")
            appending = self._appendHere(state, uid, message, dedupe, bool(echo))
            duplicates = self.duplicates
            if dedupe is not None and duplicates is not None and duplicates.peek(*dedupe)[0]:
                # The sender's keys are in memory here too (it has a
                # session here): add this one, so a resend here is known.
                duplicates.remember(uid, dedupe[1], appending, groupConversation(state.gid))
            return appending

        d.addCallback(found)
        return d.addCallbacks(lambda appended: pack(b"ok", codec.encode_compact(appended.message), b""), refusalAnswer)
