# -*- test-case-name: timtx.test.test_store -*-
"""
The MariaDB store: a database server that every node of a cluster can
share.

MariaDB's drivers block, so each connection of the L{OrderedPool} lives on
a thread of its own and the reactor thread only hands it work: a read, or a
batch of writes to run as one transaction (group commit).  Results come
back in the order the calls were made; the pool's docstring states how.

The driver is C{mysqlclient} (C{MySQLdb}, C code over libmariadb) when it
is installed, else C{PyMySQL} (pure Python, always installable).  Both
release the GIL while waiting for the server, but PyMySQL parses every
packet in Python: measured in C{docs/storage.md}, it spends more than twice
the CPU per operation, CPU taken from the reactor thread on a busy node.

Needs MariaDB 10.5 or later: appends read the ids of the inbox rows they
create with C{INSERT ... RETURNING}.  MySQL has no C{RETURNING} and is
refused with a clear message.

A batch in which an operation fails is rolled back and run again with a
savepoint per operation, so only the failing one is undone: an append whose
C{(conv, seq)} is taken fails alone with L{SequenceConflict}.

The schema is versioned in the table C{schema_version}.  MariaDB commits
around every C{CREATE}, so migrations cannot be one transaction: a named
lock (C{GET_LOCK}) keeps nodes from migrating at once, each step is written
to be run again safely (C{IF NOT EXISTS}), and the version is recorded after
each step.  A database newer than this code is refused with
L{SchemaTooNew}.
"""

from __future__ import annotations

import math
import queue
import random as _random
import threading
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.persistence.errors import SchemaTooNew, SequenceConflict, StoreUnavailable
from timtx.persistence.interfaces import IMessageStore, IStoreFactory
from timtx.persistence.pool import LinkLost, PooledStore, Transient, mergedRuns
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
from timtx.persistence.rows import Appends, InboxDeletion, firstLine, groupRow, poolOptions
from timtx.persistence.rows import group as groupFrom
from timtx.persistence.rows import message as messageFrom
from timtx.persistence.sealed import keyCounts, keysSql, selectSql, updateSql

_TABLE = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"

#: Schema steps; step N brings C{schema_version} from N-1 to N.  Append
#: only, and each step must be safe to run again (MariaDB cannot roll DDL
#: back).  Identifiers compare byte-wise (utf8mb4_bin), as in SQLite.
MIGRATIONS: list[list[str]] = [
    # 1: everything SQLite has after its step 3.
    [
        f"""CREATE TABLE IF NOT EXISTS accounts (
            uid VARCHAR(255) NOT NULL PRIMARY KEY,
            domain TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            created DOUBLE NOT NULL
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS login_tokens (
            token_key VARBINARY(255) NOT NULL PRIMARY KEY,
            uid VARCHAR(255) NOT NULL,
            domain TEXT NOT NULL,
            expires DOUBLE NOT NULL,
            KEY login_tokens_expires (expires)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS messages (
            conv VARCHAR(255) NOT NULL,
            seq BIGINT NOT NULL,
            mid BIGINT NOT NULL,
            sender VARCHAR(255) NOT NULL,
            stanza LONGBLOB NOT NULL,
            state SMALLINT NOT NULL DEFAULT 0,
            created DOUBLE NOT NULL,
            PRIMARY KEY (conv, seq),
            UNIQUE KEY messages_mid (conv, mid)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS inbox (
            qid BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            uid VARCHAR(255) NOT NULL,
            conv VARCHAR(255),
            seq BIGINT,
            stanza LONGBLOB,
            created DOUBLE NOT NULL,
            KEY inbox_uid (uid, qid)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS duplicates (
            sender VARCHAR(255) NOT NULL,
            client_id BIGINT NOT NULL,
            conv VARCHAR(255) NOT NULL,
            seq BIGINT,
            mid BIGINT NOT NULL,
            created DOUBLE NOT NULL,
            PRIMARY KEY (sender, client_id),
            KEY duplicates_created (created)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS stances (
            owner VARCHAR(255) NOT NULL,
            other VARCHAR(255) NOT NULL,
            stance SMALLINT NOT NULL,
            PRIMARY KEY (owner, other),
            KEY stances_other (other, owner)
        ) {_TABLE}""",
        f"CREATE TABLE IF NOT EXISTS profiles (uid VARCHAR(255) NOT NULL PRIMARY KEY, stanza LONGBLOB NOT NULL) {_TABLE}",
        f"CREATE TABLE IF NOT EXISTS invisible (uid VARCHAR(255) NOT NULL PRIMARY KEY) {_TABLE}",
        f"""CREATE TABLE IF NOT EXISTS `groups` (
            gid VARCHAR(255) NOT NULL PRIMARY KEY,
            domain TEXT NOT NULL,
            founder VARCHAR(255) NOT NULL,
            gtype INT NOT NULL,
            status INT NOT NULL,
            created DOUBLE NOT NULL,
            profile LONGBLOB,
            member_cap INT NOT NULL DEFAULT 0,
            muted_all BOOLEAN NOT NULL DEFAULT FALSE,
            KEY groups_founder (founder)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS group_members (
            gid VARCHAR(255) NOT NULL,
            uid VARCHAR(255) NOT NULL,
            role SMALLINT NOT NULL,
            joined DOUBLE NOT NULL,
            muted_until DOUBLE NOT NULL DEFAULT 0,
            PRIMARY KEY (gid, uid),
            KEY group_members_uid (uid, gid)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS group_requests (
            gid VARCHAR(255) NOT NULL,
            uid VARCHAR(255) NOT NULL,
            created DOUBLE NOT NULL,
            PRIMARY KEY (gid, uid)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS group_blocks (
            gid VARCHAR(255) NOT NULL,
            uid VARCHAR(255) NOT NULL,
            blocked_by SMALLINT NOT NULL,
            PRIMARY KEY (gid, uid, blocked_by),
            KEY group_blocks_uid (uid, blocked_by)
        ) {_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS group_cursors (
            uid VARCHAR(255) NOT NULL,
            gid VARCHAR(255) NOT NULL,
            seq BIGINT NOT NULL,
            PRIMARY KEY (uid, gid)
        ) {_TABLE}""",
    ],
]

