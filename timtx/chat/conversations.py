# -*- test-case-name: timtx.test.test_conversations -*-
"""
Conversation owners: the one place that numbers a conversation's messages.

Every conversation (a pair of users, later a group) has an owner that
assigns each message its C{seq} (1, 2, 3, ... without gaps) and its C{mid},
and writes it to the store together with the inbox entries it causes.
Appends are taken in arrival order; while one batch is being written, later
appends wait and are written together in the next batch, so a busy
conversation costs one transaction per batch, not per message.  A batch is
all-or-nothing: if the store fails, none of its messages get numbers and the
owner reloads its position from the store.  Callbacks fire in seq order,
after the commit, so nothing is announced before it is durable.

The owner's state is only C{(last seq, last mid)}, read back from the store
on first use; that is what lets a cluster move ownership of a conversation
to another node.

A message with a duplicate key C{(sender, client id)} that is already
stored (a resend that reached this owner while, or after, the first copy
was written, through this node or another) is not stored again: the store
refuses it (L{DuplicateConflict}, checked in the same transaction as the
message, so two copies racing on two nodes are stored once) and its append
fails with L{AlreadyStored}, naming the stored copy, for the caller to
answer it as a resend.  The other messages of its batch are numbered again
without it, so no seq is left unused.  Two copies in one batch never reach
the store: the later one waits for the earlier and is answered with it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.chat.messagerules import refusal
from timtx.crypto.vault import StanzaVault
from timtx.persistence.errors import DuplicateConflict, SequenceConflict, StoreUnavailable
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import Duplicate, NewMessage
from timtx.protocols import codec
from timtx.protocols.structs import TimMessage

#: mids count milliseconds from here, shifted left by 12 bits: 4096 ids per
#: millisecond, and below 2**53 (JavaScript's exact integers) until 2093.
MID_EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
MID_SHIFT = 12


def pairConversation(a: str, b: str) -> str:
    """
    The conversation id of users C{a} and C{b}, the same both ways.
    """
    low, high = (a, b) if a <= b else (b, a)
    return f"p:{low}:{high}"


class MidClock:
    """
    Message ids that grow with time and never repeat on this node.
    """

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._last = 0

    def next(self, after: int = 0) -> int:
        """
        A new mid, greater than every earlier one and than C{after}.
        """
        stamp = (int(self._clock.seconds() * 1000) - MID_EPOCH_MS) << MID_SHIFT
        mid = max(stamp, self._last + 1, after + 1)
        self._last = mid
        return mid


@dataclass
class Appended:
    """
    A message that is now durable.

    @ivar message: the message with C{mid} (and C{seq} if kept) set.
    @ivar qids: the inbox entry of each recipient.
    @ivar compact: C{message} in Thrift compact (tim 2.0 layout), as it
        was sealed for the store: what compact sessions are sent, without
        encoding it again.  C{None} if not known.
    @ivar handover: numbered right after this owner read a position that
        another writer had just moved (see L{Conversations.handoverWindow}):
        that writer's last pushes may still be on their way, so pushing this
        one could overtake them.  Its recipients look in their inboxes
        first, which are in seq order.
    """

    message: TimMessage
    qids: dict[str, int]
    compact: bytes | None = None
    handover: bool = False


class AlreadyStored(Exception):
    """
    An append was refused as a resend: its duplicate key is held by a
    stored message, which is what the sender is to be answered with.

    @ivar duplicate: where that message is stored.
    """

    def __init__(self, duplicate: Duplicate):
        super().__init__(f"a resend of mid {duplicate.mid} of {duplicate.conv}")
        self.duplicate = duplicate


@dataclass
class _Draft:
    sender: str
    message: TimMessage
    keep: bool
    recipients: tuple[str, ...]
    dedupe: tuple[str, int] | None
    created: float
    done: Deferred[Appended] = field(default_factory=Deferred)
    #: Times the store refused its numbers as taken (L{SequenceConflict}).
    conflicts: int = 0
    #: Later appends with the same duplicate key, answered with this one.
    resends: list[_Draft] = field(default_factory=list)
    #: The message in Thrift compact as its numbers were sealed.
    compact: bytes | None = None

    def resent(self, duplicate: Duplicate) -> None:
        """
        Answer this append and those waiting on it as resends of
        C{duplicate}.
        """
        for draft in [self, *self.resends]:
            draft.done.errback(AlreadyStored(duplicate))

    def failed(self, error: Exception) -> None:
        for draft in [self, *self.resends]:
            draft.done.errback(error)


class ConversationLog:
    """
    The owner of one conversation on this node.
    """

    def __init__(self, conv: str):
        self.conv = conv
        self.lastSeq: int | None = None
        self.lastMid = 0
        self.pending: list[_Draft] = []
        self.busy = False
        #: The next batch follows a position another writer just moved.
        self.handover = False

    @property
    def idle(self) -> bool:
        return not self.busy and not self.pending


class Conversations:
    """
    The conversation owners of this node, kept in memory while busy or
    recently used (at most C{maxIdle} idle ones).

    @param maxBatch: most messages written in one transaction.

    @ivar stored: messages made durable.
    @ivar resent: appends not stored because they were resends of a stored
        message (refused by the store, or a copy in the same batch).
    """

    log = Logger()

    #: Times a batch is numbered again after L{SequenceConflict} (another
    #: node numbered the conversation) before its messages are refused.
    maxConflicts = 3

    #: Seconds: a position read from the store whose last message is
    #: younger than this was moved by another writer that may still be
    #: pushing it (a node that owned the conversation until a membership
    #: change, or numbered it at the same moment), so the next batch is
    #: marked L{Appended.handover}.  0 on a single node, where nobody else
    #: writes; a cluster sets it.
    handoverWindow = 0.0

    def __init__(
        self,
        *,
        store: IMessageStore,
        vault: StanzaVault,
        clock: IReactorTime,
        maxBatch: int = 256,
        maxIdle: int = 100_000,
    ):
        self.store = store
        self.vault = vault
        self.clock = clock
        self.mids = MidClock(clock)
        self.maxBatch = maxBatch
        self.maxIdle = maxIdle
        self._logs: OrderedDict[str, ConversationLog] = OrderedDict()
        self.stored = 0
        self.resent = 0

    def append(
        self,
        conv: str,
        sender: str,
        message: TimMessage,
        recipients: tuple[str, ...],
        *,
        keep: bool = True,
        dedupe: tuple[str, int] | None = None,
    ) -> Deferred[Appended]:
        """
        Number C{message}, store it and give each recipient an inbox entry.

        @param keep: keep it in history with a C{seq}; otherwise it is held
            only in the recipients' inboxes (custom odTypes).
        @param dedupe: C{(sender, client id)} to remember with it.
        @return: a L{Deferred} firing with L{Appended} once durable, in the
            order appends were made; it fails with C{ERR_DATABASE} if the
            store fails.
        """
        log = self._logs.get(conv)
        if log is None:
            log = self._logs[conv] = ConversationLog(conv)
        else:
            self._logs.move_to_end(conv)
        draft = _Draft(sender, message, keep, recipients, dedupe, self.clock.seconds())
        log.pending.append(draft)
        self._flush(log)
        return draft.done

    def _flush(self, log: ConversationLog) -> None:
        if log.busy or not log.pending:
            return
        log.busy = True
        if log.lastSeq is None:
            d = self.store.lastMessage(log.conv)
            d.addCallbacks(self._loaded, self._loadFailed, callbackArgs=(log,), errbackArgs=(log,))
            return
        batch, log.pending = _firstOfEachKey(log.pending[: self.maxBatch]), log.pending[self.maxBatch :]
        seq, mid = log.lastSeq, log.lastMid
        rows = []
        for draft in batch:
            message = draft.message
            mid = self.mids.next(after=mid)
            message.mid = mid
            if draft.keep:
                seq += 1
                message.seq = seq
            # Encoded once: sealed here, and sent as is to compact sessions
            # once durable (L{Appended.compact}).
            draft.compact = compact = codec.encode_compact(message)
            if draft.keep:
                stanza: bytes | None = self.vault.sealEncodedMessage(log.conv, seq, compact)
                inbox: tuple[tuple[str, bytes | None], ...] = tuple((uid, None) for uid in draft.recipients)
            else:
                stanza = None
                inbox = tuple((uid, self.vault.sealEncodedFor(uid, compact)) for uid in draft.recipients)
            rows.append(
                NewMessage(
                    log.conv,
                    message.seq if draft.keep else None,
                    mid,
                    draft.sender,
                    stanza,
                    draft.created,
                    inbox,
                    draft.dedupe,
                )
            )
        written = self.store.appendMessages(rows)
        written.addCallbacks(
            self._written, self._writeFailed, callbackArgs=(log, batch, seq, mid), errbackArgs=(log, batch)
        )

    def _loaded(self, last: tuple[int, int], log: ConversationLog) -> None:
        ours = last[1] == log.lastMid
        log.lastSeq, log.lastMid = last
        log.busy = False
        if self.handoverWindow and last[1] and not ours:
            # A mid counts milliseconds: when its writer numbered it.
            written = (last[1] >> MID_SHIFT) + MID_EPOCH_MS
            log.handover = self.clock.seconds() * 1000 - written < self.handoverWindow * 1000
        self._flush(log)

    def _loadFailed(self, failure: Failure, log: ConversationLog) -> None:
        if failure.check(StoreUnavailable):
            self.log.warn("reading the position of {conv} failed: {why}", conv=log.conv, why=failure.getErrorMessage())
        else:
            self.log.failure("reading the position of {conv} failed", failure, conv=log.conv)
        log.busy = False
        pending, log.pending = log.pending, []
        for draft in pending:
            draft.failed(refusal(failure))

    def _written(self, qids: list[list[int]], log: ConversationLog, batch: list[_Draft], seq: int, mid: int) -> None:
        log.lastSeq, log.lastMid = seq, mid
        log.busy = False
        handover, log.handover = log.handover, False
        self.stored += len(batch)
        for draft, entries in zip(batch, qids, strict=True):
            resends, draft.resends = draft.resends, []
            message = draft.message
            draft.done.callback(
                Appended(message, dict(zip(draft.recipients, entries, strict=True)), draft.compact, handover)
            )
            if resends:
                self.resent += len(resends)
                stored = Duplicate(log.conv, message.seq if draft.keep else None, message.mid or 0, draft.created)
                for resend in resends:
                    resend.resent(stored)
        self._flush(log)
        self._evictIdle()

    def _writeFailed(self, failure: Failure, log: ConversationLog, batch: list[_Draft]) -> None:
        # Nothing of the batch was written (or, for StoreOutcomeUnknown, it
        # may have been): forget the numbers it used and read the position
        # again before the next batch.
        log.lastSeq = None
        log.busy = False
        for draft in batch:
            draft.message.mid = None
            draft.message.seq = None
            draft.compact = None
        if isinstance(failure.value, DuplicateConflict):
            # Resends of stored messages: answered with those, and the
            # rest numbered again without them.
            held = failure.value.held
            again = []
            for index, draft in enumerate(batch):
                if index in held:
                    self.resent += 1 + len(draft.resends)
                    self.log.info(
                        "{conv}: a resend of mid {mid} ({sender}) was not stored again",
                        conv=log.conv,
                        mid=held[index].mid,
                        sender=draft.sender,
                    )
                    draft.resent(held[index])
                else:
                    again.append(draft)
            log.pending[:0] = again
            batch = []
        elif failure.check(SequenceConflict):
            # Another node numbered this conversation meanwhile (a moment of
            # split ownership, fenced by the store): number the batch again
            # from the stored position, a few times, then refuse.
            again = [draft for draft in batch if draft.conflicts < self.maxConflicts]
            refused = [draft for draft in batch if draft.conflicts >= self.maxConflicts]
            for draft in again:
                draft.conflicts += 1
            self.log.info(
                "{conv}: seq {seq} was taken by another writer; numbering {count} messages again",
                conv=log.conv,
                seq=getattr(failure.value, "seq", None),
                count=len(again),
            )
            log.pending[:0] = again
            batch = refused
        elif failure.check(StoreUnavailable):
            self.log.warn(
                "storing {count} messages of {conv} failed: {why}",
                count=len(batch),
                conv=log.conv,
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure("storing {count} messages of {conv} failed", failure, count=len(batch), conv=log.conv)
        for draft in batch:
            draft.failed(refusal(failure))
        self._flush(log)

    def _evictIdle(self) -> None:
        while len(self._logs) > self.maxIdle:
            conv, oldest = next(iter(self._logs.items()))
            if not oldest.idle:
                self._logs.move_to_end(conv)
                return
            del self._logs[conv]


def _firstOfEachKey(batch: list[_Draft]) -> list[_Draft]:
    """
    C{batch} without the appends whose duplicate key an earlier one of it
    (or of its resends) has: each waits on that one, to be answered with
    it, since a store refuses a key given twice in one call.
    """
    first: dict[tuple[str, int], _Draft] = {}
    kept = []
    for draft in batch:
        key = draft.dedupe
        if key is None:
            kept.append(draft)
            continue
        earlier = first.get(key)
        if earlier is not None:
            earlier.resends.append(draft)
            earlier.resends.extend(draft.resends)
            draft.resends = []
            continue
        first[key] = draft
        kept.append(draft)
    return kept
