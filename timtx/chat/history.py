# -*- test-case-name: timtx.test.test_messaging -*-
"""
TIMPULLMESSAGE: a conversation's history, newest first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from timtx.crypto.vault import StanzaVault
from timtx.persistence.interfaces import IMessageStore
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessageList, TimReq

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session


class History:
    """
    @param limit: most messages in one answer (C{[messages] history_limit}).
    """

    def __init__(self, *, store: IMessageStore, vault: StanzaVault, limit: int):
        self.store = store
        self.vault = vault
        self.limit = limit

    @inlineCallbacks
    def send(self, session: Session, conv: str, request: TimReq) -> Any:
        """
        Send C{conv}'s history before the C{mid} in C{reqInt} (0: from the
        newest), at most C{reqInt2} and never more than L{limit} messages.
        Recalled and burned messages appear as tombstones.  An empty history
        gets an empty list.
        """
        cursor = request.reqInt or 0
        limit = self.limit if request.reqInt2 is None else request.reqInt2
        if limit < 1 or cursor < 0:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "reqInt must be >= 0 and reqInt2 >= 1")
        rows = yield self.store.history(conv, cursor or None, min(limit, self.limit))
        messages = [self.vault.openMessage(row.conv, row.seq, row.stanza) for row in rows]
        session.send(TimType.TIMPULLMESSAGE, TimMessageList(messageList=messages))
