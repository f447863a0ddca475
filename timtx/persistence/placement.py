# -*- test-case-name: timtx.test.test_sharded -*-
"""
Where a row lives when the store is split over several databases (shards).

Every row has a I{placement key}: the user for what a user reads on login
(account, inbox, roster, profile, cursors, duplicate keys), the group for a
group and its members, requests and blocks, the conversation for its
messages (a group's conversation C{g:<gid>} by the group, so that a group's
messages live with its members).  A key falls in one of L{SLOTS} logical
slots, the first 12 bits of its MD5; the I{shard map} gives each slot to one
shard, by ranges.  Slots never change; moving data between shards moves
slot ranges.

A few rows are read from two sides and are kept on both keys' shards (the
same row twice when the keys are on different shards): a stance by its
owner and by the other user (so that C{relationsOf} reads one shard), a
membership and a user's block of a group by the group and by the user
(C{groupsOf}, C{userGroupBlocks}).  L{TABLES} says, per table, which
columns place a row; the mover (L{timtx.persistence.pgmove}) and the
placement checks use it.

The slot of a key is computed the same way in SQL (for the mover's triggers
and copies): C{timtx_slot(key)}, C{('x' || substr(md5(key), 1, 3))::bit(12)::int}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import md5
from typing import Any, Callable, Iterable

from timtx.persistence.records import Intent, Part

#: The number of logical slots.  Fixed: changing it would move every row.
SLOTS = 4096


@lru_cache(maxsize=65536)
def slotOf(key: str | bytes) -> int:
    """
    The slot of a placement key: the first 12 bits of its MD5 (of its
    UTF-8 bytes for text).
    """
    data = key.encode("utf-8") if isinstance(key, str) else key
    return int(md5(data, usedforsecurity=False).hexdigest()[:3], 16)


def convKey(conv: str) -> str:
    """
    The placement key of a conversation: its group for C{g:<gid>}, itself
    otherwise.
    """
    return conv[2:] if conv.startswith("g:") else conv


@dataclass(frozen=True)
class Table:
    """
    How a table's rows are placed.

    @ivar pk: its primary key columns.
    @ivar keys: the columns holding the placement keys of a row (two for
        the rows kept on both sides).
    @ivar conv: the key columns that hold a conversation (see L{convKey}).
    """

    name: str
    pk: tuple[str, ...]
    keys: tuple[str, ...]
    conv: tuple[str, ...] = ()

    def keySql(self, column: str, row: str = "") -> str:
        """
        The SQL expression of the slot of C{column} (of record C{row}, such
        as C{NEW}, if given).
        """
        ref = f"{row}.{column}" if row else column
        if column in self.conv:
            ref = f"CASE WHEN left({ref}, 2) = 'g:' THEN substr({ref}, 3) ELSE {ref} END"
        return f"timtx_slot({ref})"


#: Every table that holds placed rows, and how.
TABLES: tuple[Table, ...] = (
    Table("accounts", ("uid",), ("uid",)),
    Table("login_tokens", ("token_key",), ("token_key",)),
    Table("messages", ("conv", "seq"), ("conv",), conv=("conv",)),
    Table("inbox", ("uid", "qid"), ("uid",)),
    # With the sender (read there) and with the conversation (where the
    # store fences it).
    Table("duplicates", ("sender", "client_id"), ("sender", "conv"), conv=("conv",)),
    Table("stances", ("owner", "other"), ("owner", "other")),
    Table("profiles", ("uid",), ("uid",)),
    Table("invisible", ("uid",), ("uid",)),
    Table("groups", ("gid",), ("gid",)),
    Table("group_members", ("gid", "uid"), ("gid", "uid")),
    Table("group_requests", ("gid", "uid"), ("gid",)),
    Table("group_blocks", ("gid", "uid", "blocked_by"), ("gid", "uid")),
    Table("group_cursors", ("uid", "gid"), ("uid",)),
)


@dataclass(frozen=True)
class Range:
    """
    Slots C{lo} to C{hi} (both included) on shard C{shard}; C{held} while
    a move switches them to another shard: nodes wait before touching them.
    """

    lo: int
    hi: int
    shard: int
    held: bool = False


@dataclass(frozen=True)
class ShardMap:
    """
    The shard map as read from the directory.

    @ivar version: grows with every change.
    @ivar shards: shard id to its DSN.
    @ivar ranges: cover every slot once, in order.
    @ivar moving: a move is under way (nodes look at the map more often).
    """

    version: int
    shards: dict[int, str]
    ranges: tuple[Range, ...]
    moving: bool = False
    _owner: list[int] = field(default_factory=list, compare=False, repr=False)
    _held: frozenset[int] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        owner = [-1] * SLOTS
        held = set()
        for r in self.ranges:
            for slot in range(r.lo, r.hi + 1):
                owner[slot] = r.shard
                if r.held:
                    held.add(slot)
        if -1 in owner:
            raise ValueError(f"shard map {self.version} leaves slot {owner.index(-1)} without a shard")
        self._owner[:] = owner
        object.__setattr__(self, "_held", frozenset(held))

    def shardOf(self, slot: int) -> int:
        return self._owner[slot]

    def isHeld(self, slot: int) -> bool:
        return slot in self._held

    @property
    def anyHeld(self) -> bool:
        return bool(self._held)

    def slotsOf(self, shard: int) -> list[tuple[int, int]]:
        """
        The slot ranges of C{shard}.
        """
        return [(r.lo, r.hi) for r in self.ranges if r.shard == shard]

    def owns(self, shard: int, key: str | bytes) -> bool:
        return self._owner[slotOf(key)] == shard


def evenRanges(shards: list[int]) -> tuple[Range, ...]:
    """
    The slots split in equal ranges over C{shards}, in order.
    """
    count = len(shards)
    return tuple(Range(SLOTS * i // count, SLOTS * (i + 1) // count - 1, shard) for i, shard in enumerate(shards))


def parseSlots(text: str) -> tuple[int, int]:
    """
    C{"lo-hi"} (or one slot) as a range of slots.

    @raise ValueError: for anything else, or slots out of range.
    """
    lo, _, hi = text.strip().partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"slots are a range such as 0-2047, not {text!r}") from None
    if not 0 <= first <= last < SLOTS:
        raise ValueError(f"slots run from 0 to {SLOTS - 1}: {text!r}")
    return first, last


# Intents: what a write that spans shards still has to do elsewhere.


def encodeParts(parts: Iterable[Part]) -> bytes:
    """
    Parts as the payload of an intent row (JSON; bytes as hex).
    """
    return json.dumps([[p.kind, p.key, *map(_plain, p.args)] for p in parts], separators=(",", ":")).encode()


def decodeParts(payload: bytes) -> tuple[Part, ...]:
    parts = []
    for kind, key, *args in json.loads(bytes(payload)):
        parts.append(Part(kind, key, tuple(_typed(a) for a in args)))
    return tuple(parts)


#: Where the placement keys of a part's row are among its arguments (see
#: L{Part}): two for the rows kept on both keys' shards.
_ROW_KEYS: dict[str, tuple[int, ...]] = {
    "inbox": (0,),
    "dedupe": (0, 2),
    "stance": (0, 1),
    "member": (0, 1),
    "unmember": (0, 1),
    "block": (0, 1),
}


def rowSlots(part: Part) -> frozenset[int]:
    """
    The slots of every placement key of the row C{part} writes, not only
    of the part's own key: for a row kept on both sides, the other key's
    too.  A call that writes the part waits while either is held, as the
    call that made it did; during a move's switch the source takes no
    write of a row of the range but its own copies
    (L{timtx.persistence.pgmove}), and the range is compared then.
    """
    keys = {part.key}
    for index in _ROW_KEYS.get(part.kind, ()):
        key = part.args[index]
        keys.add(convKey(key) if part.kind == "dedupe" and index == 2 else key)
    return frozenset(slotOf(key) for key in keys)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return bytes.fromhex(value["b"])
    if isinstance(value, list):
        return tuple(_typed(v) for v in value)
    return value


def intentRow(intent: Intent) -> tuple[bytes, float, bytes]:
    return (intent.id, intent.created, encodeParts(intent.parts))


def reassigned(ranges: Iterable[Range], lo: int, hi: int, shard: int, held: bool) -> tuple[Range, ...]:
    """
    C{ranges} with slots C{lo} to C{hi} given to C{shard} (and C{held} or
    not); neighbours of one shard and state are merged.
    """
    pieces: list[Range] = []
    for r in ranges:
        if r.hi < lo or r.lo > hi:
            pieces.append(r)
            continue
        if r.lo < lo:
            pieces.append(Range(r.lo, lo - 1, r.shard, r.held))
        if r.hi > hi:
            pieces.append(Range(hi + 1, r.hi, r.shard, r.held))
    pieces.append(Range(lo, hi, shard, held))
    pieces.sort(key=lambda r: r.lo)
    merged: list[Range] = []
    for r in pieces:
        last = merged[-1] if merged else None
        if last is not None and last.shard == r.shard and last.held == r.held and last.hi + 1 == r.lo:
            merged[-1] = Range(last.lo, r.hi, r.shard, r.held)
        else:
            merged.append(r)
    return tuple(merged)


def statusOf(
    shardMap: ShardMap,
    nodes: list[tuple[str, int, float]],
    moves: list[dict[str, Any]],
    describe: Callable[[str], str] = lambda dsn: dsn,
) -> dict[str, Any]:
    """
    What C{shards status} prints and the admin API shows.

    @param nodes: C{(name, map version, seconds since its heartbeat)}.
    @param moves: the recent moves, newest first (C{shard_moves} rows).
    @param describe: names a shard's database without its password.
    """
    return {
        "version": shardMap.version,
        "moving": shardMap.moving,
        "shards": [
            {
                "shard": shard,
                "database": describe(dsn),
                "slots": sum(r.hi - r.lo + 1 for r in shardMap.ranges if r.shard == shard),
                "ranges": [
                    f"{r.lo}-{r.hi}" + (" (held)" if r.held else "") for r in shardMap.ranges if r.shard == shard
                ],
            }
            for shard, dsn in sorted(shardMap.shards.items())
        ],
        "nodes": [{"node": n, "version": v, "seen": round(age, 1)} for n, v, age in nodes],
        "moves": moves,
    }