#: Error codes after which the connection is gone: server gone away, lost
#: during a query, cannot connect, killed, shutting down, closed by the
#: client library (0).
_LOST_CODES = frozenset({0, 1053, 1927, 2003, 2006, 2013, 2055, 4031})
#: Deadlock, lock wait timeout: the transaction was (or must be) rolled back.
_TRANSIENT_CODES = frozenset({1205, 1213})
_DUPLICATE_KEY = 1062

Op = Callable[[Any], Any]


class Driver:
    """
    One DB-API driver: C{MySQLdb} (mysqlclient) or C{pymysql}.
    """

    def __init__(self, name: str):
        self.name = name
        if name == "mysqlclient":
            import MySQLdb
            from MySQLdb.constants import CLIENT

            self.module: Any = MySQLdb
        else:
            import pymysql
            from pymysql.constants import CLIENT

            self.module = pymysql
        self.foundRows = CLIENT.FOUND_ROWS

    @classmethod
    def choose(cls, name: str) -> Driver:
        """
        @param name: C{"auto"} (mysqlclient if installed, else PyMySQL),
            C{"mysqlclient"} or C{"pymysql"}.
        """
        if name == "auto":
            try:
                return cls("mysqlclient")
            except ImportError:
                return cls("pymysql")
        return cls(name)

    def connect(self, params: dict[str, Any], connectTimeout: float, timeout: float) -> Any:
        # mysqlclient takes whole seconds.
        return self.module.connect(
            **params,
            charset="utf8mb4",
            autocommit=True,
            client_flag=self.foundRows,
            connect_timeout=max(1, math.ceil(connectTimeout)),
            read_timeout=max(1, math.ceil(timeout)),
            write_timeout=max(1, math.ceil(timeout)),
        )

    def code(self, error: BaseException) -> int | None:
        if isinstance(error, self.module.Error):
            if error.args and isinstance(error.args[0], int):
                return error.args[0]
            return 0 if isinstance(error, self.module.InterfaceError) else None
        return None


def parseDSN(dsn: str) -> dict[str, Any]:
    """
    C{mariadb://user:password@host:port/database?unix_socket=/path} (also
    C{mysql://}) as driver keywords.

    @raise ValueError: saying what is wrong.
    """
    parts = urlsplit(dsn.strip())
    if parts.scheme not in ("mariadb", "mysql"):
        raise ValueError("expected mariadb://user:password@host:port/database")
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise ValueError("no database: mariadb://user@host/database")
    params: dict[str, Any] = {"host": parts.hostname or "localhost", "database": database}
    if parts.port:
        params["port"] = parts.port
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    for key, value in parse_qsl(parts.query):
        if key != "unix_socket":
            raise ValueError(f"unknown parameter {key!r} (known: unix_socket)")
        params[key] = value
    return params


