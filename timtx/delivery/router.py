# -*- test-case-name: timtx.test.test_router -*-
"""
The single-node L{IRouter}: every session is on this node.

Services decide I{what} a user gets; the router decides I{where} it goes.
Here that is always this node's sessions.  The cluster replaces this router
with one that also sends to the nodes holding a user's other sessions, and
the services do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from zope.interface import implementer

from timtx.delivery.encoded import Encoded
from timtx.interfaces import IRouter

if TYPE_CHECKING:
    from timtx.delivery.fanout import GroupFanout
    from timtx.delivery.inbox import InboxDelivery
    from timtx.delivery.registry import SessionRegistry


@implementer(IRouter)
class LocalRouter:
    """
    Routes to the sessions of this node.
    """

    def __init__(self, sessions: SessionRegistry, inbox: InboxDelivery, fanout: GroupFanout):
        self.sessions = sessions
        self.inbox = inbox
        self.fanout = fanout

    def push(self, uid: str, qid: int, message: Encoded) -> None:
        self.inbox.push(uid, qid, message)

    def pushAfterLook(self, uid: str, qid: int, message: Encoded) -> None:
        # The push is held while the look reads the inbox.
        self.inbox.recheck(uid, qid - 1)
        self.inbox.push(uid, qid, message)

    def send(self, uid: str, timType: int, message: Encoded) -> None:
        for session in self.sessions.sessionsView(uid):
            session.sendPayload(timType, message.payload(session.encoding))

    def sendFrame(self, uid: str, header: bytes, payload: bytes) -> None:
        for session in self.sessions.sessionsView(uid):
            if not session.closed:
                session.sink.writeFrameParts(header, payload)

    def pushToGroup(self, gid: str, members: Iterable[str], message: Encoded, skip: str | None = None) -> int:
        return self.fanout.deliver(gid, members, message, skip)

    def sendToGroup(self, members: Iterable[str], timType: int, message: Encoded, skip: str | None = None) -> None:
        for uid in members:
            if uid != skip:
                self.send(uid, timType, message)

    def isOnline(self, uid: str) -> bool:
        return self.sessions.isOnline(uid)

    def reread(self, uid: str) -> None:
        self.inbox.recheck(uid)
