# -*- test-case-name: timtx.test.test_store -*-
"""
The PostgreSQL store: a database server that every node of a cluster can
share.

Connections are asynchronous psycopg2 connections driven by the reactor
through C{txpostgres}, so no thread is involved.  They form an
L{OrderedPool}: queued writes are committed together in one transaction
(group commit), reads run side by side on the other connections, and
results come back in the order the calls were made; the pool's docstring
states how that keeps "a read issued after a write sees it".

Every operation is a single SQL statement, prepared once per connection:
an append of many messages with their inbox entries and duplicate keys is
one statement of data-modifying CTEs over C{unnest}ed arrays.  A batch's
appends, and its inbox deletions, run merged into one statement per kind
(L{timtx.persistence.pool.mergedRuns}), so that a busy batch costs a few
round trips, not one per operation; C{BEGIN} travels with the first.  All
the SQL is in this module, in L{MIGRATIONS} and the L{PostgreSQLStore}
methods.

A batch in which a statement fails is rolled back and run again with a
savepoint per operation, so only the failing one is undone: an append whose
C{(conv, seq)} is taken fails alone with L{SequenceConflict}.

The schema is versioned in the table C{schema_version}; L{MIGRATIONS} lists
the steps, applied in one transaction under an advisory lock, so that nodes
starting together migrate once.  A database newer than this code is refused
with L{SchemaTooNew}.

Faults: each connection runs with C{statement_timeout}; a connection that
stays silent for longer than that plus C{connect_timeout} is closed and
counted as lost (a server behind a dead network).  What the pool does about
a lost connection (retry, L{StoreUnavailable}, L{StoreOutcomeUnknown},
reconnecting with backoff) is in L{timtx.persistence.pool}.
"""

from __future__ import annotations

import functools
import os
import random as _random
import re
from typing import Any, Callable

import psycopg2
import psycopg2.extensions
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from txpostgres import txpostgres
from zope.interface import implementer

from timtx.persistence.errors import SchemaTooNew, StoreUnavailable
from timtx.persistence.interfaces import IMessageStore, IShardStore, IStoreFactory
from timtx.persistence.placement import Range, ShardMap, decodeParts, intentRow
from timtx.persistence.pool import LinkLost, PooledStore, Transient, mergedRuns
from timtx.persistence.records import (
    BLOCK_BY_USER,
    GROUP_ALIVE,
    Account,
    Duplicate,
    Group,
    InboxEntry,
    Intent,
    Member,
    NewMessage,
    Part,
    Relation,
    StoredMessage,
    TokenGrant,
)
from timtx.persistence.rows import Appends, InboxDeletion, firstLine, groupRow, poolOptions
from timtx.persistence.rows import group as groupFrom
from timtx.persistence.rows import message as messageFrom
from timtx.persistence.sealed import SEALED, keyCounts, keysSql, selectSql

#: Schema steps; step N brings C{schema_version} from N-1 to N.  Append only.
#: Identifiers are compared byte-wise (C{COLLATE "C"}): cheaper than the
#: database's locale and the same as SQLite.
MIGRATIONS: list[str] = [
    # 1: everything SQLite has after its step 3.
    """
    CREATE TABLE accounts (
        uid text COLLATE "C" PRIMARY KEY,
        domain text NOT NULL,
        password_hash text NOT NULL,
        created double precision NOT NULL
    );
    CREATE TABLE login_tokens (
        token_key bytea PRIMARY KEY,
        uid text NOT NULL,
        domain text NOT NULL,
        expires double precision NOT NULL
    );
    CREATE INDEX login_tokens_expires ON login_tokens (expires);
    CREATE TABLE messages (
        conv text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        mid bigint NOT NULL,
        sender text NOT NULL,
        stanza bytea NOT NULL,
        state smallint NOT NULL DEFAULT 0,
        created double precision NOT NULL,
        PRIMARY KEY (conv, seq)
    );
    CREATE UNIQUE INDEX messages_mid ON messages (conv, mid);
    CREATE TABLE inbox (
        qid bigserial PRIMARY KEY,
        uid text COLLATE "C" NOT NULL,
        conv text COLLATE "C",
        seq bigint,
        stanza bytea,
        created double precision NOT NULL
    );
    CREATE INDEX inbox_uid ON inbox (uid, qid);
    CREATE TABLE duplicates (
        sender text COLLATE "C" NOT NULL,
        client_id bigint NOT NULL,
        conv text NOT NULL,
        seq bigint,
        mid bigint NOT NULL,
        created double precision NOT NULL,
        PRIMARY KEY (sender, client_id)
    );
    CREATE INDEX duplicates_created ON duplicates (created);
    CREATE TABLE stances (
        owner text COLLATE "C" NOT NULL,
        other text COLLATE "C" NOT NULL,
        stance smallint NOT NULL,
        PRIMARY KEY (owner, other)
    );
    CREATE INDEX stances_other ON stances (other, owner);
    CREATE TABLE profiles (uid text COLLATE "C" PRIMARY KEY, stanza bytea NOT NULL);
    CREATE TABLE invisible (uid text COLLATE "C" PRIMARY KEY);
    CREATE TABLE groups (
        gid text COLLATE "C" PRIMARY KEY,
        domain text NOT NULL,
        founder text COLLATE "C" NOT NULL,
        gtype integer NOT NULL,
        status integer NOT NULL,
        created double precision NOT NULL,
        profile bytea,
        member_cap integer NOT NULL DEFAULT 0,
        muted_all boolean NOT NULL DEFAULT false
    );
    CREATE INDEX groups_founder ON groups (founder);
    CREATE TABLE group_members (
        gid text COLLATE "C" NOT NULL,
        uid text COLLATE "C" NOT NULL,
        role smallint NOT NULL,
        joined double precision NOT NULL,
        muted_until double precision NOT NULL DEFAULT 0,
        PRIMARY KEY (gid, uid)
    );
    CREATE INDEX group_members_uid ON group_members (uid, gid);
    CREATE TABLE group_requests (
        gid text COLLATE "C" NOT NULL,
        uid text COLLATE "C" NOT NULL,
        created double precision NOT NULL,
        PRIMARY KEY (gid, uid)
    );
    CREATE TABLE group_blocks (
        gid text COLLATE "C" NOT NULL,
        uid text COLLATE "C" NOT NULL,
        blocked_by smallint NOT NULL,
        PRIMARY KEY (gid, uid, blocked_by)
    );
    CREATE INDEX group_blocks_uid ON group_blocks (uid, blocked_by);
    CREATE TABLE group_cursors (
        uid text COLLATE "C" NOT NULL,
        gid text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (uid, gid)
    );
    """,
    # 2: sharding (timtx.persistence.sharded, pgmove).  Inbox entries are
    # keyed by user, so that a user's entries keep their qids when moved
    # to another shard; entries made by the second step of a write that
    # spans shards carry the ref that makes them once.
    """
    ALTER TABLE inbox ADD COLUMN ref bytea;
    CREATE UNIQUE INDEX inbox_ref ON inbox (ref) WHERE ref IS NOT NULL;
    ALTER TABLE inbox DROP CONSTRAINT inbox_pkey;
    ALTER TABLE inbox ADD PRIMARY KEY (uid, qid);
    DROP INDEX inbox_uid;
    CREATE TABLE shard_intents (
        id bytea PRIMARY KEY,
        created double precision NOT NULL,
        payload bytea NOT NULL
    );
    CREATE INDEX shard_intents_created ON shard_intents (created);
    CREATE TABLE shard_map (
        id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
        version bigint NOT NULL,
        moving boolean NOT NULL DEFAULT false
    );
    CREATE TABLE shard_list (shard integer PRIMARY KEY, dsn text NOT NULL, added double precision NOT NULL);
    CREATE TABLE shard_ranges (
        lo integer PRIMARY KEY,
        hi integer NOT NULL,
        shard integer NOT NULL,
        held boolean NOT NULL DEFAULT false
    );
    CREATE TABLE shard_nodes (node text PRIMARY KEY, version bigint NOT NULL, seen timestamptz NOT NULL);
    CREATE TABLE shard_moves (
        id serial PRIMARY KEY,
        lo integer NOT NULL,
        hi integer NOT NULL,
        source integer NOT NULL,
        target integer NOT NULL,
        phase text NOT NULL,
        copied bigint NOT NULL DEFAULT 0,
        total bigint NOT NULL DEFAULT 0,
        started double precision NOT NULL,
        updated double precision NOT NULL,
        finished double precision,
        detail text NOT NULL DEFAULT ''
    );
    CREATE TABLE shard_capture (lo integer PRIMARY KEY, hi integer NOT NULL, fenced boolean NOT NULL DEFAULT false);
    CREATE TABLE shard_changes (id bigserial PRIMARY KEY, tbl text NOT NULL, pk jsonb NOT NULL);
    CREATE FUNCTION timtx_slot(key text) RETURNS integer LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS $$ SELECT ('x' || substr(md5(key), 1, 3))::bit(12)::integer $$;
    CREATE FUNCTION timtx_slot(key bytea) RETURNS integer LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS $$ SELECT ('x' || substr(md5(key), 1, 3))::bit(12)::integer $$;
    """,
]

