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

Group messages go once to each node holding members, which fans them out
to its own sessions: L{pushToGroup} and L{sendToGroup} hand them to
L{timtx.cluster.groups.GroupRouting} when a node has one (it sets
L{ClusterRouter.groups}).  Virtual rooms route their frames themselves,
through the room's holder (L{timtx.cluster.rooms}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.cluster.directory import UserDirectory
from timtx.cluster.membership import ClusterService
from timtx.cluster.wire import integer, pack, text, unpack
from timtx.delivery.encoded import Encoded
from timtx.interfaces import IRouter
from timtx.protocols.codec import Encoding

if TYPE_CHECKING:
    from timtx.delivery.fanout import GroupFanout
    from timtx.delivery.router import LocalRouter

KIND_PUSH = "route.push"
KIND_SEND = "route.send"
KIND_FRAME = "route.frame"


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
    """

    log = Logger()

    def __init__(self, local: LocalRouter, directory: UserDirectory, cluster: ClusterService):
        self.local = local
        self.directory = directory
        self.cluster = cluster
        self.forwarded: dict[str, int] = {}
        self.received: dict[str, int] = {}
        #: Routes group messages once per node (set by L{GroupRouting}).
        self.groups: GroupRoute | None = None
        cluster.addHandler(KIND_PUSH, self._pushReceived)
        cluster.addHandler(KIND_SEND, self._sendReceived)
        cluster.addHandler(KIND_FRAME, self._frameReceived)

    # IRouter.

    def push(self, uid: str, qid: int, message: Encoded) -> None:
        self.local.push(uid, qid, message)
        self._forward(uid, KIND_PUSH, lambda: pack(*_encodings(message), uid.encode(), b"%d" % qid))

    def send(self, uid: str, timType: int, message: Encoded) -> None:
        self.local.send(uid, timType, message)
        self._forward(uid, KIND_SEND, lambda: pack(*_encodings(message), uid.encode(), b"%d" % timType))

    def sendFrame(self, uid: str, header: bytes, payload: bytes) -> None:
        self.local.sendFrame(uid, header, payload)
        self._forward(uid, KIND_FRAME, lambda: pack(header, payload, uid.encode()))

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

    def _forward(self, uid: str, kind: str, payload: Callable[[], bytes]) -> None:
        nodes = self.directory.nodes(uid)
        if nodes is None:
            self.directory.locate(uid).addCallback(self._sendTo, kind, payload)
        else:
            self._sendTo(nodes, kind, payload)

    def _sendTo(self, nodes: frozenset[str], kind: str, payload: Callable[[], bytes]) -> None:
        me = self.cluster.nodeId
        data = None
        for node in nodes:
            if node == me:
                continue
            if data is None:
                data = payload()
            self.forwarded[kind] = self.forwarded.get(kind, 0) + 1
            self.cluster.send(node, kind, data).addErrback(self._sendFailed, node, kind)

    def _sendFailed(self, failure: Failure, node: str, kind: str) -> None:
        # A push not delivered stays in the inbox; what is sent unstored
        # (presence, echoes) is worthless later anyway.
        self.log.info("{kind} to node {node} failed: {why}", kind=kind, node=node, why=failure.getErrorMessage())

    # Receiving.

    def _count(self, kind: str) -> None:
        self.received[kind] = self.received.get(kind, 0) + 1

    def _pushReceived(self, node: str, payload: bytes) -> None:
        compact, json, uid, qid = unpack(payload, 4)
        self._count(KIND_PUSH)
        self.local.push(text(uid), integer(qid), Encoded.prepared(compact, json))

    def _sendReceived(self, node: str, payload: bytes) -> None:
        compact, json, uid, timType = unpack(payload, 4)
        self._count(KIND_SEND)
        self.local.send(text(uid), integer(timType), Encoded.prepared(compact, json))

    def _frameReceived(self, node: str, payload: bytes) -> None:
        header, body, uid = unpack(payload, 3)
        self._count(KIND_FRAME)
        self.local.sendFrame(text(uid), header, body)


def _encodings(message: Encoded) -> tuple[bytes, bytes]:
    return message.payload(Encoding.COMPACT), message.payload(Encoding.JSON)
