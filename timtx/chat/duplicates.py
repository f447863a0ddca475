# -*- test-case-name: timtx.test.test_duplicates,timtx.test.test_messaging -*-
"""
Recognising a client's resend of a message it already sent.

A client that did not see the echo of its message (a dropped connection,
say) sends it again with the same C{id}.  Within C{[messages]
dedupe_window} seconds, such a resend is answered with the first message
instead of being stored again.

The keys live in the store, written in the same transaction as the message,
so they survive restarts, and the store fences them: a message whose key
is stored already is refused there (L{AlreadyStored}), even when this
filter did not know the key (two copies racing through two nodes, or
written by a node that stopped while committing), and is answered here
like any resend.  A sender's recent keys are read once, on its
first message with an id, and kept in memory; after that, checks cost no
store round trip, and a resend that arrives while the first copy is still
being written waits for it.

Memory holds at most C{[messages] dedupe_memory_keys} keys, the most recently
written, whoever sent them: the number of keys a window holds grows with
the message rate (a node taking 600 messages a second writes 180,000 in five
minutes), so past the bound a key is forgotten before its window ends.  A
resend of it then costs a trip to the store, whose fence refuses it: a
client resends what it did not see echoed, its last few messages, not one
from 100,000 messages ago.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional, Union

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from timtx.chat.conversations import AlreadyStored, Appended
from timtx.chat.messagerules import MaybeStored, refuseUnstored
from timtx.crypto.vault import StanzaVault
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import Duplicate
from timtx.protocols.constants import TimType
from timtx.protocols.structs import TimMessage
from timtx.util.cache import LoadingCache

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session

#: What a client id is known as: the message written in this process (to
#: those who waited for it), a key, or a write still under way.
Seen = Union[Appended, Duplicate, "InFlight"]

#: A written key in memory: C{(created, conv, seq, mid)}.  Atomic values
#: only, so the garbage collector stops tracking the tuple and full
#: collections (L{timtx.tap.collectPeriodically}) do not walk every key.
_Written = tuple[float, str, Optional[int], int]


class InFlight:
    """
    A message being written; resends wait for it.

    @ivar created: when its write began.
    """

    def __init__(self, created: float) -> None:
        self.created = created
        self._waiters: list[Deferred[Appended | Duplicate]] = []

    def wait(self) -> Deferred[Appended | Duplicate]:
        d: Deferred[Appended | Duplicate] = Deferred()
        self._waiters.append(d)
        return d

    def fire(self, result: Appended | Duplicate | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class DuplicateFilter:
    """
    @param window: seconds a client id is remembered; 0 disables the filter.
    @param maxKeys: keys kept in memory at most, the most recently written
        (or read from the store) first; older ones are forgotten.
    @param maxSenders: senders remembered as having had their keys read
        from the store; one past it is read again on its next message.
    """

    def __init__(
        self,
        *,
        store: IMessageStore,
        vault: StanzaVault,
        clock: IReactorTime,
        window: float,
        maxKeys: int = 100_000,
        maxSenders: int = 100_000,
    ):
        self.store = store
        self.vault = vault
        self.clock = clock
        self.window = window
        self.maxKeys = maxKeys
        self.maxSenders = maxSenders
        #: Every sender's keys in one order, oldest first: the bound and
        #: the expiry are one pass from the front.
        self._keys: OrderedDict[tuple[str, int], _Written | InFlight] = OrderedDict()
        #: Senders whose stored keys are in L{_keys}.
        self._senders: LoadingCache[str, bool] = LoadingCache(self._read, maxSenders)

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def __len__(self) -> int:
        """
        The keys in memory.
        """
        return len(self._keys)

    def check(self, sender: str, clientId: int) -> Deferred[Any]:
        """
        @return: a L{Deferred} firing with C{None} for a new message, or
            what C{clientId} is already known as.
        """
        d: Deferred[Any] = self._senders.get(sender)
        d.addCallback(lambda _: self._lookup(sender, clientId))
        return d

    def peek(self, sender: str, clientId: int) -> tuple[bool, Seen | None]:
        """
        Like L{check} without a Deferred: whether C{sender}'s keys are in
        memory, and if so what C{clientId} is known as.
        """
        if self._senders.peek(sender) is None:
            return False, None
        return True, self._lookup(sender, clientId)

    def remember(self, sender: str, clientId: int, appending: Deferred[Appended], conv: str) -> None:
        """
        Note that C{clientId} is being written to C{conv}.  Once written it
        is known by where it was stored (a small tuple, not the message: a
        busy node's window holds hundreds of thousands); if writing fails it
        is forgotten.  Call after L{check} answered C{None}.
        """
        keys = self._keys
        key = (sys.intern(sender), clientId)
        inFlight = InFlight(self.clock.seconds())
        keys[key] = inFlight
        keys.move_to_end(key)
        self._trim()
        # Every message of a conversation shares one string.
        conv = sys.intern(conv)

        def written(appended: Appended) -> Appended:
            message = appended.message
            # Unless it was forgotten for room meanwhile.
            if keys.get(key) is inFlight:
                keys[key] = (self.clock.seconds(), conv, message.seq, message.mid or 0)
            # Resends that waited meanwhile get the message itself.
            inFlight.fire(appended)
            return appended

        def failed(failure: Failure) -> Failure:
            if isinstance(failure.value, AlreadyStored):
                # The store had the key: a resend after all.  Known from
                # now on as what it holds; those who waited get that.
                stored: Duplicate = failure.value.duplicate
                if keys.get(key) is inFlight:
                    keys[key] = (stored.created, sys.intern(stored.conv), stored.seq, stored.mid)
                inFlight.fire(stored)
                return failure
            if keys.get(key) is inFlight:
                del keys[key]
            if failure.check(MaybeStored):
                # It may be stored after all, with its key: read the keys
                # again before the resend is checked.
                self._senders.pop(sender)
            inFlight.fire(failure)
            return failure

        appending.addCallbacks(written, failed)

    @inlineCallbacks
    def answer(self, session: Session, seen: Seen) -> Any:
        """
        Answer a resend with the message first stored, to this session
        only; a message no longer in history is answered with an ack of its
        mid.
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

    def refused(self, failure: Failure, session: Session, message: TimMessage) -> Any:
        """
        The errback of a message's append: one the store refused as a
        resend (L{AlreadyStored}) is answered as one, with the message it
        resends; any other failure is told to the sender by its id.
        """
        if not isinstance(failure.value, AlreadyStored):
            return refuseUnstored(failure, session, message)
        d = self.answer(session, failure.value.duplicate)
        return d.addErrback(refuseUnstored, session, message)

    def forget(self, sender: str) -> None:
        """
        Read C{sender}'s keys from the store again on its next message: in
        a cluster, once the sender logs in here, a resend of what it sent
        through another node must be seen.  The keys in memory stay (a
        write under way here is newer than the store's copy, and a resend
        waits for it); the store's are merged in beside them.
        """
        self._senders.pop(sender)

    def _read(self, sender: str) -> Deferred[bool]:
        d: Deferred[Any] = self.store.recentDuplicates(sender, self.clock.seconds() - self.window)
        d.addCallback(self._merge, sys.intern(sender))
        return d

    def _merge(self, rows: dict[int, Duplicate], sender: str) -> bool:
        keys = self._keys
        # Oldest first, so that the bound drops this sender's oldest; they
        # go after every key in memory, older or not: the sender is active
        # now.  A key known here already is newer than the store's copy.
        for clientId, dup in sorted(rows.items(), key=lambda item: item[1].created):
            key = (sender, clientId)
            if key not in keys:
                keys[key] = (dup.created, sys.intern(dup.conv), dup.seq, dup.mid)
        self._trim()
        return True

    def _lookup(self, sender: str, clientId: int) -> Seen | None:
        key = (sender, clientId)
        entry = self._keys.get(key)
        if entry is None:
            return None
        if isinstance(entry, InFlight):
            return entry
        created, conv, seq, mid = entry
        if created < self.clock.seconds() - self.window:
            del self._keys[key]
            return None
        return Duplicate(conv, seq, mid, created)

    def _trim(self) -> None:
        keys = self._keys
        while len(keys) > self.maxKeys:
            # A write under way that is dropped still answers those who
            # wait for it; only a later resend is no longer recognised.
            keys.popitem(last=False)

    def purge(self) -> Deferred[int]:
        """
        Forget expired keys, in memory and in the store.
        """
        oldest = self.clock.seconds() - self.window
        expired = []
        for key, entry in self._keys.items():
            if isinstance(entry, InFlight):
                # Its write ends it, or the bound does.
                if entry.created >= oldest:
                    break
                continue
            if entry[0] >= oldest:
                break
            expired.append(key)
        for key in expired:
            del self._keys[key]
        return self.store.purgeDuplicates(oldest)