#: The advisory lock nodes take to migrate one at a time ("timtx" in ASCII).
MIGRATION_LOCK = 0x74696D7478

#: SQLSTATEs after which the server closes the connection.
_GONE = ("57P01", "57P02", "57P03")
#: SQLSTATEs of a transaction the server rolled back to resolve a conflict.
_TRANSIENT = ("40001", "40P01")

_LOST, _TRANSIENT_ERROR = "lost", "transient"


class Op:
    """
    One operation: a statement, its parameters, and what to make of the
    cursor.

    @ivar merge: for an operation that may run merged with others of its
        kind in one statement, what it writes (an L{_Append} or
        L{_DeleteInbox}); see L{timtx.persistence.pool.mergedRuns}.
    @ivar then: more statements of the same operation, run after it and
        undone with it (a write and its intent, for a sharded store).
    """

    __slots__ = ("sql", "params", "result", "merge", "then")

    def __init__(
        self, sql: str, params: Any, result: Callable[[Any], Any], merge: Any = None, then: tuple[Op, ...] = ()
    ):
        self.sql = sql
        self.params = params
        self.result = result
        self.merge = merge
        self.then = then


class _Cursor(txpostgres.Cursor):  # type: ignore[misc]
    """
    A txpostgres cursor watched under its connection's descriptor
    (L{_Connection.fileno}).
    """

    def fileno(self) -> int:
        return self._connection.fileno()  # type: ignore[no-any-return]


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """
    A txpostgres connection that tells its link when the server closes it
    while idle, instead of letting the driver's error escape into the
    reactor's log.

    Once connected, the reactor watches a duplicate of libpq's socket that
    this connection owns and closes only after taking it out of the
    reactor.  libpq closes its own socket whenever it finds the server
    gone, and can do so inside a call that txpostgres makes while the
    connection is registered (a statement started as the server dies): the
    reactor would then keep a descriptor number with nothing behind it,
    unregistering it would fail half-way, and once the number was reused
    the reactor would stop polling whatever held it.  The duplicate keeps
    the socket, and so the registration, valid until L{close}.
    """

    cursorFactory = _Cursor
    link: PostgresLink | None = None
    _why = ""
    #: The duplicate of libpq's socket that the reactor watches, once
    #: connected.
    _watched: int | None = None

    def poll(self) -> Deferred[Any]:
        # Only connect() polls the connection itself; the reactor watches
        # it for good in a callback after this one.
        d: Deferred[Any] = super().poll()
        if self._watched is None:
            d.addCallback(self._watch)
        return d

    def _watch(self, connected: Any) -> Any:
        # txpostgres went back to watching libpq's own descriptor after
        # the last poll: swap it for the duplicate.
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        self._watched = os.dup(self._connection.fileno())
        return connected

    def fileno(self) -> int:
        if self._watched is not None:
            return self._watched
        return super().fileno()  # type: ignore[no-any-return]

    def close(self) -> None:
        try:
            super().close()
        finally:
            watched, self._watched = self._watched, None
            if watched is not None:
                os.close(watched)

    def doRead(self) -> None:
        try:
            super().doRead()
        except (psycopg2.Error, ValueError, OSError) as e:
            # The driver's error, or a socket libpq already gave up (-1).
            self._why = firstLine(e)
            self.close()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.link is not None:
            link, self.link = self.link, None
            link.connectionLost(self._why or reason.getErrorMessage())


