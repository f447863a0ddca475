# -*- test-case-name: timtx.test.test_messaging -*-
"""
Getting stored items to a user's sessions on this node: at least once, in
order.

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
lists, as after a login (see L{timtx.delivery.flow}).
"""

from __future__ import annotations

import secrets
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.crypto.vault import SealError, StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.delivery.flow import FlowControl, SessionFlow
from timtx.persistence.errors import StoreUnavailable
from timtx.persistence.interfaces import IMessageStore
from timtx.protocols.constants import TimType
from timtx.protocols.frames import server_header
from timtx.protocols.structs import TimMessage, TimMessageList
from timtx.util.histogram import Histogram

if TYPE_CHECKING:
    from timtx.config import MessagesConfig
    from timtx.delivery.registry import SessionRegistry
    from timtx.delivery.sessions import AckIds, Session
    from timtx.persistence.records import InboxEntry


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


class _Check:
    """
    A look at a live session's inbox under way (L{InboxDelivery.recheck}).

    @ivar upTo: entries above this qid are not looked for (C{None}: all).
    @ivar held: C{(qid, encoded)} pushed meanwhile, in order.
    @ivar again: another look was asked for meanwhile.
    """

    __slots__ = ("upTo", "held", "again")

    def __init__(self, upTo: int | None):
        self.upTo = upTo
        self.held: list[tuple[int, Encoded]] = []
        self.again = False


def higherBound(one: int | None, other: int | None) -> int | None:
    """
    The higher of two bounds on the inbox ids to look for
    (L{InboxDelivery.recheck}), C{None} (no bound) the highest.
    """
    if one is None or other is None:
        return None
    return max(one, other)


