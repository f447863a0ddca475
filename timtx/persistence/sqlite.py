# -*- test-case-name: timtx.test.test_store -*-
"""
The embedded default store: one SQLite file in WAL mode, driven by one
L{SerialWorker} thread with group commit.

The schema is versioned with C{PRAGMA user_version}; L{MIGRATIONS} lists the
steps, and L{SQLiteStore.open} applies the missing ones in one transaction.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import implementer

from timtx.persistence.errors import SchemaTooNew, SequenceConflict
from timtx.persistence.interfaces import IMessageStore, IStoreFactory
from timtx.persistence.records import (
    BLOCK_BY_USER,
    GROUP_ALIVE,
    Account,
    Duplicate,
    Group,
    InboxEntry,
    Member,
    NewMessage,
    Relation,
    StoredMessage,
    TokenGrant,
)
from timtx.persistence.rows import Appends
from timtx.persistence.sealed import keyCounts, keysSql, selectSql, updateSql
from timtx.persistence.worker import BatchWorker, SerialWorker

T = TypeVar("T")

#: Schema steps; step N brings user_version from N-1 to N.  Append only.
MIGRATIONS: list[str] = [
    # 1: accounts and login tokens.
    """
    CREATE TABLE accounts (
        uid TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE login_tokens (
        token_key BLOB PRIMARY KEY,
        uid TEXT NOT NULL,
        domain TEXT NOT NULL,
        expires REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX login_tokens_expires ON login_tokens (expires);
    """,
    # 2: conversations, inboxes, duplicate keys, relations, profiles.
    """
    CREATE TABLE messages (
        conv TEXT NOT NULL,
        seq INTEGER NOT NULL,
        mid INTEGER NOT NULL,
        sender TEXT NOT NULL,
        stanza BLOB NOT NULL,
        state INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        PRIMARY KEY (conv, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX messages_mid ON messages (conv, mid);
    CREATE TABLE inbox (
        qid INTEGER PRIMARY KEY AUTOINCREMENT,
        uid TEXT NOT NULL,
        conv TEXT,
        seq INTEGER,
        stanza BLOB,
        created REAL NOT NULL
    );
    CREATE INDEX inbox_uid ON inbox (uid, qid);
    CREATE TABLE duplicates (
        sender TEXT NOT NULL,
        client_id INTEGER NOT NULL,
        conv TEXT NOT NULL,
        seq INTEGER,
        mid INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (sender, client_id)
    ) WITHOUT ROWID;
    CREATE INDEX duplicates_created ON duplicates (created);
    CREATE TABLE stances (
        owner TEXT NOT NULL,
        other TEXT NOT NULL,
        stance INTEGER NOT NULL,
        PRIMARY KEY (owner, other)
    ) WITHOUT ROWID;
    CREATE INDEX stances_other ON stances (other, owner);
    CREATE TABLE profiles (uid TEXT PRIMARY KEY, stanza BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE invisible (uid TEXT PRIMARY KEY) WITHOUT ROWID;
    """,
    # 3: groups.
    """
    CREATE TABLE groups (
        gid TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        founder TEXT NOT NULL,
        gtype INTEGER NOT NULL,
        status INTEGER NOT NULL,
        created REAL NOT NULL,
        profile BLOB,
        member_cap INTEGER NOT NULL DEFAULT 0,
        muted_all INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE group_members (
        gid TEXT NOT NULL,
        uid TEXT NOT NULL,
        role INTEGER NOT NULL,
        joined REAL NOT NULL,
        muted_until REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (gid, uid)
    ) WITHOUT ROWID;
    CREATE INDEX group_members_uid ON group_members (uid, gid);
    CREATE TABLE group_requests (
        gid TEXT NOT NULL,
        uid TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (gid, uid)
    ) WITHOUT ROWID;
    CREATE TABLE group_blocks (
        gid TEXT NOT NULL,
        uid TEXT NOT NULL,
        by INTEGER NOT NULL,
        PRIMARY KEY (gid, uid, by)
    ) WITHOUT ROWID;
    CREATE INDEX group_blocks_uid ON group_blocks (uid, by);
    CREATE TABLE group_cursors (
        uid TEXT NOT NULL,
        gid TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (uid, gid)
    ) WITHOUT ROWID;
    """,
]


def _connect(path: str, synchronous: str) -> Callable[[], sqlite3.Connection]:
    def connect() -> sqlite3.Connection:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={synchronous.upper()}")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute("PRAGMA busy_timeout=5000")
        _migrate(connection)
        return connection

    return connect


def transactionSteps(begin: str = "BEGIN IMMEDIATE") -> dict[str, Callable[..., Any]]:
    """
    A L{BatchWorker}'s transaction steps on an C{sqlite3} connection
    opened with C{isolation_level=None}.
    """
    return {
        "begin": lambda c: c.execute(begin),
        "commit": lambda c: c.execute("COMMIT"),
        "rollback": lambda c: c.execute("ROLLBACK"),
        "savepoint": lambda c, n: c.execute(f"SAVEPOINT {n}"),
        "release": lambda c, n: c.execute(f"RELEASE {n}"),
        "rollbackTo": lambda c, n: c.execute(f"ROLLBACK TO {n}"),
        "close": lambda c: c.close(),
    }


def _migrate(connection: sqlite3.Connection) -> None:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise SchemaTooNew(f"database schema {version} is newer than this timtx ({len(MIGRATIONS)})")
    if version == len(MIGRATIONS):
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[step].split(";"):
                if statement.strip():
                    connection.execute(statement)
        connection.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


@implementer(IMessageStore)
class SQLiteStore:
    name = "sqlite"
    #: A file on the node's own disk: there is no server to lose.
    available = True

    def __init__(
        self,
        reactor: Any,
        path: str,
        synchronous: str = "full",
        batchMax: int = 256,
        worker: Callable[..., BatchWorker] = SerialWorker,
    ):
        self.path = path
        self._qids = _Qids()
        self._worker = worker(
            reactor, _connect(path, synchronous), **transactionSteps(), batchMax=batchMax, name="timtx-sqlite"
        )

    def _run(self, operation: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        return self._worker.submit(operation)

    def open(self) -> Deferred[None]:
        return self._worker.start()

    def close(self) -> Deferred[None]:
        return self._worker.stop()

    # Accounts.

    def createAccount(self, account: Account) -> Deferred[bool]:
        def create(c: sqlite3.Connection) -> bool:
            cursor = c.execute(
                "INSERT OR IGNORE INTO accounts (uid, domain, password_hash, created) VALUES (?, ?, ?, ?)",
                (account.uid, account.domain, account.passwordHash, account.created),
            )
            return cursor.rowcount == 1

        return self._run(create)

    def getAccount(self, uid: str) -> Deferred[Account | None]:
        def get(c: sqlite3.Connection) -> Account | None:
            row = c.execute("SELECT uid, domain, password_hash, created FROM accounts WHERE uid = ?", (uid,)).fetchone()
            return Account(*row) if row else None

        return self._run(get)

    def setPasswordHash(self, uid: str, passwordHash: str) -> Deferred[bool]:
        def update(c: sqlite3.Connection) -> bool:
            cursor = c.execute("UPDATE accounts SET password_hash = ? WHERE uid = ?", (passwordHash, uid))
            return cursor.rowcount == 1

        return self._run(update)

    # Login tokens.

    def addToken(self, key: bytes, grant: TokenGrant, expires: float) -> Deferred[None]:
        def add(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO login_tokens (token_key, uid, domain, expires) VALUES (?, ?, ?, ?)",
                (key, grant.uid, grant.domain, expires),
            )

        return self._run(add)

    def takeToken(self, key: bytes, now: float) -> Deferred[TokenGrant | None]:
        def take(c: sqlite3.Connection) -> TokenGrant | None:
            row = c.execute(
                "DELETE FROM login_tokens WHERE token_key = ? RETURNING uid, domain, expires", (key,)
            ).fetchone()
            if row is None or row[2] < now:
                return None
            return TokenGrant(row[0], row[1])

        return self._run(take)

    def purgeTokens(self, now: float) -> Deferred[int]:
        return self._run(lambda c: c.execute("DELETE FROM login_tokens WHERE expires < ?", (now,)).rowcount)

    # Messages.

    def appendMessages(self, messages: list[NewMessage]) -> Deferred[list[list[int]]]:
        return self._run(_Append(messages, self._qids))

    def lastMessage(self, conv: str) -> Deferred[tuple[int, int]]:
        def last(c: sqlite3.Connection) -> tuple[int, int]:
            row = c.execute(
                "SELECT seq, mid FROM messages WHERE conv = ? ORDER BY seq DESC LIMIT 1", (conv,)
            ).fetchone()
            return (row[0], row[1]) if row else (0, 0)

        return self._run(last)

    _MESSAGE = "SELECT conv, seq, mid, sender, stanza, state, created FROM messages"

    def getMessage(self, conv: str, mid: int) -> Deferred[StoredMessage | None]:
        def get(c: sqlite3.Connection) -> StoredMessage | None:
            row = c.execute(f"{self._MESSAGE} WHERE conv = ? AND mid = ?", (conv, mid)).fetchone()
            return StoredMessage(*row) if row else None

        return self._run(get)

    def replaceMessage(
        self, conv: str, seq: int, stanza: bytes, state: int, notices: list[tuple[str, bytes]], created: float
    ) -> Deferred[list[int]]:
        def replace(c: sqlite3.Connection) -> list[int]:
            c.execute(
                "UPDATE messages SET stanza = ?, state = ? WHERE conv = ? AND seq = ?", (stanza, state, conv, seq)
            )
            return [_insertInbox(c, self._qids, uid, conv, None, body, created) for uid, body in notices]

        return self._run(replace)

    def history(self, conv: str, beforeMid: int | None, limit: int) -> Deferred[list[StoredMessage]]:
        def read(c: sqlite3.Connection) -> list[StoredMessage]:
            if beforeMid is None:
                rows = c.execute(f"{self._MESSAGE} WHERE conv = ? ORDER BY mid DESC LIMIT ?", (conv, limit))
            else:
                rows = c.execute(
                    f"{self._MESSAGE} WHERE conv = ? AND mid < ? ORDER BY mid DESC LIMIT ?", (conv, beforeMid, limit)
                )
            return [StoredMessage(*row) for row in rows]

        return self._run(read)

    def recentDuplicates(self, sender: str, since: float) -> Deferred[dict[int, Duplicate]]:
        def read(c: sqlite3.Connection) -> dict[int, Duplicate]:
            rows = c.execute(
                "SELECT client_id, conv, seq, mid, created FROM duplicates WHERE sender = ? AND created >= ?",
                (sender, since),
            )
            return {row[0]: Duplicate(*row[1:]) for row in rows}

        return self._run(read)

    def purgeDuplicates(self, before: float) -> Deferred[int]:
        return self._run(lambda c: c.execute("DELETE FROM duplicates WHERE created < ?", (before,)).rowcount)

    # Inboxes.

    def addInbox(self, entries: list[tuple[str, bytes]], created: float) -> Deferred[list[int]]:
        return self._run(
            lambda c: [_insertInbox(c, self._qids, uid, None, None, stanza, created) for uid, stanza in entries]
        )

    def readInbox(self, uid: str, afterQid: int, limit: int) -> Deferred[list[InboxEntry]]:
        def read(c: sqlite3.Connection) -> list[InboxEntry]:
            rows = c.execute(
                "SELECT i.qid, i.conv, i.seq, COALESCE(i.stanza, m.stanza) FROM inbox i "
                "LEFT JOIN messages m ON i.stanza IS NULL AND m.conv = i.conv AND m.seq = i.seq "
                "WHERE i.uid = ? AND i.qid > ? ORDER BY i.qid LIMIT ?",
                (uid, afterQid, limit),
            )
            return [InboxEntry(qid, uid, conv, seq, stanza) for qid, conv, seq, stanza in rows if stanza is not None]

        return self._run(read)

    def deleteInbox(self, uid: str, qids: list[int]) -> Deferred[int]:
        def delete(c: sqlite3.Connection) -> int:
            unique = list(dict.fromkeys(qids))
            count = 0
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                count += c.execute(f"DELETE FROM inbox WHERE uid = ? AND qid IN ({marks})", (uid, *chunk)).rowcount
            return count

        return self._run(delete)

    def countInbox(self, uid: str) -> Deferred[int]:
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM inbox WHERE uid = ?", (uid,)).fetchone()[0])

    # Relations and profiles.

    def relationsOf(self, uid: str) -> Deferred[list[Relation]]:
        def read(c: sqlite3.Connection) -> list[Relation]:
            others: dict[str, list[int]] = {}
            for other, stance in c.execute("SELECT other, stance FROM stances WHERE owner = ?", (uid,)):
                others.setdefault(other, [0, 0])[0] = stance
            for owner, stance in c.execute("SELECT owner, stance FROM stances WHERE other = ?", (uid,)):
                others.setdefault(owner, [0, 0])[1] = stance
            return [Relation(other, mine, theirs) for other, (mine, theirs) in others.items()]

        return self._run(read)

    def setStance(self, owner: str, other: str, stance: int) -> Deferred[None]:
        def store(c: sqlite3.Connection) -> None:
            if stance:
                c.execute(
                    "INSERT OR REPLACE INTO stances (owner, other, stance) VALUES (?, ?, ?)", (owner, other, stance)
                )
            else:
                c.execute("DELETE FROM stances WHERE owner = ? AND other = ?", (owner, other))

        return self._run(store)

    def getProfile(self, uid: str) -> Deferred[bytes | None]:
        def get(c: sqlite3.Connection) -> bytes | None:
            row = c.execute("SELECT stanza FROM profiles WHERE uid = ?", (uid,)).fetchone()
            return row[0] if row else None

        return self._run(get)

    def putProfile(self, uid: str, stanza: bytes) -> Deferred[None]:
        def store(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO profiles (uid, stanza) VALUES (?, ?)", (uid, stanza))

        return self._run(store)

    def getInvisible(self, uid: str) -> Deferred[bool]:
        return self._run(lambda c: c.execute("SELECT 1 FROM invisible WHERE uid = ?", (uid,)).fetchone() is not None)

    def setInvisible(self, uid: str, invisible: bool) -> Deferred[None]:
        def store(c: sqlite3.Connection) -> None:
            if invisible:
                c.execute("INSERT OR IGNORE INTO invisible (uid) VALUES (?)", (uid,))
            else:
                c.execute("DELETE FROM invisible WHERE uid = ?", (uid,))

        return self._run(store)

    # Groups.

    _GROUP = "SELECT gid, domain, founder, gtype, status, created, profile, member_cap, muted_all FROM groups"

    def createGroup(self, group: Group, founder: Member) -> Deferred[None]:
        def create(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO groups (gid, domain, founder, gtype, status, created, profile, member_cap, muted_all) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _groupRow(group),
            )
            _putMember(c, group.gid, founder)

        return self._run(create)

    def getGroup(self, gid: str) -> Deferred[Group | None]:
        def get(c: sqlite3.Connection) -> Group | None:
            row = c.execute(f"{self._GROUP} WHERE gid = ?", (gid,)).fetchone()
            return _group(row) if row else None

        return self._run(get)

    def updateGroup(self, group: Group) -> Deferred[None]:
        def update(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE groups SET domain = ?, founder = ?, gtype = ?, status = ?, created = ?, profile = ?, "
                "member_cap = ?, muted_all = ? WHERE gid = ?",
                (*_groupRow(group)[1:], group.gid),
            )

        return self._run(update)

    def countFounded(self, uid: str) -> Deferred[int]:
        return self._run(
            lambda c: c.execute(
                "SELECT COUNT(*) FROM groups WHERE founder = ? AND status = ?", (uid, GROUP_ALIVE)
            ).fetchone()[0]
        )

    def groupMembers(self, gid: str) -> Deferred[list[Member]]:
        def read(c: sqlite3.Connection) -> list[Member]:
            rows = c.execute("SELECT uid, role, joined, muted_until FROM group_members WHERE gid = ?", (gid,))
            return [Member(*row) for row in rows]

        return self._run(read)

    def groupsOf(self, uid: str) -> Deferred[list[str]]:
        return self._run(lambda c: [r[0] for r in c.execute("SELECT gid FROM group_members WHERE uid = ?", (uid,))])

    def putMember(self, gid: str, member: Member) -> Deferred[None]:
        return self._run(lambda c: _putMember(c, gid, member))

    def removeMembers(self, gid: str, uids: list[str]) -> Deferred[int]:
        def remove(c: sqlite3.Connection) -> int:
            return sum(
                c.execute("DELETE FROM group_members WHERE gid = ? AND uid = ?", (gid, uid)).rowcount for uid in uids
            )

        return self._run(remove)

    def addJoinRequest(self, gid: str, uid: str, created: float) -> Deferred[None]:
        def add(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO group_requests (gid, uid, created) VALUES (?, ?, ?)", (gid, uid, created))

        return self._run(add)

    def takeJoinRequest(self, gid: str, uid: str) -> Deferred[bool]:
        return self._run(
            lambda c: c.execute("DELETE FROM group_requests WHERE gid = ? AND uid = ?", (gid, uid)).rowcount == 1
        )

    def setGroupBlock(self, gid: str, uid: str, by: int, blocked: bool) -> Deferred[None]:
        def store(c: sqlite3.Connection) -> None:
            if blocked:
                c.execute("INSERT OR IGNORE INTO group_blocks (gid, uid, by) VALUES (?, ?, ?)", (gid, uid, by))
            else:
                c.execute("DELETE FROM group_blocks WHERE gid = ? AND uid = ? AND by = ?", (gid, uid, by))

        return self._run(store)

    def groupBlocks(self, gid: str) -> Deferred[dict[str, set[int]]]:
        def read(c: sqlite3.Connection) -> dict[str, set[int]]:
            found: dict[str, set[int]] = {}
            for uid, by in c.execute("SELECT uid, by FROM group_blocks WHERE gid = ?", (gid,)):
                found.setdefault(uid, set()).add(by)
            return found

        return self._run(read)

    def userGroupBlocks(self, uid: str) -> Deferred[list[str]]:
        return self._run(
            lambda c: [
                r[0] for r in c.execute("SELECT gid FROM group_blocks WHERE uid = ? AND by = ?", (uid, BLOCK_BY_USER))
            ]
        )

    def saveCursors(self, cursors: list[tuple[str, str, int]]) -> Deferred[None]:
        def save(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO group_cursors (uid, gid, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (uid, gid) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                cursors,
            )

        return self._run(save)

    def cursorsOf(self, uid: str) -> Deferred[dict[str, int]]:
        return self._run(lambda c: dict(c.execute("SELECT gid, seq FROM group_cursors WHERE uid = ?", (uid,))))

    def messagesAfter(self, conv: str, afterSeq: int, limit: int) -> Deferred[list[StoredMessage]]:
        def read(c: sqlite3.Connection) -> list[StoredMessage]:
            rows = c.execute(
                f"{self._MESSAGE} WHERE conv = ? AND seq > ? ORDER BY seq LIMIT ?", (conv, afterSeq, limit)
            )
            return [StoredMessage(*row) for row in rows]

        return self._run(read)

    # Sealed blobs.

    def sealedRows(
        self, kind: str, after: Any, limit: int, keep: bytes
    ) -> Deferred[tuple[list[tuple[Any, bytes]], Any]]:
        def read(c: sqlite3.Connection) -> tuple[list[tuple[Any, bytes]], Any]:
            params = (len(keep), keep, *(after or ()), limit)
            rows = [(tuple(r[:-1]), bytes(r[-1])) for r in c.execute(selectSql(kind, after is not None, "?"), params)]
            return rows, rows[-1][0] if len(rows) == limit else None

        return self._run(read)

    def replaceSealed(self, kind: str, rows: list[tuple[Any, bytes, bytes]]) -> Deferred[int]:
        def replace(c: sqlite3.Connection) -> int:
            sql = updateSql(kind, "?")
            return sum(c.execute(sql, (new, *key, old)).rowcount for key, old, new in rows)

        return self._run(replace)

    def sealedKeys(self, kind: str) -> Deferred[dict[int, int]]:
        return self._run(lambda c: keyCounts(c.execute(keysSql(kind, "?"), (b"\x01", b"\x02")).fetchall()))


def _groupRow(group: Group) -> tuple[Any, ...]:
    return (
        group.gid,
        group.domain,
        group.founder,
        group.gtype,
        group.status,
        group.created,
        group.profile,
        group.memberCap,
        int(group.mutedAll),
    )


def _group(row: tuple[Any, ...]) -> Group:
    gid, domain, founder, gtype, status, created, profile, cap, mutedAll = row
    return Group(gid, domain, founder, gtype, status, created, profile, cap, bool(mutedAll))


def _putMember(c: sqlite3.Connection, gid: str, member: Member) -> None:
    c.execute(
        "INSERT OR REPLACE INTO group_members (gid, uid, role, joined, muted_until) VALUES (?, ?, ?, ?, ?)",
        (gid, member.uid, member.role, member.joined, member.mutedUntil),
    )


class _Qids:
    """
    Inbox qids, given out by the store rather than by SQLite, so that a
    batch's entries are inserted with one C{executemany}.  Only the worker
    thread uses it; it starts past every qid ever given (C{AUTOINCREMENT}
    keeps the highest in C{sqlite_sequence}), and never goes back: a batch
    rolled back leaves a gap, which readers do not mind.
    """

    def __init__(self) -> None:
        self._next = 0

    def take(self, c: sqlite3.Connection, count: int) -> int:
        """
        The first of C{count} new qids.
        """
        if not self._next:
            (top,) = c.execute(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'inbox'), 0), "
                "COALESCE((SELECT MAX(qid) FROM inbox), 0))"
            ).fetchone()
            self._next = int(top) + 1
        first = self._next
        self._next += count
        return first


def _insertInbox(
    c: sqlite3.Connection,
    qids: _Qids,
    uid: str,
    conv: str | None,
    seq: int | None,
    stanza: bytes | None,
    created: float,
) -> int:
    qid = qids.take(c, 1)
    c.execute(
        "INSERT INTO inbox (qid, uid, conv, seq, stanza, created) VALUES (?, ?, ?, ?, ?, ?)",
        (qid, uid, conv, seq, stanza, created),
    )
    return qid


class _Append:
    """
    One C{appendMessages} call, as a worker operation: run alone, or with
    the others of its batch merged into three C{executemany} (history
    rows, inbox entries, duplicate keys), which spends far less of the
    reactor's GIL than a statement per row.
    """

    def __init__(self, messages: list[NewMessage], qids: _Qids):
        self.messages = messages
        self.qids = qids
        self.merge = self

    def __call__(self, c: sqlite3.Connection) -> list[list[int]]:
        return _Append.combine([self])(c)[0]

    @staticmethod
    def combine(appends: list[_Append]) -> Callable[[sqlite3.Connection], list[list[list[int]]]]:
        def run(c: sqlite3.Connection) -> list[list[list[int]]]:
            messages = [m for a in appends for m in a.messages]
            dupes = [(*m.dedupe, m.conv, m.seq, m.mid, m.created) for m in messages if m.dedupe is not None]
            if dupes:
                # The fence of duplicate keys, first: a resend is refused
                # whatever else is wrong with its call.
                stored = c.executemany(
                    "INSERT INTO duplicates (sender, client_id, conv, seq, mid, created) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (sender, client_id) DO NOTHING",
                    dupes,
                ).rowcount
                if stored != len(dupes):
                    Appends.checkKeys([Appends(a.messages) for a in appends], _storedKeys(c, dupes))
            rows = [(m.conv, m.seq, m.mid, m.sender, m.stanza, m.created) for m in messages if m.seq is not None]
            if rows:
                stored = c.executemany(
                    "INSERT INTO messages (conv, seq, mid, sender, stanza, created) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (conv, seq) DO NOTHING",
                    rows,
                ).rowcount
                if stored != len(rows):
                    # A taken seq: the worker runs the batch again one call
                    # at a time, and the call that holds it fails alone.
                    taken = _firstTaken(c, rows) if len(appends) == 1 else rows[0]
                    raise SequenceConflict(taken[0], taken[1])
            count = sum(len(m.inbox) for m in messages)
            qid = appends[0].qids.take(c, count) if count else 0
            inbox = []
            results = []
            for a in appends:
                mine = []
                for m in a.messages:
                    qids = []
                    for uid, body in m.inbox:
                        inbox.append((qid, uid, m.conv, m.seq if body is None else None, body, m.created))
                        qids.append(qid)
                        qid += 1
                    mine.append(qids)
                results.append(mine)
            if inbox:
                c.executemany(
                    "INSERT INTO inbox (qid, uid, conv, seq, stanza, created) VALUES (?, ?, ?, ?, ?, ?)", inbox
                )
            return results

        return run


def _storedKeys(c: sqlite3.Connection, dupes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """
    The duplicate-key rows stored now for the keys of C{dupes}.
    """
    found = []
    for sender, clientId, *_ in dupes:
        row = c.execute(
            "SELECT sender, client_id, conv, seq, mid, created FROM duplicates WHERE sender = ? AND client_id = ?",
            (sender, clientId),
        ).fetchone()
        if row is not None:
            found.append(row)
    return found


def _firstTaken(c: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """
    Which row of one call found its seq taken (inserted as the others were,
    so look: a row of ours has our mid).
    """
    seen = set()
    for row in rows:
        conv, seq, mid = row[0], row[1], row[2]
        found = c.execute("SELECT mid FROM messages WHERE conv = ? AND seq = ?", (conv, seq)).fetchone()
        if found is None or found[0] != mid or (conv, seq) in seen:
            return row
        seen.add((conv, seq))
    return rows[0]


@implementer(IStoreFactory)
class SQLiteStoreFactory:
    name = "sqlite"
    description = "Embedded SQLite file (WAL, group commit); the default."

    def makeStore(self, config: Any, reactor: Any) -> Any:
        store = config.store
        if store.sqlite_process:
            from timtx.persistence.hosted import HostedStore

            return HostedStore(
                reactor,
                config.store_path,
                store.synchronous,
                store.batch_max,
                restartInitial=store.reconnect_initial,
                restartMax=store.reconnect_max,
            )
        return SQLiteStore(reactor, config.store_path, store.synchronous, store.batch_max)
