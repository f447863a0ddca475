# -*- test-case-name: timtx.test.test_pgmove -*-
"""
Tests for L{timtx.persistence.pgmove} and C{python -m timtx shards}: adding
a shard and moving slot ranges while a sharded store serves calls, resuming
a mover that died, abandoning a move, and the placement of every row
afterwards.
"""

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import timtx
from timtx.commands import ProgressBar
from timtx.persistence.placement import SLOTS, TABLES, convKey, slotOf
from timtx.persistence.records import (
    ROLE_FOUNDER,
    ROLE_MEMBER,
    STANCE_FRIEND,
    Account,
    Group,
    Member,
    NewMessage,
    TokenGrant,
)
from timtx.persistence.sharded import ShardedStore
from timtx.test.databases import postgresqlDatabase


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def runTimtx(*args):
    """
    C{python -m timtx ARGS} with the timtx under test.

    @return: a L{Deferred} firing with its output, errors and status.
    """
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(timtx.__file__))))
    out, err, code = yield getProcessOutputAndValue(sys.executable, ["-m", "timtx", *args], env=env)
    return out.decode(), err.decode(), code


def rowsOf(dsn):
    """
    Every placed row of the database C{dsn}, by table: primary key to the
    whole row and its placement keys.
    """
    import psycopg2

    connection = psycopg2.connect(dsn)
    try:
        found = {}
        with connection.cursor() as cursor:
            for table in TABLES:
                cursor.execute(f"SELECT * FROM {table.name} t")
                columns = [d[0] for d in cursor.description]
                rows = {}
                for row in cursor.fetchall():
                    row = tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                    named = dict(zip(columns, row, strict=True))
                    pk = tuple(named[c] for c in table.pk)
                    keys = [convKey(named[c]) if c in table.conv else named[c] for c in table.keys]
                    rows[pk] = (row, keys)
                found[table.name] = rows
        return found
    finally:
        connection.close()


def placementErrors(shardMap, dsns):
    """
    Rows that are not exactly where C{shardMap} puts them: on each shard
    that one of their keys is placed on, and nowhere else; and rows whose
    copies differ.

    @param dsns: shard id to DSN.
    @return: C{(errors, logical)}: a list of complaints, and the rows by
        table as one logical store (each row once).
    """
    byShard = {shard: rowsOf(dsn) for shard, dsn in dsns.items()}
    errors = []
    logical = {}
    for table in TABLES:
        seen = {}
        for shard, tables in byShard.items():
            for pk, (row, keys) in tables[table.name].items():
                owners = {shardMap.shardOf(slotOf(k)) for k in keys}
                if shard not in owners:
                    errors.append(f"{table.name} {pk!r} on shard {shard}, placed on {sorted(owners)}")
                seen.setdefault(pk, {})[shard] = row
        for pk, copies in seen.items():
            keys = None
            for shard in copies:
                keys = byShard[shard][table.name][pk][1]
            owners = {shardMap.shardOf(slotOf(k)) for k in keys}
            missing = owners - set(copies)
            if missing:
                errors.append(f"{table.name} {pk!r} missing on shards {sorted(missing)}")
            if len(set(copies.values())) > 1:
                errors.append(f"{table.name} {pk!r} differs between shards {sorted(copies)}")
            logical.setdefault(table.name, {})[pk] = next(iter(copies.values()))
    return errors, logical


@inlineCallbacks
def shardedDatabases(testCase, count):
    dsns = []
    for _ in range(count):
        dsns.append((yield postgresqlDatabase(testCase)))
    return dsns


def openSharded(testCase, dsns, **kwargs):
    from timtx.persistence.postgresql import PostgreSQLStore

    kwargs.setdefault("mapPoll", 0.2)
    kwargs.setdefault("mapLease", 5.0)
    kwargs.setdefault("repairInterval", 1.0)
    store = ShardedStore(
        lambda dsn: PostgreSQLStore(reactor, dsn, poolSize=2), dsns, reactor, backend="postgresql", **kwargs
    )
    d = store.open()
    d.addCallback(lambda _: testCase.addCleanup(store.close))
    d.addCallback(lambda _: store)
    return d


