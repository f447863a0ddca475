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

from timtx.persistence.interfaces import IMessageStore, IStoreFactory
from timtx.persistence.records import Account, TokenGrant
from timtx.persistence.worker import SerialWorker

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
]


class SchemaTooNew(Exception):
    """
    The database was written by a newer timtx; refusing to touch it.
    """


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

    def __init__(self, reactor: Any, path: str, synchronous: str = "full", batchMax: int = 256):
        self.path = path
        self._worker = SerialWorker(
            reactor,
            _connect(path, synchronous),
            begin=lambda c: c.execute("BEGIN IMMEDIATE"),
            commit=lambda c: c.execute("COMMIT"),
            rollback=lambda c: c.execute("ROLLBACK"),
            savepoint=lambda c, n: c.execute(f"SAVEPOINT {n}"),
            release=lambda c, n: c.execute(f"RELEASE {n}"),
            rollbackTo=lambda c, n: c.execute(f"ROLLBACK TO {n}"),
            close=lambda c: c.close(),
            batchMax=batchMax,
            name="timtx-sqlite",
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


@implementer(IStoreFactory)
class SQLiteStoreFactory:
    name = "sqlite"
    description = "Embedded SQLite file (WAL, group commit); the default."

    def makeStore(self, config: Any, reactor: Any) -> SQLiteStore:
        return SQLiteStore(reactor, config.store_path, config.store.synchronous, config.store.batch_max)
