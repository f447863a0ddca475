# -*- test-case-name: timtx.test.test_messaging -*-
"""
Where a client's messages enter: TIMMESSAGE, TIMREVOKEMESSAGE and
TIMBURNMESSAGE, and TIMPULLMESSAGE.

Every message is checked here by the rules common to all
(L{timtx.chat.messagerules}), then handed to 1:1 or group messaging by its
addressing: a C{roomTid} or msType 3 makes it a group's.  An error ack
carries the message's C{id} in C{t}, so the client can tell which message
was refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks

from timtx.chat.conversations import pairConversation
from timtx.chat.groups.messages import GroupMessages
from timtx.chat.history import History
from timtx.chat.messagerules import checkFromClient, tagged
from timtx.chat.messaging import PersonalMessaging
from timtx.protocols.constants import ErrorCode, MsType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage, TimReq

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session


class InboundMessages:
    """
    @param maxBodyBytes: C{[messages] max_body_bytes}.
    """

    def __init__(self, *, personal: PersonalMessaging, groups: GroupMessages, history: History, maxBodyBytes: int):
        self.personal = personal
        self.groups = groups
        self.history = history
        self.maxBodyBytes = maxBodyBytes

    def handleMessage(self, session: Session, message: TimMessage) -> Any:
        """
        The route of TIMMESSAGE, TIMREVOKEMESSAGE and TIMBURNMESSAGE.
        """
        clientId = message.id
        try:
            checkFromClient(session, message, self.maxBodyBytes)
            if message.roomTid is not None or message.msType == MsType.SOURCE_ROOM:
                result = self.groups.handle(session, message)
            else:
                result = self.personal.handle(session, message)
        except TimProtocolError as e:
            if clientId is not None:
                e.ackFields.setdefault("t", clientId)
            raise
        if result is not None and clientId is not None and isinstance(result, Deferred):
            result.addErrback(tagged, clientId)
        return result

    @inlineCallbacks
    def handlePull(self, session: Session, request: TimReq) -> Any:
        """
        The route of TIMPULLMESSAGE: rtype 1 (or none) is the history with
        the user in C{node}, rtype 2 the history of the group in C{node}.
        """
        if request.rtype == 2:
            conv = yield self.groups.historyConversation(session, request)
        elif request.rtype in (None, 1):
            if not request.node:
                raise TimProtocolError(ErrorCode.ERR_PARAMS, "TimReq.node is required")
            conv = pairConversation(session.uid, request.node)
        else:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"unknown history rtype {request.rtype}")
        yield self.history.send(session, conv, request)
