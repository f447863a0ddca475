# -*- test-case-name: timtx.test.test_store -*-
"""
What the server stores (PostgreSQL, MariaDB) share besides their SQL: the
rows an append or an inbox deletion writes, ready to be merged with others
of a batch (L{timtx.persistence.pool.mergedRuns}), and the records made
from rows read.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from timtx.persistence.errors import DuplicateConflict, SequenceConflict
from timtx.persistence.records import Duplicate, Group, NewMessage, StoredMessage

#: An inbox row: uid, conv, seq, stanza, created.
InboxRow = tuple[str, "str | None", "int | None", "bytes | None", float]


class Appends:
    """
    The rows one C{appendMessages} call writes.

    @ivar rows: history rows: conv, seq, mid, sender, stanza, created.
    @ivar inbox: inbox rows, in the order of the messages and their C{inbox}.
    @ivar sizes: how many inbox rows each message has.
    @ivar dupes: duplicate-key rows: sender, client id, conv, seq, mid,
        created.
    @ivar keys: per duplicate key, the index of its message in the call,
        the key, and where the message goes (conv, mid).
    """

    def __init__(self, messages: list[NewMessage]):
        self.rows = [(m.conv, m.seq, m.mid, m.sender, m.stanza, m.created) for m in messages if m.seq is not None]
        self.inbox: list[InboxRow] = [
            (uid, m.conv, m.seq if body is None else None, body, m.created) for m in messages for uid, body in m.inbox
        ]
        self.sizes = [len(m.inbox) for m in messages]
        self.dupes = [(*m.dedupe, m.conv, m.seq, m.mid, m.created) for m in messages if m.dedupe is not None]
        self.keys = [(i, m.dedupe, m.conv, m.mid) for i, m in enumerate(messages) if m.dedupe is not None]

    @staticmethod
    def together(appends: list[Appends]) -> tuple[list[tuple[Any, ...]], list[InboxRow], list[tuple[Any, ...]]]:
        """
        The rows of C{appends} in call order.  A duplicate key given twice
        is kept twice: the second is a resend of the first, refused by the
        store's fence like any other.
        """
        return (
            [row for a in appends for row in a.rows],
            [entry for a in appends for entry in a.inbox],
            [row for a in appends for row in a.dupes],
        )

    @staticmethod
    def checkKeys(appends: list[Appends], stored: Iterable[tuple[Any, ...]]) -> None:
        """
        @param stored: duplicate-key rows as stored now (sender, client id,
            conv, seq, mid, created), for keys of C{appends}; a key stored
            by its own message counts as that message's.
        @raise DuplicateConflict: for the first call with a message whose
            key is held by another message.
        """
        holders = {(row[0], row[1]): Duplicate(row[2], row[3], row[4], row[5]) for row in stored}
        for a in appends:
            held = {}
            for index, key, conv, mid in a.keys:
                holder = holders.get(key)
                if holder is not None and (holder.conv, holder.mid) != (conv, mid):
                    held[index] = holder
            if held:
                raise DuplicateConflict(held)

    @staticmethod
    def checkStored(rows: list[tuple[Any, ...]], stored: Iterable[tuple[str, int]]) -> None:
        """
        @param stored: the C{(conv, seq)} of the history rows written.
        @raise SequenceConflict: for the first of C{rows} not written (its
            seq was taken, by an earlier row or call).
        """
        written = Counter(stored)
        for conv, seq, *_ in rows:
            if not written[(conv, seq)]:
                raise SequenceConflict(conv, seq)
            written[(conv, seq)] -= 1

    @staticmethod
    def split(appends: list[Appends], qids: list[int]) -> list[list[list[int]]]:
        """
        The qids of the inbox rows of C{appends}, in order, cut into each
        call's result: per message, the qids of its entries.
        """
        results = []
        start = 0
        for a in appends:
            each = []
            for size in a.sizes:
                each.append(qids[start : start + size])
                start += size
            results.append(each)
        return results


class InboxDeletion:
    """
    The entries one C{deleteInbox} call removes.
    """

    def __init__(self, uid: str, qids: list[int]):
        self.uid = uid
        self.qids = list(qids)

    @staticmethod
    def pairs(deletions: list[InboxDeletion]) -> list[tuple[str, int]]:
        return [(d.uid, qid) for d in deletions for qid in d.qids]

    @staticmethod
    def counts(deletions: list[InboxDeletion], gone: Iterable[tuple[str, int]]) -> list[int]:
        """
        How many entries each of C{deletions} removed, given the C{(uid,
        qid)} of the rows deleted: an entry named twice counts for the
        first.
        """
        left = Counter(gone)
        counts = []
        for deletion in deletions:
            count = 0
            for qid in deletion.qids:
                if left[(deletion.uid, qid)]:
                    left[(deletion.uid, qid)] -= 1
                    count += 1
            counts.append(count)
        return counts


def message(row: tuple[Any, ...]) -> StoredMessage:
    conv, seq, mid, sender, stanza, state, created = row
    return StoredMessage(conv, seq, mid, sender, bytes(stanza), state, created)


def group(row: tuple[Any, ...]) -> Group:
    gid, domain, founder, gtype, status, created, profile, cap, mutedAll = row
    return Group(
        gid, domain, founder, gtype, status, created, None if profile is None else bytes(profile), cap, bool(mutedAll)
    )


def groupRow(group: Group) -> tuple[Any, ...]:
    return (
        group.gid,
        group.domain,
        group.founder,
        group.gtype,
        group.status,
        group.created,
        group.profile,
        group.memberCap,
        group.mutedAll,
    )


def firstLine(error: BaseException) -> str:
    """
    An error in one line, for logs and the message a node exits with.
    """
    args = error.args
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        # A MySQL driver's (code, message): the message first.
        text = f"{args[1]} (error {args[0]})"
    else:
        text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if text.strip() else type(error).__name__


def poolOptions(store: Any) -> dict[str, Any]:
    """
    The keyword arguments of a server store from C{[store]}.
    """
    return {
        "poolSize": store.pool_size,
        "batchMax": store.batch_max,
        "statementTimeout": store.statement_timeout,
        "connectTimeout": store.connect_timeout,
        "reconnectInitial": store.reconnect_initial,
        "reconnectMax": store.reconnect_max,
    }
