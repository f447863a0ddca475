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
    output limit drops it (see L{timtx.transports.server}).

Cursors move in memory as acks arrive and are written to the store in
batches (C{[groups] cursor_flush_interval}); after a crash, members get at
most that much again (at least once).
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from timtx.crypto.vault import StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.delivery.flow import FlowControl
from timtx.persistence.interfaces import IMessageStore
from timtx.protocols.constants import TimType
from timtx.protocols.frames import server_header
from timtx.util.cache import LoadingCache
from timtx.util.histogram import Histogram

if TYPE_CHECKING:
    from timtx.delivery.registry import SessionRegistry
    from timtx.delivery.sessions import AckIds, Session


def groupConversation(gid: str) -> str:
    return f"g:{gid}"


#: One group ack in this many (a power of two, minus one) has its latency
#: observed: a sample, so that an ack costs an addition and a test.
ACK_SAMPLE_MASK = 15


class _Acked:
    """
    The acknowledgement handler shared by every session a group message was
    pushed to.
    """

    __slots__ = ("fanout", "gid", "seq", "sent")

    def __init__(self, fanout: GroupFanout, gid: str, seq: int, sent: float):
        self.fanout = fanout
        self.gid = gid
        self.seq = seq
        self.sent = sent

    def __call__(self, session: Session) -> None:
        fanout = self.fanout
        fanout.advance(session.uid, self.gid, self.seq)
        fanout.flow.acked(session)
        fanout.acked += 1
        if not fanout.acked & ACK_SAMPLE_MASK:
            fanout.ackSeconds.observe(perf_counter() - self.sent)


class GroupFanout:
    """
    Pushes group messages to this node's sessions and keeps members'
    cursors; a backlog source of the inbox reader.

    @param groupsOf: C{groupsOf(uid)} fires with the ids of the groups
        C{uid} is a member of, for what it missed.

    @ivar messages: group messages fanned out.
    @ivar delivered: frames written to sessions by fan-out.
    @ivar acked: of those, acknowledged.
    @ivar fanoutSeconds: seconds to write one message to every session.
    @ivar ackSeconds: seconds from fan-out to a session's ack, for one ack
        in C{ACK_SAMPLE_MASK + 1}.
    """

    log = Logger()

    def __init__(
        self,
        *,
        store: IMessageStore,
        vault: StanzaVault,
        sessions: SessionRegistry,
        flow: FlowControl,
        ackIds: AckIds,
        groupsOf: Callable[[str], Deferred[set[str]]],
        batch: int = 50,
        maxUsers: int = 100_000,
    ):
        self.store = store
        self.vault = vault
        self.sessions = sessions
        self.flow = flow
        self.ackIds = ackIds
        self.groupsOf = groupsOf
        self.batch = batch
        self.maxUsers = maxUsers
        #: Unsaved cursor moves, by user then group.
        self._dirty: dict[str, dict[str, int]] = {}
        self._cursors: LoadingCache[str, dict[str, int]] = LoadingCache(
            self._read, maxUsers, onEvict=lambda uid, _: uid in self._dirty
        )
        self.messages = 0
        self.delivered = 0
        self.acked = 0
        self.fanoutSeconds = Histogram()
        self.ackSeconds = Histogram()

    # Cursors.

    def cursorsOf(self, uid: str) -> Deferred[dict[str, int]]:
        return self._cursors.get(uid)

    def _read(self, uid: str) -> Deferred[Any]:
        d: Deferred[Any] = self.store.cursorsOf(uid)

        def merged(stored: dict[str, int]) -> dict[str, int]:
            for gid, seq in self._dirty.get(uid, {}).items():
                stored[gid] = max(seq, stored.get(gid, 0))
            return stored

        d.addCallback(merged)
        return d

    def cursor(self, uid: str, gid: str) -> int | None:
        """
        C{uid}'s cursor of C{gid} if known in memory.
        """
        known = self._cursors.peek(uid)
        return None if known is None else known.get(gid, 0)

    def forgetCursors(self, uid: str) -> None:
        """
        Another node moved C{uid}'s cursors in the store (it placed a new
        member's): read them again when next needed, with this node's
        unsaved moves on top.
        """
        self._cursors.invalidate(uid)

    def advance(self, uid: str, gid: str, seq: int) -> None:
        """
        C{uid} acknowledged C{gid}'s message C{seq}.  Cursors only move
        forward; the move is saved with the next L{flush}.
        """
        known = self._cursors.peek(uid)
        if known is not None:
            if seq <= known.get(gid, 0):
                return
            known[gid] = seq
        dirty = self._dirty.setdefault(uid, {})
        dirty[gid] = max(seq, dirty.get(gid, 0))

    def place(self, uid: str, gid: str, seq: int) -> Deferred[None]:
        """
        Move C{uid}'s cursor of C{gid} to C{seq} now, in memory and in the
        store: a new member starts at the group's last message.  (A group's
        last seq never decreases, so this never moves a cursor back.)
        """
        known = self._cursors.peek(uid)
        if known is not None:
            known[gid] = max(seq, known.get(gid, 0))
        return self.store.saveCursors([(uid, gid, seq)])

    def flush(self) -> Deferred[None]:
        """
        Write the cursors that moved since the last flush.
        """
        if not self._dirty:
            return succeed(None)
        dirty, self._dirty = self._dirty, {}
        rows = [(uid, gid, seq) for uid, moves in dirty.items() for gid, seq in moves.items()]
        d = self.store.saveCursors(rows)

        def failed(failure: Any) -> None:
            # Keep them for the next flush.
            for uid, gid, seq in rows:
                moves = self._dirty.setdefault(uid, {})
                moves[gid] = max(seq, moves.get(gid, 0))
            self.log.failure("saving group cursors failed", failure)

        d.addErrback(failed)
        return d

    # Pushing.

    def deliver(
        self, gid: str, members: Iterable[str], encoded: Encoded, skip: str | None = None, seq: int | None = None
    ) -> int:
        """
        Push a durable group message to every live session on this node of
        every member but C{skip} (the sender, who gets an echo instead).

        @param seq: the message's seq, when C{encoded} came from another
            node already encoded (without its struct).
        @return: how many sessions it was written to.
        """
        start = perf_counter()
        if seq is None:
            seq = encoded.message.seq
        ackId = self.ackIds.next()
        header = server_header(TimType.TIMMESSAGE, ackId)
        prepared: dict[tuple[str, Any], tuple[Any, int]] = {}
        handler = _Acked(self, gid, seq, start)
        admit = self.flow.admit
        sessionsView = self.sessions.sessionsView
        written = 0
        # The hot loop of group traffic: everything it can, it looks up
        # once per message, not once per session.
        for uid in members:
            if uid == skip:
                continue
            for session in sessionsView(uid):
                if admit(session) is None:
                    continue
                sink = session.sink
                frame = prepared.get(session.frameKey)
                if frame is None:
                    raw = header + encoded.payload(session.encoding)
                    frame = prepared[session.frameKey] = (sink.prepareFrame(raw), len(raw))
                session.expectAck(ackId, handler)
                sink.writePrepared(frame[0], frame[1])
                written += 1
        # Counted once per message, never per session.
        self.messages += 1
        self.delivered += written
        self.fanoutSeconds.observe(perf_counter() - start)
        return written

    # Offline: the delivery drain asks for batches.

    def nextBatch(self, session: Session) -> Deferred[Any]:
        """
        The next group messages C{session}'s user has not acknowledged, as
        C{(messages, onAck)}, or C{None} when it is up to date.
        """
        d: Deferred[Any] = self.groupsOf(session.uid)
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
