# -*- test-case-name: timtx.test.test_store -*-
"""
What a store call can fail with, beyond a plain bug.

Services tell these apart: L{SequenceConflict} means another node numbered
the conversation (reload and retry), L{DuplicateConflict} means a message
is a resend of one already stored (answer it with that one),
L{StoreUnavailable} means the database
cannot be reached (answer the client with a retryable error), and
L{StoreOutcomeUnknown} means the write may or may not have happened (never
confirm it; a resend is matched by its duplicate key).
"""

from __future__ import annotations

from timtx.persistence.records import Duplicate


class SequenceConflict(Exception):
    """
    L{appendMessages<timtx.persistence.interfaces.IMessageStore.appendMessages>}
    was given a C{(conv, seq)} that is already stored.  Nothing of that call
    was written.  In a cluster it means two nodes each believed they owned
    the conversation: the loser reloads the position and numbers again.

    @ivar conv: the conversation.
    @ivar seq: the first seq of the call found taken.
    """

    def __init__(self, conv: str, seq: int):
        super().__init__(f"seq {seq} of {conv} is already stored")
        self.conv = conv
        self.seq = seq

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        # Made again from its fields, not its message: a store in a child
        # process sends it pickled (timtx.persistence.hosted).
        return (SequenceConflict, (self.conv, self.seq))


class DuplicateConflict(Exception):
    """
    L{appendMessages<timtx.persistence.interfaces.IMessageStore.appendMessages>}
    was given messages whose duplicate key C{(sender, client id)} is
    already stored (committed before, or by a concurrent transaction that
    the store waited for).  Nothing of that call was written.  The caller
    answers those messages with the ones holding their keys, and appends
    the others again.

    @ivar held: for each refused message, its index in the call and the
        L{timtx.persistence.records.Duplicate} holding its key (where
        that message is stored).
    """

    def __init__(self, held: dict[int, Duplicate]):
        first = min(held)
        super().__init__(f"message {first} of the call is a resend of mid {held[first].mid} of {held[first].conv}")
        self.held = held

    def __reduce__(self) -> tuple[type, tuple[dict[int, Duplicate]]]:
        return (DuplicateConflict, (self.held,))


class StoreUnavailable(Exception):
    """
    The database cannot be reached (down, restarting, unreachable, or the
    store is closed).  The call did not happen; it is safe to retry later.
    The store reconnects by itself in the background.
    """


class StoreOutcomeUnknown(StoreUnavailable):
    """
    The connection was lost after the commit was sent: the write may have
    been stored or not.  Never confirm such a write to a client; ask it to
    resend, and let the duplicate keys sort out a write that did happen.
    """


class SchemaTooNew(Exception):
    """
    The database was written by a newer timtx; refusing to touch it.
    """
