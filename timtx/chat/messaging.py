# -*- test-case-name: timtx.test.test_messaging -*-
"""
Messages between two users (TIMMESSAGE, TIMREVOKEMESSAGE, TIMBURNMESSAGE
with msType 2) and their history (TIMPULLMESSAGE rtype 1).

What each odType does:

  - 1 (ORDER_INOF): stored, numbered (C{mid}, and C{seq} in the
    conversation), echoed to all the sender's sessions with the client's
    C{id}, and delivered to the recipient at least once.
  - 2 (ORDER_REVOKE): the sender recalls its own message by C{mid}, within
    C{recall_window}.  The stored message becomes a tombstone, and the
    recipient gets a recall notice.
  - 3 (ORDER_BURN): the recipient burns a message it received, which
    becomes a tombstone; the sender gets the notice.
  - 4 (ORDER_BUSINESS): only the server sends these; from a client, 4104.
  - 5 (ORDER_STREAM): sent to the recipient's online sessions, never stored.
  - 31..127 (custom): delivered at least once through the recipient's inbox,
    not kept in history.
  - 6..30: reserved, 4104.

Handlers check everything they can without waiting, hand the message to the
conversation's owner and return: the next frame of the connection is
handled while the store writes, and the owner keeps the order.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.chat.conversations import Appended, Conversations, pairConversation
from timtx.delivery.inbox import Delivery, Encoded
from timtx.chat.duplicates import DuplicateFilter, InFlight
from timtx.persistence.records import MESSAGE_BURNED, MESSAGE_NORMAL, MESSAGE_RECALLED, Duplicate
from timtx.protocols.constants import ORDER_CUSTOM_MAX, ORDER_RESERVED_MAX, ErrorCode, MsType, OdType, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Tid, TimMessage, TimMessageList, TimReq
from timtx.chat.roster import RelationCache, areFriends, blocked
from timtx.crypto.vault import StanzaVault

if TYPE_CHECKING:
    from timtx.chat.accounts import AccountService
    from timtx.config import MessagesConfig
    from timtx.delivery.sessions import Session, SessionRegistry


def contentSize(message: TimMessage) -> int:
    """
    Bytes of a message's content, the part C{max_body_bytes} bounds.
    """
    size = len(message.dataString.encode("utf-8")) if message.dataString else 0
    size += len(message.dataBinary or b"")
    for key, value in (message.extend or {}).items():
        size += len(key) + len(value)
    for key, blob in (message.extra or {}).items():
        size += len(key) + len(blob)
    return size


def _tagged(failure: Failure, clientId: int) -> Failure:
    if isinstance(failure.value, TimProtocolError):
        failure.value.ackFields.setdefault("t", clientId)
    return failure


def target(message: TimMessage) -> str:
    """
    The user a message is addressed to (checked to be there on arrival).
    """
    return message.toTid.node if message.toTid is not None and message.toTid.node else ""


class MessagingService:
    log = Logger()

    def __init__(
        self,
        config: MessagesConfig,
        store: Any,
        vault: StanzaVault,
        conversations: Conversations,
        delivery: Delivery,
        relations: RelationCache,
        duplicates: DuplicateFilter,
        accounts: AccountService,
        sessions: SessionRegistry,
        clock: IReactorTime,
    ):
        self.config = config
        self.store = store
        self.vault = vault
        self.conversations = conversations
        self.delivery = delivery
        self.relations = relations
        self.duplicates = duplicates
        self.accounts = accounts
        self.sessions = sessions
        self.clock = clock
        #: Set by the groups service: handles msType 3 and messages with a
        #: roomTid.
        self.roomMessages: Any = None

    # Checks.

    def _check(self, session: Session, message: TimMessage) -> None:
        """
        Refuse what a client may not send, before anything is looked up.
        """
        if message.msType == MsType.SOURCE_OS:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "system messages come from the server")
        if message.msType not in (MsType.SOURCE_USER, MsType.SOURCE_ROOM):
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"msType {message.msType} is not known")
        od = message.odType or 0
        if od == OdType.ORDER_BUSINESS:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "business notices come from the server")
        if od < OdType.ORDER_INOF or od > ORDER_CUSTOM_MAX or (OdType.ORDER_STREAM < od <= ORDER_RESERVED_MAX):
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"odType {od} is reserved or out of range")
        if message.bnType is not None or message.isOffline or message.seq is not None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "bnType, isOffline and seq are set by the server")
        if message.fromTid is not None and message.fromTid.node not in (None, "", session.uid):
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "fromTid is set by the server")
        if message.mid is not None and od not in (OdType.ORDER_REVOKE, OdType.ORDER_BURN):
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "mid is set by the server")
        if contentSize(message) > self.config.max_body_bytes:
            raise TimProtocolError(
                ErrorCode.ERR_BIGDATA, f"message content over {self.config.max_body_bytes} bytes", fatal=False
            )

    def stamp(self, session: Session, message: TimMessage) -> None:
        """
        Fill in what only the server sets.
        """
        message.fromTid = session.tid
        message.timestamp = int(self.clock.seconds() * 1e9)
        if message.id is None:
            message.id = secrets.randbits(53)

    @inlineCallbacks
    def _mayMessage(self, session: Session, other: str) -> Any:
        """
        @raise TimProtocolError: 4110 if either blocks the other, 4106 if
            C{other} does not exist, 4105 if they are not friends (unless
            C{noauth}).
        """
        relation = yield self.relations.between(session.uid, other)
        if blocked(relation):
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        if areFriends(relation):
            return
        # As tim: an unknown user is 4106 before friendship is looked at.
        if not (yield self.accounts.exists(other)):
            raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")
        if not self.config.noauth:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not friends")

    # TIMMESSAGE, TIMREVOKEMESSAGE, TIMBURNMESSAGE.

    def handleMessage(self, session: Session, message: TimMessage) -> Any:
        """
        The route of TIMMESSAGE, TIMREVOKEMESSAGE and TIMBURNMESSAGE.  An
        error ack carries the message's C{id} in C{t}, so the client can
        tell which message was refused.
        """
        clientId = message.id
        try:
            result = self._handleMessage(session, message)
        except TimProtocolError as e:
            if clientId is not None:
                e.ackFields.setdefault("t", clientId)
            raise
        if isinstance(result, Deferred) and clientId is not None:
            result.addErrback(_tagged, clientId)
        return result

    def _handleMessage(self, session: Session, message: TimMessage) -> Any:
        self._check(session, message)
        if message.roomTid is not None or message.msType == MsType.SOURCE_ROOM:
            if self.roomMessages is None:
                raise TimProtocolError(ErrorCode.ERR_INTERFACE, "group messages are not served by this node")
            return self.roomMessages(session, message)
        if message.toTid is None or not message.toTid.node:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "toTid is required")
        od = message.odType
        if od == OdType.ORDER_REVOKE:
            return self.recall(session, message)
        if od == OdType.ORDER_BURN:
            return self.burn(session, message)
        return self._send(session, message)

    def sendPrivate(self, session: Session, message: TimMessage) -> Any:
        """
        A message between two members of a group (msType 2 with C{toTid}
        and C{roomTid}): no friendship needed, blocks still apply.  The
        caller checked both memberships.
        """
        return self._send(session, message, private=True)

    def _send(self, session: Session, message: TimMessage, private: bool = False) -> Any:
        """
        Check and store a message to one user.  When the caches already know
        everything the checks need (the usual case), this is done at once,
        without a Deferred; otherwise the caches are filled first.
        """
        other = target(message)
        if self._knownAllowed(session.uid, other, private):
            clientId = message.id
            if clientId is None or not self.duplicates.enabled:
                return self._accept(session, message, other, None)
            loaded, seen = self.duplicates.peek(session.uid, clientId)
            if loaded:
                return self._accept(session, message, other, seen)
        return self._sendChecked(session, message, private)

    def _knownAllowed(self, uid: str, other: str, private: bool) -> bool:
        """
        Whether the caches alone show that C{uid} may message C{other}.
        """
        relations = self.relations.peek(uid)
        if relations is None:
            return False
        relation = relations.get(other)
        if relation is not None and blocked(relation):
            return False
        if private or (relation is not None and areFriends(relation)):
            return True
        return self.config.noauth and self.accounts.isKnown(other)

    @inlineCallbacks
    def _sendChecked(self, session: Session, message: TimMessage, private: bool) -> Any:
        other = target(message)
        clientId = message.id
        if private:
            relation = yield self.relations.between(session.uid, other)
            if blocked(relation):
                raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        else:
            yield self._mayMessage(session, other)
        seen = None
        if clientId is not None and self.duplicates.enabled:
            seen = yield self.duplicates.check(session.uid, clientId)
        yield self._accept(session, message, other, seen)

    def _accept(self, session: Session, message: TimMessage, other: str, seen: Any) -> Any:
        """
        Hand a checked message to its conversation's owner (or answer a
        resend, or send a stream).  Returns without waiting for the store:
        the owner keeps the order, so the connection's next frame may start.
        """
        if seen is not None:
            return self.answerResend(session, seen)
        clientId = message.id
        self.stamp(session, message)
        message.toTid = Tid(node=other, domain=message.toTid.domain)  # type: ignore[union-attr]
        if message.odType == OdType.ORDER_STREAM:
            self.delivery.sendNow(other, TimType.TIMMESSAGE, Encoded(message))
            return None
        keep = message.odType == OdType.ORDER_INOF
        dedupe = (session.uid, clientId) if clientId is not None and self.duplicates.enabled else None
        appending = self.conversations.append(
            pairConversation(session.uid, other), session.uid, message, (other,), keep=keep, dedupe=dedupe
        )
        if dedupe is not None:
            self.duplicates.remember(session.uid, clientId, appending)  # type: ignore[arg-type]
        appending.addCallbacks(
            self._appended, self.notAppended, callbackArgs=(session.uid, other), errbackArgs=(session, message)
        )
        return None

    def _appended(self, appended: Appended, sender: str, recipient: str) -> Appended:
        encoded = Encoded(appended.message)
        self.echo(sender, encoded)
        self.delivery.deliver(recipient, appended.qids[recipient], encoded)
        return appended

    def notAppended(self, failure: Failure, session: Session, message: TimMessage) -> None:
        error = (
            failure.value if isinstance(failure.value, TimProtocolError) else TimProtocolError(ErrorCode.ERR_DATABASE)
        )
        # The client matches the error to its message by id, in t.
        session.sendError(TimType.TIMMESSAGE, error, t=message.id)

    def echo(self, sender: str, encoded: Encoded) -> None:
        """
        Show every session of the sender what it sent, as stored.
        """
        for session in self.sessions.sessionsOf(sender):
            session.sendPayload(TimType.TIMMESSAGE, encoded.payload(session.encoding))

    @inlineCallbacks
    def answerResend(self, session: Session, seen: Any) -> Any:
        """
        Answer a resend with the message first stored, to this session.
        """
        if isinstance(seen, InFlight):
            seen = yield seen.wait()
        if isinstance(seen, Appended):
            session.send(TimType.TIMMESSAGE, seen.message)
            return
        assert isinstance(seen, Duplicate)
        row = None
        if seen.seq is not None and seen.conv:
            row = yield self.store.getMessage(seen.conv, seen.mid)
        if row is not None:
            session.send(TimType.TIMMESSAGE, self.vault.openMessage(row.conv, row.seq, row.stanza))
        else:
            session.sendAck(TimType.TIMMESSAGE, t=seen.mid)

    # Recall and burn.

    @inlineCallbacks
    def _findOwn(self, session: Session, message: TimMessage, sentByMe: bool) -> Any:
        if not message.mid:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "mid is required")
        other = target(message)
        conv = pairConversation(session.uid, other)
        row = yield self.store.getMessage(conv, message.mid)
        if row is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "no such message")
        sender, recipient = (session.uid, other) if sentByMe else (other, session.uid)
        original = self.vault.openMessage(row.conv, row.seq, row.stanza)
        toNode = original.toTid.node if original.toTid else None
        if row.sender != sender or toNode != recipient:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not your message to do this with")
        if row.state != MESSAGE_NORMAL:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "already recalled or burned")
        return row, original

    @inlineCallbacks
    def recall(self, session: Session, message: TimMessage) -> Any:
        row, original = yield self._findOwn(session, message, sentByMe=True)
        window = self.config.recall_window
        if window and self.clock.seconds() - row.created > window:
            raise TimProtocolError(ErrorCode.ERR_EXPIREOP, f"messages can be recalled for {window:g} seconds")
        yield self._tombstone(session, row, original, OdType.ORDER_REVOKE, MESSAGE_RECALLED, message)

    @inlineCallbacks
    def burn(self, session: Session, message: TimMessage) -> Any:
        row, original = yield self._findOwn(session, message, sentByMe=False)
        yield self._tombstone(session, row, original, OdType.ORDER_BURN, MESSAGE_BURNED, message)

    @inlineCallbacks
    def _tombstone(
        self, session: Session, row: Any, original: TimMessage, odType: int, state: int, request: TimMessage
    ) -> Any:
        """
        Replace the stored message by a tombstone that keeps its place (seq,
        mid, parties, time) and nothing of its content, and tell the other
        party through its inbox.
        """
        tombstone = TimMessage(
            msType=original.msType,
            odType=odType,
            id=original.id,
            mid=original.mid,
            seq=original.seq,
            fromTid=original.fromTid,
            toTid=original.toTid,
            roomTid=original.roomTid,
            timestamp=original.timestamp,
        )
        other = target(request)
        notice = TimMessage(
            msType=MsType.SOURCE_USER,
            odType=odType,
            id=request.id if request.id is not None else secrets.randbits(53),
            mid=original.mid,
            seq=original.seq,
            fromTid=session.tid,
            toTid=Tid(node=other),
            timestamp=int(self.clock.seconds() * 1e9),
        )
        qids = yield self.store.replaceMessage(
            row.conv,
            row.seq,
            self.vault.sealMessage(row.conv, row.seq, tombstone),
            state,
            [(other, self.vault.sealFor(other, notice))],
            self.clock.seconds(),
        )
        encoded = Encoded(notice)
        self.echo(session.uid, encoded)
        self.delivery.deliver(other, qids[0], encoded)

    # TIMPULLMESSAGE.

    @inlineCallbacks
    def handlePull(self, session: Session, request: TimReq) -> Any:
        """
        History, newest first, before the C{mid} in C{reqInt} (0: from the
        newest), at most C{reqInt2} and never more than C{history_limit}
        messages.  Recalled and burned messages appear as tombstones.  An
        empty history gets an empty list.
        """
        if request.rtype == 2:
            if self.roomMessages is None:
                raise TimProtocolError(ErrorCode.ERR_INTERFACE, "group history is not served by this node")
            conv = yield self.roomMessages.historyConversation(session, request)
        elif request.rtype in (None, 1):
            if not request.node:
                raise TimProtocolError(ErrorCode.ERR_PARAMS, "TimReq.node is required")
            conv = pairConversation(session.uid, request.node)
        else:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"unknown history rtype {request.rtype}")
        cursor = request.reqInt or 0
        limit = self.config.history_limit if request.reqInt2 is None else request.reqInt2
        if limit < 1 or cursor < 0:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "reqInt must be >= 0 and reqInt2 >= 1")
        rows = yield self.store.history(conv, cursor or None, min(limit, self.config.history_limit))
        messages = [self.vault.openMessage(row.conv, row.seq, row.stanza) for row in rows]
        session.send(TimType.TIMPULLMESSAGE, TimMessageList(messageList=messages))
