# -*- test-case-name: timtx.test.test_architecture -*-
"""
The seams between floors, as zope interfaces.

Each floor of timtx (see C{docs/architecture.md}) talks to the floor above or
beside it only through what is declared here:

  - a client connection (L{timtx.transports}) is handed an L{IClientNode}
    and gets L{ISession}s from it; it is an L{IFrameSink} to them;
  - the chat services (L{timtx.chat}) reach users through an L{IRouter},
    which decides whether "deliver this to user U" means a local session or
    another node.

The interfaces name what crosses a seam and nothing else, so that a
downstream subclass, a test double or the cluster can stand in for either
side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from timtx.protocols.codec import Encoding
from timtx.protocols.structs import TimAuth, TimStruct


@dataclass(frozen=True)
class Route:
    """
    How frames of one type are handled once a client is logged in.

    @ivar bodyType: the struct a frame's payload decodes into, or C{None}
        for frames whose payload is empty or not a struct (the handler then
        receives the raw payload bytes).
    @ivar handler: C{handler(session, body)}; may return a L{Deferred}.  A
        L{timtx.protocols.errors.TimProtocolError} it raises becomes an error
        ack.
    """

    bodyType: type[TimStruct] | None
    handler: Callable[[Any, Any], Any]


class IFrameSink(Interface):
    """
    Where a session's frames go: one client connection, whatever its
    transport.
    """

    frameKind = Attribute(
        "How this sink frames bytes (C{'ws'}, C{'tcp'}); sinks of one kind share frames made by L{prepareFrame}."
    )
    congested = Attribute("Whether the peer is behind in reading what was written.")
    peerAddress = Attribute("The client's address (a host) as this node sees it, for logs and login budgets.")
    backlog = Attribute("Bytes written since the connection became congested.")

    def writeFrame(frame: bytes) -> None:
        """
        Write one whole frame (bytes).
        """

    def writeFrameParts(header: bytes, payload: bytes) -> None:
        """
        Write one frame given as header and payload, so that a payload shared
        by many sessions is not copied per session where the transport can
        avoid it.
        """

    def prepareFrame(frame: bytes) -> Any:
        """
        Turn a frame into what L{writePrepared} writes, once for all sinks of
        this kind.
        """

    def writePrepared(prepared: Any, size: int) -> None:
        """
        Write a frame made by L{prepareFrame}; C{size} is the frame's length.
        """

    def closeConnection(reason: str) -> None:
        """
        Stop reading and close cleanly after what was written.
        """


class ISession(Interface):
    """
    One logged-in client, as its connection sees it.
    """

    uid = Attribute("The account id (tim's C{node}).")
    encoding = Attribute("The L{timtx.protocols.codec.Encoding} of every frame pushed to it, fixed at login.")
    generation = Attribute(
        "The L{timtx.protocols.structs.Generation} whose Thrift layouts it reads and writes: decided at login, "
        "raised to tim 2.1 by the connection when a frame proves it (L{timtx.protocols.generations})."
    )

    def ackReceived(ackId: int) -> None:
        """
        The client acknowledged the server frame C{ackId}.
        """

    def sendAck(timType: int, **fields: object) -> None:
        """
        Send C{TimAck{ok: true, timType, ...fields}}.
        """

    def connectionLost() -> None:
        """
        The connection closed; nothing is written to it any more.
        """


class IClientNode(Interface):
    """
    What a client connection needs from the node it serves: admission, login,
    the handlers of frame types, and its settings.  L{timtx.node.Node}
    provides it; a connection never reaches further into the node.
    """

    clock = Attribute("The L{twisted.internet.interfaces.IReactorTime} for timeouts.")
    reactor = Attribute("The reactor, for transports that need one (autobahn, twisted.web).")
    config = Attribute(
        "The node's L{timtx.config.Config}.  Its C{[client]} section holds the defaults of a connection's "
        "limits, which a protocol subclass may override."
    )

    def connectionOpened(connection: IFrameSink) -> bool:
        """
        A connection was accepted.

        @return: C{False} if the node is at C{max_connections}; the
            connection should then refuse the client.
        """

    def connectionClosed(connection: IFrameSink) -> None:
        """
        A connection opened with L{connectionOpened} closed.
        """

    def login(sink: IFrameSink, auth: TimAuth, encoding: Encoding) -> Deferred[Any]:
        """
        Authenticate a TimAuth and start a session on C{sink} within the
        device limits.

        @param sink: the connection, an L{IFrameSink}.
        @param auth: the L{timtx.protocols.structs.TimAuth}.
        @param encoding: the encoding of every frame pushed to the session.
        @return: a L{Deferred} firing with the L{ISession} (its TIMAUTH ack
            not yet sent), or failing with a
            L{timtx.protocols.errors.TimProtocolError}.
        """

    def sessionReady(session: Any) -> None:
        """
        C{session} has its TIMAUTH ack: start delivering to it.
        """

    def sessionEnded(session: Any) -> None:
        """
        The connection of C{session} closed.
        """

    def routeFor(timType: int) -> Route | None:
        """
        @return: the L{Route} for frames of C{timType}, or C{None} if the node
            does not handle them.
        """

    def register(auth: TimAuth) -> Deferred[str]:
        """
        Create an account (C{/tim2} TIMREGISTER).

        @return: a L{Deferred} firing with the new account id.
        """

    def issueToken(auth: TimAuth, peer: str) -> Deferred[int]:
        """
        Issue a one-time login token (C{/tim2} TIMTOKEN) to a client at
        address C{peer}.

        @return: a L{Deferred} firing with the token.
        """


class IRouter(Interface):
    """
    Where "deliver this to user U" is decided.

    On a single node every user's sessions are local; in a cluster the
    router knows which nodes hold a user's sessions and sends there.  Callers
    do not know the difference.  Messages are given already encoded
    (L{timtx.delivery.encoded.Encoded}), so that one message going to many
    sessions is encoded once per encoding.
    """

    def push(uid: str, qid: int, message: Any) -> None:
        """
        Push a durable inbox entry of C{uid} to its live sessions, asking for
        an ack that removes the entry from the inbox.  Call in the order
        entries were written.
        """

    def pushAfterLook(uid: str, qid: int, message: Any) -> None:
        """
        L{push}, after C{uid}'s live sessions have looked in its inbox for
        an older entry that was never pushed to them: another writer may
        have just stored one in the same conversation and its push may still
        be on its way (a conversation that changed owners,
        L{timtx.chat.conversations.Appended.handover}).  If a session finds
        one, it reads its inbox, in order, instead of taking this push live.
        """

    def send(uid: str, timType: int, message: Any) -> None:
        """
        Send to every session of C{uid} without storing or asking for an ack:
        for what is worthless later (streams, presence, echoes).
        """

    def sendFrame(uid: str, header: bytes, payload: bytes) -> None:
        """
        Send a frame made once for every session of C{uid} (a big payload:
        C{header} then C{payload}, written without copying per session).
        """

    def pushToGroup(gid: str, members: Iterable[str], message: Any, skip: str | None) -> int:
        """
        Push a durable group message to the live sessions of C{members} but
        C{skip}; acks move each member's cursor.

        @return: how many sessions it was written to on this node.
        """

    def sendToGroup(members: Iterable[str], timType: int, message: Any, skip: str | None) -> None:
        """
        L{send} to every member but C{skip}.
        """

    def isOnline(uid: str) -> bool:
        """
        @return: whether C{uid} has a session anywhere.
        """

    def reread(uid: str) -> None:
        """
        Have C{uid}'s live sessions, wherever they are, read its inbox
        again: something may be stored there that was never pushed (the
        first copy of a resend recognised by its id, whose storing node may
        have died before routing it).  What waits arrives as offline lists,
        before anything pushed to the user from then on.
        """
