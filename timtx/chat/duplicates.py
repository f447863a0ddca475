# -*- test-case-name: timtx.test.test_messaging -*-
"""
Recognising a client's resend of a message it already sent.

A client that did not see the echo of its message (a dropped connection,
say) sends it again with the same C{id}.  Within C{[messages]
dedupe_window} seconds, such a resend is answered with the first message
instead of being stored again.

The keys live in the store, written in the same transaction as the message,
so they survive restarts.  A sender's recent keys are read once, on its
first message with an id, and kept in memory while the sender is active;
after that, checks cost no store round trip, and a resend that arrives while
the first copy is still being written waits for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from timtx.chat.conversations import Appended
from timtx.chat.messagerules import MaybeStored
from timtx.crypto.vault import StanzaVault
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import Duplicate
from timtx.protocols.constants import TimType
from timtx.util.cache import LoadingCache

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session

#: What a client id is known as: the message written in this process, a
#: key read from the store, or a write still under way.
Seen = Union[Appended, Duplicate, "InFlight"]


class InFlight:
    """
    A message being written; resends wait for it.
    """

    def __init__(self) -> None:
        self._waiters: list[Deferred[Appended]] = []

    def wait(self) -> Deferred[Appended]:
        d: Deferred[Appended] = Deferred()
        self._waiters.append(d)
        return d

    def fire(self, result: Appended | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class DuplicateFilter:
    """
    @param window: seconds a client id is remembered; 0 disables the filter.
    @param maxSenders: senders whose keys are kept in memory at once.
    """

    #: Past this many keys for one sender, expired ones are dropped.
    pruneAbove = 10_000

    def __init__(
        self, *, store: IMessageStore, vault: StanzaVault, clock: IReactorTime, window: float, maxSenders: int = 100_000
    ):
        self.store = store
        self.vault = vault
        self.clock = clock
        self.window = window
        self.maxSenders = maxSenders
        self._senders: LoadingCache[str, dict[int, tuple[float, Seen]]] = LoadingCache(self._read, maxSenders)

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def check(self, sender: str, clientId: int) -> Deferred[Any]:
        """
        @return: a L{Deferred} firing with C{None} for a new message, or
            what C{clientId} is already known as.
        """
        d: Deferred[Any] = self._senders.get(sender)
        d.addCallback(self._lookup, clientId)
        return d

    def peek(self, sender: str, clientId: int) -> tuple[bool, Seen | None]:
        """
        Like L{check} without a Deferred: whether C{sender}'s keys are in
        memory, and if so what C{clientId} is known as.
        """
        known = self._senders.peek(sender)
        if known is None:
            return False, None
        return True, self._lookup(known, clientId)

    def remember(self, sender: str, clientId: int, appending: Deferred[Appended], conv: str) -> None:
        """
        Note that C{clientId} is being written to C{conv}.  Once written it
        is known by where it was stored (a small L{Duplicate}, not the
        message: a busy sender's window holds thousands); if writing fails
        it is forgotten.  Call after L{check} answered C{None}.
        """
        known = self._senders.peek(sender)
        if known is None:
            known = {}
            self._senders.put(sender, known)
        if len(known) > self.pruneAbove:
            self._prune(known)
        inFlight = InFlight()
        known[clientId] = (self.clock.seconds(), inFlight)

        def written(appended: Appended) -> Appended:
            now = self.clock.seconds()
            message = appended.message
            known[clientId] = (now, Duplicate(conv, message.seq, message.mid or 0, now))
            # Resends that waited meanwhile get the message itself.
            inFlight.fire(appended)
            return appended

        def failed(failure: Failure) -> Failure:
            known.pop(clientId, None)
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

    def forget(self, sender: str) -> None:
        """
        Drop C{sender}'s keys from memory, so that its next message reads
        them from the store again: in a cluster, once the sender logs in
        here, a resend of what it sent through another node must be seen.
        Keys of writes still under way here are kept (a resend waits for
        them).
        """
        known = self._senders.peek(sender)
        if known is not None and not any(isinstance(seen, InFlight) for _, seen in known.values()):
            self._senders.pop(sender)

    def _read(self, sender: str) -> Deferred[Any]:
        d: Deferred[Any] = self.store.recentDuplicates(sender, self.clock.seconds() - self.window)
        d.addCallback(lambda rows: {cid: (dup.created, dup) for cid, dup in rows.items()})
        return d

    def _lookup(self, known: dict[int, tuple[float, Seen]], clientId: int) -> Seen | None:
        entry = known.get(clientId)
        if entry is None:
            return None
        created, seen = entry
        if isinstance(seen, InFlight):
            return seen
        if created < self.clock.seconds() - self.window:
            del known[clientId]
            return None
        return seen

    def _prune(self, known: dict[int, tuple[float, Seen]]) -> None:
        oldest = self.clock.seconds() - self.window
        for cid in [
            cid for cid, (created, seen) in known.items() if created < oldest and not isinstance(seen, InFlight)
        ]:
            del known[cid]

    def purge(self) -> Deferred[int]:
        """
        Forget expired keys, in memory and in the store.
        """
        for sender, known in self._senders.items():
            self._prune(known)
            if not known:
                self._senders.pop(sender)
        return self.store.purgeDuplicates(self.clock.seconds() - self.window)
