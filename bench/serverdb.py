"""
A database of its own on a database server, for a benchmark node on the
C{postgresql} or C{mariadb} store: created before the node starts, dropped
after it stops, so that runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

#: Where the databases are created unless C{--dsn} says otherwise: this
#: machine's servers (docs/storage.md).
ADMIN = {
    "postgresql": os.environ.get("TIMTX_TEST_POSTGRESQL", "host=127.0.0.1 port=5432 user=postgres dbname=test"),
    "mariadb": os.environ.get("TIMTX_TEST_MARIADB", "mariadb://root@127.0.0.1:3306/test"),
}


class ServerDatabase:
    """
    @ivar dsn: what the node's C{[store] dsn} should be.
    """

    def __init__(self, backend: str, admin: str):
        self.backend = backend
        self.admin = admin
        self.name = f"timtx_bench_{uuid.uuid4().hex[:12]}"
        self.dsn = ""

    def create(self) -> str:
        if self.backend == "postgresql":
            import psycopg2.extensions

            self._postgresql(f"CREATE DATABASE {self.name}")
            params = psycopg2.extensions.parse_dsn(self.admin)
            params["dbname"] = self.name
            self.dsn = " ".join(f"{key}={value}" for key, value in params.items())
        else:
            self._mariadb(f"CREATE DATABASE {self.name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            self.dsn = f"{self.admin.rsplit('/', 1)[0]}/{self.name}"
        return self.dsn

    def drop(self) -> None:
        if self.backend == "postgresql":
            self._postgresql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        else:
            self._mariadb(f"DROP DATABASE IF EXISTS {self.name}")

    def server(self) -> str:
        """
        The server's version, for the record.
        """
        if self.backend == "postgresql":
            return str(self._postgresql("SELECT version()")).split(" on ")[0]
        return "MariaDB " + str(self._mariadb("SELECT VERSION()"))

    def _postgresql(self, statement: str) -> Any:
        import psycopg2

        connection = psycopg2.connect(self.admin, connect_timeout=5)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement)
                return cursor.fetchone()[0] if cursor.description else None
        finally:
            connection.close()

    def _mariadb(self, statement: str) -> Any:
        import pymysql

        from timtx.persistence.mariadb import parseDSN

        connection = pymysql.connect(**parseDSN(self.admin), connect_timeout=5, autocommit=True)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
                row = cursor.fetchone()
                return row[0] if row else None
        finally:
            connection.close()


class ShardDatabases:
    """
    Databases for a sharded PostgreSQL store: C{count} shards, and one
    spare that a run may add as a shard and move slots to.

    @ivar dsns: the shards' DSNs, the first being the directory.
    @ivar spare: the spare's DSN.
    """

    def __init__(self, admin: str, count: int):
        self._all = [ServerDatabase("postgresql", admin) for _ in range(count + 1)]
        self.dsns: list[str] = []
        self.spare = ""

    def create(self) -> list[str]:
        created = [database.create() for database in self._all]
        self.dsns, self.spare = created[:-1], created[-1]
        return self.dsns

    def drop(self) -> None:
        for database in self._all:
            database.drop()

    def server(self) -> str:
        return self._all[0].server()


def forSections(sections: dict[str, dict[str, Any]]) -> ServerDatabase | ShardDatabases | None:
    """
    If C{sections} put the node on a server store without a DSN, create a
    database for it and set the DSN (or, for C{shard_count}, databases and
    C{shards}); the caller drops them at the end.
    """
    store = sections.get("store", {})
    backend = store.get("backend")
    count = store.pop("shard_count", 0)
    if backend not in ADMIN or store.get("dsn") or store.get("shards"):
        return None
    admin = store.pop("admin_dsn", "") or ADMIN[backend]
    if count and backend == "postgresql":
        shards = ShardDatabases(admin, count)
        store["shards"] = ", ".join(shards.create())
        return shards
    database = ServerDatabase(backend, admin)
    store["dsn"] = database.create()
    return database