class PostgresLink:
    """
    One connection of the pool (see L{timtx.persistence.pool.Link}).

    @param timeout: seconds without an answer after which the connection is
        closed and counted as lost.
    """

    def __init__(self, connection: _Connection, clock: Any, timeout: float):
        self._connection = connection
        self._cursor = connection.cursor()
        self._clock = clock
        self._timeout = timeout
        self._busy = False
        #: Statements prepared on this connection: SQL to name.
        self._prepared: dict[str, str] = {}
        self._names = 0
        #: Called with the link when its connection goes while idle.
        self.onLost: Callable[[PostgresLink, str], None] | None = None
        connection.link = self

    def connectionLost(self, why: str) -> None:
        if not self._busy and self.onLost is not None:
            self.onLost(self, why)

    def close(self) -> None:
        self.onLost = None
        self._connection.link = None
        if self._connection._connection is not None:
            self._connection.close()

    def _statement(self, prefix: str, sql: str, params: Any) -> Deferred[Any]:
        """
        Run an operation's statement after C{prefix} (transaction control),
        as a prepared statement of this connection: parsing and planning
        the append, a statement of several CTEs, cost more than running it.
        """
        body, arguments = _preparable(sql)
        call = f"({arguments})" if arguments else ""
        name = self._prepared.get(sql)
        if name is not None:
            return self._execute(f"{prefix}EXECUTE {name}{call}", params)
        self._names += 1
        name = f"timtx_{self._names}"
        d = self._execute(f"{prefix}PREPARE {name} AS {body};EXECUTE {name}{call}", params)

        def prepared(result: Any) -> Any:
            self._prepared[sql] = name
            return result

        def failed(failure: Failure) -> Failure:
            # An error of the execution (not of parsing or planning) means
            # the PREPARE before it was done; otherwise the next use
            # prepares under a new name.
            code = getattr(failure.value, "pgcode", None) or ""
            if code[:2] not in ("", "26", "42"):
                self._prepared[sql] = name
            return failure

        return d.addCallbacks(prepared, failed)

    def _execute(self, sql: str, params: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = self._cursor.execute(sql, params)
        if d.called:
            return d
        timer = self._clock.callLater(self._timeout, self._stalled)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    def _stalled(self) -> None:
        self._connection._why = f"no answer for {self._timeout:g}s"
        self._connection.close()

    def _classify(self, error: BaseException) -> str | None:
        """
        Whether C{error} means the connection is gone, the transaction was
        rolled back for a conflict, or neither (the statement's own error).
        """
        if self._connection._connection is None or self._connection.closed:
            return _LOST
        if isinstance(error, (ConnectionDone, ConnectionLost)):
            return _LOST
        if isinstance(error, psycopg2.Error):
            code = error.pgcode or ""
            if not code and isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)):
                return _LOST
            if code.startswith("08") or code in _GONE:
                return _LOST
            if code in _TRANSIENT:
                return _TRANSIENT_ERROR
        return None

    async def _raiseFor(self, error: BaseException, committing: bool = False) -> None:
        """
        Raise L{LinkLost} if C{error} means the connection is gone, or roll
        back and raise L{Transient} if the transaction lost a conflict;
        return if it is the statement's own error.
        """
        kind = self._classify(error)
        if kind == _LOST:
            raise LinkLost(self._connection._why or firstLine(error), committing)
        if kind == _TRANSIENT_ERROR:
            if not committing:
                await self._rollback()
            raise Transient(firstLine(error))

    # Link.

    def runRead(self, op: Op) -> Deferred[Any]:
        return self._run(self._read(op))

    def runBatch(self, ops: list[Op]) -> Deferred[list[tuple[bool, Any]]]:
        return self._run(self._batch(ops))

    def _run(self, coroutine: Any) -> Deferred[Any]:
        self._busy = True
        d = ensureDeferred(coroutine)

        def idle(result: Any) -> Any:
            self._busy = False
            return result

        return d.addBoth(idle)

    async def _read(self, op: Op) -> Any:
        try:
            cursor = await self._statement("", op.sql, op.params)
        except Exception as e:
            await self._raiseFor(e)
            raise
        return op.result(cursor)

    async def _batch(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        values: list[Any] = [None] * len(ops)
        prefix = "BEGIN;"
        try:
            for indices, kind in mergedRuns([op.merge for op in ops]):
                if kind is None:
                    op = ops[indices[0]]
                    cursor = await self._statement(prefix, op.sql, op.params)
                    values[indices[0]] = op.result(cursor)
                    for then in op.then:
                        await self._statement("", then.sql, then.params)
                else:
                    op = kind.combine([ops[i].merge for i in indices])
                    cursor = await self._statement(prefix, op.sql, op.params)
                    for index, value in zip(indices, op.result(cursor), strict=True):
                        values[index] = value
                prefix = ""
        except Exception as e:
            await self._raiseFor(e)
            await self._rollback()
            return await self._isolated(ops)
        await self._commit()
        return [(True, value) for value in values]

    async def _isolated(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """
        Run C{ops} again with a savepoint around each, so that a failing
        one is undone alone.  A statement the server never ran (refused
        whole) leaves no savepoint to return to: the transaction is then
        rolled back and run again without that op.
        """
        failed: dict[int, Failure] = {}
        while True:
            outcomes: list[tuple[bool, Any]] = []
            restart = False
            prefix = "BEGIN;"
            for index, op in enumerate(ops):
                if index in failed:
                    outcomes.append((False, failed[index]))
                    continue
                name = f"op{index}"
                try:
                    cursor = await self._statement(f"{prefix}SAVEPOINT {name};", op.sql, op.params)
                    value = op.result(cursor)
                    for then in op.then:
                        await self._statement("", then.sql, then.params)
                except Exception as e:
                    await self._raiseFor(e)
                    failed[index] = Failure()
                    outcomes.append((False, failed[index]))
                    prefix = ""
                    try:
                        await self._execute(f"ROLLBACK TO SAVEPOINT {name}")
                    except Exception as e2:
                        await self._raiseFor(e2)
                        restart = True
                        break
                else:
                    outcomes.append((True, value))
                    # Released with the next statement, saving a round trip.
                    prefix = f"RELEASE SAVEPOINT {name};"
            if restart:
                await self._rollback()
                continue
            await self._commit()
            return outcomes

    async def _rollback(self) -> None:
        try:
            await self._execute("ROLLBACK")
        except Exception as e:
            raise LinkLost(f"rollback failed: {firstLine(e)}") from e

    async def _commit(self) -> None:
        try:
            await self._execute("COMMIT")
        except Exception as e:
            await self._raiseFor(e, committing=True)
            raise

    async def migrate(self, describe: str) -> None:
        """
        Bring the schema to the current version, or refuse a newer one.

        @raise SchemaTooNew: the database is newer than this code.
        @raise StoreUnavailable: the schema cannot be read or created.
        """
        try:
            cursor = await self._execute(
                "BEGIN; SELECT pg_advisory_xact_lock(%s); "
                "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL); "
                "SELECT version FROM schema_version",
                (MIGRATION_LOCK,),
            )
            rows = cursor.fetchall()
            version = rows[0][0] if rows else 0
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"{describe}: database schema {version} is newer than this timtx ({len(MIGRATIONS)})"
                )
            for step in range(version, len(MIGRATIONS)):
                await self._execute(MIGRATIONS[step])
            if version != len(MIGRATIONS):
                if rows:
                    await self._execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))
                else:
                    await self._execute("INSERT INTO schema_version (version) VALUES (%s)", (len(MIGRATIONS),))
            await self._execute("COMMIT")
        except BaseException as e:
            try:
                await self._execute("ROLLBACK")
            except Exception:
                pass
            if isinstance(e, SchemaTooNew):
                raise
            raise StoreUnavailable(f"{describe}: cannot create the schema: {firstLine(e)}") from e


_PARAMETER = re.compile(r"%s((?:::[a-z0-9_]+(?:\[\])?)?)")


@functools.lru_cache(maxsize=256)
def _preparable(sql: str) -> tuple[str, str]:
    """
    C{sql} with C{$n} parameters for C{PREPARE}, and the argument list of
    its C{EXECUTE} with the same casts (an array of NULLs needs its type).
    """
    arguments: list[str] = []

    def number(match: re.Match[str]) -> str:
        arguments.append("%s" + match.group(1))
        return f"${len(arguments)}{match.group(1)}"

    body = _PARAMETER.sub(number, sql)
    return body, ", ".join(arguments)


# Turning a cursor into a result.


def _nothing(cursor: Any) -> None:
    return None


def _changedOne(cursor: Any) -> bool:
    return bool(cursor.rowcount == 1)


def _rowcount(cursor: Any) -> int:
    return int(cursor.rowcount)


def _scalar(cursor: Any) -> Any:
    row = cursor.fetchone()
    return row[0] if row else None


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


#: New inbox rows from arrays: qids drawn in the order of the arrays, so
#: that a user's entries are read back in the order they were given.
_NEW_INBOX = """q AS (
    SELECT nextval('inbox_qid_seq') AS qid, e.* FROM (
        SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bytea[], %s::float8[])
        WITH ORDINALITY AS e(uid, conv, seq, stanza, created, ord) ORDER BY ord
    ) e
), i AS (
    INSERT INTO inbox (qid, uid, conv, seq, stanza, created) SELECT qid, uid, conv, seq, stanza, created FROM q
)"""

