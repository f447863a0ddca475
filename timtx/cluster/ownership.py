# -*- test-case-name: timtx.test.test_ownership -*-
"""
Who owns what, without a leader: rendezvous (highest-random-weight)
hashing over the live members (Thaler and Ravishankar, 1998).

For a key, every live node gets a score, a hash of its node id and the key;
the node with the highest score owns the key, and the next ones in score
order are its successors (L{Ownership.owners}, for replication).  Nodes that
see the same members compute the same owners with no messages at all.  When
a node joins it takes over only the keys it now scores highest on, about
1/n of them, each from a single previous owner; when one leaves, only its
own keys move, each to its own successor.  There are no virtual nodes to
tune and no ring to keep.

Keys are namespaced strings: C{user:<uid>} (where a user's sessions are
registered), C{conv:<conversation>} (who assigns a conversation's sequence
numbers), C{group:<gid>}, C{room:<rid>}; L{userKey} and friends build them.

The score is the first 8 bytes of BLAKE2b over the node id, a zero byte and
the key: stable across processes, versions and platforms (unlike Python's
C{hash}), and fast (about half a microsecond per node per key).
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def score(nodeId: str, key: str) -> int:
    """
    The weight of C{nodeId} for C{key}; the highest wins.
    """
    digest = hashlib.blake2b(nodeId.encode("utf-8") + b"\x00" + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def userKey(uid: str) -> str:
    return f"user:{uid}"


def conversationKey(conversation: str) -> str:
    return f"conv:{conversation}"


def groupKey(gid: str) -> str:
    return f"group:{gid}"


def roomKey(rid: str) -> str:
    return f"room:{rid}"


#: Owners one snapshot remembers before it starts again (about 150 bytes
#: each).
MAX_REMEMBERED_OWNERS = 200_000


class NoOwner(LookupError):
    """
    No live member: nothing can own anything.
    """


class Ownership:
    """
    Owners of keys among a fixed set of nodes: an immutable snapshot, made
    again when membership changes.

    @ivar nodes: the node ids taking part, sorted.
    """

    def __init__(self, nodes: Iterable[str]):
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        self._prefixes = [(nodeId, nodeId.encode("utf-8") + b"\x00") for nodeId in self.nodes]
        # Owners already computed: a snapshot never changes its mind, and a
        # group message asks for the owner of every member's user key.
        self._owners: dict[str, str] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ownership) and other.nodes == self.nodes

    def __hash__(self) -> int:
        return hash(self.nodes)

    def __repr__(self) -> str:
        return f"Ownership({list(self.nodes)!r})"

    def __contains__(self, nodeId: object) -> bool:
        return nodeId in self.nodes

    def _scores(self, key: str) -> list[tuple[int, str]]:
        encoded = key.encode("utf-8")
        blake2b = hashlib.blake2b
        return [
            (int.from_bytes(blake2b(prefix + encoded, digest_size=8).digest(), "big"), nodeId)
            for nodeId, prefix in self._prefixes
        ]

    def owner(self, key: str) -> str:
        """
        The node that owns C{key}.

        @raise NoOwner: if there are no nodes.
        """
        owner = self._owners.get(key)
        if owner is not None:
            return owner
        if not self._prefixes:
            raise NoOwner(key)
        # Ties (one in 2**64) go to the greater node id, on every node alike.
        owner = max(self._scores(key))[1]
        if len(self._owners) >= MAX_REMEMBERED_OWNERS:
            self._owners.clear()
        self._owners[key] = owner
        return owner

    def owners(self, key: str, n: int) -> list[str]:
        """
        The C{n} nodes with the highest scores for C{key}, the owner first
        (fewer if there are fewer nodes).

        @raise NoOwner: if there are no nodes.
        """
        if not self._prefixes:
            raise NoOwner(key)
        return [nodeId for _, nodeId in sorted(self._scores(key), reverse=True)[:n]]

    def owns(self, nodeId: str, key: str) -> bool:
        return bool(self._prefixes) and self.owner(key) == nodeId
