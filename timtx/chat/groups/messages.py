# -*- test-case-name: timtx.test.test_groups -*-
"""
Messages in groups: stored once, delivered to members by reference (see
L{timtx.delivery.fanout}); private messages between two members; streams;
recall by the sender or, as an extension, by the founder and managers.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from timtx.chat.duplicates import DuplicateFilter
from timtx.chat.groups.core import Groups
from timtx.chat.messagerules import stamp
from timtx.chat.messaging import PersonalMessaging
from timtx.delivery.encoded import Encoded
from timtx.delivery.fanout import groupConversation
from timtx.persistence.records import MESSAGE_NORMAL, MESSAGE_RECALLED, ROLE_MEMBER, Duplicate
from timtx.protocols.constants import ErrorCode, MsType, OdType, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import Tid, TimMessage, TimReq

if TYPE_CHECKING:
    from timtx.config import MessagesConfig
    from timtx.delivery.sessions import Session


class GroupMessages:
    def __init__(
        self,
        groups: Groups,
        *,
        messages: MessagesConfig,
        personal: PersonalMessaging,
        duplicates: DuplicateFilter,
    ):
        self.groups = groups
        self.messages = messages
        self.personal = personal
        self.duplicates = duplicates

    def handle(self, session: Session, message: TimMessage) -> Any:
        """
        Messages with a C{roomTid}: group messages (msType 3) and private
        messages between two members (msType 2 with C{toTid}).
        """
        if message.roomTid is None or not message.roomTid.node:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "roomTid is required")
        if message.msType == MsType.SOURCE_USER:
            return self._private(session, message)
        if message.toTid is not None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "a group message has no toTid")
        od = message.odType
        if od == OdType.ORDER_INOF:
            return self._send(session, message)
        if od == OdType.ORDER_REVOKE:
            return self._recall(session, message)
        if od == OdType.ORDER_STREAM:
            return self._stream(session, message)
        raise TimProtocolError(ErrorCode.ERR_PARAMS, f"odType {od} is not allowed in groups")

    @inlineCallbacks
    def _memberState(self, session: Session, message: TimMessage) -> Any:
        groups = self.groups
        state = yield groups.group(message.roomTid.node)  # type: ignore[union-attr]
        member = groups.requireMember(state, session.uid)
        if member.role == ROLE_MEMBER and (state.group.mutedAll or member.mutedUntil > groups.now()):
            raise TimProtocolError(ErrorCode.ERR_AUTH, "muted")
        return state

    @inlineCallbacks
    def _private(self, session: Session, message: TimMessage) -> Any:
        if message.toTid is None or not message.toTid.node:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "toTid is required")
        state = yield self._memberState(session, message)
        self.groups.requireMember(state, message.toTid.node)
        yield self.personal.send(session, message, private=True)

    @inlineCallbacks
    def _send(self, session: Session, message: TimMessage) -> Any:
        groups = self.groups
        state = yield self._memberState(session, message)
        clientId = message.id
        stamp(session, message, groups.now())
        message.roomTid = Tid(node=state.gid)
        dedupe = None
        if clientId is not None and self.duplicates.enabled:
            seen = yield self.duplicates.check(session.uid, clientId)
            if seen is not None:
                if isinstance(seen, Duplicate):
                    # Known from the store's keys: its first write may have
                    # been committed without being routed.
                    groups.routeAgain(state, seen)
                yield self.duplicates.answer(session, seen)
                return
            dedupe = (session.uid, clientId)
        appending = groups.appendAndRoute(state, session.uid, message, dedupe, echo=True)
        if dedupe is not None:
            self.duplicates.remember(session.uid, dedupe[1], appending, groupConversation(state.gid))
        appending.addErrback(self.duplicates.refused, session, message)

    @inlineCallbacks
    def _stream(self, session: Session, message: TimMessage) -> Any:
        state = yield self._memberState(session, message)
        stamp(session, message, self.groups.now())
        self.groups.router.sendToGroup(state.members, TimType.TIMMESSAGE, Encoded(message), session.uid)

    @inlineCallbacks
    def _recall(self, session: Session, message: TimMessage) -> Any:
        """
        The sender recalls its message within the recall window; the founder
        and managers may recall any (extension).  The message becomes a
        tombstone, and a recall notice joins the group's history.
        """
        groups = self.groups
        state = yield groups.group(message.roomTid.node)  # type: ignore[union-attr]
        groups.requireMember(state, session.uid)
        if not message.mid:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "mid is required")
        conv = groupConversation(state.gid)
        row = yield groups.store.getMessage(conv, message.mid)
        if row is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "no such message")
        if row.state != MESSAGE_NORMAL:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "already recalled")
        staff = groups.config.manager_recall and state.isManager(session.uid)
        if row.sender != session.uid and not staff:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not your message")
        window = self.messages.recall_window
        if row.sender == session.uid and not staff and window and groups.now() - row.created > window:
            raise TimProtocolError(ErrorCode.ERR_EXPIREOP, f"messages can be recalled for {window:g} seconds")
        vault = groups.vault
        original = vault.openMessage(conv, row.seq, row.stanza)
        tombstone = TimMessage(
            msType=MsType.SOURCE_ROOM,
            odType=OdType.ORDER_REVOKE,
            id=original.id,
            mid=original.mid,
            seq=original.seq,
            fromTid=original.fromTid,
            roomTid=original.roomTid,
            timestamp=original.timestamp,
        )
        notice = TimMessage(
            msType=MsType.SOURCE_ROOM,
            odType=OdType.ORDER_REVOKE,
            id=message.id if message.id is not None else secrets.randbits(53),
            mid=original.mid,
            seq=original.seq,
            fromTid=session.tid,
            roomTid=Tid(node=state.gid),
            timestamp=int(groups.now() * 1e9),
        )
        # Members who have not read the message get the tombstone from the
        # history; the notice goes to every member's inbox, like a 1:1
        # recall notice, so those who did read it learn it is gone.
        others = [uid for uid in state.members if uid != session.uid]
        qids = yield groups.store.replaceMessage(
            conv,
            row.seq,
            vault.sealMessage(conv, row.seq, tombstone),
            MESSAGE_RECALLED,
            [(uid, vault.sealFor(uid, notice)) for uid in others],
            groups.now(),
        )
        encoded = Encoded(notice)
        groups.router.send(session.uid, TimType.TIMMESSAGE, encoded)
        for uid, qid in zip(others, qids, strict=True):
            groups.router.push(uid, qid, encoded)

    @inlineCallbacks
    def historyConversation(self, session: Session, request: TimReq) -> Any:
        """
        The conversation of the group in C{request.node}, for a member's
        TIMPULLMESSAGE.
        """
        groups = self.groups
        state = yield groups.group(request.node, alive=False)
        groups.requireMember(state, session.uid)
        return groupConversation(state.gid)
