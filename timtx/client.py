# -*- test-case-name: timtx.test.test_client -*-
"""
A Twisted client for tim servers (timtx or tim itself), over WebSocket or
raw TCP, in Thrift compact or JSON.

    client = yield connect(reactor, "ws://127.0.0.1:5120/tim", encoding=Encoding.JSON)
    yield client.login("alice", "secret")
    frame = yield client.next(TimType.TIMMESSAGE)

Frames from the server are decoded by type and kept in arrival order until
L{TimClient.next} takes them, or handed to L{TimClient.onFrame} if you set
it.  Frames that ask for an acknowledgement are acknowledged on arrival
unless C{autoAck} is false.

L{TimClient.request} sends a request and waits for I{its} answer: the frame
that answers it among those that arrive after it was sent, never an older
one or somebody else's message; an error ack answering it raises
L{TimRequestFailed} at once.  See L{TimClient.request} for how answers are
matched to requests.

Registration and tokens go over HTTP C{/tim2}: see L{register} and
L{requestToken}.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.http_headers import Headers

from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, NodeInfo, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.frames import (
    LengthPrefixedDecoder,
    client_ack,
    client_frame,
    length_prefixed,
    parse_server_frame,
)
from timtx.protocols.structs import (
    Generation,
    Tid,
    TimAck,
    TimAuth,
    TimMessage,
    TimMessageList,
    TimNodes,
    TimPresence,
    TimReq,
    TimStream,
    TimStruct,
)
from timtx.util.bodies import BytesProducer

#: What the body of each server frame type decodes into; C{None} for frames
#: without a payload.  Other types arrive as raw bytes.
SERVER_BODIES: dict[int, type[TimStruct] | None] = {
    TimType.TIMACK: TimAck,
    TimType.TIMPING: None,
    TimType.TIMMESSAGE: TimMessage,
    TimType.TIMPRESENCE: TimPresence,
    TimType.TIMNODES: TimNodes,
    TimType.TIMPULLMESSAGE: TimMessageList,
    TimType.TIMOFFLINEMSG: TimMessageList,
    TimType.TIMOFFLINEMSGEND: None,
    TimType.TIMSTREAM: TimStream,
}


class TimRequestFailed(Exception):
    """
    The server answered a request with an error ack.

    @ivar ack: the L{TimAck}.
    @ivar code: its error code.
    """

    def __init__(self, ack: TimAck):
        self.ack = ack
        self.code = ack.error.code if ack.error else None
        info = ack.error.info if ack.error else ""
        super().__init__(f"{self.code}: {info}")


class ClientTimeout(Exception):
    """
    Nothing matching arrived within the C{timeout} given: raised, through
    the L{Deferred}, by L{TimClient.next}, L{TimClient.request} and every
    call built on them.  The connection stays open; an answer that comes
    later is kept in L{TimClient.received}.
    """


@dataclass(frozen=True)
class Incoming:
    """
    One frame from the server.

    @ivar body: the decoded struct, C{None} for empty frames, or the raw
        payload for types not in L{SERVER_BODIES}.
    """

    timType: int
    ackId: int | None
    body: Any
    payload: bytes


Match = Callable[[Incoming], bool]


def _matcher(what: int | Match | None) -> Match:
    if what is None:
        return lambda incoming: True
    if isinstance(what, int):
        return lambda incoming: incoming.timType == what
    return what


def ackFor(timType: int) -> Match:
    """
    Matches the TIMACK answering a request of C{timType}.
    """
    return lambda i: i.timType == TimType.TIMACK and i.body is not None and i.body.timType == timType


def answerTo(timType: int) -> Match:
    """
    Matches a frame of C{timType} or the TIMACK refusing a request of it.
    """
    return lambda i: (
        i.timType == timType or (i.timType == TimType.TIMACK and i.body is not None and i.body.timType == timType)
    )


def _ok(i: Incoming, timType: int, t: int | None = None) -> bool:
    """
    Whether C{i} is an ok TimAck answering a C{timType} request (with C{t}).
    """
    ack = i.body
    return (
        i.timType == TimType.TIMACK
        and isinstance(ack, TimAck)
        and bool(ack.ok)
        and ack.timType == timType
        and (t is None or ack.t == t)
    )


def _nodes(i: Incoming, ntype: int) -> bool:
    return i.timType == TimType.TIMNODES and isinstance(i.body, TimNodes) and i.body.ntype == ntype


#: TIMBUSINESS rtypes answered with a TimNodes list, and its ntype.
_LISTS: dict[int, int] = {
    Business.ROSTER: NodeInfo.ROSTER,
    Business.USERROOM: NodeInfo.ROOM,
    Business.ROOMUSERS: NodeInfo.ROOMMEMBER,
    Business.BLOCKROSTERLIST: NodeInfo.BLOCKROSTERLIST,
    Business.BLOCKROOMLIST: NodeInfo.BLOCKROOMLIST,
    Business.BLOCKROOMMEMBERLIST: NodeInfo.BLOCKROOMMEMBERLIST,
}

#: The frame types a message may be sent as; the server answers each with a
#: TIMMESSAGE (90) echo, or an error ack of the type sent.
MESSAGE_TYPES = frozenset({TimType.TIMMESSAGE, TimType.TIMREVOKEMESSAGE, TimType.TIMBURNMESSAGE})


def defaultAnswer(timType: int, body: TimStruct | None, uid: str | None = None) -> Match | None:
    """
    What the server sends back, on success, for a request of C{timType}
    with C{body}: a predicate matching that frame, or C{None} when success
    is silent (presence, stream pushes) or takes many frames (offline
    messages).

      - TIMAUTH: the ok TimAck of type 16.  TIMPING: a TIMPING.
      - TIMMESSAGE, TIMREVOKEMESSAGE, TIMBURNMESSAGE: the echo, a TIMMESSAGE
        (90) from C{uid} with the message's C{id} (stream messages, odType 5,
        have none); or, for a resend of a message no longer in history, an
        ok TimAck of the type sent whose C{t} is its C{mid}.
      - TIMPULLMESSAGE: a TIMPULLMESSAGE list.
      - TIMBUSINESS: the TimNodes list for rtypes 1, 2, 3, 18, 19, 20 (ntype
        1, 2, 3, 8, 9, 10), else the ok TimAck whose C{t} is the rtype.
      - TIMNODES: the TimNodes of the same ntype for reads (4, 5), the ok
        TimAck whose C{t} is the ntype for changes (6, 7).
      - TIMVROOM: the ok TimAck whose C{t} is the rtype and whose C{n} names
        the room (or, for rtypes 3, 4, 101 and 102, the user).
    """
    if timType == TimType.TIMAUTH:
        return lambda i: _ok(i, TimType.TIMAUTH)
    if timType == TimType.TIMPING:
        return lambda i: i.timType == TimType.TIMPING
    if timType in MESSAGE_TYPES and isinstance(body, TimMessage):
        if body.id is None or body.odType == 5:
            return None
        messageId = body.id
        return lambda i: (
            (
                i.timType == TimType.TIMMESSAGE
                and isinstance(i.body, TimMessage)
                and i.body.id == messageId
                and (uid is None or i.body.fromTid is None or i.body.fromTid.node == uid)
            )
            or _ok(i, timType)
        )
    if timType == TimType.TIMPULLMESSAGE:
        return lambda i: i.timType == TimType.TIMPULLMESSAGE
    if timType == TimType.TIMBUSINESS and isinstance(body, TimReq) and body.rtype is not None:
        rtype = body.rtype
        if rtype in _LISTS:
            return lambda i: _nodes(i, _LISTS[rtype])
        return lambda i: _ok(i, TimType.TIMBUSINESS, rtype)
    if timType == TimType.TIMNODES and isinstance(body, TimNodes) and body.ntype is not None:
        ntype = body.ntype
        if ntype in (NodeInfo.USERINFO, NodeInfo.ROOMINFO):
            return lambda i: _nodes(i, ntype)
        return lambda i: _ok(i, TimType.TIMNODES, ntype)
    if timType == TimType.TIMVROOM and isinstance(body, TimReq) and body.rtype is not None:
        rtype = body.rtype
        names = body.node2 if rtype in (3, 4, 101, 102) else body.node if rtype != 1 else None
        return lambda i: _ok(i, TimType.TIMVROOM, rtype) and (names is None or i.body.n == names)
    return None


@dataclass
class _Pending:
    """
    A request waiting for its answer.
    """

    timType: int
    answers: Match
    messageId: int | None
    deferred: Deferred[Incoming]
    timer: Any = field(default=None)

    def refusedBy(self, ack: TimAck) -> bool:
        """
        Whether error C{ack} answers this request: it names this request's
        frame type and, for a message, carries its id in C{t} (or no id, as
        when the frame could not be decoded).
        """
        if self.messageId is not None:
            return ack.timType in MESSAGE_TYPES and ack.t in (None, self.messageId)
        return ack.timType == self.timType


class TimClient:
    """
    The client side of one connection; see the module docstring.

    @ivar received: frames not yet taken by L{next}, oldest first.
    @ivar onFrame: if set, called with every L{Incoming} instead of keeping
        it for L{next}.
    @ivar uid: the account id once logged in.
    """

    maxKept = 100_000

    def __init__(
        self, reactor: Any, encoding: Encoding, autoAck: bool = True, generation: Generation = Generation.TIM20
    ):
        self.reactor = reactor
        self.encoding = encoding
        self.autoAck = autoAck
        #: The tim generation whose Thrift layouts this client writes and
        #: reads (group profiles); a login with a string token makes it 2.1,
        #: with a numeric one 2.0, as the server decides.
        self.generation = generation
        self.received: list[Incoming] = []
        self.onFrame: Callable[[Incoming], Any] | None = None
        self.uid: str | None = None
        self._waiters: list[tuple[Match, Deferred[Incoming], Any]] = []
        self._pending: list[_Pending] = []
        self._transport: Any = None
        self.closed: Deferred[None] = Deferred()
        self.decodeErrors = 0
        #: The WebSocket close code, once closed.
        self.closeCode: int | None = None

    # Wire.

    def _attach(self, transport: Any) -> None:
        self._transport = transport

    @property
    def connected(self) -> bool:
        """
        Whether frames can be sent: open, and not closing.
        """
        return self._transport is not None and self._transport.isOpen()

    def sendRaw(self, frame: bytes) -> None:
        """
        Send one frame's bytes as they are.

        @raise ConnectionDone: if the connection is closed or closing.
        """
        if not self.connected:
            raise ConnectionDone("the connection is closed")
        self._transport.writeFrame(frame)

    def send(self, timType: int, body: TimStruct | None = None) -> None:
        """
        Send a frame, encoding C{body} in this client's encoding (and, for
        compact, its generation's layout).
        """
        payload = b"" if body is None else codec.encode(body, self.encoding, self.generation)
        self.sendRaw(client_frame(timType, payload, self.encoding))

    def ack(self, ackId: int) -> None:
        self.sendRaw(client_ack(ackId, json=self.encoding is Encoding.JSON))

    def disconnect(self) -> Deferred[None]:
        """
        Close the connection; the result fires once it is closed.
        """
        if self.connected:
            self._transport.loseTransport()
        return self.closed

    def _frameReceived(self, data: bytes) -> None:
        try:
            frame = parse_server_frame(data)
        except TimProtocolError:
            self.decodeErrors += 1
            return
        if frame.ackId is not None and self.autoAck and self.connected:
            self.ack(frame.ackId)
        bodyType: Any = SERVER_BODIES.get(frame.timType, bytes)
        body: Any
        if bodyType is None:
            body = None
        elif bodyType is bytes:
            body = frame.payload
        else:
            try:
                body = codec.decode(bodyType, frame.payload, self.encoding, self.generation)
            except TimProtocolError:
                self.decodeErrors += 1
                body = frame.payload
        incoming = Incoming(frame.timType, frame.ackId, body, frame.payload)
        if self._answer(incoming):
            return
        if self.onFrame is not None:
            self.onFrame(incoming)
            return
        for index, (match, d, timeout) in enumerate(self._waiters):
            if match(incoming):
                del self._waiters[index]
                if timeout.active():
                    timeout.cancel()
                d.callback(incoming)
                return
        self.received.append(incoming)
        if len(self.received) > self.maxKept:
            del self.received[0]

    def _answer(self, incoming: Incoming) -> bool:
        """
        Give C{incoming} to the oldest waiting request it answers: an error
        ack it refuses, or the frame it waits for.

        @return: whether a request took it.
        """
        ack = incoming.body
        if incoming.timType == TimType.TIMACK and isinstance(ack, TimAck) and not ack.ok:
            for pending in self._pending:
                if pending.refusedBy(ack):
                    self._settle(pending)
                    pending.deferred.errback(TimRequestFailed(ack))
                    return True
        for pending in self._pending:
            if pending.answers(incoming):
                self._settle(pending)
                pending.deferred.callback(incoming)
                return True
        return False

    def _settle(self, pending: _Pending) -> None:
        self._pending.remove(pending)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()

    def _connectionLost(self, reason: Any) -> None:
        waiting = [(d, timer) for _, d, timer in self._waiters]
        waiting += [(p.deferred, p.timer) for p in self._pending]
        self._waiters = []
        self._pending = []
        for d, timer in waiting:
            if timer is not None and timer.active():
                timer.cancel()
            d.errback(ConnectionDone("connection closed while waiting for a frame"))
        if not self.closed.called:
            self.closed.callback(None)

    # Waiting for frames.

    def next(self, what: int | Match | None = None, timeout: float = 10.0) -> Deferred[Incoming]:
        """
        The oldest frame not yet taken that matches C{what} (a frame type, a
        predicate, or anything), now or when it arrives.

        @raise ClientTimeout: through the L{Deferred}, after C{timeout}
            seconds without one.
        """
        match = _matcher(what)
        for index, incoming in enumerate(self.received):
            if match(incoming):
                del self.received[index]
                return succeed(incoming)
        d: Deferred[Incoming] = Deferred()

        def expire() -> None:
            self._waiters = [w for w in self._waiters if w[1] is not d]
            d.errback(ClientTimeout(f"no matching frame within {timeout}s"))

        self._waiters.append((match, d, self.reactor.callLater(timeout, expire)))
        return d

    def take(self, what: int | Match | None = None) -> list[Incoming]:
        """
        Remove and return every kept frame matching C{what}.
        """
        match = _matcher(what)
        taken = [i for i in self.received if match(i)]
        self.received = [i for i in self.received if not match(i)]
        return taken

    def request(
        self, timType: int, body: TimStruct | None, reply: int | Match | None = None, timeout: float = 10.0
    ) -> Deferred[Incoming]:
        """
        Send a request and wait for its answer.

        The answer is looked for only among frames that arrive after the
        request is sent, and is taken by this request alone (L{next} and
        L{onFrame} do not see it):

          - On success, the frame C{reply} matches: a frame type, a
            predicate, or by default what the server sends back for
            C{timType} (L{defaultAnswer}).  A message (90, 92, 93) is given
            a random C{id} if it has none, and its answer is its own echo,
            never another user's message.
          - An error ack answering it raises L{TimRequestFailed} at once.
            For a message, that is the error ack of a message type whose
            C{t} is the message's id.  Otherwise it is the first error ack
            whose C{timType} is C{timType}: the server handles a
            connection's frames in order, so it answers the oldest request
            of that type still waiting.  (Frames sent with L{send} are not
            tracked: an error answering one of them could be taken by a
            request of the same type waiting at the same time.)

        @return: a L{Deferred} firing with the answer's L{Incoming}.
        @raise TimRequestFailed: through the L{Deferred}, for an error ack.
        @raise ClientTimeout: through the L{Deferred}, after C{timeout}
            seconds without an answer.
        @raise ValueError: if C{reply} is not given and success is silent
            for C{timType} (presence, streams): use L{send}.
        """
        messageId = None
        if timType in MESSAGE_TYPES and isinstance(body, TimMessage):
            if body.id is None:
                body.id = secrets.randbits(53)
            messageId = body.id
        if reply is None:
            answers = defaultAnswer(timType, body, self.uid)
            if answers is None:
                raise ValueError(f"a frame of type {timType} has no answer to wait for; use send()")
        else:
            answers = _matcher(reply)
        pending = _Pending(timType, answers, messageId, Deferred())

        def expire() -> None:
            if pending in self._pending:
                self._pending.remove(pending)
                pending.deferred.errback(ClientTimeout(f"no answer to a type {timType} request within {timeout}s"))

        pending.timer = self.reactor.callLater(timeout, expire)
        self._pending.append(pending)
        try:
            self.send(timType, body)
        except BaseException:
            self._settle(pending)
            raise
        return pending.deferred

    # Operations.

    @inlineCallbacks
    def login(
        self,
        name: str | None = None,
        pwd: str | None = None,
        domain: str | None = None,
        *,
        token: int | str | None = None,
        resource: str | None = None,
        termtyp: int | None = None,
        extend: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Any:
        """
        Log in by name and password, or by C{token}: a number as tim 2.0
        issues it (C{TimAck.t} of L{requestToken}), or a string as tim 2.1
        does (C{TimAck.n}, sent with C{name} and C{domain}).  A string token
        makes this a tim 2.1 client (L{generation}), a number a 2.0 one, as
        the server sees it.

        @return: a L{Deferred} firing with the TIMAUTH L{TimAck}; its C{n}
            is the account id, kept in L{uid}.
        @raise TimRequestFailed: if the server refuses.
        """
        auth = TimAuth(
            name=name, pwd=pwd, domain=domain, token=token, resource=resource, termtyp=termtyp, extend=extend
        )
        if isinstance(token, str):
            self.generation = Generation.TIM21
        elif isinstance(token, int):
            self.generation = Generation.TIM20
        incoming = yield self.request(TimType.TIMAUTH, auth, timeout=timeout)
        self.uid = incoming.body.n
        return incoming.body

    @inlineCallbacks
    def ping(self, timeout: float = 10.0) -> Any:
        """
        Send TIMPING and wait for the answer.
        """
        yield self.request(TimType.TIMPING, None, timeout=timeout)

    @staticmethod
    def _message(to: str | None, dataString: str | None, fields: dict[str, Any]) -> TimMessage:
        fields.setdefault("msType", 2)
        fields.setdefault("odType", 1)
        return TimMessage(dataString=dataString, toTid=Tid(node=to) if to else None, **fields)

    def sendMessage(
        self, to: str | None, dataString: str | None = None, *, timType: int = TimType.TIMMESSAGE, **fields: Any
    ) -> TimMessage:
        """
        Send a TimMessage to user C{to} (C{None} for group messages, with
        C{roomTid} and C{msType=3} in C{fields}).  Nothing is awaited: the
        server echoes the stored message, or answers with an error ack whose
        C{t} is the message's C{id} (if it has one).  L{postMessage} waits
        for that.

        @param fields: any other L{TimMessage} field: C{msType} (2 unless
            given), C{odType} (1 unless given), C{id}, C{roomTid},
            C{dataBinary}, C{udtype}, C{extend}...
        @return: the message sent.
        """
        message = self._message(to, dataString, fields)
        self.send(timType, message)
        return message

    @inlineCallbacks
    def postMessage(
        self,
        to: str | None,
        dataString: str | None = None,
        *,
        timType: int = TimType.TIMMESSAGE,
        timeout: float = 10.0,
        **fields: Any,
    ) -> Any:
        """
        Like L{sendMessage}, and wait for the server's answer: the message
        is given a random C{id} unless C{fields} has one, and its echo is
        matched by it (see L{request}).  Also for recalls (C{odType=2,
        timType=TIMREVOKEMESSAGE, mid=...}) and burns, whose echo is the
        notice.  Stream messages (odType 5) have no echo: use
        L{sendMessage}.

        @return: a L{Deferred} firing with the message as the server
            echoed it: C{mid}, C{seq}, C{timestamp}, C{fromTid} filled in
            (or, if this C{id} was sent before and that message has left
            the history, the ok L{TimAck} whose C{t} is its C{mid}).
        @raise TimRequestFailed: if the server refuses it.
        """
        incoming = yield self.request(timType, self._message(to, dataString, fields), timeout=timeout)
        return incoming.body

    def requestOfflineMessages(self) -> None:
        """
        Ask for the messages that arrived while this user was offline
        (TIMOFFLINEMSG with no payload, as tim clients do after login).
        They come as TIMOFFLINEMSG frames holding a L{TimMessageList} each,
        acknowledged on arrival unless C{autoAck} is off, then one
        TIMOFFLINEMSGEND.  For clients that take frames with L{onFrame};
        L{offlineMessages} collects them.
        """
        self.send(TimType.TIMOFFLINEMSG)

    @inlineCallbacks
    def offlineMessages(self, timeout: float = 10.0, request: bool = True) -> Any:
        """
        Every offline message, in order: lists already received (a timtx
        node sends them unasked after C{[messages] offline_push_after}),
        then, unless C{request} is false, those it sends when asked
        (L{requestOfflineMessages}), until TIMOFFLINEMSGEND.

        @param timeout: seconds to wait for each list.
        @return: a L{Deferred} firing with the L{TimMessage}s.
        """
        messages: list[TimMessage] = []
        ended = False
        for incoming in self.take(lambda i: i.timType in (TimType.TIMOFFLINEMSG, TimType.TIMOFFLINEMSGEND)):
            if incoming.timType == TimType.TIMOFFLINEMSGEND:
                ended = True
            else:
                messages.extend(incoming.body.messageList or ())
        if request:
            self.requestOfflineMessages()
        elif ended:
            return messages
        while True:
            incoming = yield self.next(
                lambda i: i.timType in (TimType.TIMOFFLINEMSG, TimType.TIMOFFLINEMSGEND), timeout
            )
            if incoming.timType == TimType.TIMOFFLINEMSGEND:
                return messages
            messages.extend(incoming.body.messageList or ())

    @inlineCallbacks
    def history(self, node: str, mid: int = 0, limit: int | None = None, rtype: int = 1, timeout: float = 10.0) -> Any:
        """
        TIMPULLMESSAGE: messages with C{node} (a user, or a group with
        C{rtype=2}) before C{mid} (0: from the newest), newest first, at
        most C{limit}.

        @return: a L{Deferred} firing with a list of L{TimMessage}.
        """
        request = TimReq(rtype=rtype, node=node, reqInt=mid, reqInt2=limit)
        incoming = yield self.request(TimType.TIMPULLMESSAGE, request, timeout=timeout)
        return incoming.body.messageList or []

    @inlineCallbacks
    def nodes(self, ntype: int, timeout: float = 10.0, **fields: Any) -> Any:
        """
        Send a TimNodes request (profiles) and wait for its answer: the
        TimNodes for reads (4, 5), the TimAck for changes (6, 7).
        """
        incoming = yield self.request(TimType.TIMNODES, TimNodes(ntype=ntype, **fields), timeout=timeout)
        return incoming.body

    @inlineCallbacks
    def business(self, rtype: int, timeout: float = 10.0, reply: Match | None = None, **fields: Any) -> Any:
        """
        Send a TIMBUSINESS request and wait for its answer: the TimNodes
        list for rtypes 1, 2, 3, 18, 19 and 20, else the TimAck whose C{t}
        is C{rtype} (or what C{reply} matches).

        @return: a L{Deferred} firing with the TimNodes or TimAck.
        """
        incoming = yield self.request(TimType.TIMBUSINESS, TimReq(rtype=rtype, **fields), reply, timeout)
        return incoming.body

    # Virtual rooms and big payloads: see docs/vrooms.md.  (Imports are
    # local to keep this feature's client side in this one block.)

    @inlineCallbacks
    def vroom(
        self,
        rtype: int,
        node: str | None = None,
        node2: str | None = None,
        reqInt: int | None = None,
        timeout: float = 10.0,
    ) -> Any:
        """
        Send a TIMVROOM request and wait for its TimAck: C{t} is C{rtype},
        and C{n} names the room (or, for permissions, the user).

        @raise TimRequestFailed: if the server refuses.
        """
        request = TimReq(rtype=rtype, node=node, node2=node2, reqInt=reqInt)
        incoming = yield self.request(TimType.TIMVROOM, request, timeout=timeout)
        return incoming.body

    @inlineCallbacks
    def vroomRegister(self, private: bool = False, timeout: float = 10.0) -> Any:
        """
        Register a virtual room; C{private} ones need the founder's leave to
        subscribe (a timtx extension).

        @return: a L{Deferred} firing with the room id.
        """
        ack = yield self.vroom(1, reqInt=1 if private else None, timeout=timeout)
        return ack.n

    def vroomRemove(self, vnode: str, timeout: float = 10.0) -> Deferred[TimAck]:
        return self.vroom(2, vnode, timeout=timeout)

    def vroomGrant(self, vnode: str, user: str, timeout: float = 10.0) -> Deferred[TimAck]:
        """
        Let C{user} push into room C{vnode} (founder only).
        """
        return self.vroom(3, vnode, user, timeout=timeout)

    def vroomRevoke(self, vnode: str, user: str, timeout: float = 10.0) -> Deferred[TimAck]:
        return self.vroom(4, vnode, user, timeout=timeout)

    def vroomSubscribe(self, vnode: str, binary: bool = False, timeout: float = 10.0) -> Deferred[TimAck]:
        """
        Subscribe to room C{vnode}: frames arrive as TIMSTREAM TimStreams,
        or with C{binary} as raw TIMBIGBINARYSTREAM frames (see
        L{bigDataOf}).
        """
        return self.vroom(5, vnode, reqInt=1 if binary else None, timeout=timeout)

    def vroomUnsubscribe(self, vnode: str, timeout: float = 10.0) -> Deferred[TimAck]:
        """
        @return: a L{Deferred} firing with the TimAck; its C{t2} is the
            number of frames this subscription missed.
        """
        return self.vroom(6, vnode, timeout=timeout)

    def vroomAllow(self, vnode: str, user: str, timeout: float = 10.0) -> Deferred[TimAck]:
        """
        Let C{user} subscribe to private room C{vnode} (timtx extension).
        """
        return self.vroom(101, vnode, user, timeout=timeout)

    def vroomDisallow(self, vnode: str, user: str, timeout: float = 10.0) -> Deferred[TimAck]:
        return self.vroom(102, vnode, user, timeout=timeout)

    @inlineCallbacks
    def vroomMissed(self, vnode: str, timeout: float = 10.0) -> Any:
        """
        @return: a L{Deferred} firing with how many frames of C{vnode} this
            connection's subscription missed (timtx extension).
        """
        ack = yield self.vroom(103, vnode, timeout=timeout)
        return ack.t2

    def pushStream(self, vnode: str, body: bytes, dtype: int | None = None) -> None:
        """
        Push one frame into room C{vnode}.  Nothing is awaited: success is
        silent, a refusal is a TIMACK with C{timType} 94.
        """
        self.send(TimType.TIMSTREAM, TimStream(VNode=vnode, body=body, dtype=dtype))

    def sendBigData(self, timType: int, target: str, data: bytes, chunkSize: int | None = None) -> None:
        """
        Send a big payload (95, 96 or 97) as timjs does, in one message, or
        in messages of at most C{chunkSize} bytes.
        """
        from timtx.protocols.bigframes import clientBigDataFrame

        frame = clientBigDataFrame(timType, target, data, json=self.encoding is Encoding.JSON)
        step = chunkSize or len(frame)
        for start in range(0, len(frame), step):
            self.sendRaw(frame[start : start + step])

    def bigString(self, to: str, text: str, chunkSize: int | None = None) -> None:
        """
        TIMBIGSTRING: C{text} to user C{to}.
        """
        self.sendBigData(TimType.TIMBIGSTRING, to, text.encode("utf-8"), chunkSize)

    def bigBinary(self, to: str, data: bytes, chunkSize: int | None = None) -> None:
        """
        TIMBIGBINARY: C{data} to user C{to}.
        """
        self.sendBigData(TimType.TIMBIGBINARY, to, data, chunkSize)

    def bigBinaryStream(self, vnode: str, data: bytes, chunkSize: int | None = None) -> None:
        """
        TIMBIGBINARYSTREAM: C{data} pushed into room C{vnode}.
        """
        self.sendBigData(TimType.TIMBIGBINARYSTREAM, vnode, data, chunkSize)

    @staticmethod
    def bigDataOf(incoming: Incoming) -> tuple[str, bytes]:
        """
        The source (sender or room) and data of a big payload the server
        sent (types 95-97, which arrive as raw bytes).
        """
        from timtx.protocols.bigframes import splitBigData

        return splitBigData(incoming.timType, incoming.payload)


# Transports.


class _TimClientWebSocketProtocol(WebSocketClientProtocol):
    client: TimClient
    opened: Deferred[Any]

    def onOpen(self) -> None:
        self.client._attach(self)
        self.opened.callback(self.client)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client._frameReceived(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionDone(f"WebSocket closed during the handshake: {code} {reason}"))
        self.client.closeCode = code
        self.client._connectionLost(reason)

    def writeFrame(self, frame: bytes) -> None:
        self.sendMessage(frame, isBinary=True)

    def isOpen(self) -> bool:
        return bool(self.state == self.STATE_OPEN)

    def loseTransport(self) -> None:
        self.sendClose(1000)


class _TimClientTcpProtocol(Protocol):
    client: TimClient
    opened: Deferred[Any]

    def connectionMade(self) -> None:
        self._decoder = LengthPrefixedDecoder(1 << 30)
        self.client._attach(self)
        self.opened.callback(self.client)

    def dataReceived(self, data: bytes) -> None:
        self._decoder.feed(data)
        while (frame := self._decoder.next_frame()) is not None:
            self.client._frameReceived(frame)

    def connectionLost(self, reason: Any = None) -> None:
        self.client._connectionLost(reason)

    def writeFrame(self, frame: bytes) -> None:
        self.transport.write(length_prefixed(frame))  # type: ignore[union-attr]

    def isOpen(self) -> bool:
        return bool(self.connected) and not getattr(self.transport, "disconnecting", False)

    def loseTransport(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


def _endpoint(reactor: Any, host: str, port: int, tls: bool, tlsOptions: Any) -> Any:
    endpoint: Any = TCP4ClientEndpoint(reactor, host, port, timeout=10)
    if tls:
        if tlsOptions is None:
            from twisted.internet.ssl import optionsForClientTLS

            tlsOptions = optionsForClientTLS(host)
        endpoint = wrapClientTLS(tlsOptions, endpoint)
    return endpoint


def connect(
    reactor: Any,
    url: str,
    encoding: Encoding = Encoding.COMPACT,
    *,
    origin: str | None = "https://github.com/donnie4w/tim",
    autoAck: bool = True,
    tlsOptions: Any = None,
    generation: Generation = Generation.TIM20,
) -> Deferred[TimClient]:
    """
    Connect to C{url}: C{ws://host:port/tim}, C{wss://...}, C{tcp://host:port}
    or C{tls://host:port}.

    @param origin: the WebSocket C{Origin} header (tim requires one; timgo
        sends the one given here by default).  C{None} sends none.
    @param tlsOptions: client TLS options, for example from
        L{twisted.internet.ssl.optionsForClientTLS} with a private trust
        root.
    @param generation: the tim generation whose Thrift layouts to speak
        (only group profiles differ); see L{TimClient.generation}.
    @return: a L{Deferred} firing with a connected, not yet logged-in
        L{TimClient}.
    """
    parsed = urlparse(url)
    client = TimClient(reactor, encoding, autoAck, generation)
    opened: Deferred[TimClient] = Deferred()
    host = parsed.hostname or "127.0.0.1"
    factory: Any
    if parsed.scheme in ("ws", "wss"):
        tls = parsed.scheme == "wss"
        factory = WebSocketClientFactory(url, origin=origin, reactor=reactor)
        factory.protocol = _TimClientWebSocketProtocol
        port = parsed.port or (443 if tls else 80)
    elif parsed.scheme in ("tcp", "tls"):
        tls = parsed.scheme == "tls"
        factory = Factory.forProtocol(_TimClientTcpProtocol)
        port = parsed.port or 5121
    else:
        raise ValueError(f"unsupported URL scheme {parsed.scheme!r}")
    original = factory.buildProtocol

    def buildProtocol(addr: Any) -> Any:
        protocol = original(addr)
        protocol.client = client
        protocol.opened = opened
        return protocol

    factory.buildProtocol = buildProtocol
    d = _endpoint(reactor, host, port, tls, tlsOptions).connect(factory)
    d.addErrback(opened.errback)
    return opened


# HTTP /tim2.


@inlineCallbacks
def _tim2(reactor: Any, url: str, timType: int, auth: TimAuth, encoding: Encoding, trustRoot: Any) -> Any:
    agent = Agent(
        reactor, BrowserLikePolicyForHTTPS(trustRoot) if trustRoot is not None else BrowserLikePolicyForHTTPS()
    )
    body = client_frame(timType, codec.encode(auth, encoding), encoding)
    response = yield agent.request(
        b"POST", url.encode("ascii"), Headers({b"Content-Type": [b"application/octet-stream"]}), BytesProducer(body)
    )
    content = yield readBody(response)
    if response.code != 200:
        raise TimHttpError(response.code, content)
    frame = parse_server_frame(content)
    ack = codec.decode(TimAck, frame.payload, encoding)
    if not ack.ok:
        raise TimRequestFailed(ack)
    return ack


class TimHttpError(Exception):
    """
    C{/tim2} answered with an HTTP status other than 200 (403 when
    registration or tokens are forbidden).
    """

    def __init__(self, status: int, body: bytes):
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}")


def register(
    reactor: Any,
    url: str,
    name: str,
    pwd: str,
    domain: str | None = None,
    encoding: Encoding = Encoding.COMPACT,
    trustRoot: Any = None,
    existing: bool = False,
) -> Deferred[str | None]:
    """
    Register an account at C{url} (C{http://host:port/tim2}).

    @param existing: an account that exists already is fine: the
        L{Deferred} fires with C{None} instead of failing with error 4101
        (so that a script that registers can run again).
    @return: a L{Deferred} firing with the new account id.
    """
    d = _tim2(reactor, url, TimType.TIMREGISTER, TimAuth(name=name, pwd=pwd, domain=domain), encoding, trustRoot)
    d.addCallback(lambda ack: ack.n)
    if existing:

        def exists(failure: Failure) -> None:
            failure.trap(TimRequestFailed)
            error: TimRequestFailed = failure.value  # type: ignore[assignment]
            if error.code != ErrorCode.ERR_HASEXIST:
                failure.raiseException()

        d.addErrback(exists)
    return d


def requestToken(
    reactor: Any,
    url: str,
    name: str,
    pwd: str,
    domain: str | None = None,
    encoding: Encoding = Encoding.COMPACT,
    trustRoot: Any = None,
) -> Deferred[TimAck]:
    """
    Ask C{url} (C{http://host:port/tim2}) for a one-time login token.

    @return: a L{Deferred} firing with the L{TimAck}: C{t} holds the token
        as tim 2.0 sends it, C{n} as tim 2.1 does.
    """
    return _tim2(reactor, url, TimType.TIMTOKEN, TimAuth(name=name, pwd=pwd, domain=domain), encoding, trustRoot)
