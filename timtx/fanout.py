# -*- test-case-name: timtx.test.test_groups -*-
"""
Group message fan-out, and how far each member got.

A group message is stored once.  Members do not get inbox copies: each
member has a I{cursor}, the last seq of the group it acknowledged.  Online
members get the message pushed as soon as it is durable; whatever a member
has not acknowledged (offline, closed, too slow) it gets later from the
group's history, starting after its cursor.

Fan-out to thousands of sessions is the hot path.  For each message:

  - the payload is encoded once per encoding;
  - one ack id serves every session, so the frame's bytes are identical, and
    each transport kind prepares them once (a WebSocket frame is framed once
    by autobahn, a TCP frame is length-prefixed once);
  - every session gets the same acknowledgement handler, no per-session
    closures;
  - a session whose peer stopped reading only costs a counter until its
    output limit drops it (see L{timtx.protocols.server}).

Cursors move in memory as acks arrive and are written to the store in
batches (C{[groups] cursor_flush_interval}); after a crash, members get at
most that much again (at least once).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from timtx.delivery import Encoded
from timtx.protocols.constants import TimType
from timtx.protocols.frames import server_header
from timtx.vault import StanzaVault

if TYPE_CHECKING:
    from timtx.delivery import Delivery
    from timtx.rooms import GroupDirectory, GroupState
    from timtx.sessions import AckIds, Session, SessionRegistry


def groupConversation(gid: str) -> str:
    return f"g:{gid}"


class _Acked:
    """
    The acknowledgement handler shared by every session a group message was
    pushed to.
    """

    __slots__ = ("fanout", "gid", "seq")

    def __init__(self, fanout: GroupFanout, gid: str, seq: int):
        self.fanout = fanout
        self.gid = gid
        self.seq = seq

    def __call__(self, session: Session) -> None:
        self.fanout.advance(session.uid, self.gid, self.seq)
        self.fanout.delivery.pushAcked(session)


class GroupFanout:
    log = Logger()

    def __init__(
        self,
        directory: GroupDirectory,
        delivery: Delivery,
        sessions: SessionRegistry,
        store: Any,
        vault: StanzaVault,
        ackIds: AckIds,
        clock: IReactorTime,
        batch: int = 50,
        maxUsers: int = 100_000,
    ):
        self.directory = directory
        self.delivery = delivery
        self.sessions = sessions
        self.store = store
        self.vault = vault
        self.ackIds = ackIds
        self.clock = clock
        self.batch = batch
        self.maxUsers = maxUsers
        self._cursors: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._loading: dict[str, list[Deferred[dict[str, int]]]] = {}
        self._dirty: dict[tuple[str, str], int] = {}

    # Cursors.

    def cursorsOf(self, uid: str) -> Deferred[dict[str, int]]:
        known = self._cursors.get(uid)
        if known is not None:
            self._cursors.move_to_end(uid)
            return succeed(known)
        d: Deferred[dict[str, int]] = Deferred()
        waiters = self._loading.get(uid)
        if waiters is not None:
            waiters.append(d)
            return d
        self._loading[uid] = [d]
        self.store.cursorsOf(uid).addCallbacks(self._loaded, self._loadFailed, (uid,), errbackArgs=(uid,))
        return d

    def _loaded(self, stored: dict[str, int], uid: str) -> None:
        known = self._cursors.setdefault(uid, {})
        for gid, seq in stored.items():
            known[gid] = max(seq, known.get(gid, 0))
        while len(self._cursors) > self.maxUsers:
            old, cursors = self._cursors.popitem(last=False)
            if any(key[0] == old for key in self._dirty):
                self._cursors[old] = cursors  # unsaved: keep it
                break
        for d in self._loading.pop(uid):
            d.callback(known)

    def _loadFailed(self, failure: Any, uid: str) -> None:
        for d in self._loading.pop(uid):
            d.errback(failure)

    def advance(self, uid: str, gid: str, seq: int) -> None:
        """
        C{uid} acknowledged C{gid}'s message C{seq}.
        """
        known = self._cursors.get(uid)
        if known is None:
            known = self._cursors[uid] = {}
        if seq > known.get(gid, 0):
            known[gid] = seq
            self._dirty[(uid, gid)] = seq

    def place(self, uid: str, gid: str, seq: int) -> Deferred[None]:
        """
        Put C{uid}'s cursor of C{gid} at C{seq}, forward or back (a new
        member starts at the group's last message), and store it now.
        """
        self._cursors.setdefault(uid, {})[gid] = seq
        self._dirty.pop((uid, gid), None)
        return self.store.saveCursors([(uid, gid, seq)])

    def flush(self) -> Deferred[None]:
        """
        Write the cursors that moved since the last flush.
        """
        if not self._dirty:
            return succeed(None)
        dirty, self._dirty = self._dirty, {}
        d = self.store.saveCursors([(uid, gid, seq) for (uid, gid), seq in dirty.items()])

        def failed(failure: Any) -> None:
            # Keep them for the next flush.
            for key, seq in dirty.items():
                self._dirty[key] = max(seq, self._dirty.get(key, 0))
            self.log.failure("saving group cursors failed", failure)

        d.addErrback(failed)
        return d

    # Pushing.

    def deliver(self, state: GroupState, message: Any, skip: str | None = None) -> int:
        """
        Push a durable group message to every live session of every member
        but C{skip} (the sender, who gets an echo instead).

        @return: how many sessions it was written to.
        """
        seq = message.seq
        ackId = self.ackIds.next()
        header = server_header(TimType.TIMMESSAGE, ackId)
        encoded = Encoded(message)
        prepared: dict[tuple[str, Any], tuple[Any, int]] = {}
        handler = _Acked(self, state.gid, seq)
        states = self.delivery.states
        limit = self.delivery.config.max_unacked
        written = 0
        for uid in state.members:
            if uid == skip:
                continue
            for session in self.sessions.sessionsView(uid):
                st = states.get(session)
                if st is None:
                    continue
                if not st.live:
                    st.skipped = True
                    continue
                if st.unacked >= limit:
                    st.live = False
                    st.backlogged = True
                    continue
                sink = session.sink
                key = (sink.frameKind, session.encoding)
                frame = prepared.get(key)
                if frame is None:
                    raw = header + encoded.payload(session.encoding)
                    frame = prepared[key] = (sink.prepareFrame(raw), len(raw))
                st.unacked += 1
                session.expectAck(ackId, handler)
                sink.writePrepared(*frame)
                written += 1
        return written

    def sendNow(self, state: GroupState, message: Any, skip: str | None = None) -> None:
        """
        Send to online members without storing or asking for acks (streams).
        """
        encoded = Encoded(message)
        for uid in state.members:
            if uid != skip:
                for session in self.sessions.sessionsView(uid):
                    session.sendPayload(TimType.TIMMESSAGE, encoded.payload(session.encoding))

    # Offline: the delivery drain asks for batches.

    def nextBatch(self, session: Session) -> Deferred[Any]:
        """
        The next group messages C{session}'s user has not acknowledged, as
        C{(messages, onAck)}, or C{None} when it is up to date.
        """
        d: Deferred[Any] = self.directory.groupsOf(session.uid)
        d.addCallback(lambda gids: self.cursorsOf(session.uid).addCallback(lambda c: (sorted(gids), c)))
        d.addCallback(self._scan, session, 0)
        return d

    def _scan(self, found: tuple[list[str], dict[str, int]], session: Session, index: int) -> Any:
        gids, cursors = found
        if index >= len(gids):
            return None
        gid = gids[index]
        d = self.store.messagesAfter(groupConversation(gid), cursors.get(gid, 0), self.batch)
        d.addCallback(self._batch, found, session, index)
        return d

    def _batch(self, rows: list[Any], found: Any, session: Session, index: int) -> Any:
        if not rows:
            return self._scan(found, session, index + 1)
        gid = found[0][index]
        messages = []
        for row in rows:
            message = self.vault.openMessage(row.conv, row.seq, row.stanza)
            message.isOffline = True
            messages.append(message)
        last = rows[-1].seq
        return messages, lambda s: self.advance(s.uid, gid, last)
