# -*- test-case-name: timtx.test.test_messaging -*-
"""
Getting stored items to a user's sessions: at least once, in order.

Everything a user must receive — a message, a recall notice, a friend
request — is first written to the user's inbox in the store.  An entry
leaves the inbox only when one of the user's sessions acknowledges the frame
that carried it.  A session that closes with frames unacknowledged gets them
again at its next login, through the inbox.

Each session is in one of three states:

  - I{waiting}: just logged in with entries in its inbox.  The node waits up
    to C{[messages] offline_push_after} seconds for the client to ask
    (TIMOFFLINEMSG, as tim clients do) and then sends them unasked.
  - I{draining}: the inbox goes out in TimMessageLists of
    C{offline_batch} entries, each list waiting for its ack, then
    TIMOFFLINEMSGEND.
  - I{live}: new entries are pushed as TIMMESSAGE frames as soon as they
    are durable.

A session that is not live does not get new entries pushed: they are in the
inbox behind the older ones and come out in order with the next list.  Reads
and writes of the inbox go through the store in one order, and their results
come back in that order, which is why no entry can fall between the last
list and going live.

A session that leaves more than C{max_unacked} pushes unacknowledged stops
getting pushes; once it has acknowledged them all, the backlog goes out as
lists, as after a login.
"""

from __future__ import annotations

import secrets
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.frames import server_header
from timtx.protocols.structs import TimMessage, TimMessageList
from timtx.crypto.vault import SealError, StanzaVault

if TYPE_CHECKING:
    from timtx.config import MessagesConfig
    from timtx.persistence.records import InboxEntry
    from timtx.delivery.sessions import AckIds, Session, SessionRegistry


class Encoded:
    """
    A message encoded at most once per encoding, however many sessions get
    it.
    """

    __slots__ = ("message", "_compact", "_json")

    def __init__(self, message: Any):
        self.message = message
        self._compact: bytes | None = None
        self._json: bytes | None = None

    def payload(self, encoding: Encoding) -> bytes:
        if encoding is Encoding.JSON:
            if self._json is None:
                self._json = codec.encode_json(self.message)
            return self._json
        if self._compact is None:
            self._compact = codec.encode_compact(self.message)
        return self._compact


class SessionDelivery:
    """
    What delivery knows about one session.

    @ivar inFlight: qid -> ack id of inbox entries pushed live and not yet
        acknowledged.
    @ivar unacked: pushes of any kind not yet acknowledged.
    @ivar skipped: whether something was not pushed because the session was
        not live; the drain then looks once more before going live.
    """

    __slots__ = ("live", "draining", "quiet", "backlogged", "skipped", "inFlight", "unacked", "timer")

    def __init__(self) -> None:
        self.live = False
        self.draining = False
        #: The drain under way is the node's own check after login: it ends
        #: without TIMOFFLINEMSGEND, unless the client asks meanwhile.
        self.quiet = False
        self.backlogged = False
        self.skipped = False
        self.inFlight: dict[int, int] = {}
        self.unacked = 0
        self.timer: IDelayedCall | None = None


class BacklogSource(Protocol):
    """
    Something besides the inbox a session may have missed (group messages).
    """

    def nextBatch(self, session: Session) -> Deferred[Any]:
        """
        @return: a L{Deferred} firing with C{(messages, onAck)}, where
            C{onAck(session)} records that the batch was acknowledged, or
            C{None} when nothing is left.
        """


