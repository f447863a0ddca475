"""
The plain records stores take and return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Account:
    """
    @ivar uid: the account id (tim's "node"), see L{timtx.crypto.ids}.
    @ivar domain: the tenant namespace given at registration.
    @ivar passwordHash: see L{timtx.crypto.passwords}.
    @ivar created: registration time, Unix seconds.
    """

    uid: str
    domain: str
    passwordHash: str
    created: float


@dataclass(frozen=True)
class TokenGrant:
    """
    What a one-time login token stood for.
    """

    uid: str
    domain: str


@dataclass(frozen=True)
class NewMessage:
    """
    One message to append to a conversation, with the inbox entries it
    causes, all written in one transaction.

    @ivar seq: its place in the conversation, or C{None} for a message kept
        only until delivered (custom odTypes): no history row is written.
    @ivar stanza: the sealed history copy; C{None} when C{seq} is.
    @ivar inbox: C{(recipient, sealed stanza)} pairs; a C{None} stanza
        makes the entry refer to the history row instead of carrying a copy.
    @ivar dedupe: C{(sender, client id)} to remember, so that a resend can be
        answered with this message instead of stored again.
    """

    conv: str
    seq: int | None
    mid: int
    sender: str
    stanza: bytes | None
    created: float
    inbox: tuple[tuple[str, bytes | None], ...] = ()
    dedupe: tuple[str, int] | None = None


@dataclass(frozen=True)
class StoredMessage:
    """
    A history row.

    @ivar state: L{MESSAGE_NORMAL}, L{MESSAGE_RECALLED} or L{MESSAGE_BURNED};
        the stanza of a recalled or burned message is a tombstone without
        content.
    """

    conv: str
    seq: int
    mid: int
    sender: str
    stanza: bytes
    state: int
    created: float


MESSAGE_NORMAL = 0
MESSAGE_RECALLED = 1
MESSAGE_BURNED = 2


@dataclass(frozen=True)
class InboxEntry:
    """
    Something waiting for a user's acknowledgement.

    @ivar qid: the entry's id; entries of one user are read in qid order.
    @ivar conv: the conversation the entry belongs to.
    @ivar seq: for an entry that refers to a history row, its seq; the
        stanza is then the row's (a tombstone once recalled or burned).
    @ivar stanza: the sealed stanza to deliver.
    """

    qid: int
    uid: str
    conv: str | None
    seq: int | None
    stanza: bytes


@dataclass(frozen=True)
class Duplicate:
    """
    What a client message id was stored as.
    """

    conv: str
    seq: int | None
    mid: int
    created: float


@dataclass(frozen=True)
class Relation:
    """
    How two users stand toward each other.  A stance is L{STANCE_NONE},
    L{STANCE_FRIEND} (wants or accepts friendship) or L{STANCE_BLOCK}.
    Friends are two users whose stances are both L{STANCE_FRIEND}.
    """

    other: str
    mine: int
    theirs: int


STANCE_NONE = 0
STANCE_FRIEND = 1
STANCE_BLOCK = 2


@dataclass(frozen=True)
class Group:
    """
    A group ("room").  The founder and managers are members with a role
    (L{Member}); the rest of its profile (cover, topic, label, extend,
    extra) is the sealed C{profile}.

    @ivar gtype: L{timtx.protocols.constants.GroupType}: 1 private (joining
        needs approval), 2 open.
    @ivar status: L{GROUP_ALIVE} or L{GROUP_CANCELLED}.
    @ivar memberCap: most members, 0 for the node's default.
    @ivar mutedAll: only the founder and managers may send.
    """

    gid: str
    domain: str
    founder: str
    gtype: int
    status: int
    created: float
    profile: bytes | None = None
    memberCap: int = 0
    mutedAll: bool = False


GROUP_ALIVE = 1
GROUP_CANCELLED = 2


@dataclass(frozen=True)
class Member:
    """
    @ivar role: L{ROLE_MEMBER}, L{ROLE_MANAGER} or L{ROLE_FOUNDER}.
    @ivar mutedUntil: Unix seconds until which the member may not send; 0
        for not muted.
    """

    uid: str
    role: int
    joined: float
    mutedUntil: float = 0.0


ROLE_MEMBER = 0
ROLE_MANAGER = 1
ROLE_FOUNDER = 2

#: Who blocks whom between a user and a group.
BLOCK_BY_USER = 1
BLOCK_BY_GROUP = 2


@dataclass(frozen=True)
class Part:
    """
    One write a sharded store makes on the shard of C{key}, safe to repeat:

      - C{inbox}: C{(uid, conv, seq, stanza, created, ref)}, an inbox entry
        made once per C{ref} (see L{Intent});
      - C{dedupe}: C{(sender, client id, conv, seq, mid, created)};
      - C{stance}: C{(owner, other, stance)}, as C{setStance};
      - C{member}: C{(gid, uid, role, joined, mutedUntil)}, as C{putMember};
      - C{unmember}: C{(gid, uid)};
      - C{block}: C{(gid, uid, by, blocked)}, as C{setGroupBlock}.
    """

    kind: str
    key: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Intent:
    """
    What a write that spans shards still has to do on other shards, stored
    with its first part in one transaction, and forgotten once done: a
    crash between the two leaves it for any node to finish (parts are safe
    to repeat).

    @ivar id: 16 random bytes; inbox parts are made once per C{id} and
        index.
    """

    id: bytes
    created: float
    parts: tuple[Part, ...]
