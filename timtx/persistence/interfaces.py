# -*- test-case-name: timtx.test.test_store -*-
"""
What the engine keeps, behind one interface per storage plugin.

Every method returns a L{Deferred}; none blocks the reactor thread.  A
plugin may answer synchronously (the memory store does) or from a worker
thread (SQLite).  Results are delivered in the order the calls were made, so
a read issued after a write sees it.

Any method may fail with L{timtx.persistence.errors.StoreUnavailable} when
the database cannot be reached (the call did not happen), or with its
subclass L{timtx.persistence.errors.StoreOutcomeUnknown} when a write may
or may not have been committed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from timtx.persistence.records import (
    Account,
    Duplicate,
    Group,
    InboxEntry,
    Intent,
    Member,
    NewMessage,
    Part,
    Relation,
    StoredMessage,
    TokenGrant,
)


class IMessageStore(Interface):
    """
    The node's durable state: accounts, login tokens, conversations and
    their history, inboxes of undelivered items, duplicate keys, relations
    between users, profiles.
    """

    name = Attribute("The plugin name, such as C{'sqlite'}.")

    available = Attribute(
        "Whether the database can be reached now (C{False} while calls fail at once with "
        "L{timtx.persistence.errors.StoreUnavailable}); for monitoring."
    )

    def open() -> Deferred[None]:
        """
        Connect and bring the schema to the current version.

        @return: a L{Deferred} that fires when the store is usable.
        """

    def close() -> Deferred[None]:
        """
        Finish pending work and release connections.

        @return: a L{Deferred} that fires when done.
        """

    def createAccount(account: Account) -> Deferred[bool]:
        """
        Add an account unless its uid exists.

        @type account: L{timtx.persistence.records.Account}
        @return: a L{Deferred} firing with C{True}, or C{False} if the uid
            was taken (nothing is changed then).
        """

    def getAccount(uid: str) -> Deferred[Account | None]:
        """
        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.Account}, or C{None}.
        """

    def setPasswordHash(uid: str, passwordHash: str) -> Deferred[bool]:
        """
        @return: a L{Deferred} firing with C{True}, or C{False} if there is
            no such account.
        """

    def addToken(key: bytes, grant: TokenGrant, expires: float) -> Deferred[None]:
        """
        Remember a one-time login token.

        @param key: the keyed hash of the token (bytes); the token itself is
            never stored.
        @type grant: L{timtx.persistence.records.TokenGrant}
        @param expires: Unix seconds after which the token is void.
        @return: a L{Deferred} that fires when it is stored.
        """

    def takeToken(key: bytes, now: float) -> Deferred[TokenGrant | None]:
        """
        Use up a token: remove it and say what it granted.  A token can be
        taken once; an expired token grants nothing.

        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.TokenGrant}, or C{None}.
        """

    def purgeTokens(now: float) -> Deferred[int]:
        """
        Forget expired tokens.

        @return: a L{Deferred} firing with how many were removed.
        """

    # Messages, inboxes, duplicates, relations and profiles.  Stanzas are
    # opaque, already sealed bytes; stores never look inside them.

    def appendMessages(messages: list[NewMessage]) -> Deferred[list[list[int]]]:
        """
        Write messages, their inbox entries and their duplicate keys in one
        transaction: all of them or none.

        A C{(conv, seq)} that is already stored fails the call with
        L{timtx.persistence.errors.SequenceConflict} and writes nothing of
        it; other calls are not affected.  This is the fence that makes a
        split view of who numbers a conversation cost a retry, never a
        duplicate.

        A message whose duplicate key C{(sender, client id)} is already
        stored fails the call with
        L{timtx.persistence.errors.DuplicateConflict}, naming the message
        that holds the key, and writes nothing of the call; other calls are
        not affected.  A key a concurrent transaction is writing counts as
        stored once that transaction commits (the store waits for it), so
        two appends of the same key racing on two nodes store it once.
        Keys removed by C{purgeDuplicates} no longer count.  Callers give
        a key at most once per call.

        @type messages: L{list} of L{timtx.persistence.records.NewMessage}
        @return: a L{Deferred} firing with, per message, the list of inbox
            qids created, in the order of its C{inbox}.
        """

    def lastMessage(conv: str) -> Deferred[tuple[int, int]]:
        """
        @return: a L{Deferred} firing with C{(last seq, last mid)} of
            C{conv}'s history, C{(0, 0)} if it has none.
        """

    def getMessage(conv: str, mid: int) -> Deferred[StoredMessage | None]:
        """
        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.StoredMessage} of C{conv} with
            C{mid}, or C{None}.
        """

    def replaceMessage(
        conv: str, seq: int, stanza: bytes, state: int, notices: list[tuple[str, bytes]], created: float
    ) -> Deferred[list[int]]:
        """
        Replace a history row's stanza (with a tombstone, on recall or burn)
        and add inbox entries telling others, in one transaction.  Inbox
        entries that refer to the row deliver the tombstone from now on.

        @param notices: C{(recipient, sealed stanza)} pairs.
        @return: a L{Deferred} firing with the notices' qids.
        """

    def history(conv: str, beforeMid: int | None, limit: int) -> Deferred[list[StoredMessage]]:
        """
        @param beforeMid: only rows with a smaller mid; C{None} for the newest.
        @return: a L{Deferred} firing with up to C{limit}
            L{timtx.persistence.records.StoredMessage}s, newest first.
        """

    def recentDuplicates(sender: str, since: float) -> Deferred[dict[int, Duplicate]]:
        """
        @return: a L{Deferred} firing with a dict of client id to
            L{timtx.persistence.records.Duplicate} for C{sender}'s messages
            stored at or after C{since}.
        """

    def purgeDuplicates(before: float) -> Deferred[int]:
        """
        Forget duplicate keys older than C{before}.

        @return: a L{Deferred} firing with how many were removed.
        """

    def addInbox(entries: list[tuple[str, bytes]], created: float) -> Deferred[list[int]]:
        """
        @param entries: C{(recipient, sealed stanza)} pairs.
        @return: a L{Deferred} firing with their qids.
        """

    def readInbox(uid: str, afterQid: int, limit: int) -> Deferred[list[InboxEntry]]:
        """
        @return: a L{Deferred} firing with up to C{limit}
            L{timtx.persistence.records.InboxEntry}s of C{uid} with a qid
            above C{afterQid}, in qid order.
        """

    def deleteInbox(uid: str, qids: list[int]) -> Deferred[int]:
        """
        @return: a L{Deferred} firing with how many entries were removed.
        """

    def countInbox(uid: str) -> Deferred[int]:
        """
        @return: a L{Deferred} firing with the number of entries of C{uid}.
        """

    def relationsOf(uid: str) -> Deferred[list[Relation]]:
        """
        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.Relation}s of C{uid} with every user
            either side has a stance toward.
        """

    def setStance(owner: str, other: str, stance: int) -> Deferred[None]:
        """
        Set C{owner}'s stance toward C{other}.

        @return: a L{Deferred} that fires when stored.
        """

    def getProfile(uid: str) -> Deferred[bytes | None]:
        """
        @return: a L{Deferred} firing with the sealed profile, or C{None}.
        """

    def putProfile(uid: str, stanza: bytes) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires when stored.
        """

    def getInvisible(uid: str) -> Deferred[bool]:
        """
        @return: a L{Deferred} firing with whether C{uid} is invisible.
        """

    def setInvisible(uid: str, invisible: bool) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires when stored.
        """

    # Groups.  A group's messages live in the conversation C{"g:<gid>"} of
    # the message methods above; members get them by reference, through a
    # per-member cursor, not through inbox copies.

    def createGroup(group: Group, founder: Member) -> Deferred[None]:
        """
        Create a group with its founder as the first member.

        @type group: L{timtx.persistence.records.Group}
        @type founder: L{timtx.persistence.records.Member}
        @return: a L{Deferred} that fires when stored.
        """

    def getGroup(gid: str) -> Deferred[Group | None]:
        """
        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.Group}, or C{None}.
        """

    def updateGroup(group: Group) -> Deferred[None]:
        """
        Store a changed group (all fields but C{gid}).

        @return: a L{Deferred} that fires when stored.
        """

    def countFounded(uid: str) -> Deferred[int]:
        """
        @return: a L{Deferred} firing with how many groups that are not
            dissolved C{uid} is the founder of.
        """

    def groupMembers(gid: str) -> Deferred[list[Member]]:
        """
        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.Member}s of C{gid}.
        """

    def groupsOf(uid: str) -> Deferred[list[str]]:
        """
        @return: a L{Deferred} firing with the ids of the groups C{uid} is a
            member of.
        """

    def putMember(gid: str, member: Member) -> Deferred[None]:
        """
        Add a member, or change one.

        @return: a L{Deferred} that fires when stored.
        """

    def removeMembers(gid: str, uids: list[str]) -> Deferred[int]:
        """
        @return: a L{Deferred} firing with how many were members.
        """

    def addJoinRequest(gid: str, uid: str, created: float) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires when stored.
        """

    def takeJoinRequest(gid: str, uid: str) -> Deferred[bool]:
        """
        Remove a pending join request.

        @return: a L{Deferred} firing with whether there was one.
        """

    def setGroupBlock(gid: str, uid: str, by: int, blocked: bool) -> Deferred[None]:
        """
        Set or clear a block between a group and a user.

        @param by: L{timtx.persistence.records.BLOCK_BY_USER} (the user
            blocks the group) or C{BLOCK_BY_GROUP} (the group blocks the
            user).
        @return: a L{Deferred} that fires when stored.
        """

    def groupBlocks(gid: str) -> Deferred[dict[str, set[int]]]:
        """
        @return: a L{Deferred} firing with a dict of uid to the set of
            C{by} values of the blocks between C{gid} and users.
        """

    def userGroupBlocks(uid: str) -> Deferred[list[str]]:
        """
        @return: a L{Deferred} firing with the ids of the groups C{uid}
            blocks.
        """

    def saveCursors(cursors: list[tuple[str, str, int]]) -> Deferred[None]:
        """
        Record how far members have acknowledged their groups' messages.

        @param cursors: C{(uid, gid, seq)} triples; a cursor never moves
            back.
        @return: a L{Deferred} that fires when stored.
        """

    def cursorsOf(uid: str) -> Deferred[dict[str, int]]:
        """
        @return: a L{Deferred} firing with a dict of gid to the last seq
            C{uid} acknowledged.
        """

    def messagesAfter(conv: str, afterSeq: int, limit: int) -> Deferred[list[StoredMessage]]:
        """
        @return: a L{Deferred} firing with up to C{limit}
            L{timtx.persistence.records.StoredMessage}s of C{conv} with a
            seq above C{afterSeq}, oldest first.
        """

    # Sealed blobs, for re-encryption under a new key
    # (timtx.persistence.sealed, timtx.chat.reseal).

    def sealedRows(kind: str, after: Any, limit: int, keep: bytes) -> Deferred[tuple[list[tuple[Any, bytes]], Any]]:
        """
        Page through the blobs of C{kind} (C{message}, C{inbox},
        C{profile}, C{group}) that do not start with C{keep}.

        @param after: where the previous page ended, C{None} to start.
        @return: a L{Deferred} firing with up to C{limit} C{(key, blob)},
            and where to go on from (C{None} at the end).
        """

    def replaceSealed(kind: str, rows: list[tuple[Any, bytes, bytes]]) -> Deferred[int]:
        """
        Replace blobs: C{(key, old, new)}, each only if it is still C{old}
        (a write since it was read wins).

        @return: a L{Deferred} firing with how many were replaced.
        """

    def sealedKeys(kind: str) -> Deferred[dict[int, int]]:
        """
        @return: a L{Deferred} firing with, per key id, how many blobs of
            C{kind} it sealed.
        """


