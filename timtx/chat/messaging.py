# -*- test-case-name: timtx.test.test_messaging -*-
"""
Messages between two users (TIMMESSAGE, TIMREVOKEMESSAGE, TIMBURNMESSAGE
with msType 2 and no C{roomTid}).

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

from timtx.chat.conversations import AlreadyStored, Appended, Conversations, pairConversation
from timtx.chat.duplicates import DuplicateFilter
from timtx.chat.messagerules import stamp, target
from timtx.chat.permissions import MessagePermissions
from timtx.crypto.vault import StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.interfaces import IRouter
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import MESSAGE_BURNED, MESSAGE_NORMAL, MESSAGE_RECALLED, Duplicate
from timtx.protocols.constants import ErrorCode, MsType, OdType, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Tid, TimMessage

if TYPE_CHECKING:
    from timtx.config import MessagesConfig
    from timtx.delivery.sessions import Session


class PersonalMessaging:
    """
    1:1 messages, checked by L{timtx.chat.inbound.InboundMessages} first.
    """

    log = Logger()

    def __init__(
        self,
        config: MessagesConfig,
        *,
        store: IMessageStore,
        vault: StanzaVault,
        clock: IReactorTime,
        conversations: Conversations,
        router: IRouter,
        permissions: MessagePermissions,
        duplicates: DuplicateFilter,
    ):
        self.config = config
        self.store = store
        self.vault = vault
        self.clock = clock
        self.conversations = conversations
        self.router = router
        self.permissions = permissions
        self.duplicates = duplicates

    def handle(self, session: Session, message: TimMessage) -> Any:
        if message.toTid is None or not message.toTid.node:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "toTid is required")
        od = message.odType
        if od == OdType.ORDER_REVOKE:
            return self.recall(session, message)
        if od == OdType.ORDER_BURN:
            return self.burn(session, message)
        return self.send(session, message)

    def send(self, session: Session, message: TimMessage, private: bool = False) -> Any:
        """
        Check and store a message to one user.  When the caches already know
        everything the checks need (the usual case), this is done at once,
        without a Deferred; otherwise the caches are filled first.

        @param private: a message between two members of a group (msType 2
            with C{toTid} and C{roomTid}): no friendship needed, blocks
            still apply.  The caller checked both memberships.
        """
        other = target(message)
        if self.permissions.knownAllowed(session.uid, other, private):
            clientId = message.id
            if clientId is None or not self.duplicates.enabled:
                return self._accept(session, message, other, None)
            loaded, seen = self.duplicates.peek(session.uid, clientId)
            if loaded:
                return self._accept(session, message, other, seen)
        return self._sendChecked(session, message, private)

    @inlineCallbacks
    def _sendChecked(self, session: Session, message: TimMessage, private: bool) -> Any:
        other = target(message)
        yield self.permissions.check(session.uid, other, private)
        seen = None
        if message.id is not None and self.duplicates.enabled:
            seen = yield self.duplicates.check(session.uid, message.id)
        yield self._accept(session, message, other, seen)

    def _accept(self, session: Session, message: TimMessage, other: str, seen: Any) -> Any:
        """
        Hand a checked message to its conversation's owner (or answer a
        resend, or send a stream).  Returns without waiting for the store:
        the owner keeps the order, so the connection's next frame may start.
        """
        if seen is not None:
            if isinstance(seen, Duplicate):
                # Known from the stored keys: its first copy's node may
                # have stored it and died before pushing it.
                self.router.reread(other)
            return self.duplicates.answer(session, seen)
        clientId = message.id
        stamp(session, message, self.clock.seconds())
        message.toTid = Tid(node=other, domain=message.toTid.domain)  # type: ignore[union-attr]
        if message.odType == OdType.ORDER_STREAM:
            self.router.send(other, TimType.TIMMESSAGE, Encoded(message))
            return None
        keep = message.odType == OdType.ORDER_INOF
        dedupe = (session.uid, clientId) if clientId is not None and self.duplicates.enabled else None
        conv = pairConversation(session.uid, other)
        appending = self.appendAndRoute(conv, session.uid, message, other, keep, dedupe)
        if dedupe is not None:
            self.duplicates.remember(session.uid, dedupe[1], appending, conv)
        appending.addErrback(self._resent, other)
        appending.addErrback(self.duplicates.refused, session, message)
        return None

    def _resent(self, failure: Failure, recipient: str) -> Failure:
        """
        A resend the store refused as stored already: its first copy may
        never have been pushed (L{IRouter.reread}).
        """
        if isinstance(failure.value, AlreadyStored):
            self.router.reread(recipient)
        return failure

    def appendAndRoute(
        self, conv: str, sender: str, message: TimMessage, recipient: str, keep: bool, dedupe: tuple[str, int] | None
    ) -> Deferred[Appended]:
        """
        Store a checked message through its conversation's owner and, once
        durable, route it: the echo to the sender's sessions, the push to
        the recipient's.  The cluster overrides this to do both on the
        node that owns the conversation, so that one node routes a
        conversation's messages, in seq order.

        @return: fires with the L{Appended} message once durable; fails
            with what the client is to be told.
        """
        d = self.conversations.append(conv, sender, message, (recipient,), keep=keep, dedupe=dedupe)
        return d.addCallback(self._appended, sender, recipient)

    def _appended(self, appended: Appended, sender: str, recipient: str) -> Appended:
        encoded = Encoded(appended.message, appended.compact)
        # Every session of the sender sees what it sent, as stored.
        self.router.send(sender, TimType.TIMMESSAGE, encoded)
        return self._pushAppended(appended, recipient, encoded)

    def _pushAppended(self, appended: Appended, recipient: str, encoded: Encoded) -> Appended:
        """
        Push a durable message to its recipient's sessions.
        """
        if appended.handover:
            # The conversation's last writer was another node a moment ago:
            # its push of the message before this one may still be on its
            # way, and this one must not overtake it.
            self.router.pushAfterLook(recipient, appended.qids[recipient], encoded)
        else:
            self.router.push(recipient, appended.qids[recipient], encoded)
        return appended

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
        self.router.send(session.uid, TimType.TIMMESSAGE, encoded)
        self.router.push(other, qids[0], encoded)