#: An append: history rows, inbox entries, duplicate keys.  A taken
#: C{(conv, seq)} is skipped and found missing from C{m}.  A duplicate key
#: already stored is the fence of resends: the no-op update locks the
#: stored row (waiting for a concurrent transaction that inserted it, as an
#: insert would) and returns it as committed, which a C{DO NOTHING} would
#: not, and C{h} keeps the keys held by another message.
_APPEND = f"""WITH m AS (
    INSERT INTO messages (conv, seq, mid, sender, stanza, created)
    SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::bytea[], %s::float8[])
    ON CONFLICT (conv, seq) DO NOTHING
    RETURNING conv, seq
), {_NEW_INBOX}, k AS (
    SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[], %s::float8[])
    AS k(sender, client_id, conv, seq, mid, created)
), d AS (
    INSERT INTO duplicates (sender, client_id, conv, seq, mid, created) SELECT * FROM k
    ON CONFLICT (sender, client_id) DO UPDATE SET created = duplicates.created
    RETURNING sender, client_id, conv, seq, mid, created
), h AS (
    SELECT d.* FROM d JOIN k USING (sender, client_id) WHERE d.conv <> k.conv OR d.mid <> k.mid
)
SELECT ARRAY(SELECT conv FROM m), ARRAY(SELECT seq FROM m), ARRAY(SELECT qid FROM q ORDER BY ord),
    ARRAY(SELECT sender FROM h), ARRAY(SELECT client_id FROM h), ARRAY(SELECT conv FROM h),
    ARRAY(SELECT seq FROM h), ARRAY(SELECT mid FROM h), ARRAY(SELECT created FROM h)"""

#: Intent rows of a sharded store, written with the first step of a write
#: that spans shards (see L{timtx.persistence.sharded}).
_INTENTS = """x AS (
    INSERT INTO shard_intents (id, created, payload)
    SELECT * FROM unnest(%s::bytea[], %s::float8[], %s::bytea[]) ON CONFLICT (id) DO NOTHING
)"""

_APPEND_STAGED = _APPEND.replace(
    "\nSELECT ARRAY(SELECT conv FROM m)", f", {_INTENTS}\nSELECT ARRAY(SELECT conv FROM m)"
)

_ADD_INBOX = f"WITH {_NEW_INBOX} SELECT ARRAY(SELECT qid FROM q ORDER BY ord)"

#: Inbox entries made once per ref: those an earlier run made are found,
#: the others made; the result is every entry's qid, in order.
_APPLY_INBOX = """WITH e AS (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bytea[], %s::float8[], %s::bytea[])
    WITH ORDINALITY AS e(uid, conv, seq, stanza, created, ref, ord)
), old AS (
    SELECT i.ref, i.qid FROM inbox i JOIN e ON i.ref = e.ref
), q AS (
    SELECT nextval('inbox_qid_seq') AS qid, n.* FROM (
        SELECT * FROM e WHERE NOT EXISTS (SELECT 1 FROM old WHERE old.ref = e.ref) ORDER BY ord
    ) n
), i AS (
    INSERT INTO inbox (qid, uid, conv, seq, stanza, created, ref)
    SELECT qid, uid, conv, seq, stanza, created, ref FROM q ON CONFLICT DO NOTHING
)
SELECT ARRAY(SELECT COALESCE(old.qid, q.qid) FROM e LEFT JOIN old ON old.ref = e.ref LEFT JOIN q ON q.ref = e.ref
             ORDER BY e.ord)"""

_UPSERT_DUPLICATES = """INSERT INTO duplicates (sender, client_id, conv, seq, mid, created)
SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[], %s::float8[])
ON CONFLICT (sender, client_id) DO UPDATE
SET conv = excluded.conv, seq = excluded.seq, mid = excluded.mid, created = excluded.created"""

_REPLACE = f"""WITH u AS (
    UPDATE messages SET stanza = %s, state = %s WHERE conv = %s AND seq = %s
), {_NEW_INBOX}
SELECT ARRAY(SELECT qid FROM q ORDER BY ord)"""

_MESSAGE = "SELECT conv, seq, mid, sender, stanza, state, created FROM messages"
_GROUP = "SELECT gid, domain, founder, gtype, status, created, profile, member_cap, muted_all FROM groups"
_PUT_MEMBER = (
    "INSERT INTO group_members (gid, uid, role, joined, muted_until) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (gid, uid) DO UPDATE SET role = excluded.role, joined = excluded.joined, "
    "muted_until = excluded.muted_until"
)