class ThreadLink:
    """
    One connection of the pool (see L{timtx.persistence.pool.Link}), owned
    by a thread that runs what it is handed, one thing at a time.
    """

    def __init__(self, reactor: Any, driver: Driver):
        self._reactor = reactor
        self._driver = driver
        self._connection: Any = None
        self._cursor: Any = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="timtx-mariadb", daemon=True)
        self._closed: Deferred[None] = Deferred()
        self._closing = False

    def start(self, connect: Callable[[], Any]) -> Deferred[ThreadLink]:
        """
        Start the thread and connect on it with C{connect()}.
        """
        self._thread.start()

        def connected(connection: Any) -> ThreadLink:
            self._connection = connection
            self._cursor = connection.cursor()
            return self

        return self._submit(connect).addCallback(connected)

    def _submit(self, work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.put((work, d))
        return d

    def _loop(self) -> None:
        deliver = self._reactor.callFromThread
        while True:
            item = self._queue.get()
            if item is None:
                break
            work, d = item
            try:
                result = work()
            except BaseException:
                deliver(d.errback, Failure())
            else:
                deliver(d.callback, result)
        try:
            if self._connection is not None:
                self._connection.close()
        except Exception:
            pass
        deliver(self._closed.callback, None)

    def close(self) -> Deferred[None]:
        if not self._closing:
            self._closing = True
            if self._thread.is_alive():
                self._queue.put(None)
            else:
                self._closed.callback(None)
        return self._closed

    # On the link's thread.

    def _raiseFor(self, error: BaseException, committing: bool = False) -> None:
        """
        Raise L{LinkLost} if C{error} means the connection is gone, or roll
        back and raise L{Transient} if the transaction lost a conflict;
        return if it is the operation's own error.
        """
        code = self._driver.code(error)
        if code in _LOST_CODES:
            raise LinkLost(firstLine(error), committing)
        if code in _TRANSIENT_CODES:
            if not committing:
                self._rollback()
            raise Transient(firstLine(error))

    def runRead(self, op: Op) -> Deferred[Any]:
        return self._submit(lambda: self._read(op))

    def runBatch(self, ops: list[Op]) -> Deferred[list[tuple[bool, Any]]]:
        return self._submit(lambda: self._batch(ops))

    def _read(self, op: Op) -> Any:
        try:
            return op(self._cursor)
        except Exception as e:
            self._raiseFor(e)
            raise

    def _batch(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        cursor = self._cursor
        values: list[Any] = [None] * len(ops)
        try:
            cursor.execute("BEGIN")
            merges = [getattr(op, "merge", None) for op in ops]
            for indices, kind in mergedRuns(merges):
                if kind is None:
                    values[indices[0]] = ops[indices[0]](cursor)
                else:
                    merged = kind.combine([merges[i] for i in indices], self._driver)
                    for index, value in zip(indices, merged(cursor), strict=True):
                        values[index] = value
        except Exception as e:
            self._raiseFor(e)
            self._rollback()
            return self._isolated(ops)
        self._commit()
        return [(True, value) for value in values]

    def _isolated(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        cursor = self._cursor
        outcomes: list[tuple[bool, Any]] = []
        try:
            cursor.execute("BEGIN")
        except Exception as e:
            self._raiseFor(e)
            raise
        for op in ops:
            try:
                cursor.execute("SAVEPOINT op")
                value = op(cursor)
            except Exception as e:
                self._raiseFor(e)
                outcomes.append((False, Failure()))
                try:
                    cursor.execute("ROLLBACK TO SAVEPOINT op")
                except Exception as e2:
                    self._raiseFor(e2)
                    raise
            else:
                outcomes.append((True, value))
        self._commit()
        return outcomes

    def _rollback(self) -> None:
        try:
            self._cursor.execute("ROLLBACK")
        except Exception as e:
            raise LinkLost(f"rollback failed: {firstLine(e)}") from e

    def _commit(self) -> None:
        try:
            self._cursor.execute("COMMIT")
        except Exception as e:
            self._raiseFor(e, committing=True)
            raise


def _changed(c: Any, sql: str, params: Any) -> int:
    """
    Run a statement; how many rows it matched.
    """
    c.execute(sql, params)
    return int(c.rowcount)


def _values(rows: int, columns: int) -> str:
    one = "(" + ", ".join(["%s"] * columns) + ")"
    return ", ".join([one] * rows)


_MESSAGE = "SELECT conv, seq, mid, sender, stanza, state, created FROM messages"
_GROUP = "SELECT gid, domain, founder, gtype, status, created, profile, member_cap, muted_all FROM `groups`"


@implementer(IMessageStore)
class MariaDBStore(PooledStore):
    """
    @param reactor: delivers the threads' results (C{IReactorFromThreads}).
    @param dsn: C{mariadb://user:password@host:port/database}.
    @param driver: C{"auto"}, C{"mysqlclient"} or C{"pymysql"}.
    @param clock: for reconnection; the reactor by default.
    """

    name = "mariadb"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        *,
        driver: str = "auto",
        clock: Any = None,
        poolSize: int = 4,
        batchMax: int = 256,
        statementTimeout: float = 10.0,
        connectTimeout: float = 5.0,
        reconnectInitial: float = 0.5,
        reconnectMax: float = 10.0,
        random: Callable[[], float] = _random.random,
    ):
        self._reactor = reactor
        self.dsn = dsn
        self._driverName = driver
        self._driver: Driver | None = None
        self._statementTimeout = statementTimeout
        self._connectTimeout = connectTimeout
        try:
            self._params: dict[str, Any] | None = parseDSN(dsn)
            self._dsnError = ""
        except ValueError as e:
            self._params = None
            self._dsnError = str(e)
        params = self._params or {}
        where = params.get("unix_socket") or f"{params.get('host', '')}:{params.get('port', 3306)}"
        self._makePool(
            clock if clock is not None else reactor,
            f"MariaDB at {where}/{params.get('database', '')}",
            poolSize=poolSize,
            batchMax=batchMax,
            reconnectInitial=reconnectInitial,
            reconnectMax=reconnectMax,
            random=random,
        )

    @property
    def driver(self) -> str:
        """
        The driver in use once open: C{"mysqlclient"} or C{"pymysql"}.
        """
        return self._driver.name if self._driver is not None else self._driverName

    def open(self) -> Deferred[None]:
        if not self.dsn.strip():
            return _failed(StoreUnavailable("[store] dsn is empty: set it to mariadb://user@host/database"))
        if self._params is None:
            return _failed(StoreUnavailable(f"[store] dsn is not a MariaDB URL: {self._dsnError}"))
        try:
            self._driver = Driver.choose(self._driverName)
        except ImportError as e:
            return _failed(StoreUnavailable(f"the MariaDB driver {self._driverName} is not installed ({e})"))

        def migrate(link: ThreadLink) -> Deferred[None]:
            d = link._submit(lambda: self._migrate(link._connection))

            def failed(failure: Failure) -> Failure:
                link.close()
                return failure

            d.addCallbacks(lambda _: self._pool.start(link), failed)
            return d

        return self._connect().addCallback(migrate)

    def _connect(self) -> Deferred[ThreadLink]:
        assert self._params is not None and self._driver is not None
        driver, params = self._driver, self._params
        timeout = self._statementTimeout + self._connectTimeout
        link = ThreadLink(self._reactor, driver)

        def connect() -> Any:
            connection = None
            try:
                connection = driver.connect(params, self._connectTimeout, timeout)
                cursor = connection.cursor()
                cursor.execute("SELECT VERSION()")
                (version,) = cursor.fetchone()
                if "mariadb" not in version.lower() or _versionTuple(version) < (10, 5):
                    raise StoreUnavailable(f"{self.describe} runs {version}: timtx needs MariaDB 10.5 or later")
                cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cursor.execute(
                    "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION', "
                    "SESSION max_statement_time = %s",
                    (self._statementTimeout,),
                )
                cursor.close()
            except Exception as e:
                if connection is not None:
                    try:
                        connection.close()
                    except Exception:
                        pass
                if isinstance(e, StoreUnavailable):
                    raise
                raise StoreUnavailable(f"cannot connect to {self.describe}: {firstLine(e)}") from None
            return connection

        def failed(failure: Failure) -> Failure:
            link.close()
            return failure

        return link.start(connect).addErrback(failed)

    def _migrate(self, connection: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("SELECT GET_LOCK('timtx_migrate', 60)")
        if cursor.fetchone()[0] != 1:
            raise StoreUnavailable(f"{self.describe}: another node holds the migration lock")
        try:
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL) ENGINE=InnoDB")
            cursor.execute("SELECT version FROM schema_version")
            row = cursor.fetchone()
            if row is None:
                cursor.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"{self.describe}: database schema {version} is newer than this timtx ({len(MIGRATIONS)})"
                )
            for step in range(version, len(MIGRATIONS)):
                try:
                    for statement in MIGRATIONS[step]:
                        cursor.execute(statement)
                except Exception as e:
                    raise StoreUnavailable(f"{self.describe}: cannot create the schema: {firstLine(e)}") from e
                cursor.execute("UPDATE schema_version SET version = %s", (step + 1,))
        finally:
            cursor.execute("SELECT RELEASE_LOCK('timtx_migrate')")
            cursor.close()

    def _read(self, op: Op) -> Deferred[Any]:
        return self._pool.read(op)

    def _write(self, op: Op, idempotent: bool = False) -> Deferred[Any]:
        return self._pool.write(op, idempotent)

    # Accounts.

    def createAccount(self, account: Account) -> Deferred[bool]:
        driver = self._driver

        def create(c: Any) -> bool:
            try:
                c.execute(
                    "INSERT INTO accounts (uid, domain, password_hash, created) VALUES (%s, %s, %s, %s)",
                    (account.uid, account.domain, account.passwordHash, account.created),
                )
            except Exception as e:
                if driver is not None and driver.code(e) == _DUPLICATE_KEY:
                    return False
                raise
            return True

        return self._write(create)

    def getAccount(self, uid: str) -> Deferred[Account | None]:
        def get(c: Any) -> Account | None:
            c.execute("SELECT uid, domain, password_hash, created FROM accounts WHERE uid = %s", (uid,))
            row = c.fetchone()
            return Account(*row) if row else None

        return self._read(get)

    def setPasswordHash(self, uid: str, passwordHash: str) -> Deferred[bool]:
        def update(c: Any) -> bool:
            return _changed(c, "UPDATE accounts SET password_hash = %s WHERE uid = %s", (passwordHash, uid)) == 1

        return self._write(update, True)

    # Login tokens.

    def addToken(self, key: bytes, grant: TokenGrant, expires: float) -> Deferred[None]:
        def add(c: Any) -> None:
            c.execute(
                "INSERT INTO login_tokens (token_key, uid, domain, expires) VALUES (%s, %s, %s, %s) "
                "ON DUPLICATE KEY UPDATE uid = VALUES(uid), domain = VALUES(domain), expires = VALUES(expires)",
                (key, grant.uid, grant.domain, expires),
            )

        return self._write(add, True)

    def takeToken(self, key: bytes, now: float) -> Deferred[TokenGrant | None]:
        def take(c: Any) -> TokenGrant | None:
            c.execute("DELETE FROM login_tokens WHERE token_key = %s RETURNING uid, domain, expires", (key,))
            row = c.fetchone()
            if row is None or row[2] < now:
                return None
            return TokenGrant(row[0], row[1])

        return self._write(take)

    def purgeTokens(self, now: float) -> Deferred[int]:
        return self._write(lambda c: _changed(c, "DELETE FROM login_tokens WHERE expires < %s", (now,)))

    # Messages.

    def appendMessages(self, messages: list[NewMessage]) -> Deferred[list[list[int]]]:
        return self._write(_Mergeable(_Append(messages), self._driver))

    def lastMessage(self, conv: str) -> Deferred[tuple[int, int]]:
        def last(c: Any) -> tuple[int, int]:
            c.execute("SELECT seq, mid FROM messages WHERE conv = %s ORDER BY seq DESC LIMIT 1", (conv,))
            row = c.fetchone()
            return (row[0], row[1]) if row else (0, 0)

        return self._read(last)

    def getMessage(self, conv: str, mid: int) -> Deferred[StoredMessage | None]:
        def get(c: Any) -> StoredMessage | None:
            c.execute(f"{_MESSAGE} WHERE conv = %s AND mid = %s", (conv, mid))
            row = c.fetchone()
            return messageFrom(row) if row else None

        return self._read(get)

    def replaceMessage(
        self, conv: str, seq: int, stanza: bytes, state: int, notices: list[tuple[str, bytes]], created: float
    ) -> Deferred[list[int]]:
        def replace(c: Any) -> list[int]:
            c.execute(
                "UPDATE messages SET stanza = %s, state = %s WHERE conv = %s AND seq = %s", (stanza, state, conv, seq)
            )
            return _insertInbox(c, [(uid, conv, None, body, created) for uid, body in notices])

        return self._write(replace)

    def history(self, conv: str, beforeMid: int | None, limit: int) -> Deferred[list[StoredMessage]]:
        def read(c: Any) -> list[StoredMessage]:
            if beforeMid is None:
                c.execute(f"{_MESSAGE} WHERE conv = %s ORDER BY mid DESC LIMIT %s", (conv, limit))
            else:
                c.execute(
                    f"{_MESSAGE} WHERE conv = %s AND mid < %s ORDER BY mid DESC LIMIT %s", (conv, beforeMid, limit)
                )
            return [messageFrom(row) for row in c.fetchall()]

        return self._read(read)

    def recentDuplicates(self, sender: str, since: float) -> Deferred[dict[int, Duplicate]]:
        def read(c: Any) -> dict[int, Duplicate]:
            c.execute(
                "SELECT client_id, conv, seq, mid, created FROM duplicates WHERE sender = %s AND created >= %s",
                (sender, since),
            )
            return {row[0]: Duplicate(*row[1:]) for row in c.fetchall()}

        return self._read(read)

    def purgeDuplicates(self, before: float) -> Deferred[int]:
        return self._write(lambda c: _changed(c, "DELETE FROM duplicates WHERE created < %s", (before,)))

    # Inboxes.

    def addInbox(self, entries: list[tuple[str, bytes]], created: float) -> Deferred[list[int]]:
        return self._write(lambda c: _insertInbox(c, [(uid, None, None, stanza, created) for uid, stanza in entries]))

    def readInbox(self, uid: str, afterQid: int, limit: int) -> Deferred[list[InboxEntry]]:
        def read(c: Any) -> list[InboxEntry]:
            c.execute(
                "SELECT i.qid, i.conv, i.seq, COALESCE(i.stanza, m.stanza) FROM inbox i "
                "LEFT JOIN messages m ON i.stanza IS NULL AND m.conv = i.conv AND m.seq = i.seq "
                "WHERE i.uid = %s AND i.qid > %s ORDER BY i.qid LIMIT %s",
                (uid, afterQid, limit),
            )
            return [
                InboxEntry(qid, uid, conv, seq, bytes(stanza))
                for qid, conv, seq, stanza in c.fetchall()
                if stanza is not None
            ]

        return self._read(read)

    def deleteInbox(self, uid: str, qids: list[int]) -> Deferred[int]:
        return self._write(_Mergeable(_DeleteInbox(uid, qids), self._driver))

    def countInbox(self, uid: str) -> Deferred[int]:
        def count(c: Any) -> int:
            c.execute("SELECT COUNT(*) FROM inbox WHERE uid = %s", (uid,))
            return int(c.fetchone()[0])

        return self._read(count)

    # Relations and profiles.

    def relationsOf(self, uid: str) -> Deferred[list[Relation]]:
        def read(c: Any) -> list[Relation]:
            c.execute(
                "SELECT other, stance, 1 FROM stances WHERE owner = %s "
                "UNION ALL SELECT owner, stance, 0 FROM stances WHERE other = %s",
                (uid, uid),
            )
            others: dict[str, list[int]] = {}
            for other, stance, mine in c.fetchall():
                others.setdefault(other, [0, 0])[0 if mine else 1] = stance
            return [Relation(other, mine, theirs) for other, (mine, theirs) in others.items()]

        return self._read(read)

    def setStance(self, owner: str, other: str, stance: int) -> Deferred[None]:
        def store(c: Any) -> None:
            if stance:
                c.execute(
                    "INSERT INTO stances (owner, other, stance) VALUES (%s, %s, %s) "
                    "ON DUPLICATE KEY UPDATE stance = VALUES(stance)",
                    (owner, other, stance),
                )
            else:
                c.execute("DELETE FROM stances WHERE owner = %s AND other = %s", (owner, other))

        return self._write(store, True)

    def getProfile(self, uid: str) -> Deferred[bytes | None]:
        def get(c: Any) -> bytes | None:
            c.execute("SELECT stanza FROM profiles WHERE uid = %s", (uid,))
            row = c.fetchone()
            return bytes(row[0]) if row else None

        return self._read(get)

    def putProfile(self, uid: str, stanza: bytes) -> Deferred[None]:
        def store(c: Any) -> None:
            c.execute(
                "INSERT INTO profiles (uid, stanza) VALUES (%s, %s) ON DUPLICATE KEY UPDATE stanza = VALUES(stanza)",
                (uid, stanza),
            )

        return self._write(store, True)

    def getInvisible(self, uid: str) -> Deferred[bool]:
        def get(c: Any) -> bool:
            c.execute("SELECT 1 FROM invisible WHERE uid = %s", (uid,))
            return c.fetchone() is not None

        return self._read(get)

    def setInvisible(self, uid: str, invisible: bool) -> Deferred[None]:
        def store(c: Any) -> None:
            if invisible:
                c.execute("INSERT INTO invisible (uid) VALUES (%s) ON DUPLICATE KEY UPDATE uid = uid", (uid,))
            else:
                c.execute("DELETE FROM invisible WHERE uid = %s", (uid,))

        return self._write(store, True)

    # Groups.

    def createGroup(self, group: Group, founder: Member) -> Deferred[None]:
        def create(c: Any) -> None:
            c.execute(
                "INSERT INTO `groups` (gid, domain, founder, gtype, status, created, profile, member_cap, muted_all) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                groupRow(group),
            )
            _putMember(c, group.gid, founder)

        return self._write(create)

    def getGroup(self, gid: str) -> Deferred[Group | None]:
        def get(c: Any) -> Group | None:
            c.execute(f"{_GROUP} WHERE gid = %s", (gid,))
            row = c.fetchone()
            return groupFrom(row) if row else None

        return self._read(get)

    def updateGroup(self, group: Group) -> Deferred[None]:
        def update(c: Any) -> None:
            c.execute(
                "UPDATE `groups` SET domain = %s, founder = %s, gtype = %s, status = %s, created = %s, profile = %s, "
                "member_cap = %s, muted_all = %s WHERE gid = %s",
                (*groupRow(group)[1:], group.gid),
            )

        return self._write(update, True)

    def countFounded(self, uid: str) -> Deferred[int]:
        def count(c: Any) -> int:
            c.execute("SELECT COUNT(*) FROM `groups` WHERE founder = %s AND status = %s", (uid, GROUP_ALIVE))
            return int(c.fetchone()[0])

        return self._read(count)

    def groupMembers(self, gid: str) -> Deferred[list[Member]]:
        def read(c: Any) -> list[Member]:
            c.execute("SELECT uid, role, joined, muted_until FROM group_members WHERE gid = %s", (gid,))
            return [Member(*row) for row in c.fetchall()]

        return self._read(read)

    def groupsOf(self, uid: str) -> Deferred[list[str]]:
        def read(c: Any) -> list[str]:
            c.execute("SELECT gid FROM group_members WHERE uid = %s", (uid,))
            return [row[0] for row in c.fetchall()]

        return self._read(read)

    def putMember(self, gid: str, member: Member) -> Deferred[None]:
        return self._write(lambda c: _putMember(c, gid, member), True)

    def removeMembers(self, gid: str, uids: list[str]) -> Deferred[int]:
        def remove(c: Any) -> int:
            if not uids:
                return 0
            return _changed(
                c,
                "DELETE FROM group_members WHERE gid = %s AND uid IN (" + ", ".join(["%s"] * len(uids)) + ")",
                (gid, *uids),
            )

        return self._write(remove)

    def addJoinRequest(self, gid: str, uid: str, created: float) -> Deferred[None]:
        def add(c: Any) -> None:
            c.execute(
                "INSERT INTO group_requests (gid, uid, created) VALUES (%s, %s, %s) "
                "ON DUPLICATE KEY UPDATE created = VALUES(created)",
                (gid, uid, created),
            )

        return self._write(add, True)

    def takeJoinRequest(self, gid: str, uid: str) -> Deferred[bool]:
        return self._write(
            lambda c: _changed(c, "DELETE FROM group_requests WHERE gid = %s AND uid = %s", (gid, uid)) == 1
        )

    def setGroupBlock(self, gid: str, uid: str, by: int, blocked: bool) -> Deferred[None]:
        def store(c: Any) -> None:
            if blocked:
                c.execute(
                    "INSERT INTO group_blocks (gid, uid, blocked_by) VALUES (%s, %s, %s) "
                    "ON DUPLICATE KEY UPDATE blocked_by = blocked_by",
                    (gid, uid, by),
                )
            else:
                c.execute("DELETE FROM group_blocks WHERE gid = %s AND uid = %s AND blocked_by = %s", (gid, uid, by))

        return self._write(store, True)

    def groupBlocks(self, gid: str) -> Deferred[dict[str, set[int]]]:
        def read(c: Any) -> dict[str, set[int]]:
            c.execute("SELECT uid, blocked_by FROM group_blocks WHERE gid = %s", (gid,))
            found: dict[str, set[int]] = {}
            for uid, by in c.fetchall():
                found.setdefault(uid, set()).add(by)
            return found

        return self._read(read)

    def userGroupBlocks(self, uid: str) -> Deferred[list[str]]:
        def read(c: Any) -> list[str]:
            c.execute("SELECT gid FROM group_blocks WHERE uid = %s AND blocked_by = %s", (uid, BLOCK_BY_USER))
            return [row[0] for row in c.fetchall()]

        return self._read(read)

    def saveCursors(self, cursors: list[tuple[str, str, int]]) -> Deferred[None]:
        highest: dict[tuple[str, str], int] = {}
        for uid, gid, seq in cursors:
            highest[(uid, gid)] = max(seq, highest.get((uid, gid), seq))

        def save(c: Any) -> None:
            if highest:
                c.execute(
                    "INSERT INTO group_cursors (uid, gid, seq) VALUES "
                    + _values(len(highest), 3)
                    + " ON DUPLICATE KEY UPDATE seq = GREATEST(seq, VALUES(seq))",
                    [value for (uid, gid), seq in highest.items() for value in (uid, gid, seq)],
                )

        return self._write(save, True)

    def cursorsOf(self, uid: str) -> Deferred[dict[str, int]]:
        def read(c: Any) -> dict[str, int]:
            c.execute("SELECT gid, seq FROM group_cursors WHERE uid = %s", (uid,))
            return dict(c.fetchall())

        return self._read(read)

    def sealedRows(
        self, kind: str, after: Any, limit: int, keep: bytes
    ) -> Deferred[tuple[list[tuple[Any, bytes]], Any]]:
        def read(c: Any) -> tuple[list[tuple[Any, bytes]], Any]:
            c.execute(selectSql(kind, after is not None), (len(keep), keep, *(after or ()), limit))
            rows = [(tuple(r[:-1]), bytes(r[-1])) for r in c.fetchall()]
            return rows, rows[-1][0] if len(rows) == limit else None

        return self._read(read)

    def replaceSealed(self, kind: str, rows: list[tuple[Any, bytes, bytes]]) -> Deferred[int]:
        def replace(c: Any) -> int:
            sql = updateSql(kind)
            return sum(_changed(c, sql, (new, *key, old)) for key, old, new in rows)

        return self._write(replace, True)

    def sealedKeys(self, kind: str) -> Deferred[dict[int, int]]:
        def count(c: Any) -> dict[int, int]:
            c.execute(keysSql(kind), (b"\x01", b"\x02"))
            return keyCounts(c.fetchall())

        return self._read(count)

    def messagesAfter(self, conv: str, afterSeq: int, limit: int) -> Deferred[list[StoredMessage]]:
        def read(c: Any) -> list[StoredMessage]:
            c.execute(f"{_MESSAGE} WHERE conv = %s AND seq > %s ORDER BY seq LIMIT %s", (conv, afterSeq, limit))
            return [messageFrom(row) for row in c.fetchall()]

        return self._read(read)


def _putMember(c: Any, gid: str, member: Member) -> None:
    c.execute(
        "INSERT INTO group_members (gid, uid, role, joined, muted_until) VALUES (%s, %s, %s, %s, %s) "
        "ON DUPLICATE KEY UPDATE role = VALUES(role), joined = VALUES(joined), muted_until = VALUES(muted_until)",
        (gid, member.uid, member.role, member.joined, member.mutedUntil),
    )


#: Most bytes of stanzas, and most rows, one multi-row statement carries:
#: well under MariaDB's default max_allowed_packet (16 MiB).
_CHUNK_BYTES = 3 << 20
_CHUNK_ROWS = 1000


def _literal(value: Any) -> str:
    """
    One value as SQL, for the multi-row statements of the hot path: hex
    literals for strings and bytes (C{.hex()} is a C loop; the drivers
    escape each value in Python, measured at a third of the driver
    thread's time), so nothing in a value can break out of it.
    """
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "_utf8mb4 X'" + value.encode("utf-8").hex() + "'"
    if isinstance(value, bytes):
        return "X'" + value.hex() + "'"
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"no SQL literal for {type(value).__name__}")


