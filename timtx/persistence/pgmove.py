# -*- test-case-name: timtx.test.test_pgmove -*-
"""
Moving slot ranges between PostgreSQL shards while nodes serve traffic
(C{python -m timtx shards move}).  Blocking code for an operator's command:
plain psycopg2 connections, no reactor.

A move of slots C{lo}-C{hi} from shard S to shard T, in phases, each
recorded in the directory's C{shard_moves} so that a mover that dies is
resumed where it stopped by running the command again:

  1. I{prepare}: on S, triggers on every placed table record the primary
     key of each row of the range that changes (C{shard_changes}) from now
     on; the map says a move is under way (nodes look at it more often).
  2. I{copy}: every row of the range is copied from S to T, in batches,
     keyed by primary key (a row copied twice is written twice, no harm).
  3. I{catch up}: rows recorded as changed are copied again (or deleted on
     T), until few are left.
  4. I{switch}: the map marks the range I{held} (version v+1): nodes stop
     touching it, and say so in their heartbeats once their calls under
     older maps are done.  When every live node has (a node silent for
     C{map_lease} refuses calls by itself), S is fenced (its triggers
     refuse writes to the range's rows, but not to S's own copy of a row
     kept on both keys' shards whose other key stays on S: nodes on the
     new map write it there), the last changes are copied, the range is
     checked (row count and a checksum per table, equal on S and T), T's
     qids are set past the moved ones, and the map gives the range to T
     (v+2).  Nodes then send the calls they held to T.
  5. I{cleanup}: once every live node uses v+2, the triggers are dropped
     and the range's rows are deleted from S (rows kept on both sides stay
     where the other key still lives).

Only one move runs at a time.  Until the switch, a move can be abandoned
(C{--abort}): the map is restored and what was copied to T is deleted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from timtx.persistence.placement import SLOTS, TABLES, Range, ShardMap, Table, reassigned, statusOf
from timtx.persistence.postgresql import MIGRATION_LOCK, MIGRATIONS

PHASES = ("prepare", "copy", "catchup", "switch", "cleanup", "done", "aborted")

#: What a progress callback receives: phase, done, total, a line of detail.
Progress = Callable[[str, int, int, str], None]


class MoveError(Exception):
    """
    A move cannot go on; the message says why and what to do.
    """


@dataclass
class Move:
    """
    A move as recorded in the directory (C{shard_moves}).
    """

    id: int
    lo: int
    hi: int
    source: int
    target: int
    phase: str
    copied: int
    total: int
    started: float
    updated: float
    finished: float | None
    detail: str

    @property
    def slots(self) -> str:
        return f"{self.lo}-{self.hi}"

    def asDict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slots": self.slots,
            "source": self.source,
            "target": self.target,
            "phase": self.phase,
            "copied": self.copied,
            "total": self.total,
            "started": self.started,
            "updated": self.updated,
            "finished": self.finished,
            "detail": self.detail,
        }


def connect(dsn: str) -> Any:
    """
    An autocommit connection to C{dsn}.

    @raise MoveError: if it cannot be made.
    """
    try:
        connection = psycopg2.connect(dsn, connect_timeout=10, application_name="timtx shards")
    except psycopg2.Error as e:
        raise MoveError(f"cannot connect to {describe(dsn)}: {str(e).strip().splitlines()[0]}") from None
    connection.autocommit = True
    return connection


def describe(dsn: str) -> str:
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return "the database"
    where = params.get("host", "localhost")
    if "port" in params:
        where += f":{params['port']}"
    return f"PostgreSQL at {where}/{params.get('dbname', '')}"


def migrate(connection: Any) -> None:
    """
    Bring a database to the current schema, as a node does when it opens
    it (same steps, same lock).
    """
    with connection.cursor() as cursor:
        cursor.execute("BEGIN")
        try:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            cursor.execute("SELECT version FROM schema_version")
            rows = cursor.fetchall()
            version = rows[0][0] if rows else 0
            if version > len(MIGRATIONS):
                raise MoveError(f"database schema {version} is newer than this timtx ({len(MIGRATIONS)})")
            for step in MIGRATIONS[version:]:
                cursor.execute(step)
            if rows:
                cursor.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))
            else:
                cursor.execute("INSERT INTO schema_version (version) VALUES (%s)", (len(MIGRATIONS),))
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise


class Directory:
    """
    The shard map and the state of moves, in the first shard's database.
    """

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.connection = connect(dsn)
        migrate(self.connection)

    def close(self) -> None:
        self.connection.close()

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def shardMap(self) -> ShardMap:
        rows = self.query("SELECT version, moving FROM shard_map")
        if not rows:
            raise MoveError("the directory has no shard map yet: start a node with [store] shards first")
        version, moving = rows[0]
        shards = dict(self.query("SELECT shard, dsn FROM shard_list"))
        ranges = tuple(Range(*row) for row in self.query("SELECT lo, hi, shard, held FROM shard_ranges ORDER BY lo"))
        return ShardMap(version, shards, ranges, moving)

    def saveMap(self, old: ShardMap, ranges: tuple[Range, ...], moving: bool) -> ShardMap:
        """
        Replace the ranges of C{old} (if it is still the current map) and
        raise the version.

        @raise MoveError: if the map changed meanwhile.
        """
        with self.connection.cursor() as cursor:
            cursor.execute("BEGIN")
            try:
                cursor.execute(
                    "UPDATE shard_map SET version = version + 1, moving = %s WHERE version = %s RETURNING version",
                    (moving, old.version),
                )
                found = cursor.fetchall()
                if not found:
                    raise MoveError("the shard map changed while this command ran; run it again")
                cursor.execute("DELETE FROM shard_ranges")
                psycopg2.extras.execute_values(
                    cursor,
                    "INSERT INTO shard_ranges (lo, hi, shard, held) VALUES %s",
                    [(r.lo, r.hi, r.shard, r.held) for r in ranges],
                )
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        return ShardMap(found[0][0], old.shards, ranges, moving)

    def setMoving(self, moving: bool) -> None:
        self.query("UPDATE shard_map SET moving = %s", (moving,))

    def nodes(self) -> list[tuple[str, int, float]]:
        """
        The nodes that sent a heartbeat: name, version, seconds since.
        """
        return [
            (node, version, float(age))
            for node, version, age in self.query(
                "SELECT node, version, extract(epoch FROM clock_timestamp() - seen) FROM shard_nodes ORDER BY node"
            )
        ]

    def moves(self, limit: int = 20) -> list[Move]:
        return [
            Move(*row)
            for row in self.query(
                "SELECT id, lo, hi, source, target, phase, copied, total, started, updated, finished, detail "
                "FROM shard_moves ORDER BY id DESC LIMIT %s",
                (limit,),
            )
        ]

    def unfinished(self) -> Move | None:
        for move in self.moves(5):
            if move.phase not in ("done", "aborted"):
                return move
        return None

    def record(self, move: Move) -> None:
        move.updated = time.time()
        self.query(
            "UPDATE shard_moves SET phase = %s, copied = %s, total = %s, updated = %s, finished = %s, detail = %s "
            "WHERE id = %s",
            (move.phase, move.copied, move.total, move.updated, move.finished, move.detail, move.id),
        )

    def newMove(self, lo: int, hi: int, source: int, target: int) -> Move:
        now = time.time()
        ((moveId,),) = self.query(
            "INSERT INTO shard_moves (lo, hi, source, target, phase, started, updated) "
            "VALUES (%s, %s, %s, %s, 'prepare', %s, %s) RETURNING id",
            (lo, hi, source, target, now, now),
        )
        return Move(moveId, lo, hi, source, target, "prepare", 0, 0, now, now, None, "")

    def addShard(self, dsn: str) -> int:
        """
        Register the database C{dsn} as a new shard, owning no slots yet.
        """
        with self.connection.cursor() as cursor:
            cursor.execute("BEGIN")
            try:
                cursor.execute("SELECT shard FROM shard_list WHERE dsn = %s", (dsn,))
                found = cursor.fetchall()
                if found:
                    cursor.execute("ROLLBACK")
                    return int(found[0][0])
                cursor.execute("SELECT version FROM shard_map FOR UPDATE")
                if not cursor.fetchall():
                    raise MoveError("the directory has no shard map yet: start a node with [store] shards first")
                cursor.execute(
                    "INSERT INTO shard_list (shard, dsn, added) "
                    "SELECT COALESCE(max(shard) + 1, 0), %s, extract(epoch FROM now()) FROM shard_list RETURNING shard",
                    (dsn,),
                )
                ((shard,),) = cursor.fetchall()
                cursor.execute("UPDATE shard_map SET version = version + 1")
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        return int(shard)


def addShard(directoryDsn: str, dsn: str) -> int:
    """
    C{shards add}: create the schema in C{dsn} and register it.

    @return: the new shard's id.
    """
    shard = connect(dsn)
    try:
        migrate(shard)
    finally:
        shard.close()
    directory = Directory(directoryDsn)
    try:
        return directory.addShard(dsn)
    finally:
        directory.close()


def status(directoryDsn: str) -> dict[str, Any]:
    """
    C{shards status}, and what the admin API shows: the map, the shards
    with their slot counts, the nodes' heartbeats and the recent moves.
    """
    directory = Directory(directoryDsn)
    try:
        shardMap = directory.shardMap()
        return statusOf(shardMap, directory.nodes(), [m.asDict() for m in directory.moves()], describe)
    finally:
        directory.close()


def _triggerSql(table: Table, kept: list[tuple[int, int]]) -> str:
    """
    The function and trigger that record changes of the range's rows of
    C{table} on a move's source, and refuse them once it is fenced.

    @param kept: the slots the source keeps (its own outside the range).
        A row kept on both keys' shards whose other key is in one of them
        is the source's own copy, not the range's: a node that knows the
        new map writes it there (and the target's copy on the target), so
        the fence lets it through.  Its changes are still recorded: if the
        switch is undone, the range is the source's again.
    """
    name = f"timtx_capture_{table.name}"

    def slots(row: str) -> str:
        return ", ".join(table.keySql(column, row) for column in table.keys)

    def own(row: str) -> str:
        if len(table.keys) < 2 or not kept:
            return "false"
        tests = [
            f"{table.keySql(column, row)} BETWEEN {int(lo)} AND {int(hi)}" for column in table.keys for lo, hi in kept
        ]
        return "COALESCE(" + " OR ".join(tests) + ", false)"

    def pk(row: str) -> str:
        return (
            "json_build_array("
            + ", ".join(
                f"encode({row}.{c}, 'hex')" if (table.name, c) == ("login_tokens", "token_key") else f"{row}.{c}"
                for c in table.pk
            )
            + ")"
        )

    return f"""
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    slots integer[] := '{{}}';
    fenced boolean;
    own boolean := true;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        slots := slots || ARRAY[{slots("OLD")}];
        own := own AND {own("OLD")};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        slots := slots || ARRAY[{slots("NEW")}];
        own := own AND {own("NEW")};
    END IF;
    SELECT bool_or(c.fenced) INTO fenced FROM shard_capture c, unnest(slots) s WHERE s BETWEEN c.lo AND c.hi;
    IF fenced IS NULL THEN
        RETURN NULL;
    END IF;
    IF fenced AND NOT own THEN
        RAISE EXCEPTION 'timtx: slot moved to another shard; the node will use the new shard map'
            USING ERRCODE = 'TX001';
    END IF;
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO shard_changes (tbl, pk) VALUES ('{table.name}', {pk("OLD")});
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND {pk("OLD")}::text <> {pk("NEW")}::text) THEN
        INSERT INTO shard_changes (tbl, pk) VALUES ('{table.name}', {pk("NEW")});
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS timtx_capture ON {table.name};
CREATE TRIGGER timtx_capture AFTER INSERT OR UPDATE OR DELETE ON {table.name}
    FOR EACH ROW EXECUTE FUNCTION {name}();
