# -*- test-case-name: timtx.test.test_reseal -*-
"""
The columns that hold sealed blobs (L{timtx.crypto.vault}), for
re-encryption under a new key: which table, which key, which column, and
the SQL the stores share to page through them, replace them and count them
by key.

A blob names its key in its first bytes: C{01} for key 1, C{02 hh ll} for
key C{hhll}.  Rows are paged by primary key; only blobs that do not start
with the header of the key to keep are read.
"""

from __future__ import annotations

from typing import Any

#: Kind to (table, primary key columns, blob column).  A kind's key is its
#: primary key: C{(conv, seq)}, C{(uid, qid)}, C{(uid,)}, C{(gid,)}.
SEALED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "message": ("messages", ("conv", "seq"), "stanza"),
    "inbox": ("inbox", ("uid", "qid"), "stanza"),
    "profile": ("profiles", ("uid",), "stanza"),
    "group": ("groups", ("gid",), "profile"),
}


def selectSql(kind: str, after: bool, mark: str = "%s") -> str:
    """
    Rows of C{kind} whose blob does not start with a given header: the
    parameters are the header's length and the header, then (if C{after})
    the key to start after, then the limit.
    """
    table, pk, column = SEALED[kind]
    keys = ", ".join(pk)
    where = f"{column} IS NOT NULL AND substr({column}, 1, {mark}) <> {mark}"
    if after:
        where += f" AND ({keys}) > ({', '.join([mark] * len(pk))})"
    return f"SELECT {keys}, {column} FROM {table} WHERE {where} ORDER BY {keys} LIMIT {mark}"


def updateSql(kind: str, mark: str = "%s") -> str:
    """
    Replace one blob if it is still the one read: the new blob, the key,
    the old blob.
    """
    table, pk, column = SEALED[kind]
    keys = " AND ".join(f"{c} = {mark}" for c in pk)
    return f"UPDATE {table} SET {column} = {mark} WHERE {keys} AND {column} = {mark}"


def keysSql(kind: str, mark: str = "%s", hexOf: str = "hex({})") -> str:
    """
    The rows of C{kind} per key: a key column (C{''} for key 1, the id in
    hex for a blob that names it, C{'-'} for anything else) and a count;
    the parameters are the bytes C{01} and C{02}.
    """
    table, _, column = SEALED[kind]
    idHex = hexOf.format(f"substr({column}, 2, 2)")
    first = f"substr({column}, 1, 1)"
    return (
        f"SELECT CASE WHEN {first} = {mark} THEN '' WHEN {first} = {mark} THEN {idHex} ELSE '-' END, count(*) "
        f"FROM {table} WHERE {column} IS NOT NULL GROUP BY 1"
    )


def keyCounts(rows: list[tuple[Any, ...]]) -> dict[int, int]:
    """
    The result of L{keysSql} as key id to rows (0 for what is not a
    sealed blob).
    """
    counts: dict[int, int] = {}
    for idHex, count in rows:
        text = idHex.decode() if isinstance(idHex, (bytes, bytearray)) else str(idHex or "")
        keyId = 1 if not text else 0 if text == "-" else int(text, 16)
        counts[keyId] = counts.get(keyId, 0) + int(count)
    return counts
