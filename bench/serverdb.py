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


def forSections(sections: dict[str, dict[str, Any]]) -> ServerDatabase | None:
    """
    If C{sections} put the node on a server store without a DSN, create a
    database for it and set the DSN; the caller drops it at the end.
    """
    store = sections.get("store", {})
    backend = store.get("backend")
    if backend not in ADMIN or store.get("dsn"):
        return None
    database = ServerDatabase(backend, store.pop("admin_dsn", "") or ADMIN[backend])
    store["dsn"] = database.create()
    return database