def _rows(rows: Sequence[tuple[Any, ...]]) -> str:
    """
    C{rows} as the list of a multi-row C{VALUES} or C{IN}.
    """
    return ", ".join("(" + ", ".join(map(_literal, row)) + ")" for row in rows)


def _chunks(rows: Sequence[tuple[Any, ...]], blob: int) -> list[Sequence[tuple[Any, ...]]]:
    """
    C{rows} cut into statements of bounded size; C{blob} is the index of
    the column that carries the bulk.
    """
    chunks: list[Sequence[tuple[Any, ...]]] = []
    start = size = 0
    for index, row in enumerate(rows):
        length = len(row[blob] or b"")
        if index > start and (size + length > _CHUNK_BYTES or index - start >= _CHUNK_ROWS):
            chunks.append(rows[start:index])
            start, size = index, 0
        size += length
    if start < len(rows):
        chunks.append(rows[start:])
    return chunks


def _insertInbox(c: Any, rows: Sequence[tuple[str, str | None, int | None, bytes | None, float]]) -> list[int]:
    """
    Insert inbox rows, a few statements for many; their qids, in the order
    given.
    """
    qids: list[int] = []
    for chunk in _chunks(rows, 3):
        c.execute("INSERT INTO inbox (uid, conv, seq, stanza, created) VALUES " + _rows(chunk) + " RETURNING qid")
        qids.extend(row[0] for row in c.fetchall())
    return qids