@inlineCallbacks
def fill(store, prefix, count=30):
    """
    A bit of everything, spread over the slots.
    """
    users = [f"{prefix}u{i}" for i in range(count)]
    for uid in users:
        yield store.createAccount(Account(uid, "dom", "hash", 1.0))
        yield store.putProfile(uid, b"profile-" + uid.encode())
    for i, uid in enumerate(users):
        other = users[(i + 1) % count]
        yield store.setStance(uid, other, STANCE_FRIEND)
        conv = f"p:{min(uid, other)}:{max(uid, other)}"
        yield store.appendMessages(
            [NewMessage(conv, 1, 100 + i, uid, b"m-" + uid.encode(), 2.0, inbox=((other, None),), dedupe=(uid, i))]
        )
        yield store.addToken(f"{prefix}t{i}".encode(), TokenGrant(uid, "dom"), 1e12)
    for g in range(count // 3):
        gid = f"{prefix}g{g}"
        yield store.createGroup(Group(gid, "dom", users[g], 2, 1, 3.0), Member(users[g], ROLE_FOUNDER, 3.0))
        for uid in users[g + 1 : g + 4]:
            yield store.putMember(gid, Member(uid, ROLE_MEMBER, 4.0))
        yield store.appendMessages([NewMessage(f"g:{gid}", 1, 500 + g, users[g], b"gm", 5.0)])
        yield store.saveCursors([(users[g + 1], gid, 1)])
        yield store.setGroupBlock(gid, users[g + 4], 2, True)
    return users


class PlacementHelpersTests(SynchronousTestCase):
    def test_progressBar(self):
        """
        On a terminal the bar is redrawn in place; elsewhere a line is
        written per phase and per tenth.
        """
        from io import StringIO

        out = StringIO()
        bar = ProgressBar(out, tty=False)
        for done in range(0, 101, 5):
            bar("copy", done, 100, "accounts")
        bar("switch", 1, 1, "done")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 12)
        self.assertEqual(lines[-1], "switch: 100% (1/1) done")
        out = StringIO()
        bar = ProgressBar(out, tty=True)
        bar("copy", 100, 100, "x")
        bar.end()
        self.assertIn("\r", out.getvalue())
        self.assertIn("[" + "#" * 30 + "]", out.getvalue())