class IShardStore(IMessageStore):
    """
    A store that can be one shard of a
    L{ShardedStore<timtx.persistence.sharded.ShardedStore>}: besides
    L{IMessageStore}, the steps of writes that span shards, reads that do
    not resolve references to other shards, and (on the first shard, the
    I{directory}) the shard map.
    """

    def appendStaged(messages: list[NewMessage], intent: Intent) -> Deferred[list[list[int]]]:
        """
        C{appendMessages} of the parts that live here, and C{intent} (what
        is left for other shards), in one transaction.
        """

    def stagedWrite(method: str, args: tuple[Any, ...], intent: Intent) -> Deferred[Any]:
        """
        One of C{replaceMessage}, C{addInbox}, C{createGroup},
        C{removeMembers} with C{args}, and C{intent}, in one transaction.

        @return: the method's result.
        """

    def applyParts(parts: list[Part], intent: Intent | None) -> Deferred[list[int]]:
        """
        Make the writes C{parts} (each safe to repeat), and store C{intent}
        if given, in one transaction.

        @return: the qids of the C{inbox} parts, in order: the entry made
            now, or the one an earlier run made for the same C{ref}.
        """

    def pendingIntents(before: float, limit: int) -> Deferred[list[Intent]]:
        """
        @return: up to C{limit} intents stored before C{before}, oldest first.
        """

    def dropIntents(ids: list[bytes]) -> Deferred[None]:
        """
        Forget intents whose parts are all done.
        """

    def readInboxRaw(
        uid: str, afterQid: int, limit: int
    ) -> Deferred[list[tuple[int, str | None, int | None, bytes | None]]]:
        """
        Like C{readInbox}, as C{(qid, conv, seq, stanza)}, with a C{None}
        stanza for an entry whose history row is not on this shard.
        """

    def stanzasAt(rows: list[tuple[str, int]]) -> Deferred[dict[tuple[str, int], bytes]]:
        """
        @return: the stanzas of the history rows C{(conv, seq)} found here.
        """

    def foundedBy(uid: str) -> Deferred[list[str]]:
        """
        @return: the ids of the groups here, not dissolved, founded by C{uid}.
        """

    def shardMap() -> Deferred[Any]:
        """
        @return: the L{timtx.persistence.placement.ShardMap} kept here (the
            directory), or C{None} if there is none yet.
        """

    def createShardMap(shardMap: Any) -> Deferred[None]:
        """
        Keep C{shardMap} here unless a map exists already (nodes starting
        together create it once).
        """

    def heartbeat(node: str, version: int) -> Deferred[tuple[int, bool]]:
        """
        Record that C{node} is alive and has no call under a map older than
        C{version}.

        @return: the version of the map kept here, and whether a move is
            under way.
        """

    def leave(node: str) -> Deferred[None]:
        """
        Forget C{node}: it stopped.
        """

    def directoryStatus() -> Deferred[tuple[list[tuple[str, int, float]], list[dict[str, Any]]]]:
        """
        @return: the nodes' heartbeats (name, map version, seconds since)
            and the recent moves (newest first), as kept here.
        """


class IStoreFactory(Interface):
    """
    A named storage plugin.  Built-in plugins are found by name in
    L{timtx.persistence}; others provide this interface from a module in
    C{twisted/plugins/}, as C{twisted.cred} finds checkers.
    """

    name = Attribute("The name used in C{[store] backend}.")
    description = Attribute("One line for operators.")

    def makeStore(config: Any, reactor: Any) -> IMessageStore:
        """
        @type config: L{timtx.config.Config}
        @return: an L{IMessageStore} provider, not yet opened.
        """