class Delivery:
    log = Logger()

    def __init__(
        self,
        config: MessagesConfig,
        store: Any,
        vault: StanzaVault,
        sessions: SessionRegistry,
        ackIds: AckIds,
        clock: IReactorTime,
        soon: IReactorTime | None = None,
    ):
        """
        @param soon: what schedules work for the next reactor turn (the
            reactor itself, even in tests that use a fake C{clock}).
        """
        self.config = config
        self.store = store
        self.vault = vault
        self.sessions = sessions
        self.ackIds = ackIds
        self.clock = clock
        self._soon = soon if soon is not None else clock
        #: Acknowledged inbox entries not yet removed, by user: the acks of
        #: one reactor turn leave the store in one operation per user.
        self._removals: dict[str, list[int]] = {}
        self._removalCall: IDelayedCall | None = None
        #: Per-session state; fan-out reads it directly.
        self.states: dict[Session, SessionDelivery] = {}
        #: Drained after the inbox, in order.
        self.sources: list[BacklogSource] = []

    # Sessions.

    def sessionStarted(self, session: Session) -> None:
        state = self.states[session] = SessionDelivery()
        self._removeNow(session.uid)
        d = self.store.countInbox(session.uid)
        d.addCallbacks(self._counted, self._failed, callbackArgs=(session, state), errbackArgs=(session,))

    def _counted(self, count: int, session: Session, state: SessionDelivery) -> None:
        if session.closed or state.live or state.draining:
            return
        if not count and not self.sources:
            state.live = True
        elif self.config.offline_push_after:
            # Others (groups) may hold something too: look after the wait
            # either way, so new messages never overtake missed ones.
            state.timer = self.clock.callLater(self.config.offline_push_after, self.drain, session)
            if not count:
                self.drain(session, quiet=True)
        else:
            self.drain(session)

    def sessionEnded(self, session: Session) -> None:
        state = self.states.pop(session, None)
        if state is not None and state.timer is not None and state.timer.active():
            state.timer.cancel()

    def state(self, session: Session) -> SessionDelivery | None:
        return self.states.get(session)

    # Pushing.

    def deliver(self, uid: str, qid: int, encoded: Encoded) -> None:
        """
        Push a durable inbox entry of C{uid} to its live sessions.  Call in
        the order entries were written.
        """
        ackId = header = None
        for session in self.sessions.sessionsView(uid):
            state = self.states.get(session)
            if state is None:
                continue
            if not state.live:
                state.skipped = True
                continue
            if state.unacked >= self.config.max_unacked:
                # It stopped acknowledging; the entry waits in the inbox.
                state.live = False
                state.backlogged = True
                continue
            if ackId is None or header is None:
                # One id for every session: the frame's bytes are the same.
                ackId = self.ackIds.next()
                header = server_header(TimType.TIMMESSAGE, ackId)
            state.inFlight[qid] = ackId
            state.unacked += 1
            session.expectAck(ackId, partial(self._inboxAcked, qid))
            session.sink.writeFrameParts(header, encoded.payload(session.encoding))

    def _inboxAcked(self, qid: int, session: Session) -> None:
        state = self.states.get(session)
        if state is not None:
            state.inFlight.pop(qid, None)
        self._remove(session.uid, [qid])
        self.pushAcked(session)

    def pushAcked(self, session: Session) -> None:
        """
        One push to C{session} was acknowledged.  A session that fell behind
        gets its backlog once it has acknowledged everything.
        """
        state = self.states.get(session)
        if state is None:
            return
        state.unacked = max(0, state.unacked - 1)
        if state.backlogged and not state.unacked and not session.closed:
            state.backlogged = False
            self.drain(session)

    def _remove(self, uid: str, qids: list[int]) -> None:
        self._removals.setdefault(uid, []).extend(qids)
        if self._removalCall is None:
            self._removalCall = self._soon.callLater(0, self.flushRemovals)

    def _removeNow(self, uid: str) -> None:
        """
        Remove C{uid}'s acknowledged entries before its inbox is read, so
        that the read sees the store as the acks left it.
        """
        if uid in self._removals:
            self.flushRemovals()

    def flushRemovals(self) -> None:
        """
        Remove every acknowledged entry from the store.
        """
        if self._removalCall is not None and self._removalCall.active():
            self._removalCall.cancel()
        self._removalCall = None
        removals, self._removals = self._removals, {}
        for uid, qids in removals.items():
            d = self.store.deleteInbox(uid, qids)
            d.addErrback(partial(self._removeFailed, uid))

    def _removeFailed(self, uid: str, failure: Failure) -> None:
        self.log.failure("removing acknowledged entries of {uid} failed", failure, uid=uid)

    def notify(self, uid: str, message: TimMessage) -> Deferred[None]:
        """
        Put C{message} (a notice) in C{uid}'s inbox and push it to its live
        sessions.
        """
        d: Deferred[Any] = self.store.addInbox([(uid, self.vault.sealFor(uid, message))], self.clock.seconds())
        d.addCallback(self._added, uid, message)
        return d

    def _added(self, qids: list[int], uid: str, message: TimMessage) -> None:
        self.deliver(uid, qids[0], Encoded(message))

    def sendNow(self, uid: str, timType: int, encoded: Encoded) -> None:
        """
        Send to C{uid}'s sessions without storing or asking for an ack: for
        what is worthless later (streams, presence).
        """
        for session in self.sessions.sessionsView(uid):
            session.sendPayload(timType, encoded.payload(session.encoding))

    # Offline lists.

    def drain(self, session: Session, quiet: bool = False) -> None:
        """
        Send C{session} what it missed — its inbox, then every backlog
        source — as acknowledged TimMessageLists, then TIMOFFLINEMSGEND, then
        go live.  A drain already under way is left to finish.

        @param quiet: end without TIMOFFLINEMSGEND if nothing was sent (a
            check the client did not ask for); the wait for the client's
            request goes on if something was found.
        """
        state = self.states.get(session)
        if state is None or session.closed:
            return
        if state.draining:
            if not quiet:
                # The client asked while the node was looking on its own.
                state.quiet = False
            return
        if not quiet and state.timer is not None and state.timer.active():
            state.timer.cancel()
        if not quiet:
            state.timer = None
        state.draining = True
        state.quiet = quiet
        state.live = False
        state.skipped = False
        self._readInbox(session, state, 0)

    def _readInbox(self, session: Session, state: SessionDelivery, after: int) -> None:
        self._removeNow(session.uid)
        limit = self.config.offline_batch + len(state.inFlight)
        d = self.store.readInbox(session.uid, after, limit)
        d.addCallbacks(self._inboxRead, self._failed, callbackArgs=(session, state), errbackArgs=(session,))

    def _inboxRead(self, entries: list[InboxEntry], session: Session, state: SessionDelivery) -> None:
        if session.closed:
            return
        entries = [e for e in entries if e.qid not in state.inFlight][: self.config.offline_batch]
        if not entries:
            self._readSource(session, state, 0)
            return
        if self._foundQuietly(state):
            return
        messages = [m for m in (self._open(session.uid, e) for e in entries) if m is not None]
        qids = [e.qid for e in entries]

        def acked(s: Session) -> None:
            self._remove(s.uid, qids)
            if not s.closed:
                self._readInbox(s, state, max(qids))

        self._sendList(session, messages, acked)

    def _foundQuietly(self, state: SessionDelivery) -> bool:
        """
        During the node's own check, something was found: stop and wait for
        the client to ask (or for C{offline_push_after}).
        """
        if state.quiet:
            state.draining = False
            state.quiet = False
            return True
        return False

    def _readSource(self, session: Session, state: SessionDelivery, index: int) -> None:
        if index >= len(self.sources):
            self._finish(session, state)
            return
        d = self.sources[index].nextBatch(session)
        d.addCallbacks(self._sourceRead, self._failed, callbackArgs=(session, state, index), errbackArgs=(session,))

    def _sourceRead(self, batch: Any, session: Session, state: SessionDelivery, index: int) -> None:
        if session.closed:
            return
        if batch is None:
            self._readSource(session, state, index + 1)
            return
        if self._foundQuietly(state):
            return
        messages, onAck = batch

        def acked(s: Session) -> None:
            onAck(s)
            if not s.closed:
                self._readSource(s, state, index)

        self._sendList(session, messages, acked)

    def _sendList(self, session: Session, messages: list[TimMessage], acked: Any) -> None:
        batch = TimMessageList(id=secrets.randbits(53), messageList=messages)
        session.send(TimType.TIMOFFLINEMSG, batch, onAck=acked)

    def _finish(self, session: Session, state: SessionDelivery) -> None:
        if state.skipped:
            # Something arrived for a source already read: look again.
            state.skipped = False
            self._readInbox(session, state, 0)
            return
        state.draining = False
        state.live = True
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.timer = None
        if not state.quiet:
            session.send(TimType.TIMOFFLINEMSGEND)
        state.quiet = False

    def _open(self, uid: str, entry: InboxEntry) -> TimMessage | None:
        try:
            if entry.seq is not None and entry.conv is not None:
                message = self.vault.openMessage(entry.conv, entry.seq, entry.stanza)
            else:
                message = self.vault.openFor(uid, entry.stanza)
        except (SealError, ValueError, Exception):
            self.log.failure("inbox entry {qid} of {uid} does not open; dropping it", qid=entry.qid, uid=uid)
            return None
        message.isOffline = True
        return message

    def _failed(self, failure: Failure, session: Session) -> None:
        self.log.failure("reading what {uid} missed failed", failure, uid=session.uid)
        if not session.closed:
            session.sink.closeConnection("storage error")