class MoveTests(TestCase):
    """
    Moves between PostgreSQL databases of this machine's server.
    """

    timeout = 120

    @inlineCallbacks
    def setUpShards(self, count=2):
        self.dsns = yield shardedDatabases(self, count + 1)
        self.store = yield openSharded(self, self.dsns[:count])
        return self.store

    def mover(self, **kwargs):
        from timtx.persistence.pgmove import Mover

        kwargs.setdefault("lease", 5.0)
        mover = Mover(self.dsns[0], **kwargs)
        self.addCleanup(mover.close)
        return mover

    def shardDsns(self):
        from timtx.persistence.pgmove import Directory

        directory = Directory(self.dsns[0])
        try:
            shardMap = directory.shardMap()
        finally:
            directory.close()
        return shardMap, shardMap.shards

    @inlineCallbacks
    def test_addAndMoveHalf(self):
        """
        A third database is added and half the slots moved to it while the
        store serves: afterwards every row is exactly where the map puts it,
        the store as a whole holds the same rows, and reads see them.
        """
        from timtx.persistence.pgmove import addShard

        store = yield self.setUpShards()
        users = yield fill(store, "a")
        shardMap, dsns = yield deferToThread(self.shardDsns)
        errors, before = yield deferToThread(placementErrors, shardMap, dsns)
        self.assertEqual(errors, [])
        shard = yield deferToThread(addShard, self.dsns[0], self.dsns[2])
        self.assertEqual(shard, 2)
        phases = []
        mover = self.mover(progress=lambda phase, done, total, detail: phases.append(phase))
        (move,) = yield deferToThread(mover.move, 0, SLOTS // 2 - 1, 2)
        self.assertEqual(move.phase, "done")
        self.assertEqual(
            [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p][:5],
            ["prepare", "copy", "catchup", "switch", "cleanup"],
        )
        shardMap, dsns = yield deferToThread(self.shardDsns)
        self.assertEqual(shardMap.slotsOf(2), [(0, SLOTS // 2 - 1)])
        errors, after = yield deferToThread(placementErrors, shardMap, dsns)
        self.assertEqual(errors, [])
        self.assertEqual(after, before)
        yield sleep(0.5)
        self.assertEqual(store.map.version, shardMap.version)
        for uid in users:
            self.assertEqual((yield store.getAccount(uid)).uid, uid)
            self.assertEqual(len((yield store.readInbox(uid, 0, 10))), 1)
        self.assertEqual((yield store.countFounded(users[0])), 1)
        self.assertEqual(sorted((yield store.groupsOf(users[2]))), ["ag0", "ag1", "ag2"])

    @inlineCallbacks
    def test_moveUnderCalls(self):
        """
        Calls keep coming while the range moves: each gets its answer, in
        order, and what they wrote is where it belongs afterwards.
        """
        from timtx.persistence.pgmove import addShard

        store = yield self.setUpShards()
        yield deferToThread(addShard, self.dsns[0], self.dsns[2])
        mover = self.mover(batch=50)
        moving = deferToThread(mover.move, 0, SLOTS // 2 - 1, 2)
        written = []
        i = 0
        while not moving.called:
            i += 1
            uid, other = f"w{i}", f"x{i}"
            yield gatherResults(
                [
                    store.createAccount(Account(uid, "", "h", 0.0)),
                    store.appendMessages(
                        [NewMessage(f"p:{uid}:{other}", 1, i, uid, b"b", 0.0, inbox=((other, None),), dedupe=(uid, i))]
                    ),
                    store.setStance(uid, other, 1),
                ]
            )
            written.append((uid, other))
        yield moving
        self.assertGreater(len(written), 5)
        shardMap, dsns = yield deferToThread(self.shardDsns)
        errors, logical = yield deferToThread(placementErrors, shardMap, dsns)
        self.assertEqual(errors, [])
        self.assertEqual(len(logical["accounts"]), len(written))
        self.assertEqual(len(logical["inbox"]), len(written))
        for uid, other in written:
            self.assertIsNotNone((yield store.getAccount(uid)))
            self.assertEqual(len((yield store.readInbox(other, 0, 10))), 1)

    @inlineCallbacks
    def test_resumeAfterCrash(self):
        """
        A mover that dies (here: in the copy, then while switching, with
        the range held) is resumed by running it again, and the move ends
        as if nothing happened.
        """
        from timtx.persistence.pgmove import addShard

        store = yield self.setUpShards()
        yield fill(store, "r")
        shardMap, dsns = yield deferToThread(self.shardDsns)
        _, before = yield deferToThread(placementErrors, shardMap, dsns)
        yield deferToThread(addShard, self.dsns[0], self.dsns[2])

        class Died(Exception):
            pass

        def dieAt(phase, detail=None):
            def progress(p, done, total, d):
                if p == phase and (detail is None or detail in d):
                    raise Died(p)

            return progress

        yield self.assertFailure(deferToThread(self.mover(progress=dieAt("copy"), batch=5).move, 0, 2047, 2), Died)
        yield self.assertFailure(deferToThread(self.mover(progress=dieAt("switch", "rows equal")).resume), Died)
        shardMap, _ = yield deferToThread(self.shardDsns)
        self.assertTrue(shardMap.isHeld(0))
        move = yield deferToThread(self.mover().resume)
        self.assertEqual(move.phase, "done")
        shardMap, dsns = yield deferToThread(self.shardDsns)
        errors, after = yield deferToThread(placementErrors, shardMap, dsns)
        self.assertEqual((errors, after), ([], before))
        self.assertFalse(shardMap.anyHeld)

    @inlineCallbacks
    def test_abort(self):
        """
        A move abandoned before its switch leaves the map and the rows as
        they were, and nothing on the target.
        """
        from timtx.persistence.pgmove import addShard

        store = yield self.setUpShards()
        yield fill(store, "b")
        shardMap, dsns = yield deferToThread(self.shardDsns)
        _, before = yield deferToThread(placementErrors, shardMap, dsns)
        yield deferToThread(addShard, self.dsns[0], self.dsns[2])

        def stop(phase, done, total, detail):
            if phase == "catchup":
                raise KeyboardInterrupt()

        yield self.assertFailure(deferToThread(self.mover(progress=stop).move, 100, 3000, 2), KeyboardInterrupt)
        aborted = yield deferToThread(self.mover().abort)
        self.assertEqual(aborted.phase, "aborted")
        after, dsns = yield deferToThread(self.shardDsns)
        self.assertEqual(after.ranges, shardMap.ranges)
        errors, rows = yield deferToThread(placementErrors, after, dsns)
        self.assertEqual((errors, rows), ([], before))
        yield store.createAccount(Account("after", "", "h", 0.0))

    @inlineCallbacks
    def test_differenceFound(self):
        """
        A range found different on the two shards at the switch (here: a
        row slipped onto the target behind the mover's back) is not
        switched: the map gives it back to the source, calls go on, and
        the next run copies it again and finishes.
        """
        import psycopg2

        from timtx.persistence.pgmove import MoveError, addShard

        store = yield self.setUpShards()
        yield fill(store, "d")
        yield deferToThread(addShard, self.dsns[0], self.dsns[2])
        uid = next(f"stray{i}" for i in range(10000) if slotOf(f"stray{i}") < 2048)

        def tamper(phase, done, total, detail):
            if phase == "catchup":
                connection = psycopg2.connect(self.dsns[2])
                connection.autocommit = True
                connection.cursor().execute("INSERT INTO accounts VALUES (%s, '', 'h', 0)", (uid,))
                connection.close()

        failure = yield self.assertFailure(deferToThread(self.mover(progress=tamper).move, 0, 2047, 2), MoveError)
        self.assertIn("accounts", str(failure))
        shardMap, _ = yield deferToThread(self.shardDsns)
        self.assertEqual((shardMap.shardOf(0), shardMap.anyHeld), (0, False))
        yield store.createAccount(Account("during", "", "h", 0.0))
        move = yield deferToThread(self.mover().resume)
        self.assertEqual(move.phase, "done")
        shardMap, dsns = yield deferToThread(self.shardDsns)
        errors, logical = yield deferToThread(placementErrors, shardMap, dsns)
        self.assertEqual(errors, [])
        self.assertNotIn((uid,), logical["accounts"])


class CommandTests(TestCase):
    """
    C{python -m timtx shards} as an operator runs it.
    """

    timeout = 120

    def command(self, *args):
        return runTimtx("shards", *args)

    @inlineCallbacks
    def test_statusAddMove(self):
        """
        status, add, move and status again, with the directory from a node
        config; errors are one line and a non-zero status.
        """
        dsns = yield shardedDatabases(self, 3)
        store = yield openSharded(self, dsns[:2])
        yield fill(store, "c", 12)
        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write(f"[store]\nbackend = postgresql\nshards = {dsns[0]}, {dsns[1]}\nmap_lease = 5\n")
        out, err, code = yield self.command("status", "--config", ini)
        self.assertEqual(code, 0, err)
        self.assertIn("shard map version 1", out)
        self.assertIn("nodes: 1", out)
        out, err, code = yield self.command("add", dsns[2], "--config", ini)
        self.assertEqual(code, 0, err)
        self.assertIn("shard 2 added", out)
        out, err, code = yield self.command("move", "--config", ini, "--slots", "0-4095", "--to", "9")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.strip().count("\n"), 0, err)
        self.assertIn("there is no shard 9", err)
        out, err, code = yield self.command("move", "--config", ini, "--slots", "1000-2999", "--to", "2")
        self.assertEqual(code, 0, err)
        self.assertIn("shard 0 -> 2", out)
        self.assertIn("shard 1 -> 2", out)
        out, err, code = yield self.command("status", "--directory", dsns[0], "--json")
        found = json.loads(out)
        self.assertEqual([s["ranges"] for s in found["shards"]], [["0-999"], ["3000-4095"], ["1000-2999"]])
        self.assertEqual([m["phase"] for m in found["moves"]], ["done", "done"])
        yield sleep(0.5)
        self.assertEqual(store.map.version, found["version"])
        mine = yield store.shardStatus()
        self.assertEqual(mine["shards"], found["shards"])
        self.assertEqual(
            [(m["slots"], m["phase"]) for m in mine["moves"]], [("2048-2999", "done"), ("1000-2047", "done")]
        )
        self.assertEqual([n["node"] for n in mine["nodes"]], [store.nodeName])
        self.assertNotIn("password", json.dumps(mine))


def keyIn(prefix, lo, hi):
    """
    A key whose slot is between C{lo} and C{hi}.
    """
    for i in range(100000):
        key = f"{prefix}{i}"
        if lo <= slotOf(key) <= hi:
            return key
    raise AssertionError("no key found")


class FenceTests(TestCase):
    """
    The source's fence between a move's switch and its cleanup.
    """

    timeout = 120

    @inlineCallbacks
    def test_sourceKeepsItsOwnCopies(self):
        """
        Once a move has switched (the map gives the range to the target),
        until its cleanup drops the triggers, the source still takes writes
        of the copies it keeps of rows kept on both keys' shards whose other
        key stays there: the sender's copy of a duplicate key, a stance
        by its owner, a membership by its user.  Such writes succeed at
        once (none is left to the repair), and every row ends where the
        map puts it.  Rows that leave with the range are still refused.
        """
        import psycopg2

        from timtx.persistence.pgmove import Mover, addShard

        dsns = yield shardedDatabases(self, 3)
        store = yield openSharded(self, dsns[:2])
        yield deferToThread(addShard, dsns[0], dsns[2])
        # Shard 0 holds 0-2047 and moves 0-1023 to shard 2; it keeps
        # 1024-2047.  Shard 1 holds 2048-4095.
        moving, kept, elsewhere = (0, 1023), (1024, 2047), (2048, SLOTS - 1)
        sender, other = keyIn("s", *kept), keyIn("o", *moving)
        conv = keyIn(f"p:{sender}:", *moving)
        gid = keyIn("g", *moving)
        stranger = keyIn("x", *elsewhere)
        yield store.createAccount(Account(sender, "", "h", 0.0))

        class Switched(Exception):
            pass

        def stopAfterSwitch(phase, done, total, detail):
            if phase == "switch" and "are on shard" in detail:
                raise Switched()

        mover = Mover(dsns[0], progress=stopAfterSwitch, lease=5.0)
        self.addCleanup(mover.close)
        yield self.assertFailure(deferToThread(mover.move, *moving, 2), Switched)
        for _ in range(500):
            if store.map.shardOf(0) == 2:
                break
            yield sleep(0.02)
        self.assertEqual(store.map.shardOf(kept[0]), 0)

        yield store.appendMessages(
            [NewMessage(conv, 1, 11, sender, b"m", 1.0, inbox=((other, None),), dedupe=(sender, 7))]
        )
        yield store.setStance(sender, other, STANCE_FRIEND)
        yield store.createGroup(Group(gid, "dom", other, 2, 1, 3.0), Member(other, ROLE_FOUNDER, 3.0))
        yield store.putMember(gid, Member(sender, ROLE_MEMBER, 4.0))
        self.assertEqual(store.incidents, 0)
        self.assertEqual(sorted((yield store.recentDuplicates(sender, 0.0))), [7])

        def refused(sql, params):
            connection = psycopg2.connect(dsns[0])
            connection.autocommit = True
            try:
                connection.cursor().execute(sql, params)
            except psycopg2.Error as e:
                return e.pgcode
            finally:
                connection.close()
            return None

        # The fence still refuses what leaves with the range: a row of one
        # key there, and a copy whose other key is not the source's either.
        code = yield deferToThread(refused, "INSERT INTO accounts VALUES (%s, '', 'h', 0)", (other,))
        self.assertEqual(code, "TX001")
        code = yield deferToThread(refused, "INSERT INTO duplicates VALUES (%s, 1, %s, 1, 1, 0)", (stranger, conv))
        self.assertEqual(code, "TX001")

        again = Mover(dsns[0], lease=5.0)
        self.addCleanup(again.close)
        move = yield deferToThread(again.resume)
        self.assertEqual(move.phase, "done")
        shardMap, shards = yield deferToThread(self.shardDsns, dsns[0])
        errors, logical = yield deferToThread(placementErrors, shardMap, shards)
        self.assertEqual(errors, [])
        self.assertIn((sender, 7), logical["duplicates"])
        self.assertIn((sender, other), logical["stances"])
        self.assertIn((gid, sender), logical["group_members"])
        self.assertEqual((store.repaired, store.incidents), (0, 0))

    def shardDsns(self, directoryDsn):
        from timtx.persistence.pgmove import Directory

        directory = Directory(directoryDsn)
        try:
            shardMap = directory.shardMap()
        finally:
            directory.close()
        return shardMap, shardMap.shards