def _textElement(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bytesElement(value: bytes) -> str:
    # The array parser unescapes \\x to \x, bytea's hex input.
    return '"\\\\x' + value.hex() + '"'


#: How each column type is written in an array literal.
_ELEMENT: dict[str, Callable[[Any], str]] = {"t": _textElement, "b": _bytesElement, "i": repr, "f": repr}


def _columns(rows: Any, types: str) -> tuple[str, ...]:
    """
    Rows as one array literal per column, for C{unnest}: C{types} has a
    letter per column (C{t}ext, C{b}ytea, C{i}nteger, C{f}loat).  Written
    here rather than by psycopg2, which adapts every element as an object
    of its own: three times the CPU, measured on a 16-message append.
    """
    columns = zip(*rows, strict=True) if rows else [()] * len(types)
    return tuple(_array(_ELEMENT[t], column) for t, column in zip(types, columns, strict=True))


def _array(element: Callable[[Any], str], column: tuple[Any, ...]) -> str:
    if None in column:
        return "{" + ",".join("NULL" if v is None else element(v) for v in column) + "}"
    return "{" + ",".join(map(element, column)) + "}"


#: The columns of L{_NEW_INBOX}: uid, conv, seq, stanza, created.
_INBOX_TYPES = "ttibf"

_DELETE_INBOX = (
    "DELETE FROM inbox i USING unnest(%s::text[], %s::bigint[]) AS d(uid, qid) "
    "WHERE i.uid = d.uid AND i.qid = d.qid RETURNING i.uid, i.qid"
)


class _Append(Appends):
    """
    What one L{PostgreSQLStore.appendMessages} call writes; several run as
    one statement (L{timtx.persistence.pool.mergedRuns}).

    @ivar intents: intent rows written with it (a sharded store's first
        step).
    """

    ordered = True

    def __init__(self, messages: list[NewMessage], intents: list[tuple[bytes, float, bytes]] | None = None):
        super().__init__(messages)
        self.intents = intents or []

    @staticmethod
    def combine(appends: list[Appends]) -> Op:
        """
        One statement for C{appends}, in order; its result is each one's.

        @raise DuplicateConflict: from the result, for the first call with
            a duplicate key held by another message, and then
        @raise SequenceConflict: for the first taken C{(conv, seq)} (the
            batch then runs again op by op, so that only the call that
            holds it fails).
        """
        rows, inbox, dupes = Appends.together(appends)
        intents = [row for a in appends for row in getattr(a, "intents", ())]

        def result(cursor: Any) -> list[list[list[int]]]:
            convs, seqs, qids, *held = cursor.fetchone()
            if held[0]:
                Appends.checkKeys(appends, zip(*held, strict=True))
            if len(seqs) != len(rows):
                Appends.checkStored(rows, zip(convs, seqs, strict=True))
            return Appends.split(appends, qids)

        params = (*_columns(rows, "tiitbf"), *_columns(inbox, _INBOX_TYPES), *_columns(dupes, "titiif"))
        if intents:
            return Op(_APPEND_STAGED, (*params, *_columns(intents, "bfb")), result)
        return Op(_APPEND, params, result)


_APPLY_PARTS = _APPLY_INBOX.replace(
    "\nSELECT ARRAY(", ", d AS (" + _UPSERT_DUPLICATES.replace("\n", " ") + ")\nSELECT ARRAY("
)


class _Parts:
    """
    The inbox entries and duplicate keys of one C{applyParts} call (the
    second step of a message whose conversation lives on another shard);
    several run as one statement.
    """

    ordered = True

    def __init__(self, parts: list[Part]):
        self.inbox = [p.args for p in parts if p.kind == "inbox"]
        self.dupes = {(p.args[0], p.args[1]): p.args for p in parts if p.kind == "dedupe"}

    @staticmethod
    def combine(calls: list[_Parts]) -> Op:
        inbox = [row for c in calls for row in c.inbox]
        dupes: dict[Any, Any] = {}
        for c in calls:
            dupes.update(c.dupes)

        def result(cursor: Any) -> list[list[int]]:
            qids = list(_scalar(cursor))
            out = []
            for c in calls:
                out.append(qids[: len(c.inbox)])
                del qids[: len(c.inbox)]
            return out

        return Op(_APPLY_PARTS, (*_columns(inbox, "ttibfb"), *_columns(list(dupes.values()), "titiif")), result)


class _DeleteInbox(InboxDeletion):
    """
    What one L{PostgreSQLStore.deleteInbox} call removes; several run as
    one statement.
    """

    @staticmethod
    def combine(deletions: list[InboxDeletion]) -> Op:
        pairs = InboxDeletion.pairs(deletions)
        return Op(
            _DELETE_INBOX,
            _columns(pairs, "ti"),
            lambda cursor: InboxDeletion.counts(deletions, cursor.fetchall()),
        )


def _mergeable(merge: Any) -> Op:
    """
    The operation of one mergeable call alone.
    """
    combined = merge.combine([merge])
    return Op(combined.sql, combined.params, lambda cursor: combined.result(cursor)[0], merge)


@implementer(IMessageStore, IShardStore)
class PostgreSQLStore(PooledStore):
    """
    @param reactor: drives the connections (C{IReactorFDSet}).
    @param dsn: libpq's C{key=value} string or a C{postgresql://} URI.
    @param clock: for timeouts and reconnection; the reactor by default.
    """

    name = "postgresql"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        *,
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
        self._clock = clock if clock is not None else reactor
        self.dsn = dsn
        self._statementTimeout = statementTimeout
        self._connectTimeout = connectTimeout
        try:
            self._params: dict[str, str] | None = psycopg2.extensions.parse_dsn(dsn)
            self._dsnError = ""
        except psycopg2.Error as e:
            self._params = None
            self._dsnError = firstLine(e)
        params = self._params or {}
        where = params.get("host", "localhost")
        if "port" in params:
            where += f":{params['port']}"
        self._makePool(
            self._clock,
            f"PostgreSQL at {where}/{params.get('dbname', params.get('user', ''))}",
            poolSize=poolSize,
            batchMax=batchMax,
            reconnectInitial=reconnectInitial,
            reconnectMax=reconnectMax,
            random=random,
        )

    def open(self) -> Deferred[None]:
        return ensureDeferred(self._open())

    async def _open(self) -> None:
        if not self.dsn.strip():
            raise StoreUnavailable("[store] dsn is empty: set it to the server, such as postgresql://user@host/db")
        if self._params is None:
            raise StoreUnavailable(f"[store] dsn is not a PostgreSQL connection string: {self._dsnError}")
        link = await self._connect()
        try:
            await link.migrate(self.describe)
        except BaseException:
            link.close()
            raise
        self._pool.start(link)

    def _connect(self) -> Deferred[PostgresLink]:
        return ensureDeferred(self._connectLink())

    async def _connectLink(self) -> PostgresLink:
        assert self._params is not None
        params = dict(self._params)
        params.setdefault("application_name", "timtx")
        connection = _Connection(self._reactor)
        timedOut = []

        def timeout() -> None:
            timedOut.append(True)
            if connection._connection is not None:
                connection.close()

        timer = self._clock.callLater(self._connectTimeout, timeout)
        try:
            await connection.connect(**params)
            link = PostgresLink(connection, self._clock, self._statementTimeout + self._connectTimeout)
            milliseconds = int(self._statementTimeout * 1000)
            await link._execute(
                "SET statement_timeout = %s; SET idle_in_transaction_session_timeout = %s",
                (milliseconds, milliseconds + int(self._connectTimeout * 1000)),
            )
        except Exception as e:
            if connection._connection is not None and not connection.closed:
                connection.close()
            why = f"no answer within {self._connectTimeout:g}s" if timedOut else firstLine(e)
            raise StoreUnavailable(f"cannot connect to {self.describe}: {why}") from None
        finally:
            if timer.active():
                timer.cancel()
        link.onLost = self._pool.linkLost
        return link

    def _read(self, sql: str, params: Any, result: Callable[[Any], Any]) -> Deferred[Any]:
        return self._pool.read(Op(sql, params, result))

    def _write(self, sql: str, params: Any, result: Callable[[Any], Any], idempotent: bool = False) -> Deferred[Any]:
        return self._pool.write(Op(sql, params, result), idempotent)

    # Accounts.

    def createAccount(self, account: Account) -> Deferred[bool]:
        return self._write(
            "INSERT INTO accounts (uid, domain, password_hash, created) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (uid) DO NOTHING",
            (account.uid, account.domain, account.passwordHash, account.created),
            _changedOne,
        )

    def getAccount(self, uid: str) -> Deferred[Account | None]:
        def account(cursor: Any) -> Account | None:
            row = cursor.fetchone()
            return Account(*row) if row else None

        return self._read("SELECT uid, domain, password_hash, created FROM accounts WHERE uid = %s", (uid,), account)

    def setPasswordHash(self, uid: str, passwordHash: str) -> Deferred[bool]:
        return self._write(
            "UPDATE accounts SET password_hash = %s WHERE uid = %s", (passwordHash, uid), _changedOne, True
        )

    # Login tokens.

    def addToken(self, key: bytes, grant: TokenGrant, expires: float) -> Deferred[None]:
        return self._write(
            "INSERT INTO login_tokens (token_key, uid, domain, expires) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (token_key) DO UPDATE SET uid = excluded.uid, domain = excluded.domain, "
            "expires = excluded.expires",
            (key, grant.uid, grant.domain, expires),
            _nothing,
            True,
        )

    def takeToken(self, key: bytes, now: float) -> Deferred[TokenGrant | None]:
        def grant(cursor: Any) -> TokenGrant | None:
            row = cursor.fetchone()
            if row is None or row[2] < now:
                return None
            return TokenGrant(row[0], row[1])

        return self._write(
            "DELETE FROM login_tokens WHERE token_key = %s RETURNING uid, domain, expires", (key,), grant
        )

    def purgeTokens(self, now: float) -> Deferred[int]:
        return self._write("DELETE FROM login_tokens WHERE expires < %s", (now,), _rowcount)

    # Messages.

    def appendMessages(self, messages: list[NewMessage]) -> Deferred[list[list[int]]]:
        return self._pool.write(_mergeable(_Append(messages)))

    def lastMessage(self, conv: str) -> Deferred[tuple[int, int]]:
        def last(cursor: Any) -> tuple[int, int]:
            row = cursor.fetchone()
            return (row[0], row[1]) if row else (0, 0)

        return self._read("SELECT seq, mid FROM messages WHERE conv = %s ORDER BY seq DESC LIMIT 1", (conv,), last)

    def getMessage(self, conv: str, mid: int) -> Deferred[StoredMessage | None]:
        def message(cursor: Any) -> StoredMessage | None:
            row = cursor.fetchone()
            return messageFrom(row) if row else None

        return self._read(f"{_MESSAGE} WHERE conv = %s AND mid = %s", (conv, mid), message)

    def replaceMessage(
        self, conv: str, seq: int, stanza: bytes, state: int, notices: list[tuple[str, bytes]], created: float
    ) -> Deferred[list[int]]:
        return self._pool.write(self._replaceOp(conv, seq, stanza, state, notices, created))

    def _replaceOp(
        self, conv: str, seq: int, stanza: bytes, state: int, notices: list[tuple[str, bytes]], created: float
    ) -> Op:
        inbox = _columns([(uid, conv, None, body, created) for uid, body in notices], _INBOX_TYPES)
        return Op(_REPLACE, (stanza, state, conv, seq, *inbox), _scalar)

    def history(self, conv: str, beforeMid: int | None, limit: int) -> Deferred[list[StoredMessage]]:
        def messages(cursor: Any) -> list[StoredMessage]:
            return [messageFrom(row) for row in cursor.fetchall()]

        if beforeMid is None:
            return self._read(f"{_MESSAGE} WHERE conv = %s ORDER BY mid DESC LIMIT %s", (conv, limit), messages)
        return self._read(
            f"{_MESSAGE} WHERE conv = %s AND mid < %s ORDER BY mid DESC LIMIT %s", (conv, beforeMid, limit), messages
        )

    def recentDuplicates(self, sender: str, since: float) -> Deferred[dict[int, Duplicate]]:
        def duplicates(cursor: Any) -> dict[int, Duplicate]:
            return {row[0]: Duplicate(*row[1:]) for row in cursor.fetchall()}

        return self._read(
            "SELECT client_id, conv, seq, mid, created FROM duplicates WHERE sender = %s AND created >= %s",
            (sender, since),
            duplicates,
        )

    def purgeDuplicates(self, before: float) -> Deferred[int]:
        return self._write("DELETE FROM duplicates WHERE created < %s", (before,), _rowcount)

    # Inboxes.

    def addInbox(self, entries: list[tuple[str, bytes]], created: float) -> Deferred[list[int]]:
        return self._pool.write(self._addInboxOp(entries, created))

    def _addInboxOp(self, entries: list[tuple[str, bytes]], created: float) -> Op:
        inbox = _columns([(uid, None, None, stanza, created) for uid, stanza in entries], _INBOX_TYPES)
        return Op(_ADD_INBOX, inbox, _scalar)

    def readInbox(self, uid: str, afterQid: int, limit: int) -> Deferred[list[InboxEntry]]:
        def entries(cursor: Any) -> list[InboxEntry]:
            return [
                InboxEntry(qid, uid, conv, seq, bytes(stanza))
                for qid, conv, seq, stanza in cursor.fetchall()
                if stanza is not None
            ]

        return self._read(
            "SELECT i.qid, i.conv, i.seq, COALESCE(i.stanza, m.stanza) FROM inbox i "
            "LEFT JOIN messages m ON i.stanza IS NULL AND m.conv = i.conv AND m.seq = i.seq "
            "WHERE i.uid = %s AND i.qid > %s ORDER BY i.qid LIMIT %s",
            (uid, afterQid, limit),
            entries,
        )

    def deleteInbox(self, uid: str, qids: list[int]) -> Deferred[int]:
        return self._pool.write(_mergeable(_DeleteInbox(uid, qids)))

    def countInbox(self, uid: str) -> Deferred[int]:
        return self._read("SELECT COUNT(*) FROM inbox WHERE uid = %s", (uid,), _scalar)

    # Relations and profiles.

    def relationsOf(self, uid: str) -> Deferred[list[Relation]]:
        def relations(cursor: Any) -> list[Relation]:
            others: dict[str, list[int]] = {}
            for other, stance, mine in cursor.fetchall():
                others.setdefault(other, [0, 0])[0 if mine else 1] = stance
            return [Relation(other, mine, theirs) for other, (mine, theirs) in others.items()]

        return self._read(
            "SELECT other, stance, true FROM stances WHERE owner = %s "
            "UNION ALL SELECT owner, stance, false FROM stances WHERE other = %s",
            (uid, uid),
            relations,
        )

    def setStance(self, owner: str, other: str, stance: int) -> Deferred[None]:
        return self._pool.write(_stanceOp(owner, other, stance), True)

    def getProfile(self, uid: str) -> Deferred[bytes | None]:
        return self._read("SELECT stanza FROM profiles WHERE uid = %s", (uid,), lambda cursor: _bytes(_scalar(cursor)))

    def putProfile(self, uid: str, stanza: bytes) -> Deferred[None]:
        return self._write(
            "INSERT INTO profiles (uid, stanza) VALUES (%s, %s) ON CONFLICT (uid) DO UPDATE SET stanza = excluded.stanza",
            (uid, stanza),
            _nothing,
            True,
        )

    def getInvisible(self, uid: str) -> Deferred[bool]:
        return self._read("SELECT 1 FROM invisible WHERE uid = %s", (uid,), lambda cursor: cursor.rowcount > 0)

    def setInvisible(self, uid: str, invisible: bool) -> Deferred[None]:
        if invisible:
            sql = "INSERT INTO invisible (uid) VALUES (%s) ON CONFLICT (uid) DO NOTHING"
        else:
            sql = "DELETE FROM invisible WHERE uid = %s"
        return self._write(sql, (uid,), _nothing, True)

    # Groups.

    def createGroup(self, group: Group, founder: Member) -> Deferred[None]:
        return self._pool.write(self._createGroupOp(group, founder))

    def _createGroupOp(self, group: Group, founder: Member) -> Op:
        return Op(
            "WITH g AS (INSERT INTO groups (gid, domain, founder, gtype, status, created, profile, member_cap, "
            f"muted_all) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)) {_PUT_MEMBER}",
            (*groupRow(group), group.gid, founder.uid, founder.role, founder.joined, founder.mutedUntil),
            _nothing,
        )

    def getGroup(self, gid: str) -> Deferred[Group | None]:
        def group(cursor: Any) -> Group | None:
            row = cursor.fetchone()
            return groupFrom(row) if row else None

        return self._read(f"{_GROUP} WHERE gid = %s", (gid,), group)

    def updateGroup(self, group: Group) -> Deferred[None]:
        return self._write(
            "UPDATE groups SET domain = %s, founder = %s, gtype = %s, status = %s, created = %s, profile = %s, "
            "member_cap = %s, muted_all = %s WHERE gid = %s",
            (*groupRow(group)[1:], group.gid),
            _nothing,
            True,
        )

    def countFounded(self, uid: str) -> Deferred[int]:
        return self._read("SELECT COUNT(*) FROM groups WHERE founder = %s AND status = %s", (uid, GROUP_ALIVE), _scalar)

    def groupMembers(self, gid: str) -> Deferred[list[Member]]:
        return self._read(
            "SELECT uid, role, joined, muted_until FROM group_members WHERE gid = %s",
            (gid,),
            lambda cursor: [Member(*row) for row in cursor.fetchall()],
        )

    def groupsOf(self, uid: str) -> Deferred[list[str]]:
        return self._read(
            "SELECT gid FROM group_members WHERE uid = %s", (uid,), lambda cursor: [r[0] for r in cursor.fetchall()]
        )

    def putMember(self, gid: str, member: Member) -> Deferred[None]:
        return self._pool.write(_memberOp(gid, member.uid, member.role, member.joined, member.mutedUntil), True)

    def removeMembers(self, gid: str, uids: list[str]) -> Deferred[int]:
        return self._pool.write(self._removeMembersOp(gid, uids))

    def _removeMembersOp(self, gid: str, uids: list[str]) -> Op:
        return Op("DELETE FROM group_members WHERE gid = %s AND uid = ANY(%s::text[])", (gid, list(uids)), _rowcount)

    def addJoinRequest(self, gid: str, uid: str, created: float) -> Deferred[None]:
        return self._write(
            "INSERT INTO group_requests (gid, uid, created) VALUES (%s, %s, %s) "
            "ON CONFLICT (gid, uid) DO UPDATE SET created = excluded.created",
            (gid, uid, created),
            _nothing,
            True,
        )

    def takeJoinRequest(self, gid: str, uid: str) -> Deferred[bool]:
        return self._write("DELETE FROM group_requests WHERE gid = %s AND uid = %s", (gid, uid), _changedOne)

    def setGroupBlock(self, gid: str, uid: str, by: int, blocked: bool) -> Deferred[None]:
        return self._pool.write(_blockOp(gid, uid, by, blocked), True)

    def groupBlocks(self, gid: str) -> Deferred[dict[str, set[int]]]:
        def blocks(cursor: Any) -> dict[str, set[int]]:
            found: dict[str, set[int]] = {}
            for uid, by in cursor.fetchall():
                found.setdefault(uid, set()).add(by)
            return found

        return self._read("SELECT uid, blocked_by FROM group_blocks WHERE gid = %s", (gid,), blocks)

    def userGroupBlocks(self, uid: str) -> Deferred[list[str]]:
        return self._read(
            "SELECT gid FROM group_blocks WHERE uid = %s AND blocked_by = %s",
            (uid, BLOCK_BY_USER),
            lambda cursor: [r[0] for r in cursor.fetchall()],
        )

    def saveCursors(self, cursors: list[tuple[str, str, int]]) -> Deferred[None]:
        highest: dict[tuple[str, str], int] = {}
        for uid, gid, seq in cursors:
            highest[(uid, gid)] = max(seq, highest.get((uid, gid), seq))
        return self._write(
            "INSERT INTO group_cursors (uid, gid, seq) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
            "ON CONFLICT (uid, gid) DO UPDATE SET seq = GREATEST(group_cursors.seq, excluded.seq)",
            ([k[0] for k in highest], [k[1] for k in highest], list(highest.values())),
            _nothing,
            True,
        )

    def cursorsOf(self, uid: str) -> Deferred[dict[str, int]]:
        return self._read(
            "SELECT gid, seq FROM group_cursors WHERE uid = %s", (uid,), lambda cursor: dict(cursor.fetchall())
        )

    def messagesAfter(self, conv: str, afterSeq: int, limit: int) -> Deferred[list[StoredMessage]]:
        return self._read(
            f"{_MESSAGE} WHERE conv = %s AND seq > %s ORDER BY seq LIMIT %s",
            (conv, afterSeq, limit),
            lambda cursor: [messageFrom(row) for row in cursor.fetchall()],
        )

    # Sealed blobs.

    def sealedRows(
        self, kind: str, after: Any, limit: int, keep: bytes
    ) -> Deferred[tuple[list[tuple[Any, bytes]], Any]]:
        def rows(cursor: Any) -> tuple[list[tuple[Any, bytes]], Any]:
            found = [(tuple(r[:-1]), bytes(r[-1])) for r in cursor.fetchall()]
            return found, found[-1][0] if len(found) == limit else None

        return self._read(selectSql(kind, after is not None), (len(keep), keep, *(after or ()), limit), rows)

    def replaceSealed(self, kind: str, rows: list[tuple[Any, bytes, bytes]]) -> Deferred[int]:
        table, pk, column = SEALED[kind]
        types = "ti"[: len(pk)]
        names = ", ".join(pk)
        arrays = ", ".join(f"%s::{'text' if t == 't' else 'bigint'}[]" for t in types)
        match = " AND ".join(f"t.{c} = r.{c}" for c in pk)
        return self._write(
            f"UPDATE {table} t SET {column} = r.new FROM unnest({arrays}, %s::bytea[], %s::bytea[]) "
            f"AS r({names}, old, new) WHERE {match} AND t.{column} = r.old",
            _columns([(*key, old, new) for key, old, new in rows], types + "bb"),
            _rowcount,
            True,
        )

    def sealedKeys(self, kind: str) -> Deferred[dict[int, int]]:
        return self._read(
            keysSql(kind, "%s", "encode({}, 'hex')"), (b"\x01", b"\x02"), lambda cursor: keyCounts(cursor.fetchall())
        )

    # As a shard of a sharded store (timtx.persistence.sharded).

    def appendStaged(self, messages: list[NewMessage], intent: Intent) -> Deferred[list[list[int]]]:
        return self._pool.write(_mergeable(_Append(messages, [intentRow(intent)])))

    def stagedWrite(self, method: str, args: tuple[Any, ...], intent: Intent) -> Deferred[Any]:
        builders: dict[str, Callable[..., Op]] = {
            "replaceMessage": self._replaceOp,
            "addInbox": self._addInboxOp,
            "createGroup": self._createGroupOp,
            "removeMembers": self._removeMembersOp,
        }
        op = builders[method](*args)
        op.then = (_intentOp(intent),)
        return self._pool.write(op)

    def applyParts(self, parts: list[Part], intent: Intent | None) -> Deferred[list[int]]:
        if intent is None and all(p.kind in ("inbox", "dedupe") for p in parts):
            # The second step of a message: merged with the others of the
            # batch into one statement.
            return self._pool.write(_mergeable(_Parts(parts)), True)
        ops = _partOps(parts)
        if intent is not None:
            ops.append(_intentOp(intent))
        first, rest = ops[0], ops[1:]
        return self._pool.write(Op(first.sql, first.params, first.result, then=tuple(rest)), True)

    def pendingIntents(self, before: float, limit: int) -> Deferred[list[Intent]]:
        return self._read(
            "SELECT id, created, payload FROM shard_intents WHERE created < %s ORDER BY created LIMIT %s",
            (before, limit),
            lambda cursor: [Intent(bytes(i), c, decodeParts(bytes(p))) for i, c, p in cursor.fetchall()],
        )

    def dropIntents(self, ids: list[bytes]) -> Deferred[None]:
        return self._write(
            "DELETE FROM shard_intents WHERE id = ANY(%s::bytea[])", _columns([(i,) for i in ids], "b"), _nothing, True
        )

    def readInboxRaw(
        self, uid: str, afterQid: int, limit: int
    ) -> Deferred[list[tuple[int, str | None, int | None, bytes | None]]]:
        return self._read(
            "SELECT i.qid, i.conv, i.seq, COALESCE(i.stanza, m.stanza) FROM inbox i "
            "LEFT JOIN messages m ON i.stanza IS NULL AND m.conv = i.conv AND m.seq = i.seq "
            "WHERE i.uid = %s AND i.qid > %s ORDER BY i.qid LIMIT %s",
            (uid, afterQid, limit),
            lambda cursor: [(q, c, s, _bytes(b)) for q, c, s, b in cursor.fetchall()],
        )

    def stanzasAt(self, rows: list[tuple[str, int]]) -> Deferred[dict[tuple[str, int], bytes]]:
        return self._read(
            "SELECT m.conv, m.seq, m.stanza FROM messages m "
            "JOIN unnest(%s::text[], %s::bigint[]) AS r(conv, seq) ON m.conv = r.conv AND m.seq = r.seq",
            _columns(rows, "ti"),
            lambda cursor: {(c, s): bytes(b) for c, s, b in cursor.fetchall()},
        )

    def foundedBy(self, uid: str) -> Deferred[list[str]]:
        return self._read(
            "SELECT gid FROM groups WHERE founder = %s AND status = %s",
            (uid, GROUP_ALIVE),
            lambda cursor: [r[0] for r in cursor.fetchall()],
        )

    def shardMap(self) -> Deferred[ShardMap | None]:
        return self._read(
            "SELECT (SELECT json_build_object('version', version, 'moving', moving, "
            "'shards', (SELECT json_agg(json_build_array(shard, dsn)) FROM shard_list), "
            "'ranges', (SELECT json_agg(json_build_array(lo, hi, shard, held) ORDER BY lo) FROM shard_ranges)) "
            "FROM shard_map)",
            None,
            lambda cursor: _shardMapFrom(_scalar(cursor)),
        )

    def createShardMap(self, shardMap: ShardMap) -> Deferred[None]:
        ranges = [(r.lo, r.hi, r.shard) for r in shardMap.ranges]
        shards = sorted(shardMap.shards.items())
        return self._write(
            "WITH m AS (INSERT INTO shard_map (version) VALUES (%s) ON CONFLICT (id) DO NOTHING RETURNING version), "
            "s AS (INSERT INTO shard_list (shard, dsn, added) SELECT s.shard, s.dsn, extract(epoch FROM now()) "
            "FROM unnest(%s::integer[], %s::text[]) AS s(shard, dsn) WHERE EXISTS (SELECT 1 FROM m)) "
            "INSERT INTO shard_ranges (lo, hi, shard) SELECT * FROM unnest(%s::integer[], %s::integer[], %s::integer[]) "
            "WHERE EXISTS (SELECT 1 FROM m)",
            (shardMap.version, *_columns(shards, "it"), *_columns(ranges, "iii")),
            _nothing,
        )

    def heartbeat(self, node: str, version: int) -> Deferred[tuple[int, bool]]:
        return self._write(
            "WITH h AS (INSERT INTO shard_nodes (node, version, seen) VALUES (%s, %s, clock_timestamp()) "
            "ON CONFLICT (node) DO UPDATE SET version = excluded.version, seen = excluded.seen) "
            "SELECT version, moving FROM shard_map",
            (node, version),
            lambda cursor: tuple(cursor.fetchone() or (0, False)),
            True,
        )

    def leave(self, node: str) -> Deferred[None]:
        return self._write("DELETE FROM shard_nodes WHERE node = %s", (node,), _nothing, True)

    def directoryStatus(self) -> Deferred[tuple[list[tuple[str, int, float]], list[dict[str, Any]]]]:
        return self._read(
            "SELECT json_build_object("
            "'nodes', (SELECT json_agg(json_build_array(node, version, extract(epoch FROM clock_timestamp() - seen)) "
            "ORDER BY node) FROM shard_nodes), "
            "'moves', (SELECT json_agg(m ORDER BY id DESC) FROM (SELECT id, lo || '-' || hi AS slots, source, target, "
            "phase, copied, total, started, updated, finished, detail FROM shard_moves ORDER BY id DESC LIMIT 20) m))",
            None,
            lambda cursor: _directoryStatusFrom(_scalar(cursor)),
        )


def _shardMapFrom(found: Any) -> ShardMap | None:
    if found is None:
        return None
    return ShardMap(
        int(found["version"]),
        {int(shard): dsn for shard, dsn in found["shards"] or ()},
        tuple(Range(lo, hi, shard, held) for lo, hi, shard, held in found["ranges"] or ()),
        bool(found["moving"]),
    )


def _directoryStatusFrom(found: Any) -> tuple[list[tuple[str, int, float]], list[dict[str, Any]]]:
    nodes = [(node, int(version), float(age)) for node, version, age in found["nodes"] or ()]
    return nodes, list(found["moves"] or ())


def _stanceOp(owner: str, other: str, stance: int) -> Op:
    if stance:
        return Op(
            "INSERT INTO stances (owner, other, stance) VALUES (%s, %s, %s) "
            "ON CONFLICT (owner, other) DO UPDATE SET stance = excluded.stance",
            (owner, other, stance),
            _nothing,
        )
    return Op("DELETE FROM stances WHERE owner = %s AND other = %s", (owner, other), _nothing)


def _memberOp(gid: str, uid: str, role: int, joined: float, mutedUntil: float) -> Op:
    return Op(_PUT_MEMBER, (gid, uid, role, joined, mutedUntil), _nothing)


def _blockOp(gid: str, uid: str, by: int, blocked: bool) -> Op:
    if blocked:
        sql = (
            "INSERT INTO group_blocks (gid, uid, blocked_by) VALUES (%s, %s, %s) "
            "ON CONFLICT (gid, uid, blocked_by) DO NOTHING"
        )
    else:
        sql = "DELETE FROM group_blocks WHERE gid = %s AND uid = %s AND blocked_by = %s"
    return Op(sql, (gid, uid, by), _nothing)


def _intentOp(intent: Intent) -> Op:
    return Op(
        "INSERT INTO shard_intents (id, created, payload) VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING",
        intentRow(intent),
        _nothing,
    )


def _partOps(parts: list[Part]) -> list[Op]:
    """
    The statements of C{parts}: the inbox entries first (their qids are the
    result), then the rest in order.
    """
    inbox = [p.args for p in parts if p.kind == "inbox"]
    dupes = [p.args for p in parts if p.kind == "dedupe"]
    ops = [Op(_APPLY_INBOX, _columns(inbox, "ttibfb"), _scalar) if inbox else Op("SELECT 1", None, lambda _: [])]
    if dupes:
        ops.append(Op(_UPSERT_DUPLICATES, _columns(dupes, "titiif"), _nothing))
    for part in parts:
        if part.kind == "stance":
            ops.append(_stanceOp(*part.args))
        elif part.kind == "member":
            ops.append(_memberOp(*part.args))
        elif part.kind == "unmember":
            ops.append(Op("DELETE FROM group_members WHERE gid = %s AND uid = %s", part.args, _nothing))
        elif part.kind == "block":
            ops.append(_blockOp(*part.args))
        elif part.kind not in ("inbox", "dedupe"):
            raise ValueError(f"unknown part {part.kind!r}")
    return ops


@implementer(IStoreFactory)
class PostgreSQLStoreFactory:
    name = "postgresql"
    description = "A PostgreSQL server (txpostgres, connection pool, group commit); for clusters."

    def makeStore(self, config: Any, reactor: Any) -> PostgreSQLStore:
        return PostgreSQLStore(reactor, config.store.dsn, **poolOptions(config.store))