class _Mergeable:
    """
    An operation that a batch may run merged with others of its kind
    (L{timtx.persistence.pool.mergedRuns}); called alone, it runs alone.
    """

    def __init__(self, merge: Any, driver: Driver | None):
        self.merge = merge
        self._driver = driver

    def __call__(self, c: Any) -> Any:
        return type(self.merge).combine([self.merge], self._driver)(c)[0]


class _Append(Appends):
    """
    What one L{MariaDBStore.appendMessages} call writes.
    """

    @staticmethod
    def combine(appends: list[Appends], driver: Driver | None) -> Callable[[Any], list[list[list[int]]]]:
        """
        Write C{appends} in a few statements, in order; the result is each
        one's.

        @raise DuplicateConflict: for the first call with a duplicate key
            held by another message, and then
        @raise SequenceConflict: for the first taken C{(conv, seq)} (the
            batch then runs again op by op, so that only the call that
            holds it fails).
        """
        rows, inbox, dupes = Appends.together(appends)

        def append(c: Any) -> list[list[list[int]]]:
            # The fence of duplicate keys, first: a resend is refused
            # whatever else is wrong with its call.
            for chunk in _chunks(dupes, 0):
                try:
                    c.execute(
                        "INSERT INTO duplicates (sender, client_id, conv, seq, mid, created) VALUES " + _rows(chunk)
                    )
                except Exception as e:
                    if driver is None or driver.code(e) != _DUPLICATE_KEY:
                        raise
                    # A locking read sees the latest committed rows, not
                    # this transaction's snapshot: a key that a concurrent
                    # transaction committed (InnoDB made the insert wait for
                    # it) is found.
                    c.execute(
                        "SELECT sender, client_id, conv, seq, mid, created FROM duplicates "
                        "WHERE (sender, client_id) IN (" + _rows([key[:2] for key in chunk]) + ") LOCK IN SHARE MODE"
                    )
                    Appends.checkKeys(appends, c.fetchall())
                    raise
            if len({(row[0], row[1]) for row in rows}) != len(rows):
                Appends.checkStored(rows, {(row[0], row[1]) for row in rows})
            for chunk in _chunks(rows, 4):
                try:
                    c.execute("INSERT INTO messages (conv, seq, mid, sender, stanza, created) VALUES " + _rows(chunk))
                except Exception as e:
                    if driver is None or driver.code(e) != _DUPLICATE_KEY or "PRIMARY" not in str(e):
                        raise
                    for conv, seq, *_ in chunk:
                        c.execute("SELECT 1 FROM messages WHERE conv = %s AND seq = %s", (conv, seq))
                        if c.fetchone():
                            raise SequenceConflict(conv, seq) from None
                    raise
            qids = _insertInbox(c, inbox)
            return Appends.split(appends, qids)

        return append