"""


def _outside(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """
    The slots of C{ranges} outside C{lo}-C{hi}.
    """
    pieces = []
    for first, last in ranges:
        if first < lo:
            pieces.append((first, min(last, lo - 1)))
        if last > hi:
            pieces.append((max(first, hi + 1), last))
    return pieces


def _dropTriggerSql(table: Table) -> str:
    return (
        f"DROP TRIGGER IF EXISTS timtx_capture ON {table.name}; DROP FUNCTION IF EXISTS timtx_capture_{table.name}();"
    )


def _inRange(table: Table) -> str:
    """
    SQL true for the rows of C{table} with a key in slots C{%(lo)s} to
    C{%(hi)s}.
    """
    return "(" + " OR ".join(f"{table.keySql(c)} BETWEEN %(lo)s AND %(hi)s" for c in table.keys) + ")"


def _pkWhere(table: Table) -> str:
    cols = ", ".join(table.pk)
    return f"({cols}) IN %s"


def _pkValues(table: Table, pk: list[Any]) -> tuple[Any, ...]:
    if table.name == "login_tokens":
        return (bytes.fromhex(pk[0]),)
    return tuple(pk)


class Mover:
    """
    Runs one move (see the module docstring) against the directory
    C{directoryDsn}.

    @param progress: told where the move is; see L{Progress}.
    @param batch: rows copied per statement.
    @param lease: the nodes' C{map_lease}: how long a silent node is waited
        for.
    @param waitTimeout: longest wait for the nodes to take a new map
        before the command gives up (it can be run again).
    @param verify: compare the range on both shards before the switch
        (row counts and checksums).  It reads every row of the range twice
        while the range is held, so the hold grows with the range.
    """

    def __init__(
        self,
        directoryDsn: str,
        progress: Progress | None = None,
        *,
        batch: int = 2000,
        lease: float = 10.0,
        waitTimeout: float = 120.0,
        verify: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.directory = Directory(directoryDsn)
        self.progress = progress or (lambda phase, done, total, detail: None)
        self.batch = batch
        self.lease = lease
        self.waitTimeout = waitTimeout
        self.verify = verify
        self.sleep = sleep
        self._connections: dict[int, Any] = {}
        #: Seconds each move's range was held at its switch, by move id.
        self.held: dict[int, float] = {}

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self.directory.close()

    def _db(self, shard: int) -> Any:
        connection = self._connections.get(shard)
        if connection is None:
            shards = self.directory.shardMap().shards
            if shard not in shards:
                raise MoveError(f"there is no shard {shard} (see `python -m timtx shards status`)")
            connection = self._connections[shard] = connect(shards[shard])
            migrate(connection)
        return connection

    # Starting, resuming, abandoning.

    def plan(self, lo: int, hi: int, target: int) -> list[tuple[int, int, int]]:
        """
        The moves that give slots C{lo}-C{hi} to C{target}: one per source
        shard range.
        """
        shardMap = self.directory.shardMap()
        if target not in shardMap.shards:
            raise MoveError(f"there is no shard {target}: add it first with `python -m timtx shards add`")
        if not 0 <= lo <= hi < SLOTS:
            raise MoveError(f"slots run from 0 to {SLOTS - 1}")
        steps = []
        for r in shardMap.ranges:
            first, last = max(lo, r.lo), min(hi, r.hi)
            if first <= last and r.shard != target:
                steps.append((first, last, r.shard))
        return steps

    def move(self, lo: int, hi: int, target: int) -> list[Move]:
        """
        Give slots C{lo}-C{hi} to shard C{target}, resuming an unfinished
        move first.

        @return: the moves made.
        """
        done = []
        unfinished = self.directory.unfinished()
        if unfinished is not None:
            if (unfinished.lo, unfinished.hi, unfinished.target) != (lo, hi, target) and not (
                lo <= unfinished.lo and unfinished.hi <= hi and unfinished.target == target
            ):
                raise MoveError(
                    f"move {unfinished.id} (slots {unfinished.slots} to shard {unfinished.target}) is unfinished: "
                    "resume it with `shards move --resume` or abandon it with `shards move --abort`"
                )
            done.append(self.run(unfinished))
        for first, last, _ in self.plan(lo, hi, target):
            shardMap = self.directory.shardMap()
            source = shardMap.shardOf(first)
            done.append(self.run(self.directory.newMove(first, last, source, target)))
        return done

    def resume(self) -> Move | None:
        unfinished = self.directory.unfinished()
        return None if unfinished is None else self.run(unfinished)

    def abort(self) -> Move | None:
        """
        Abandon the unfinished move, if it has not switched yet.
        """
        move = self.directory.unfinished()
        if move is None:
            return None
        shardMap = self.directory.shardMap()
        if move.phase == "cleanup" or shardMap.shardOf(move.lo) == move.target:
            raise MoveError(f"move {move.id} has switched already: resume it to finish (`shards move --resume`)")
        source, target = self._db(move.source), self._db(move.target)
        held = [r for r in shardMap.ranges if r.held]
        if held:
            ranges = tuple(Range(r.lo, r.hi, r.shard) for r in shardMap.ranges)
            shardMap = self.directory.saveMap(shardMap, reassigned(ranges, move.lo, move.hi, move.source, False), False)
        self._stopCapture(source)
        self._deleteUnowned(target, move.target, shardMap, move)
        self.directory.setMoving(False)
        move.phase, move.finished, move.detail = "aborted", time.time(), "abandoned before the switch"
        self.directory.record(move)
        return move

    # Running.

    def run(self, move: Move) -> Move:
        steps = {
            "prepare": self._prepare,
            "copy": self._copy,
            "catchup": self._catchUp,
            "switch": self._switch,
            "cleanup": self._cleanup,
        }
        while move.phase in steps:
            step = steps[move.phase]
            step(move)
        return move

    def _advance(self, move: Move, phase: str, detail: str = "") -> None:
        move.phase = phase
        move.detail = detail
        if phase == "done":
            move.finished = time.time()
        self.directory.record(move)

    def _execute(self, connection: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def _prepare(self, move: Move) -> None:
        self.progress("prepare", 0, len(TABLES), f"slots {move.slots}: shard {move.source} -> shard {move.target}")
        source = self._db(move.source)
        self._db(move.target)
        self._execute(
            source,
            "BEGIN; DELETE FROM shard_capture; INSERT INTO shard_capture (lo, hi) VALUES (%s, %s); COMMIT",
            (move.lo, move.hi),
        )
        # One table per transaction: a trigger waits for the writes under
        # way on its table only, and cannot deadlock with a node's batch
        # that writes several tables.  The copy starts once all are in
        # place, so what changed before is copied anyway.
        kept = _outside(self.directory.shardMap().slotsOf(move.source), move.lo, move.hi)
        for done, table in enumerate(TABLES):
            self._locking(source, _triggerSql(table, kept))
            self.progress("prepare", done + 1, len(TABLES), f"changes of {table.name} are recorded")
        self.directory.setMoving(True)
        self._advance(move, "copy")

    def _locking(self, connection: Any, sql: str, attempts: int = 50) -> None:
        """
        Run C{sql}, which takes a table lock, in a transaction that waits
        for it at most a moment (nodes' writes queue behind a waiting
        lock), and again until it gets it.
        """
        for attempt in range(attempts):
            try:
                self._execute(connection, f"BEGIN; SET LOCAL lock_timeout = '500ms'; {sql} COMMIT;")
                return
            except (psycopg2.errors.LockNotAvailable, psycopg2.errors.DeadlockDetected):
                self._execute(connection, "ROLLBACK")
                self.sleep(0.05 * (attempt + 1))
        raise MoveError("could not lock the tables of the source shard; is something holding them? try again")

    def _copy(self, move: Move) -> None:
        source, target = self._db(move.source), self._db(move.target)
        window = {"lo": move.lo, "hi": move.hi}
        # Start clean: rows of the range left on the target by an attempt
        # that was abandoned or found wrong.
        self._deleteUnowned(target, move.target, self.directory.shardMap(), move)
        move.total = sum(
            self._execute(source, f"SELECT count(*) FROM {t.name} WHERE {_inRange(t)}", window)[0][0] for t in TABLES
        )
        move.copied = 0
        self.directory.record(move)
        started = time.monotonic()
        for table in TABLES:
            for rows in self._rowsInRange(source, table, window):
                self._upsert(target, table, rows)
                move.copied += len(rows)
                rate = move.copied / max(time.monotonic() - started, 1e-6)
                self.progress("copy", move.copied, move.total, f"{table.name}, {rate:,.0f} rows/s")
            self.directory.record(move)
        self.progress("copy", move.copied, move.total, f"{move.copied:,} rows copied")
        self._advance(move, "catchup")

    def _rowsInRange(self, connection: Any, table: Table, window: dict[str, int]) -> Iterator[list[tuple[Any, ...]]]:
        pk = ", ".join(table.pk)
        after: tuple[Any, ...] | None = None
        while True:
            params: dict[str, Any] = dict(window)
            where = _inRange(table)
            if after is not None:
                where += f" AND ({pk}) > %(after)s"
                params["after"] = after
            rows = self._execute(
                connection, f"SELECT * FROM {table.name} WHERE {where} ORDER BY {pk} LIMIT {int(self.batch)}", params
            )
            if not rows:
                return
            yield rows
            columns = self._columns(connection, table)
            after = tuple(rows[-1][columns.index(c)] for c in table.pk)

    _columnCache: dict[str, list[str]] = {}

    def _columns(self, connection: Any, table: Table) -> list[str]:
        columns = self._columnCache.get(table.name)
        if columns is None:
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT * FROM {table.name} LIMIT 0")
                columns = self._columnCache[table.name] = [d[0] for d in cursor.description]
        return columns

    def _upsert(self, connection: Any, table: Table, rows: list[tuple[Any, ...]]) -> None:
        columns = self._columns(connection, table)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in table.pk)
        conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        with connection.cursor() as cursor:
            psycopg2.extras.execute_values(
                cursor,
                f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES %s ON CONFLICT ({', '.join(table.pk)}) {conflict}",
                rows,
                page_size=len(rows),
            )

    def _catchUp(self, move: Move) -> None:
        left = self._syncChanges(move, until=max(self.batch // 4, 10))
        self.progress("catchup", 1, 1, f"{left} changes left for the switch")
        self._advance(move, "switch")

    def _syncChanges(self, move: Move, until: int) -> int:
        """
        Copy the rows recorded as changed again, until at most C{until}
        changes are left.

        @return: how many are left.
        """
        source, target = self._db(move.source), self._db(move.target)
        byName = {t.name: t for t in TABLES}
        synced = 0
        while True:
            changes = self._execute(source, "SELECT id, tbl, pk FROM shard_changes ORDER BY id LIMIT %s", (self.batch,))
            left = self._execute(source, "SELECT count(*) FROM shard_changes")[0][0]
            if not changes or left <= until:
                return int(left)
            byTable: dict[str, set[str]] = {}
            for _, name, pk in changes:
                byTable.setdefault(name, set()).add(json.dumps(pk))
            for name, keys in byTable.items():
                table = byName[name]
                values = [_pkValues(table, json.loads(k)) for k in keys]
                rows = self._execute(source, f"SELECT * FROM {name} WHERE {_pkWhere(table)}", (tuple(values),))
                with target.cursor() as cursor:
                    cursor.execute("BEGIN")
                    cursor.execute(f"DELETE FROM {name} WHERE {_pkWhere(table)}", (tuple(values),))
                    if rows:
                        self._upsert(target, table, rows)
                    cursor.execute("COMMIT")
            self._execute(source, "DELETE FROM shard_changes WHERE id = ANY(%s)", ([c[0] for c in changes],))
            synced += len(changes)
            self.progress("catchup", synced, synced + int(left) - len(changes), f"{synced:,} changed rows copied again")

    def _waitForNodes(self, move: Move, version: int, why: str) -> None:
        """
        Wait until every live node reports C{version} or later (its calls
        under older maps are done); a node silent for longer than the lease
        refuses calls by itself and is not waited for.
        """
        deadline = time.monotonic() + self.waitTimeout
        while True:
            nodes = self.directory.nodes()
            behind = [n for n, v, age in nodes if v < version and age < self.lease + 1.0]
            alive = [n for n, _, age in nodes if age < self.lease + 1.0]
            self.progress("switch", len(alive) - len(behind), len(alive), f"nodes on map {version} ({why})")
            if not behind:
                return
            if time.monotonic() > deadline:
                raise MoveError(
                    f"{len(behind)} nodes did not take shard map {version} within {self.waitTimeout:g}s "
                    f"({', '.join(behind[:5])}); run the command again to go on"
                )
            self.sleep(0.02)

    def _switch(self, move: Move) -> None:
        source, target = self._db(move.source), self._db(move.target)
        shardMap = self.directory.shardMap()
        if shardMap.shardOf(move.lo) == move.target:
            self._advance(move, "cleanup")
            return
        if not all(shardMap.isHeld(s) for s in (move.lo, move.hi)):
            shardMap = self.directory.saveMap(
                shardMap, reassigned(shardMap.ranges, move.lo, move.hi, move.source, True), True
            )
        heldAt = time.monotonic()
        self._waitForNodes(move, shardMap.version, "the range is held")
        nodesAt = time.monotonic()
        self._execute(source, "UPDATE shard_capture SET fenced = true")
        self._syncChanges(move, until=0)
        syncedAt = time.monotonic()
        if self.verify:
            shardMap = self._verify(move, source, target, shardMap)
        checkedAt = time.monotonic()
        self._execute(
            target,
            "SELECT setval('inbox_qid_seq', GREATEST((SELECT last_value FROM inbox_qid_seq), "
            "(SELECT COALESCE(max(qid), 1) FROM inbox)))",
        )
        self.directory.saveMap(shardMap, reassigned(shardMap.ranges, move.lo, move.hi, move.target, False), True)
        self.held[move.id] = time.monotonic() - heldAt
        self.progress(
            "switch",
            1,
            1,
            f"slots {move.slots} are on shard {move.target}, held {self.held[move.id]:.2f}s "
            f"(nodes {nodesAt - heldAt:.2f}s, last changes {syncedAt - nodesAt:.2f}s, "
            f"check {checkedAt - syncedAt:.2f}s)",
        )
        self._advance(move, "cleanup")

    def checksums(self, connection: Any, lo: int, hi: int) -> dict[str, tuple[int, int]]:
        """
        Per table, the count and a checksum (order-free) of the rows with a
        key in slots C{lo}-C{hi}.
        """
        found = {}
        for table in TABLES:
            ((count, total),) = self._execute(
                connection,
                f"SELECT count(*), COALESCE(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)::bigint), 0) "
                f"FROM {table.name} t WHERE {_inRange(table)}",
                {"lo": lo, "hi": hi},
            )
            found[table.name] = (int(count), int(total))
        return found

    def _verify(self, move: Move, source: Any, target: Any, shardMap: ShardMap) -> ShardMap:
        """
        Compare the range on both shards; if they differ, give the range
        back to the source (unheld, unfenced) and start the copy again on
        the next run.
        """
        before, after = self.checksums(source, move.lo, move.hi), self.checksums(target, move.lo, move.hi)
        differ = [name for name in before if before[name] != after[name]]
        if differ:
            self._execute(source, "UPDATE shard_capture SET fenced = false")
            shardMap = self.directory.saveMap(
                shardMap, reassigned(shardMap.ranges, move.lo, move.hi, move.source, False), True
            )
            self._advance(move, "copy", f"{', '.join(differ)} differed after the copy; copying again")
            raise MoveError(
                f"slots {move.slots} differ between shard {move.source} and shard {move.target} in "
                f"{', '.join(differ)}; nothing was switched and the slots stay on shard {move.source} "
                "(run the command again to copy them again, or abandon the move with --abort)"
            )
        rows = sum(count for count, _ in after.values())
        move.detail = f"{rows:,} rows checked"
        self.progress("switch", 1, 1, f"{rows:,} rows equal on both shards")
        return shardMap

    def _cleanup(self, move: Move) -> None:
        shardMap = self.directory.shardMap()
        self._waitForNodes(move, shardMap.version, "before deleting from the source")
        source = self._db(move.source)
        self._stopCapture(source)
        deleted = self._deleteUnowned(source, move.source, shardMap, move)
        self.directory.setMoving(False)
        self.progress("cleanup", 1, 1, f"{deleted:,} rows deleted from shard {move.source}")
        held = f", held {self.held[move.id]:.2f}s" if move.id in self.held else ""
        self._advance(move, "done", f"{move.copied:,} rows copied{held}, {deleted:,} deleted from the source")

    def _stopCapture(self, source: Any) -> None:
        for table in TABLES:
            self._locking(source, _dropTriggerSql(table))
        self._execute(source, "DELETE FROM shard_capture; DELETE FROM shard_changes;")

    def _deleteUnowned(self, connection: Any, shard: int, shardMap: ShardMap, move: Move) -> int:
        """
        Delete from C{shard} the rows of the move's range that no key of
        theirs places there any more.
        """
        owned = shardMap.slotsOf(shard)
        los, his = [r[0] for r in owned], [r[1] for r in owned]
        deleted = 0
        for table in TABLES:
            mine = " OR ".join(
                f"EXISTS (SELECT 1 FROM unnest(%(los)s::integer[], %(his)s::integer[]) r(lo, hi) "
                f"WHERE {table.keySql(c)} BETWEEN r.lo AND r.hi)"
                for c in table.keys
            )
            with connection.cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM {table.name} WHERE {_inRange(table)} AND NOT ({mine})",
                    {"lo": move.lo, "hi": move.hi, "los": los, "his": his},
                )
                deleted += cursor.rowcount
        return deleted
