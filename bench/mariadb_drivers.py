"""
The MariaDB drivers side by side: what one store-like operation costs in
wall time and in CPU of the node's process.

    python -m bench.mariadb_drivers [--dsn mariadb://root@127.0.0.1:3306/test] [--count 5000]

Each operation is what a busy node's batch does per conversation: a
two-row inbox insert with C{RETURNING}, then a read of ten 200-byte
entries; a commit every 50 operations.  It runs on a thread of its own, as
in the store.  User CPU is what competes with the reactor thread for the
GIL; system CPU is spent in the kernel with the GIL released.  Results are
in docs/storage.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

from bench.serverdb import ADMIN, ServerDatabase
from timtx.persistence.mariadb import Driver, parseDSN


def measure(driver: Driver, dsn: str, count: int) -> tuple[float, float, float]:
    connection = driver.connect(parseDSN(dsn), 5, 30)
    cursor = connection.cursor()
    cursor.execute(
        "CREATE TABLE drivers (qid BIGINT AUTO_INCREMENT PRIMARY KEY, uid VARCHAR(255), stanza LONGBLOB, "
        "created DOUBLE, KEY (uid, qid)) ENGINE=InnoDB"
    )
    body = os.urandom(200)
    times: list[float] = []

    def run() -> None:
        started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_THREAD)
        cursor.execute("BEGIN")
        for i in range(count):
            cursor.execute(
                "INSERT INTO drivers (uid, stanza, created) VALUES (%s, %s, %s), (%s, %s, %s) RETURNING qid",
                (f"u{i % 100}", body, 1.0, f"u{(i + 1) % 100}", body, 2.0),
            )
            cursor.fetchall()
            cursor.execute(
                "SELECT qid, stanza FROM drivers WHERE uid = %s AND qid > %s ORDER BY qid LIMIT 10", (f"u{i % 100}", i)
            )
            cursor.fetchall()
            if i % 50 == 49:
                cursor.execute("COMMIT")
                cursor.execute("BEGIN")
        cursor.execute("COMMIT")
        after = resource.getrusage(resource.RUSAGE_THREAD)
        times.extend(
            (time.perf_counter() - started, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
        )

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    cursor.execute("DROP TABLE drivers")
    connection.close()
    wall, user, system = (t / count * 1e6 for t in times)
    return wall, user, system


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mariadb_drivers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=ADMIN["mariadb"], help="database to create a scratch database from")
    parser.add_argument("--count", type=int, default=5000, help="operations per driver")
    args = parser.parse_args()
    database = ServerDatabase("mariadb", args.dsn)
    dsn = database.create()
    try:
        print(f"{database.server()}, {args.count} operations per driver, one thread each")
        print("| Driver | wall µs/op | user CPU µs/op (holds the GIL) | system CPU µs/op |")
        print("|---|---|---|---|")
        for name in ("pymysql", "mysqlclient"):
            try:
                driver = Driver(name)
            except ImportError:
                print(f"| {name} | not installed | | |")
                continue
            wall, user, system = measure(driver, dsn, args.count)
            print(f"| {name} | {wall:.0f} | {user:.0f} | {system:.0f} |")
    finally:
        database.drop()


if __name__ == "__main__":
    main()
