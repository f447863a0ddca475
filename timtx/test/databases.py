"""
Database servers for tests: a fresh database per test on the machine's
PostgreSQL and MariaDB, and a private PostgreSQL server that a test may kill.

The servers are found through C{TIMTX_TEST_POSTGRESQL} (a libpq DSN of a
database to connect to for C{CREATE DATABASE}) and C{TIMTX_TEST_MARIADB} (a
C{mariadb://} URL), defaulting to this machine's 127.0.0.1:5432 (user
postgres) and 127.0.0.1:3306 (root).  Tests that cannot reach them call
L{timtx.testing.requireOrSkip}: they skip on a laptop and fail under CI.
"""

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

from twisted.internet.threads import deferToThread

from timtx.testing import requireOrSkip

POSTGRESQL_ADMIN = os.environ.get("TIMTX_TEST_POSTGRESQL", "host=127.0.0.1 port=5432 user=postgres dbname=test")
MARIADB_ADMIN = os.environ.get("TIMTX_TEST_MARIADB", "mariadb://root@127.0.0.1:3306/test")
PG_BIN = os.environ.get("TIMTX_TEST_PG_BIN", "/usr/lib/postgresql/15/bin")

_counter = itertools.count(1)


def uniqueName():
    """
    A database name no other test, process or run uses.
    """
    return f"timtx_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:8]}"


# PostgreSQL.


def _pgAdmin(statement, dsn=POSTGRESQL_ADMIN):
    import psycopg2

    connection = psycopg2.connect(dsn, connect_timeout=3)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def _dsnWith(dsn, **changes):
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    params.update(changes)
    return " ".join(f"{key}={value}" for key, value in params.items())


def postgresqlDatabase(testCase, dsn=POSTGRESQL_ADMIN):
    """
    Create an empty database for C{testCase}, dropped when it ends.

    @return: a L{Deferred} firing with the new database's DSN.
    """
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        requireOrSkip("psycopg2 is not installed")
    name = uniqueName()

    def create():
        try:
            _pgAdmin(f"CREATE DATABASE {name}", dsn)
        except Exception as e:
            return e
        return None

    def created(error):
        if error is not None:
            requireOrSkip(f"PostgreSQL is not reachable with {dsn!r}: {str(error).strip().splitlines()[0]}")
        testCase.addCleanup(deferToThread, _pgAdmin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", dsn)
        return _dsnWith(dsn, dbname=name)

    return deferToThread(create).addCallback(created)


def pgExecute(dsn, statement):
    """
    Run one statement on C{dsn} in a thread.
    """
    return deferToThread(_pgAdmin, statement, dsn)


# MariaDB.


def _mariadbAdmin(statement, url=MARIADB_ADMIN):
    import pymysql

    from timtx.persistence.mariadb import parseDSN

    connection = pymysql.connect(**parseDSN(url), connect_timeout=3, autocommit=True)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def mariadbDatabase(testCase, url=MARIADB_ADMIN):
    """
    Create an empty database for C{testCase}, dropped when it ends.

    @return: a L{Deferred} firing with the new database's C{mariadb://} URL.
    """
    try:
        import pymysql  # noqa: F401
    except ImportError:
        requireOrSkip("PyMySQL is not installed")
    name = uniqueName()

    def create():
        try:
            _mariadbAdmin(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin", url)
        except Exception as e:
            return e
        return None

    def created(error):
        if error is not None:
            requireOrSkip(f"MariaDB is not reachable at {url!r}: {error}")
        testCase.addCleanup(deferToThread, _mariadbAdmin, f"DROP DATABASE IF EXISTS {name}", url)
        base = url.rsplit("/", 1)[0]
        return f"{base}/{name}"

    return deferToThread(create).addCallback(created)


def mariadbExecute(url, statement):
    """
    Run one statement on C{url} in a thread.
    """
    return deferToThread(_mariadbAdmin, statement, url)


# A private PostgreSQL server.


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """
    A PostgreSQL server of its own, in a temporary directory, on a free
    port, that a test may stop, kill and start again.  Needs Debian's
    C{initdb}/C{pg_ctl}; run as root, it runs them as the C{postgres} user.
    """

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="timtx-pg-")
        self.data = os.path.join(self.directory, "data")
        self.port = freePort()
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *argv, check=True):
        command = [os.path.join(PG_BIN, argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, timeout=60)

    def init(self):
        if not os.path.exists(os.path.join(PG_BIN, "initdb")):
            requireOrSkip(f"no initdb in {PG_BIN} (Debian's postgresql package)")
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            f.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.directory}'\n"
                "fsync = on\nmax_connections = 20\nshared_buffers = 16MB\n"
            )

    def start(self):
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.directory, "log"), "-w", "-t", "60", "start")

    def stop(self):
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)

    def signal(self, number):
        """
        Send signal C{number} to the server and every process of it.
        """
        for pid in self.pids():
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass

    def pids(self):
        """
        The postmaster's pid and its children's.
        """
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                postmaster = int(f.readline())
        except (OSError, ValueError):
            return []
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == postmaster:
                    children.append(int(entry))
        return [postmaster, *children]

    def kill(self):
        """
        SIGKILL the server and every process of it, as a crash would.
        """
        pids = self.pids()
        self.signal(signal.SIGKILL)
        for _ in range(200):
            if not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.05)
        # Left behind by a crash; the server would take a dead postmaster
        # that init has not reaped (a zombie) for a live one.
        for path in (
            os.path.join(self.data, "postmaster.pid"),
            os.path.join(self.directory, f".s.PGSQL.{self.port}.lock"),
            os.path.join(self.directory, f".s.PGSQL.{self.port}"),
        ):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def destroy(self):
        if any(_alive(pid) for pid in self.pids()):
            self.stop()
            self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _alive(pid):
    """
    Whether C{pid} runs (a zombie left to an init that does not reap is
    dead).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assertReactorWatchesOnlyLive(testCase):
    """
    Fail C{testCase} if the reactor watches a descriptor with nothing
    behind it: a socket closed while still registered (a driver closing
    its socket under the reactor) leaves the descriptor's number in the
    reactor's sets, and once the number is reused the reactor no longer
    polls what now holds it, so every later test that opens a socket may
    hang or fail.  Checked where servers are killed, so that such a fault
    is blamed on the test that made it (seen once, at the end of
    C{test_store_faults.ServerCrashTests}).
    """
    from twisted.internet import reactor

    selectables = getattr(reactor, "_selectables", None)
    if selectables is None:
        return
    watched = set(getattr(reactor, "_reads", ())) | set(getattr(reactor, "_writes", ()))
    stale = sorted(fd for fd in watched if fd not in selectables)
    if stale:
        testCase.fail(f"the reactor watches descriptors {stale} with no selectable behind them")


def privateServer(testCase):
    """
    Start a L{PrivateServer} for C{testCase} (in a thread), destroyed when
    it ends.

    @return: a L{Deferred} firing with it, started.
    """
    if os.geteuid() != 0 and not os.access(PG_BIN, os.X_OK):
        requireOrSkip("cannot run initdb")
    server = PrivateServer()
    # Registered first, so it runs last: after the test's stores closed.
    testCase.addCleanup(assertReactorWatchesOnlyLive, testCase)
    testCase.addCleanup(deferToThread, server.destroy)

    def setUp():
        server.init()
        server.start()
        return server

    return deferToThread(setUp)
