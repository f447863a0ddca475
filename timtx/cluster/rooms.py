# -*- test-case-name: timtx.test.test_clusterrooms -*-
"""
Virtual rooms across the nodes of a cluster.

Each room has a I{holder}: the rendezvous owner of C{room:<vnode>} among
the live members (L{timtx.cluster.ownership}).  The holder keeps the room
itself (founder, private flag, publishers, allowed users, the frame
counter) and the set of other nodes with subscribers; a node, not each
subscriber, is the unit.  Every other node keeps a I{mirror} of a room
while some of its sessions subscribe to it: the rules (so that a second
subscriber there needs no round trip) and the last frame id it saw.

Operations from any node:

  - register: the node draws room ids until it draws one it holds itself
    (about as many draws as there are nodes, at most C{4 x nodes}), so
    that a founder who also publishes costs no extra hop; if none comes,
    it asks the holder of the last one (C{room.create}).
  - remove, grant, take back, allow, disallow: done by the holder
    (C{room.manage}); the holder sends the new rules to every node with
    subscribers (C{room.rules}; a disallowed user's subscriptions end
    there too) or tells them the room is gone (C{room.gone}).
  - subscribe: a node without a mirror asks the holder (C{room.join}),
    which checks the rules and adds the node; with a mirror it subscribes
    at once.  When a node's last subscriber of a room leaves (unsubscribes,
    disconnects, is disallowed), it tells the holder (C{room.leave}).

Stream frames go publisher's node -> holder -> each node with
subscribers.  We chose this over sending from the publisher's node
straight to the subscribers' nodes because the holder is the one place
that can number a room's frames (C{id} 1, 2, 3... in one order for every
subscriber, however many publishers on however many nodes), check push
permission against the current rules, and know the current node set; a
publisher's node with a stale copy of the node set would miss a node that
just subscribed.  It costs one extra hop when the publisher is not on the
holder, which the id draw above avoids for the founder.  The publisher's
node sends the raw body (C{room.push}, one-way: the publisher never waits;
a refusal comes back as C{room.refused} and is sent to the publishing
session as an error ack); the holder numbers it, writes it to its own
subscribers, and sends it once to each other node with subscribers
(C{room.frame}), already encoded (Thrift compact, the form most clients
take).  That node writes it to its subscribers with the single-node
fan-out (L{timtx.chat.vrooms.streams.fanOut}: encoded once per encoding,
written to many, slow subscribers isolated); JSON and raw forms are made
there at most once per frame, from the compact one.  Only compact crosses,
not JSON too: stream bodies are mostly binary, which JSON's base64 would
send again a third larger.

A slow or dead node holds up nobody.  Frames to another node (and pushes
to the holder) are sent while what already waits for that node stays
within C{[vrooms] node_stream_buffer_bytes}, the same rule as for a slow
subscriber's stream buffer; past it the frame is not sent to that node,
and counted (L{ClusterVRoomService.dropped}).  The node sees the gap in
the frame ids when the next frame arrives and adds it to each local
subscription's C{missed}, so its subscribers learn it as they learn a
local drop.  Nothing else is delayed: the publisher is not paused, other
nodes get every frame, and the link (which carries messages too) is never
filled to its own limit by streams.

Ownership moves.  At every change of membership each node looks at the
rooms it has: a room it holds but no longer owns is handed to the new
holder (C{room.join} carrying the rules, and the node stays as a
subscriber node if it has subscribers); a mirror whose holder changed
registers again with the new holder, carrying its copy of the rules and
its last frame id; a mirror of a room this node now owns becomes the room.
The holder also keeps a copy of the rules on its successor (the node that
owns the room if the holder goes), so a room survives its holder's death
even when no other node mirrors it.  The new holder takes the newest
rules (by version) and the highest frame id it is told, so ids keep
rising; frames in flight when the holder died are lost (a live stream is
worthless late), and subscribers see them as a gap.  Rooms are kept in
memory only, as on one node: the shared store holds nothing about them;
they survive as long as one copy of the rules is on a live node.

While views of the membership differ (the seconds a change takes to
spread, or a node wrongly declared dead by some), a node takes whatever it
is asked, and takes frames from the holder of its previous view too (the
node that lost the room in its view may not know yet), so the subscribers
of a node that took a room over keep getting the old holder's frames; ids
only rise, so none is delivered twice or out of order.  Frames may still be
lost then (numbered by two holders, the later of two equal ids is dropped).  Every sweep of idle rooms
also re-registers each mirror with its holder and hands over rooms held
in the wrong place, so such splits heal within one sweep interval.

A publisher's order.  Ids alone do not keep it across such a split: a push
held up on the link to the old holder and numbered by it after the heal
gets an id above those the new holder gave meanwhile to the publisher's
later pushes.  So the publisher's node stamps each push (L{Stamp}) with
its publishing session (a source: a random id of this process and the
session's id in it) and a number from one counter of the process, which
rises with every push; the holder puts the stamp in the frame it sends
on.  Each node that delivers (the holder to its subscribers, a node with
subscribers to its) remembers per room the last number taken from each
session (C{VRoom.stamps}) and drops, counted as refused C{out-of-order},
a push or frame whose number is not above it: a push dropped takes no id,
a frame dropped is a gap its subscribers see in C{missed}.  Late is lost,
never out of order.  The order is a session's, not a user's: ordering two
sessions (a publisher logged in again elsewhere, or on two devices at
once) would need the nodes' clocks to agree, and a clock behind would
silence the later session; so a new session's frames may still overtake
its old one's, as before.  At most C{max_publishing_sessions} sessions
are remembered per room, the one heard from longest ago forgotten.  The
stamp is two fields at the end of C{room.push} and C{room.frame}, sent to
nodes that offer L{ORDER_FEATURE}; from one that does not, frames and
pushes come unstamped and are taken by their ids, as before.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from itertools import count
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.chat.business import requireNode
from timtx.chat.vrooms.registry import ROOM_ID_BYTES, Subscription, VRoom
from timtx.chat.vrooms.service import VROOM_ALLOW, VROOM_DISALLOW, VRoomService, flag
from timtx.chat.vrooms.streams import Stamp, StreamFrame
from timtx.cluster.directory import UserDirectory
from timtx.cluster.membership import ClusterService
from timtx.cluster.ownership import NoOwner, Ownership, roomKey
from timtx.cluster.swim import ChangeKind, MemberChange
from timtx.cluster.wire import BadPayload, dumps, integer, loads, pack, text, unpack
from timtx.crypto.ids import new_random_id
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType, VRoomOp
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimReq, TimStream

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session

KIND_CREATE = "room.create"
KIND_JOIN = "room.join"
KIND_LEAVE = "room.leave"
KIND_MANAGE = "room.manage"
KIND_RULES = "room.rules"
KIND_GONE = "room.gone"
KIND_PUSH = "room.push"
KIND_REFUSED = "room.refused"
KIND_FRAME = "room.frame"

#: Offered by nodes that stamp pushes and frames with their publishing
#: session's order (the two fields at the end of C{room.push} and
#: C{room.frame}); a node that does not offer it is sent neither.
ORDER_FEATURE = "room.order"

#: The longest source a stamp may name (this node's are 23 characters).
MAX_SOURCE_CHARS = 64

#: Seconds between sweeps when rooms never expire: the sweep also heals
#: the node sets (see the module docstring).
HEAL_INTERVAL = 10.0

#: Rooms that ended here remembered, so that a late copy of their rules
#: (a mirror registering again before it heard) does not bring them back.
ENDED_MEMORY = 4096

_MANAGE_OPS = ("remove", "grant", "revoke", "allow", "disallow")


class RemoteStreamFrame(StreamFrame):
    """
    A frame that arrived encoded in Thrift compact from the room's holder:
    compact subscribers get those bytes as they are; the struct (for JSON,
    raw and C{missed} forms) is decoded once, when first needed.
    """

    __slots__ = ()

    def __init__(self, compact: bytes):
        super().__init__(None)  # type: ignore[arg-type]
        self._compact = compact

    @property
    def stream(self) -> TimStream:
        if self.message is None:
            self.message = codec.decode_compact(TimStream, self.payload(Encoding.COMPACT))
        stream: TimStream = self.message
        return stream

    def payload(self, encoding: Encoding) -> bytes:
        if encoding is Encoding.JSON and self._json is None:
            # Encoded would encode its message, which is decoded first.
            self._json = codec.encode_json(self.stream)
        return super().payload(encoding)


def _error(code: int, text: str, n: str | None = None) -> TimProtocolError:
    error = TimProtocolError(code, text)
    if n is not None:
        error.ackFields["n"] = n
    return error


def roomRules(room: VRoom) -> dict[str, Any]:
    """
    What another node needs to hold or mirror C{room}, as JSON.
    """
    return {
        "vnode": room.vnode,
        "founder": room.founder,
        "private": room.private,
        "publishers": sorted(room.publishers),
        "allowed": sorted(room.allowed),
        "version": room.version,
        "seq": room.seq,
    }


class RoomRules:
    """
    A room's rules as another node sent them, checked.
    """

    __slots__ = ("vnode", "founder", "private", "publishers", "allowed", "version", "seq")

    def __init__(self, message: Any):
        if not isinstance(message, dict):
            raise BadPayload("rules are not an object")
        private, version, seq = message.get("private"), message.get("version"), message.get("seq")
        publishers, allowed = message.get("publishers"), message.get("allowed")
        if not isinstance(private, bool) or not isinstance(version, int) or not isinstance(seq, int):
            raise BadPayload("private, version and seq are required")
        if not isinstance(publishers, list) or not isinstance(allowed, list):
            raise BadPayload("publishers and allowed are lists")
        if not all(isinstance(u, str) for u in publishers + allowed):
            raise BadPayload("publishers and allowed are account ids")
        self.vnode: str = _text(message, "vnode")
        self.founder: str = _text(message, "founder")
        self.private: bool = private
        self.version: int = version
        self.seq: int = seq
        self.publishers: set[str] = set(publishers)
        self.allowed: set[str] = set(allowed)

    def asDict(self) -> dict[str, Any]:
        """
        The rules as L{roomRules} gives them, to send on.
        """
        return {
            "vnode": self.vnode,
            "founder": self.founder,
            "private": self.private,
            "publishers": sorted(self.publishers),
            "allowed": sorted(self.allowed),
            "version": self.version,
            "seq": self.seq,
        }


class ClusterVRoomService(VRoomService):
    """
    L{VRoomService} whose rooms are held by their owner node in the
    cluster and mirrored on the nodes of their subscribers.

    @ivar nodes: for each room held here, the other nodes with subscribers.
    @ivar replicas: copies of the rules of rooms this node is the
        successor for, by room.
    @ivar sent: peer messages sent, by kind.
    @ivar received: peer messages handled, by kind.
    @ivar dropped: frames (C{room.frame}) and pushes (C{room.push}) not
        sent because too much already waited for their node.
    @ivar refused: peer messages refused, by reason (C{unknown-room},
        C{not-holder}, C{no-permission}, C{stale}, C{out-of-order},
        C{bad-payload}).
    @ivar failed: messages that could not be sent (their node unreachable),
        by kind.
    """

    log = Logger()

    def __init__(
        self, *args: Any, cluster: ClusterService, directory: UserDirectory, peerOutputBytes: int, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.cluster = cluster
        self.directory = directory
        self.nodeBufferBytes = min(self.config.node_stream_buffer_bytes, peerOutputBytes // 2)
        self.nodes: dict[str, set[str]] = {}
        self.replicas: dict[str, RoomRules] = {}
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._failing: set[tuple[str, str]] = set()
        self._ended: OrderedDict[str, None] = OrderedDict()
        #: For each node declared dead, the rooms held here it had
        #: subscribers of, until it comes back or is forgotten.
        self._lost: dict[str, set[str]] = {}
        self._ownership = cluster.ownership
        #: Draws a room id of so many bytes (one from a seed in the
        #: deterministic simulation, L{timtx.test.groupsim}).
        self.newId: Callable[[int], str] = new_random_id
        #: The view before the last change of ownership.
        self._previous: Ownership | None = None
        #: This process, in the source of the stamps of its sessions'
        #: pushes: a session id is unique only within one process.
        self._process = secrets.token_hex(8)
        self._pushes = count(1)
        cluster.offer(ORDER_FEATURE)
        handlers: dict[str, Callable[[str, bytes], Any]] = {
            KIND_CREATE: self._createReceived,
            KIND_JOIN: self._joinReceived,
            KIND_LEAVE: self._leaveReceived,
            KIND_MANAGE: self._manageReceived,
            KIND_RULES: self._rulesReceived,
            KIND_GONE: self._goneReceived,
            KIND_PUSH: self._pushReceived,
            KIND_REFUSED: self._refusedReceived,
            KIND_FRAME: self._frameReceived,
        }
        for kind, handler in handlers.items():
            cluster.addHandler(kind, self._counted(kind, handler))
        cluster.addObserver(self._membershipChanged)
        cluster.addLinkObserver(self._linkChanged)

    def startService(self) -> None:
        super().startService()
        if not self._sweep.running:
            self._sweep.start(HEAL_INTERVAL, now=False)

    def stopService(self) -> Any:
        if self.sent or self.received:
            self.log.info("virtual rooms across nodes, since start: {counters}", counters=self.counters())
        return super().stopService()

    # Who holds what.

    @property
    def nodeId(self) -> str:
        return self.cluster.nodeId

    def holder(self, vnode: str, ownership: Ownership | None = None) -> str:
        """
        The node that holds room C{vnode} in this node's view.
        """
        try:
            return (ownership or self.cluster.ownership).owner(roomKey(vnode))
        except NoOwner:
            return self.nodeId

    def _successor(self, vnode: str, ownership: Ownership | None = None) -> str | None:
        """
        The node that would hold C{vnode} if its holder went, if that
        holder is this node.
        """
        try:
            owners = (ownership or self.cluster.ownership).owners(roomKey(vnode), 2)
        except NoOwner:
            return None
        return owners[1] if len(owners) == 2 and owners[0] == self.nodeId else None

    def _held(self, vnode: str) -> VRoom | None:
        room = self.registry.get(vnode)
        return room if room is not None and room.mirrorOf is None else None

    def _servedHere(self, vnode: str) -> bool:
        """
        Whether this node answers for room C{vnode}: it holds it, or is its
        holder in this node's view (and then it does not exist).
        """
        return self._held(vnode) is not None or self.holder(vnode) == self.nodeId

    # Counting and sending.

    def _counted(self, kind: str, handler: Callable[[str, bytes], Any]) -> Callable[[str, bytes], Any]:
        def handle(node: str, payload: bytes) -> Any:
            self.received[kind] = self.received.get(kind, 0) + 1
            try:
                return handler(node, payload)
            except BadPayload:
                self._refuse("bad-payload")
                raise

        return handle

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _send(self, node: str, kind: str, payload: bytes) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + 1
        self.cluster.send(node, kind, payload).addErrback(self._sendFailed, node, kind)

    def _sendBounded(self, node: str, kind: str, payload: bytes) -> bool:
        """
        Send a frame or push to C{node} unless too much already waits for
        it; then drop it and count it.
        """
        waiting = self.cluster.waiting(node)
        if waiting is not None and waiting + len(payload) > self.nodeBufferBytes:
            self.dropped[kind] = self.dropped.get(kind, 0) + 1
            return False
        self._send(node, kind, payload)
        return True

    def _sendFailed(self, failure: Failure, node: str, kind: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1
        if (node, kind) in self._failing:
            # Frames come many a second: one line per node until it is
            # back (a change of membership).
            return
        self._failing.add((node, kind))
        self.log.info("{kind} to node {node} failed: {why}", kind=kind, node=node, why=failure.getErrorMessage())

    def _ask(self, node: str, kind: str, message: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """
        Ask C{node}; its refusal comes back as the L{TimProtocolError} it
        raised, and a node that cannot be asked as a retryable error.
        """
        self.sent[kind] = self.sent.get(kind, 0) + 1
        d: Deferred[Any] = self.cluster.request(node, kind, dumps(message))
        d.addCallbacks(_answer, self._askFailed, errbackArgs=(node, kind, message.get("vnode")))
        return d

    def _askFailed(self, failure: Failure, node: str, kind: str, vnode: Any) -> Failure:
        self.log.info("{kind} to node {node} failed: {why}", kind=kind, node=node, why=failure.getErrorMessage())
        n = vnode if isinstance(vnode, str) else None
        return Failure(_error(ErrorCode.ERR_DATABASE, "the virtual room's node cannot be reached, try again", n))

    def _answering(self, f: Callable[[], dict[str, Any] | None]) -> bytes:
        """
        The answer to a request: what C{f} returns, or the error it raised.
        """
        try:
            result = f()
        except TimProtocolError as e:
            return _refusal(e)
        return dumps(result or {})

    # TIMVROOM from this node's sessions.

    def _register(self, session: Session, request: TimReq) -> Any:
        private = flag(request, "1 for a private room")
        vnode = self._drawId()
        holder = self.holder(vnode)
        if holder == self.nodeId:
            room = self.registry.register(session.uid, private=private, vnode=vnode)
            self.log.info("{uid} registered virtual room {vnode}", uid=session.uid, vnode=vnode)
            return self._replicated(room).addCallback(
                lambda _: session.sendAck(TimType.TIMVROOM, n=vnode, t=VRoomOp.REGISTER)
            )
        d = self._ask(holder, KIND_CREATE, {"vnode": vnode, "founder": session.uid, "private": private})
        d.addCallback(lambda _: session.sendAck(TimType.TIMVROOM, n=vnode, t=VRoomOp.REGISTER))
        return d

    def _drawId(self) -> str:
        # Each draw is held here with a chance of 1 in N: 4N draws alone
        # miss about once in 55 (e^-4), and a room created here would then
        # be held elsewhere; 32 more make a miss about once in 10^8 for
        # small clusters, for a hash per member and draw.
        draws = 4 * max(len(self.cluster.ownership.nodes), 1) + 32
        for _ in range(draws):
            vnode = self.newId(ROOM_ID_BYTES)
            if self.holder(vnode) == self.nodeId and vnode not in self.registry:
                return vnode
        return vnode

    def _remove(self, session: Session, request: TimReq) -> Any:
        return self._manage(session, request, "remove", VRoomOp.REMOVE)

    def _grant(self, session: Session, request: TimReq) -> Any:
        return self._manage(session, request, "grant", VRoomOp.ADDAUTH)

    def _revoke(self, session: Session, request: TimReq) -> Any:
        return self._manage(session, request, "revoke", VRoomOp.DELAUTH)

    def _allow(self, session: Session, request: TimReq) -> Any:
        return self._manage(session, request, "allow", VROOM_ALLOW)

    def _disallow(self, session: Session, request: TimReq) -> Any:
        return self._manage(session, request, "disallow", VROOM_DISALLOW)

    @inlineCallbacks
    def _manage(self, session: Session, request: TimReq, op: str, rtype: int) -> Any:
        """
        A founder's operation, done by the room's holder (this node or
        another).  The founder is answered once the new rules reached the
        holder's successor (L{_rulesChanged}): a change it is told was
        made outlives the holder.
        """
        vnode = requireNode(request)
        user = None if op == "remove" else requireNode(request, "node2")
        if user is not None and op in ("grant", "allow") and not (yield self.accounts.exists(user)):
            raise _error(ErrorCode.ERR_ACCOUNT, "no such user", user)
        if self._servedHere(vnode):
            self._applyManage(session.uid, vnode, op, user)
            yield self._rulesChanged(vnode)
        else:
            message = {"vnode": vnode, "uid": session.uid, "op": op, "user": user}
            yield self._ask(self.holder(vnode), KIND_MANAGE, message)
        session.sendAck(TimType.TIMVROOM, n=user or vnode, t=rtype)

    def _subscribe(self, session: Session, request: TimReq) -> Any:
        vnode = requireNode(request)
        binary = flag(request, "1 for binary frames")
        room = self.registry.get(vnode)
        if self._servedHere(vnode) or (room is not None and room.maySubscribe(session.uid)):
            # Held here, or mirrored with rules that let the user in.  A
            # mirror that says no may not have the founder's latest leave
            # yet: the holder decides.
            return super()._subscribe(session, request)
        holder = self.holder(vnode)
        d = self._ask(holder, KIND_JOIN, {"vnode": vnode, "uid": session.uid, "subscribe": True})
        d.addCallback(self._joined, session, binary, holder)
        return d

    def _joined(self, answer: dict[str, Any], session: Session, binary: bool, holder: str) -> None:
        room = self._mirror(holder, RoomRules(answer))
        if session.closed:
            self._leaveIfEmpty(room)
            return
        try:
            self.registry.subscribe(session, room.vnode, binary=binary)
        except TimProtocolError:
            self._leaveIfEmpty(room)
            raise
        session.sendAck(TimType.TIMVROOM, n=room.vnode, t=VRoomOp.SUB)

    def _status(self, session: Session, request: TimReq) -> None:
        vnode = requireNode(request)
        if vnode not in self.registry and self.holder(vnode) != self.nodeId:
            # Held elsewhere, and not subscribed here.
            raise _error(ErrorCode.ERR_PARAMS, "not subscribed", vnode)
        super()._status(session, request)

    # Subscriber nodes.

    def _mirror(self, holder: str, rules: RoomRules) -> VRoom:
        """
        This node's mirror of a room C{holder} holds, made or updated from
        its rules.
        """
        fresh = rules.vnode not in self.registry
        room = self.registry.adopt(rules.vnode, rules.founder, rules.private, mirrorOf=holder)
        if fresh:
            # Frames before this one were not missed here.
            room.seq = rules.seq
        self._tell(
            self.registry.applyRules(room, rules.private, rules.publishers, rules.allowed, rules.version),
            VRoomOp.SUBCANCEL,
        )
        return room

    def endSubscriptions(self, ended: list[Subscription]) -> None:
        rooms = {id(s.room): s.room for s in ended}
        for room in rooms.values():
            self._leaveIfEmpty(room)

    def _leaveIfEmpty(self, room: VRoom) -> None:
        """
        A mirror without subscribers is dropped, and its holder told.
        """
        if room.mirrorOf is None or room.subscribers or self.registry.get(room.vnode) is not room:
            return
        self.registry.forget(room.vnode)
        self._send(room.mirrorOf, KIND_LEAVE, dumps({"vnode": room.vnode}))

    # Frames.

    def push(
        self, session: Session, vnode: str, body: bytes, dtype: int | None = None, timType: int = TimType.TIMSTREAM
    ) -> tuple[int, int]:
        if self._servedHere(vnode):
            return super().push(session, vnode, body, dtype, timType)
        holder = self.holder(vnode)
        sid = self.directory.sessionId(session)
        fields = (vnode, session.uid, str(sid), "" if dtype is None else str(dtype))
        payload = pack(*(f.encode() for f in fields), b"%d" % timType, body)
        if ORDER_FEATURE in self.cluster.peerFeatures(holder):
            payload += _packStamp(self._stampFor(sid))
        self._sendBounded(holder, KIND_PUSH, payload)
        return 0, 0

    def stamp(self, session: Session) -> Stamp:
        return self._stampFor(self.directory.sessionId(session))

    def _stampFor(self, sid: int) -> Stamp:
        """
        The stamp of the next push of session C{sid} of this node: one
        counter for all sessions and rooms of the process (it only has to
        rise within each session), and a source unique in the cluster.
        """
        return f"{self._process}.{sid}", next(self._pushes)

    def publish(
        self, room: VRoom, publisher: str, body: bytes, dtype: int | None = None, stamp: Stamp | None = None
    ) -> StreamFrame:
        frame = super().publish(room, publisher, body, dtype, stamp)
        if stamp is not None:
            self._remember(room, stamp)
        return frame

    def deliver(self, room: VRoom, frame: StreamFrame) -> tuple[int, int]:
        counts = super().deliver(room, frame)
        nodes = self.nodes.get(room.vnode) if room.mirrorOf is None else None
        if nodes:
            payload = pack(room.vnode.encode(), b"%d" % room.seq, frame.payload(Encoding.COMPACT))
            stamped = payload + _packStamp(frame.stamp) if frame.stamp is not None else payload
            for node in list(nodes):
                ordered = ORDER_FEATURE in self.cluster.peerFeatures(node)
                self._sendBounded(node, KIND_FRAME, stamped if ordered else payload)
        return counts

    def _late(self, room: VRoom, stamp: Stamp | None) -> bool:
        """
        Whether a frame stamped C{stamp} comes after one its session
        pushed later (or the same one twice): then it is dropped, not
        delivered out of its publisher's order; counted as refused
        (C{out-of-order}).  Unstamped frames (from a node that does not
        offer L{ORDER_FEATURE}) are never late.
        """
        if stamp is None:
            return False
        last = room.stamps.get(stamp[0])
        if last is None or stamp[1] > last:
            return False
        self._refuse("out-of-order")
        return True

    def _remember(self, room: VRoom, stamp: Stamp) -> None:
        """
        C{stamp} is the last taken here from its session; past
        C{max_publishing_sessions} the session heard from longest ago is
        forgotten (its late frames would be taken, as unstamped ones).
        """
        source, number = stamp
        stamps = room.stamps
        stamps[source] = max(number, stamps.get(source, number))
        stamps.move_to_end(source)
        while len(stamps) > self.config.max_publishing_sessions:
            stamps.popitem(last=False)

    def _pushReceived(self, node: str, payload: bytes) -> None:
        vnode, uid, sid, dtype, timType, body, *stampFields = unpack(payload, 6, optional=2)
        stamp = _stamp(stampFields)
        room = self._held(text(vnode))
        if room is None:
            self._refusePush(node, "unknown-room", uid, sid, vnode, timType, ErrorCode.ERR_NOEXIST)
        elif not room.mayPublish(text(uid)):
            self._refusePush(node, "no-permission", uid, sid, vnode, timType, ErrorCode.ERR_AUTH)
        elif not self._late(room, stamp):
            # A late push is not numbered: no subscriber sees a gap for it.
            self.deliver(room, self.publish(room, text(uid), body, integer(dtype) if dtype else None, stamp))

    def _refusePush(
        self, node: str, reason: str, uid: bytes, sid: bytes, vnode: bytes, timType: bytes, code: int
    ) -> None:
        self._refuse(reason)
        why = "no such virtual room" if code == ErrorCode.ERR_NOEXIST else "no push permission in this virtual room"
        message = {"uid": text(uid), "sid": integer(sid), "vnode": text(vnode), "timType": integer(timType)}
        self._send(node, KIND_REFUSED, dumps({**message, "code": code, "text": why}))

    def _refusedReceived(self, node: str, payload: bytes) -> None:
        message = loads(payload)
        uid, vnode = _text(message, "uid"), _text(message, "vnode")
        sid, timType, code = message.get("sid"), message.get("timType"), message.get("code")
        if not isinstance(sid, int) or not isinstance(timType, int) or not isinstance(code, int):
            raise BadPayload("sid, timType and code are required")
        session = self.directory.sessionFor(uid, sid)
        if session is not None and not session.closed:
            session.sendError(timType, TimProtocolError(code, str(message.get("text", ""))), n=vnode)

    def _frameReceived(self, node: str, payload: bytes) -> None:
        vnode, seq, compact, *stampFields = unpack(payload, 3, optional=2)
        stamp = _stamp(stampFields)
        room = self.registry.get(text(vnode))
        if room is None:
            # Nobody subscribes here (any more): the holder should not send.
            self._refuse("unknown-room")
            self._send(node, KIND_LEAVE, dumps({"vnode": text(vnode)}))
            return
        if not self._mayNumber(node, room):
            self._refuse("not-holder")
            return
        number = integer(seq)
        if number <= room.seq:
            self._refuse("stale")
            return
        if self._late(room, stamp):
            # Its id is not taken: the next frame's gap counts it as
            # missed here.
            return
        gap = number - room.seq - 1
        if gap:
            # Dropped for this node on the way (or lost with a holder):
            # each subscriber here missed them.
            for subscription in room.subscribers.values():
                subscription.missed += gap
        room.seq = number
        room.lastActivity = self.clock.seconds()
        room.frames.mark()
        room.bytes.mark(len(compact))
        frame = RemoteStreamFrame(compact)
        if stamp is not None:
            frame.stamp = stamp
            self._remember(room, stamp)
        if room.mirrorOf is None:
            # Numbered by the previous holder while views differ: for the
            # subscribers here only; the other nodes hear it from it too.
            VRoomService.deliver(self, room, frame)
        else:
            self.deliver(room, frame)

    def _mayNumber(self, node: str, room: VRoom) -> bool:
        """
        Whether frames of C{room} from C{node} are taken: from the node
        this node registered with or the holder in its view (even if this
        node holds the room too), and, while
        views of a change differ (the node that lost the room in this
        view may not know yet), from the holder before the last change,
        even if this node took the room over.  Ids only rise, so nothing
        is taken twice or out of order.
        """
        if node == self.nodeId:
            return False
        if node in (room.mirrorOf, self.holder(room.vnode)):
            # A node holding a room its view says another holds (it was
            # handed it by a node whose view differs) takes that one's
            # frames too.
            return True
        return self._previous is not None and node == self.holder(room.vnode, self._previous)

    # The holder's side.

    def _createReceived(self, node: str, payload: bytes) -> Deferred[bytes]:
        message = loads(payload)
        vnode, founder, private = _text(message, "vnode"), _text(message, "founder"), message.get("private")
        if not isinstance(private, bool):
            raise BadPayload("private is required")
        try:
            room = self.registry.register(founder, private=private, vnode=vnode)
        except TimProtocolError as e:
            return succeed(_refusal(e))
        self.log.info("{uid} registered virtual room {vnode} from node {node}", uid=founder, vnode=vnode, node=node)
        return self._replicated(room).addCallback(lambda _: dumps({}))

    def _joinReceived(self, node: str, payload: bytes) -> bytes:
        message = loads(payload)
        vnode, uid, subscribe = _text(message, "vnode"), message.get("uid"), message.get("subscribe")
        rules = RoomRules(message["rules"]) if message.get("rules") is not None else None
        if (uid is not None and not isinstance(uid, str)) or not isinstance(subscribe, bool):
            raise BadPayload("uid and subscribe have the wrong type")

        def join() -> dict[str, Any]:
            if vnode in self._ended and self._held(vnode) is None:
                raise _error(ErrorCode.ERR_NOEXIST, "virtual room ended", vnode)
            if rules is not None and self._held(vnode) is None:
                self.log.info("taking over virtual room {vnode}, its rules from node {node}", vnode=vnode, node=node)
            room = self._restore(rules) if rules is not None else self._held(vnode)
            if rules is not None and room is not None:
                # A copy on the successor, as for a room registered here.
                self._sendRules(room, self._successor(vnode))
            if room is None:
                raise _error(ErrorCode.ERR_NOEXIST, "no such virtual room", vnode)
            if uid is not None and not room.maySubscribe(uid):
                raise _error(ErrorCode.ERR_AUTH, "this virtual room needs the founder's leave", vnode)
            if subscribe and node != self.nodeId:
                self.nodes.setdefault(vnode, set()).add(node)
            return roomRules(room)

        return self._answering(join)

    def _restore(self, rules: RoomRules) -> VRoom:
        """
        Hold the room C{rules} describe (handed over, or registered again
        by a subscriber node after its holder went), keeping the newest
        rules and the highest frame id.
        """
        room = self.registry.adopt(rules.vnode, rules.founder, rules.private, mirrorOf=None)
        self.nodes.setdefault(room.vnode, set())
        self._tell(
            self.registry.applyRules(room, rules.private, rules.publishers, rules.allowed, rules.version),
            VRoomOp.SUBCANCEL,
        )
        room.seq = max(room.seq, rules.seq)
        self.replicas.pop(room.vnode, None)
        return room

    def _leaveReceived(self, node: str, payload: bytes) -> None:
        vnode = _text(loads(payload), "vnode")
        nodes = self.nodes.get(vnode)
        if nodes is not None:
            nodes.discard(node)

    def _manageReceived(self, node: str, payload: bytes) -> Deferred[bytes]:
        message = loads(payload)
        vnode, uid, op, named = _text(message, "vnode"), _text(message, "uid"), message.get("op"), message.get("user")
        if op not in _MANAGE_OPS or (op != "remove" and not isinstance(named, str)):
            raise BadPayload("op and user are required")
        try:
            self._applyManage(uid, vnode, op, str(named))
        except TimProtocolError as e:
            return succeed(_refusal(e))
        return self._rulesChanged(vnode).addCallback(lambda _: dumps({}))

    def _applyManage(self, uid: str, vnode: str, op: str, user: str | None) -> None:
        """
        Do founder C{uid}'s operation on room C{vnode}, held here.

        @raise TimProtocolError: if it is refused.
        """
        if self._held(vnode) is None:
            raise _error(ErrorCode.ERR_NOEXIST, "no such virtual room", vnode)
        registry = self.registry
        if op == "remove":
            room = registry.managed(uid, vnode)
            self._tell(registry.remove(uid, vnode), VRoomOp.REMOVE)
            self.log.info("{uid} removed virtual room {vnode}", uid=uid, vnode=vnode)
            self.roomEnded(room)
            return
        assert user is not None
        if op == "grant":
            registry.grant(uid, vnode, user)
        elif op == "revoke":
            registry.revoke(uid, vnode, user)
        elif op == "allow":
            registry.allow(uid, vnode, user)
        else:
            self._tell(registry.disallow(uid, vnode, user), VRoomOp.SUBCANCEL)

    def _rulesChanged(self, vnode: str) -> Deferred[None]:
        """
        Send the held room's new rules to the nodes that mirror it, and to
        its successor as a request: fires once the successor has them (or
        could not be told), so that a founder is answered only when the
        change would outlive this node.  Sent as messages and nothing
        else, a change was lost whenever this node died before flushing
        them: acknowledged, yet gone with it.
        """
        room = self._held(vnode)
        if room is None:
            return succeed(None)
        successor = self._successor(vnode)
        self._sendRules(room, *(n for n in self.nodes.get(vnode, ()) if n != successor))
        return self._replicated(room)

    def _replicated(self, room: VRoom) -> Deferred[None]:
        """
        Give the held C{room}'s successor its rules, as a request: fires
        once it has them, or could not be told (L{_rulesChanged}).
        """
        successor = self._successor(room.vnode)
        if successor is None or successor == self.nodeId:
            return succeed(None)
        self.sent[KIND_RULES] = self.sent.get(KIND_RULES, 0) + 1
        d = self.cluster.request(successor, KIND_RULES, dumps(roomRules(room)))
        d.addErrback(self._sendFailed, successor, KIND_RULES)
        return d.addCallback(lambda _: None)

    def _sendRules(self, room: VRoom, *nodes: str | None) -> None:
        payload = dumps(roomRules(room))
        for node in {n for n in nodes if n is not None and n != self.nodeId}:
            self._send(node, KIND_RULES, payload)

    def roomEnded(self, room: VRoom) -> None:
        if room.mirrorOf is not None:
            return
        self._ended[room.vnode] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        nodes = self.nodes.pop(room.vnode, set())
        payload = dumps({"vnode": room.vnode})
        for node in {*nodes, self._successor(room.vnode)}:
            if node is not None and node != self.nodeId:
                self._send(node, KIND_GONE, payload)

    def _rulesReceived(self, node: str, payload: bytes) -> None:
        rules = RoomRules(loads(payload))
        room = self.registry.get(rules.vnode)
        if room is not None and room.mirrorOf is not None:
            ended = self.registry.applyRules(room, rules.private, rules.publishers, rules.allowed, rules.version)
            self._tell(ended, VRoomOp.SUBCANCEL)
        if room is None or room.mirrorOf is not None:
            self.replicas[rules.vnode] = rules

    def _goneReceived(self, node: str, payload: bytes) -> None:
        vnode = _text(loads(payload), "vnode")
        self.replicas.pop(vnode, None)
        room = self.registry.get(vnode)
        if room is None or room.mirrorOf is None:
            if room is not None:
                self._refuse("not-holder")
            return
        self._tell(self.registry.forget(vnode), VRoomOp.REMOVE)

    # Ownership moves.

    def _membershipChanged(self, change: MemberChange) -> None:
        new = self.cluster.ownership
        old, self._ownership = self._ownership, new
        if old != new:
            self._previous = old
        node = change.member.nodeId
        self._failing = {(n, kind) for n, kind in self._failing if n != node}
        if change.kind in (ChangeKind.DIED, ChangeKind.LEFT, ChangeKind.FORGOTTEN):
            lost = {vnode for vnode, nodes in self.nodes.items() if node in nodes}
            for vnode in lost:
                self.nodes[vnode].discard(node)
            if change.kind is ChangeKind.DIED and lost:
                self._lost.setdefault(node, set()).update(lost)
            else:
                self._lost.pop(node, None)
        elif change.kind is ChangeKind.JOINED and node in self._lost:
            # Declared dead while alive (a saturated node answers probes
            # late): it may never have seen a change that would make it
            # register again, so take its rooms back now.  If it did
            # restart, its first frame tells us it has no subscribers.
            for vnode in self._lost.pop(node):
                if vnode in self.nodes:
                    self.nodes[vnode].add(node)
        if old != new:
            self._settle(old, rejoin=False)

    def _linkChanged(self, node: str, path: str | None) -> None:
        """
        A link to C{node} is up (new, back, or to a restarted process):
        register again with it the rooms it holds that this node mirrors
        or keeps a copy of, as a sweep does, and give it again the copy of
        the rooms held here whose successor it is.  A node killed and
        started again before anyone declared it dead changes no ownership,
        and has lost its rooms and copies: without this a holder's rooms
        would come back at the next sweep at best, and a room mirrored
        nowhere, whose rules only its successor's copy has, never (nor
        any room whose successor, then holder, restarted so).
        """
        if path is None:
            return
        for room in self.registry.rooms():
            if room.mirrorOf is None:
                if self._successor(room.vnode) == node:
                    self._sendRules(room, node)
            elif room.mirrorOf == node and self.holder(room.vnode) == node:
                self._join(room, node, subscribe=True)
        for vnode, rules in list(self.replicas.items()):
            if vnode not in self.registry and self.holder(vnode) == node:
                self._join(None, node, subscribe=False, rules=rules.asDict())

    def expire(self) -> None:
        super().expire()
        self._settle(self.cluster.ownership, rejoin=True)

    def _settle(self, old: Ownership, rejoin: bool) -> None:
        """
        Put every room where the current view says: hand over what this
        node holds and no longer owns, take what it mirrors (or keeps a
        copy of) and now owns, and register its mirrors with their holders
        (again, with C{rejoin}, which heals node sets that went wrong).
        """
        me = self.nodeId
        for room in self.registry.rooms():
            holder = self.holder(room.vnode)
            if room.mirrorOf is None:
                if holder != me:
                    self._handOver(room, holder)
                elif self._successor(room.vnode, old) != self._successor(room.vnode):
                    self._sendRules(room, self._successor(room.vnode))
            elif holder == me:
                self.log.info("taking over virtual room {vnode} from {node}", vnode=room.vnode, node=room.mirrorOf)
                replica = self.replicas.get(room.vnode)
                self._restore(replica if replica is not None else RoomRules(roomRules(room)))
                self._sendRules(room, self._successor(room.vnode))
            elif holder != room.mirrorOf or rejoin:
                self.registry.setMirror(room, holder)
                self._join(room, holder, subscribe=True)
        for vnode, rules in list(self.replicas.items()):
            if vnode in self.registry:
                continue
            if self.holder(vnode) == me:
                self.log.info("taking over virtual room {vnode} from its copy", vnode=vnode)
                self._sendRules(self._restore(rules), self._successor(vnode))
            else:
                try:
                    owners = self.cluster.ownership.owners(roomKey(vnode), 2)
                except NoOwner:
                    owners = []
                if owners[1:] != [me]:
                    del self.replicas[vnode]

    def _handOver(self, room: VRoom, holder: str) -> None:
        self.log.info("handing virtual room {vnode} over to {node}", vnode=room.vnode, node=holder)
        self.nodes.pop(room.vnode, None)
        if room.subscribers:
            self.registry.setMirror(room, holder)
            self._join(room, holder, subscribe=True)
        else:
            rules = roomRules(room)
            self.registry.forget(room.vnode)
            self._join(None, holder, subscribe=False, rules=rules)

    def _join(self, room: VRoom | None, holder: str, subscribe: bool, rules: dict[str, Any] | None = None) -> None:
        """
        Register this node with C{holder} as one with subscribers of
        C{room}, handing it this node's copy of the rules.
        """
        rules = rules if rules is not None else roomRules(room) if room is not None else None
        assert rules is not None
        d = self._ask(holder, KIND_JOIN, {"vnode": rules["vnode"], "uid": None, "subscribe": subscribe, "rules": rules})
        if room is not None:
            d.addCallback(self._rejoined, room, holder)
        d.addErrback(self._joinFailed, rules["vnode"], holder)

    def _rejoined(self, answer: dict[str, Any], room: VRoom, holder: str) -> None:
        if self.registry.get(room.vnode) is room and room.mirrorOf == holder:
            rules = RoomRules(answer)
            ended = self.registry.applyRules(room, rules.private, rules.publishers, rules.allowed, rules.version)
            self._tell(ended, VRoomOp.SUBCANCEL)

    def _joinFailed(self, failure: Failure, vnode: str, holder: str) -> None:
        room = self.registry.get(vnode)
        error = failure.value
        if isinstance(error, TimProtocolError) and error.code == ErrorCode.ERR_NOEXIST:
            if room is not None and room.mirrorOf == holder:
                # It ended while this node did not hear.
                self._tell(self.registry.forget(vnode), VRoomOp.REMOVE)
            return
        # The next sweep, or the next change of membership, tries again.
        self.log.info(
            "registering virtual room {vnode} with node {node} failed: {why}",
            vnode=vnode,
            node=holder,
            why=failure.getErrorMessage(),
        )

    # For operators.

    def counters(self) -> dict[str, Any]:
        """
        What crossed the mesh for rooms: for the cluster status and
        metrics.
        """
        return {
            "held": sum(1 for room in self.registry.rooms() if room.mirrorOf is None),
            "mirrored": sum(1 for room in self.registry.rooms() if room.mirrorOf is not None),
            "sent": dict(self.sent),
            "received": dict(self.received),
            "dropped": dict(self.dropped),
            "refused": dict(self.refused),
            "failed": dict(self.failed),
        }


def _refusal(error: TimProtocolError) -> bytes:
    """
    The answer to a request that C{error} refused (L{_answer} raises it).
    """
    return dumps({"error": error.code, "text": error.text, "n": error.ackFields.get("n")})


def _answer(data: bytes) -> dict[str, Any]:
    answer = loads(data)
    code = answer.get("error")
    if isinstance(code, int):
        n = answer.get("n")
        raise _error(code, str(answer.get("text", "")), n if isinstance(n, str) else None)
    return answer


def _packStamp(stamp: Stamp) -> bytes:
    """
    The two fields a stamp adds at the end of C{room.push} and
    C{room.frame}: its source and its number (decimal).
    """
    return pack(stamp[0].encode(), b"%d" % stamp[1])


def _stamp(fields: list[bytes]) -> Stamp | None:
    """
    The stamp L{_packStamp} wrote, if the sender added one.
    """
    if not fields:
        return None
    source = text(fields[0])
    if not source or len(source) > MAX_SOURCE_CHARS:
        raise BadPayload(f"a stamp's source has 1 to {MAX_SOURCE_CHARS} characters")
    return source, integer(fields[1])


def _text(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise BadPayload(f"{key} is not a string")
    return value