class _Paced:
    """
    One pass over many sessions or users, C{chunk} at a time and C{pause}
    seconds apart, so that a node with many does not flood the store; a new
    pass replaces the one under way.
    """

    def __init__(self, clock: IReactorTime):
        self.clock = clock
        self._call: IDelayedCall | None = None
        self._stopped = False

    def run(self, items: list[Any], act: Callable[[Any], object], chunk: int, pause: float) -> None:
        def some(start: int) -> None:
            self._call = None
            for item in items[start : start + chunk]:
                act(item)
            if start + chunk < len(items) and not self._stopped:
                self._call = self.clock.callLater(pause, some, start + chunk)

        self._cancel()
        some(0)

    def stop(self) -> None:
        self._stopped = True
        self._cancel()

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class InboxDelivery:
    """
    Drains and pushes the inboxes of this node's sessions.

    @ivar flow: the flow control of every push to this node's sessions; group
        fan-out uses it too.
    @ivar sources: what else a session may have missed, drained after the
        inbox, in order.
    @ivar pushed: inbox entries written to live sessions.
    @ivar acked: of those, acknowledged.
    @ivar offlineSent: messages sent in offline lists.
    @ivar ackSeconds: seconds from a live push to its ack.
    """

    log = Logger()

    #: Seconds before reading an inbox again after the store was
    #: unavailable, and before removing acknowledged entries again.
    outageRetry = 2.0

    def __init__(
        self,
        config: MessagesConfig,
        *,
        store: IMessageStore,
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
        self.flow = FlowControl(config.max_unacked, caughtUp=self.drain)
        self.sources: list[BacklogSource] = []
        #: Drains to try again once the store is back, by session.
        self._retries: dict[Session, IDelayedCall] = {}
        #: Live sessions whose inbox is being looked at (L{recheck}).
        self._checking: dict[Session, _Check] = {}
        #: Passes over every live session after an outage or a death.
        self._rechecks = _Paced(clock)
        self._looks = _Paced(clock)
        self._stopped = False
        self.pushed = 0
        self.acked = 0
        self.offlineSent = 0
        self.ackSeconds = Histogram()

    def addSource(self, source: BacklogSource) -> None:
        """
        Drain C{source} too, after the inbox and the sources added before.
        """
        self.sources.append(source)

    # Sessions.

    def sessionStarted(self, session: Session) -> None:
        state = self.flow.start(session)
        self._removeNow(session.uid)
        d = self.store.countInbox(session.uid)
        d.addCallbacks(self._counted, self._failed, callbackArgs=(session, state), errbackArgs=(session,))

    def _counted(self, count: int, session: Session, state: SessionFlow) -> None:
        if session.closed or state.live or state.draining:
            return
        if not count and not self.sources:
            state.live = not state.held
        elif self.config.offline_push_after:
            # Others (groups) may hold something too: look after the wait
            # either way, so new messages never overtake missed ones.
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            state.timer = self.clock.callLater(self.config.offline_push_after, self.drain, session)
            if not count:
                self.drain(session, quiet=True)
        else:
            self.drain(session)

    def sessionEnded(self, session: Session) -> None:
        self._checking.pop(session, None)
        retry = self._retries.pop(session, None)
        if retry is not None and retry.active():
            retry.cancel()
        state = self.flow.end(session)
        if state is not None and state.timer is not None and state.timer.active():
            state.timer.cancel()

    # Pushing.

    def push(self, uid: str, qid: int, encoded: Encoded, only: Session | None = None) -> None:
        """
        Push a durable inbox entry of C{uid} to its live sessions on this
        node (or to C{only}).  Call in the order entries were written.
        """
        ackId = header = onAck = None
        admit = self.flow.admit
        stateOf = self.flow.state
        checking = self._checking
        for session in self.sessions.sessionsView(uid) if only is None else (only,):
            if checking and session in checking:
                # After what the look at its inbox finds, if anything.
                checking[session].held.append((qid, encoded))
                continue
            known = stateOf(session)
            if known is not None and known.listed and qid in known.listed:
                # It went out in an offline list already, which overtook
                # this push (a handover of its conversation, say).
                continue
            state = admit(session)
            if state is None:
                continue
            if ackId is None or header is None or onAck is None:
                # One id for every session: the frame's bytes are the same.
                ackId = self.ackIds.next()
                header = server_header(TimType.TIMMESSAGE, ackId)
                onAck = partial(self._inboxAcked, qid, perf_counter())
            state.inFlight[qid] = ackId
            session.expectAck(ackId, onAck)
            session.sink.writeFrameParts(header, encoded.payload(session.encoding))
            self.pushed += 1

    def _inboxAcked(self, qid: int, sent: float, session: Session) -> None:
        self.acked += 1
        self.ackSeconds.observe(perf_counter() - sent)
        state = self.flow.state(session)
        if state is not None:
            state.inFlight.pop(qid, None)
        self._remove(session.uid, [qid])
        self.flow.acked(session)

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
            d.addErrback(partial(self._removeFailed, uid, qids))

    def stop(self) -> None:
        """
        The node stops: remove what was acknowledged, and try nothing again
        later.
        """
        self._stopped = True
        self._rechecks.stop()
        self._looks.stop()
        for retry in self._retries.values():
            if retry.active():
                retry.cancel()
        self._retries.clear()
        self.flushRemovals()

    def recheckLive(self, chunk: int = 200, pause: float = 0.05) -> int:
        """
        Read again what every live session may have missed.

        After the store went down, or could not say whether a write was
        committed, a message may be stored that was never pushed: its
        sender was asked to send it again, and the resend was matched by
        its duplicate key and confirmed without a push.  Draining every
        live session (in chunks of C{chunk}, C{pause} seconds apart, so that
        a node with many sessions does not flood the store as it comes
        back) delivers it; entries already pushed and not yet acknowledged
        are not sent again.

        @return: how many sessions will be drained.
        """
        live = [session for session in self.sessions if (state := self.flow.state(session)) is not None and state.live]

        def drainIfLive(session: Session) -> None:
            state = self.flow.state(session)
            if state is not None and state.live and not session.closed:
                self.drain(session)

        self._rechecks.run(live, drainIfLive, chunk, pause)
        return len(live)

    def lookLive(self, chunk: int = 200, pause: float = 0.05) -> int:
        """
        Have every live session look in its inbox (L{recheck}, so that one
        that missed nothing sees nothing of it), in chunks of C{chunk} users
        C{pause} seconds apart: a node died, and pushes it wrote to its
        links just before may never have left it.

        @return: how many users will look.
        """
        users = list(dict.fromkeys(session.uid for session in self.sessions if not session.closed))
        self._looks.run(users, self.recheck, chunk, pause)
        return len(users)

    def _removeFailed(self, uid: str, qids: list[int], failure: Failure) -> None:
        if failure.check(StoreUnavailable) and not self._stopped:
            # Removing is safe to repeat: keep them and try again later,
            # rather than deliver them a second time at the next login.
            self.log.warn(
                "removing acknowledged entries of {uid} failed: {why}", uid=uid, why=failure.getErrorMessage()
            )
            self._removals.setdefault(uid, [])[:0] = qids
            if self._removalCall is None:
                self._removalCall = self.clock.callLater(self.outageRetry, self.flushRemovals)
            return
        self.log.failure("removing acknowledged entries of {uid} failed", failure, uid=uid)

    def recheck(self, uid: str, upTo: int | None = None) -> int:
        """
        Look in C{uid}'s inbox again for its sessions here: another node
        stored something for the user that it may not have pushed here (it
        could not be sure where the user's sessions were,
        L{timtx.cluster.router}), or a resend was recognised whose first
        copy may never have been pushed.

        A live session stays live, and what is pushed to it meanwhile
        waits, while its inbox is read: if an entry up to C{upTo} (any
        entry, if C{None}) is there that was neither pushed to it nor
        waits, the session drains (what waits comes as offline lists, in
        order, then TIMOFFLINEMSGEND, and it is live again); if not, what
        waited is pushed as usual, and the session sees nothing of the
        look.  A session already reading looks once more before going
        live; a held, backlogged or new one reads its inbox anyway before
        going live.

        @return: how many sessions will look.
        """
        count = 0
        for session in self.sessions.sessionsView(uid):
            state = self.flow.state(session)
            if state is None or session.closed:
                continue
            count += 1
            if state.draining:
                state.skipped = True
            elif state.live:
                check = self._checking.get(session)
                if check is None:
                    self._look(session, state, _Check(upTo))
                else:
                    check.again = True
                    check.upTo = higherBound(check.upTo, upTo)
        return count

    def _look(self, session: Session, state: SessionFlow, check: _Check) -> None:
        self._checking[session] = check
        self._removeNow(session.uid)
        limit = len(state.inFlight) + len(check.held) + 1
        d = self.store.readInbox(session.uid, 0, limit)
        d.addCallbacks(
            self._looked, self._lookFailed, callbackArgs=(session, state, check), errbackArgs=(session, check)
        )

    def _looked(self, entries: list[InboxEntry], session: Session, state: SessionFlow, check: _Check) -> None:
        if session.closed or self._checking.get(session) is not check:
            return
        held = {qid for qid, _ in check.held}
        upTo = check.upTo
        missed = any(
            e.qid not in state.inFlight and e.qid not in held and (upTo is None or e.qid <= upTo) for e in entries
        )
        if missed:
            self.log.info("{uid} missed pushes: its session here reads its inbox again", uid=session.uid)
            # What was held is in the inbox too, after what was missed.
            del self._checking[session]
            self.drain(session)
            return
        if check.again:
            # Asked again while reading: what was stored since may be new.
            check.again = False
            self._look(session, state, check)
            return
        del self._checking[session]
        for qid, encoded in check.held:
            self.push(session.uid, qid, encoded, only=session)

    def _lookFailed(self, failure: Failure, session: Session, check: _Check) -> None:
        if self._checking.get(session) is not check:
            return
        del self._checking[session]
        self.log.info("looking in the inbox of {uid} failed: {why}", uid=session.uid, why=failure.getErrorMessage())
        # A drain reads it all (what was held included), and tries again
        # after an outage.
        self.drain(session)

    def hold(self, uid: str) -> list[Session]:
        """
        Push nothing to C{uid}'s sessions here until L{reread}: entries may
        be waiting in its inbox that were never pushed here (the user's
        owner did not know of these sessions), and they must come before
        what is pushed from now on.  Pushes meanwhile wait in the inbox.

        @return: the sessions held, for L{reread}.
        """
        held = []
        for session in self.sessions.sessionsView(uid):
            state = self.flow.state(session)
            if state is not None and not session.closed:
                state.held = True
                state.live = False
                held.append(session)
        return held

    def reread(self, sessions: list[Session]) -> None:
        """
        Let L{hold}'s sessions go live again once they have read their
        inbox (what waited comes as offline lists, in order, then
        TIMOFFLINEMSGEND).
        """
        for session in sessions:
            state = self.flow.state(session)
            if state is None or session.closed or not state.held:
                continue
            state.held = False
            if state.draining:
                # The read under way may have passed what waits: once more.
                state.skipped = True
            else:
                self.drain(session)

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
        state = self.flow.state(session)
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
        # A look at the inbox under way (L{recheck}) is overtaken: what it
        # held is in the inbox, and this read finds it.
        self._checking.pop(session, None)
        state.draining = True
        state.quiet = quiet
        state.live = False
        state.skipped = False
        self._readInbox(session, state, 0)

    def _readInbox(self, session: Session, state: SessionFlow, after: int) -> None:
        self._removeNow(session.uid)
        limit = self.config.offline_batch + len(state.inFlight)
        d = self.store.readInbox(session.uid, after, limit)
        d.addCallbacks(self._inboxRead, self._failed, callbackArgs=(session, state), errbackArgs=(session,))

    def _inboxRead(self, entries: list[InboxEntry], session: Session, state: SessionFlow) -> None:
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
        state.noteListed(qids)

        def acked(s: Session) -> None:
            self._remove(s.uid, qids)
            if not s.closed:
                self._readInbox(s, state, max(qids))

        self._sendList(session, messages, acked)

    def _foundQuietly(self, state: SessionFlow) -> bool:
        """
        During the node's own check, something was found: stop and wait for
        the client to ask (or for C{offline_push_after}).
        """
        if state.quiet:
            state.draining = False
            state.quiet = False
            return True
        return False

    def _readSource(self, session: Session, state: SessionFlow, index: int) -> None:
        if index >= len(self.sources):
            self._finish(session, state)
            return
        d = self.sources[index].nextBatch(session)
        d.addCallbacks(self._sourceRead, self._failed, callbackArgs=(session, state, index), errbackArgs=(session,))

    def _sourceRead(self, batch: Any, session: Session, state: SessionFlow, index: int) -> None:
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
        self.offlineSent += len(messages)

    def _finish(self, session: Session, state: SessionFlow) -> None:
        if state.skipped:
            # Something arrived for a source already read: look again.
            state.skipped = False
            self._readInbox(session, state, 0)
            return
        state.draining = False
        state.live = not state.held
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
        if session.closed or self._stopped:
            # No one is waiting for this read any more (the session ended,
            # or the node is stopping and its store closed under the read):
            # what it would have delivered stays in the inbox for the next
            # login.  Not an error, and no traceback in the log.
            self.log.info(
                "reading what {uid} missed ended with the session: {why}",
                uid=session.uid,
                why=failure.getErrorMessage(),
            )
            return
        if failure.check(StoreUnavailable):
            # An outage: the session stays connected, and its inbox is read
            # again once the store may be back.
            self.log.warn(
                "reading what {uid} missed failed: {why}; trying again in {delay:g}s",
                uid=session.uid,
                why=failure.getErrorMessage(),
                delay=self.outageRetry,
            )
            state = self.flow.state(session)
            if state is None or session.closed:
                return
            quiet = state.quiet if state.draining else True
            state.draining = False
            old = self._retries.pop(session, None)
            if old is not None and old.active():
                old.cancel()
            self._retries[session] = self.clock.callLater(self.outageRetry, self._retryDrain, session, quiet)
            return
        self.log.failure("reading what {uid} missed failed", failure, uid=session.uid)
        if not session.closed:
            session.sink.closeConnection("storage error")

    def _retryDrain(self, session: Session, quiet: bool) -> None:
        self._retries.pop(session, None)
        state = self.flow.state(session)
        if state is None or session.closed or state.live or state.draining:
            return
        if quiet:
            # Nobody asked yet: look again as at login.
            d = self.store.countInbox(session.uid)
            d.addCallbacks(self._counted, self._failed, callbackArgs=(session, state), errbackArgs=(session,))
        else:
            self.drain(session)