class _DeleteInbox(InboxDeletion):
    """
    What one L{MariaDBStore.deleteInbox} call removes.
    """

    @staticmethod
    def combine(deletions: list[InboxDeletion], driver: Driver | None) -> Callable[[Any], list[int]]:
        """
        Remove C{deletions} in a few statements; the result is how many
        entries each removed.
        """
        pairs = InboxDeletion.pairs(deletions)

        def delete(c: Any) -> list[int]:
            gone: list[tuple[str, int]] = []
            for start in range(0, len(pairs), _CHUNK_ROWS):
                chunk = pairs[start : start + _CHUNK_ROWS]
                c.execute(
                    "DELETE FROM inbox WHERE qid IN ("
                    + ", ".join(repr(int(qid)) for _, qid in chunk)
                    + ") AND (uid, qid) IN ("
                    + _rows(chunk)
                    + ") RETURNING uid, qid"
                )
                gone.extend((uid, qid) for uid, qid in c.fetchall())
            return InboxDeletion.counts(deletions, gone)

        return delete


def _versionTuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("-")[0].split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d


@implementer(IStoreFactory)
class MariaDBStoreFactory:
    name = "mariadb"
    description = "A MariaDB server (connection pool in threads, group commit); for clusters."

    def makeStore(self, config: Any, reactor: Any) -> MariaDBStore:
        return MariaDBStore(reactor, config.store.dsn, driver=config.store.mariadb_driver, **poolOptions(config.store))
