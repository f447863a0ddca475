# -*- test-case-name: timtx.test.test_store -*-
"""
A store that keeps everything in memory: for tests and for nodes that must
not write to disk.  Unlike tim's no-database mode it still checks passwords;
nothing survives a restart.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterator

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from timtx.persistence.errors import DuplicateConflict, SequenceConflict
from timtx.persistence.interfaces import IMessageStore, IShardStore, IStoreFactory
from timtx.persistence.records import (
    BLOCK_BY_USER,
    GROUP_ALIVE,
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


@implementer(IMessageStore, IShardStore)
class MemoryStore:
    name = "memory"
    available = True

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}
        self._tokens: dict[bytes, tuple[TokenGrant, float]] = {}
        self._messages: dict[str, dict[int, StoredMessage]] = {}
        self._byMid: dict[tuple[str, int], int] = {}
        self._inbox: dict[str, dict[int, tuple[str | None, int | None, bytes | None]]] = {}
        self._nextQid = 1
        self._duplicates: dict[tuple[str, int], Duplicate] = {}
        self._stances: dict[tuple[str, str], int] = {}
        self._profiles: dict[str, bytes] = {}
        self._invisible: set[str] = set()
        self._groups: dict[str, Group] = {}
        self._members: dict[str, dict[str, Member]] = {}
        self._requests: set[tuple[str, str]] = set()
        self._groupBlocks: dict[tuple[str, str], set[int]] = {}
        self._cursors: dict[tuple[str, str], int] = {}
        # As a shard: intents, inbox entries by ref, the directory.
        self._intents: dict[bytes, Intent] = {}
        self._refs: dict[bytes, tuple[str, int]] = {}
        self._shardMap: Any = None
        self.nodes: dict[str, int] = {}

    def open(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def createAccount(self, account: Account) -> Deferred[bool]:
        if account.uid in self._accounts:
            return succeed(False)
        self._accounts[account.uid] = account
        return succeed(True)

    def getAccount(self, uid: str) -> Deferred[Account | None]:
        return succeed(self._accounts.get(uid))

    def setPasswordHash(self, uid: str, passwordHash: str) -> Deferred[bool]:
        account = self._accounts.get(uid)
        if account is None:
            return succeed(False)
        self._accounts[uid] = Account(account.uid, account.domain, passwordHash, account.created)
        return succeed(True)

    def addToken(self, key: bytes, grant: TokenGrant, expires: float) -> Deferred[None]:
        self._tokens[key] = (grant, expires)
        return succeed(None)

    def takeToken(self, key: bytes, now: float) -> Deferred[TokenGrant | None]:
        entry = self._tokens.pop(key, None)
        if entry is None or entry[1] < now:
            return succeed(None)
        return succeed(entry[0])

    def purgeTokens(self, now: float) -> Deferred[int]:
        expired = [key for key, (_, expires) in self._tokens.items() if expires < now]
        for key in expired:
            del self._tokens[key]
        return succeed(len(expired))

    # Messages.

    def appendMessages(self, messages: list[NewMessage]) -> Deferred[list[list[int]]]:
        held: dict[int, Duplicate] = {}
        keys: dict[tuple[str, int], Duplicate] = {}
        for index, m in enumerate(messages):
            if m.dedupe is None:
                continue
            holder = self._duplicates.get(m.dedupe) or keys.get(m.dedupe)
            if holder is not None:
                held[index] = holder
            else:
                keys[m.dedupe] = Duplicate(m.conv, m.seq, m.mid, m.created)
        if held:
            return fail(DuplicateConflict(held))
        taken: set[tuple[str, int]] = set()
        for m in messages:
            if m.seq is None:
                continue
            if m.seq in self._messages.get(m.conv, {}) or (m.conv, m.seq) in taken:
                return fail(SequenceConflict(m.conv, m.seq))
            if (m.conv, m.mid) in self._byMid:
                return fail(ValueError(f"mid {m.mid} of {m.conv} exists"))
            taken.add((m.conv, m.seq))
        result = []
        for m in messages:
            if m.seq is not None and m.stanza is not None:
                self._messages.setdefault(m.conv, {})[m.seq] = StoredMessage(
                    m.conv, m.seq, m.mid, m.sender, m.stanza, 0, m.created
                )
                self._byMid[(m.conv, m.mid)] = m.seq
            qids = []
            for uid, stanza in m.inbox:
                qids.append(self._addInbox(uid, m.conv, m.seq if stanza is None else None, stanza))
            result.append(qids)
            if m.dedupe is not None:
                self._duplicates[m.dedupe] = Duplicate(m.conv, m.seq, m.mid, m.created)
        return succeed(result)

    def _addInbox(
        self, uid: str, conv: str | None, seq: int | None, stanza: bytes | None, ref: bytes | None = None
    ) -> int:
        if ref is not None and ref in self._refs:
            owner, qid = self._refs[ref]
            if qid in self._inbox.get(owner, {}):
                return qid
        qid = self._nextQid
        self._nextQid += 1
        self._inbox.setdefault(uid, {})[qid] = (conv, seq, stanza)
        if ref is not None:
            self._refs[ref] = (uid, qid)
        return qid

    def lastMessage(self, conv: str) -> Deferred[tuple[int, int]]:
        rows = self._messages.get(conv)
        if not rows:
            return succeed((0, 0))
        last = rows[max(rows)]
        return succeed((last.seq, last.mid))

    def getMessage(self, conv: str, mid: int) -> Deferred[StoredMessage | None]:
        seq = self._byMid.get((conv, mid))
        return succeed(None if seq is None else self._messages[conv][seq])

    def replaceMessage(
        self, conv: str, seq: int, stanza: bytes, state: int, notices: list[tuple[str, bytes]], created: float
    ) -> Deferred[list[int]]:
        old = self._messages[conv][seq]
        self._messages[conv][seq] = StoredMessage(conv, seq, old.mid, old.sender, stanza, state, old.created)
        return succeed([self._addInbox(uid, conv, None, body) for uid, body in notices])

    def history(self, conv: str, beforeMid: int | None, limit: int) -> Deferred[list[StoredMessage]]:
        rows = sorted(self._messages.get(conv, {}).values(), key=lambda m: m.mid, reverse=True)
        if beforeMid is not None:
            rows = [m for m in rows if m.mid < beforeMid]
        return succeed(rows[:limit])

    def recentDuplicates(self, sender: str, since: float) -> Deferred[dict[int, Duplicate]]:
        return succeed({cid: d for (s, cid), d in self._duplicates.items() if s == sender and d.created >= since})

    def purgeDuplicates(self, before: float) -> Deferred[int]:
        old = [key for key, d in self._duplicates.items() if d.created < before]
        for key in old:
            del self._duplicates[key]
        return succeed(len(old))

    # Inboxes.

    def addInbox(self, entries: list[tuple[str, bytes]], created: float) -> Deferred[list[int]]:
        return succeed([self._addInbox(uid, None, None, stanza) for uid, stanza in entries])

    def _inboxRows(self, uid: str, afterQid: int) -> Iterator[tuple[int, str | None, int | None, bytes | None]]:
        box = self._inbox.get(uid, {})
        for qid in sorted(box):
            if qid > afterQid:
                conv, seq, stanza = box[qid]
                if stanza is None:
                    row = self._messages.get(conv or "", {}).get(seq or 0)
                    stanza = None if row is None else row.stanza
                yield qid, conv, seq, stanza

    def readInboxRaw(
        self, uid: str, afterQid: int, limit: int
    ) -> Deferred[list[tuple[int, str | None, int | None, bytes | None]]]:
        return succeed(list(islice(self._inboxRows(uid, afterQid), limit)))

    def readInbox(self, uid: str, afterQid: int, limit: int) -> Deferred[list[InboxEntry]]:
        found = (InboxEntry(q, uid, c, s, b) for q, c, s, b in self._inboxRows(uid, afterQid) if b is not None)
        return succeed(list(islice(found, limit)))

    def deleteInbox(self, uid: str, qids: list[int]) -> Deferred[int]:
        box = self._inbox.get(uid, {})
        removed = sum(1 for qid in qids if box.pop(qid, None) is not None)
        if not box:
            self._inbox.pop(uid, None)
        return succeed(removed)

    def countInbox(self, uid: str) -> Deferred[int]:
        return succeed(len(self._inbox.get(uid, {})))

    # Relations and profiles.

    def relationsOf(self, uid: str) -> Deferred[list[Relation]]:
        others: dict[str, list[int]] = {}
        for (owner, other), stance in self._stances.items():
            if owner == uid:
                others.setdefault(other, [0, 0])[0] = stance
            elif other == uid:
                others.setdefault(owner, [0, 0])[1] = stance
        return succeed([Relation(other, mine, theirs) for other, (mine, theirs) in others.items()])

    def setStance(self, owner: str, other: str, stance: int) -> Deferred[None]:
        if stance:
            self._stances[(owner, other)] = stance
        else:
            self._stances.pop((owner, other), None)
        return succeed(None)

    def getProfile(self, uid: str) -> Deferred[bytes | None]:
        return succeed(self._profiles.get(uid))

    def putProfile(self, uid: str, stanza: bytes) -> Deferred[None]:
        self._profiles[uid] = stanza
        return succeed(None)

    def getInvisible(self, uid: str) -> Deferred[bool]:
        return succeed(uid in self._invisible)

    def setInvisible(self, uid: str, invisible: bool) -> Deferred[None]:
        if invisible:
            self._invisible.add(uid)
        else:
            self._invisible.discard(uid)
        return succeed(None)

    # Groups.

    def createGroup(self, group: Group, founder: Member) -> Deferred[None]:
        if group.gid in self._groups:
            return fail(ValueError(f"group {group.gid} exists"))
        self._groups[group.gid] = group
        self._members[group.gid] = {founder.uid: founder}
        return succeed(None)

    def getGroup(self, gid: str) -> Deferred[Group | None]:
        return succeed(self._groups.get(gid))

    def updateGroup(self, group: Group) -> Deferred[None]:
        self._groups[group.gid] = group
        return succeed(None)

    def countFounded(self, uid: str) -> Deferred[int]:
        return succeed(sum(1 for g in self._groups.values() if g.founder == uid and g.status == GROUP_ALIVE))

    def groupMembers(self, gid: str) -> Deferred[list[Member]]:
        return succeed(list(self._members.get(gid, {}).values()))

    def groupsOf(self, uid: str) -> Deferred[list[str]]:
        return succeed([gid for gid, members in self._members.items() if uid in members])

    def putMember(self, gid: str, member: Member) -> Deferred[None]:
        self._members.setdefault(gid, {})[member.uid] = member
        return succeed(None)

    def removeMembers(self, gid: str, uids: list[str]) -> Deferred[int]:
        members = self._members.get(gid, {})
        return succeed(sum(1 for uid in uids if members.pop(uid, None) is not None))

    def addJoinRequest(self, gid: str, uid: str, created: float) -> Deferred[None]:
        self._requests.add((gid, uid))
        return succeed(None)

    def takeJoinRequest(self, gid: str, uid: str) -> Deferred[bool]:
        if (gid, uid) in self._requests:
            self._requests.discard((gid, uid))
            return succeed(True)
        return succeed(False)

    def setGroupBlock(self, gid: str, uid: str, by: int, blocked: bool) -> Deferred[None]:
        flags = self._groupBlocks.setdefault((gid, uid), set())
        if blocked:
            flags.add(by)
        else:
            flags.discard(by)
        return succeed(None)

    def groupBlocks(self, gid: str) -> Deferred[dict[str, set[int]]]:
        return succeed({uid: set(flags) for (g, uid), flags in self._groupBlocks.items() if g == gid and flags})

    def userGroupBlocks(self, uid: str) -> Deferred[list[str]]:
        return succeed([g for (g, u), flags in self._groupBlocks.items() if u == uid and BLOCK_BY_USER in flags])

    def saveCursors(self, cursors: list[tuple[str, str, int]]) -> Deferred[None]:
        for uid, gid, seq in cursors:
            if seq > self._cursors.get((uid, gid), 0):
                self._cursors[(uid, gid)] = seq
        return succeed(None)

    def cursorsOf(self, uid: str) -> Deferred[dict[str, int]]:
        return succeed({gid: seq for (u, gid), seq in self._cursors.items() if u == uid})

    def messagesAfter(self, conv: str, afterSeq: int, limit: int) -> Deferred[list[StoredMessage]]:
        rows = self._messages.get(conv, {})
        return succeed([rows[seq] for seq in sorted(rows) if seq > afterSeq][:limit])

    # Sealed blobs.

    def _sealed(self, kind: str) -> list[tuple[Any, bytes]]:
        if kind == "message":
            return [((c, q), m.stanza) for c, rows in self._messages.items() for q, m in rows.items()]
        if kind == "inbox":
            return [((u, q), e[2]) for u, box in self._inbox.items() for q, e in box.items() if e[2] is not None]
        if kind == "profile":
            return [((u,), b) for u, b in self._profiles.items()]
        if kind == "group":
            return [((g.gid,), g.profile) for g in self._groups.values() if g.profile is not None]
        raise ValueError(f"no sealed blobs of kind {kind!r}")

    def sealedRows(
        self, kind: str, after: Any, limit: int, keep: bytes
    ) -> Deferred[tuple[list[tuple[Any, bytes]], Any]]:
        rows = sorted(r for r in self._sealed(kind) if not r[1].startswith(keep) and (after is None or r[0] > after))
        page = rows[:limit]
        return succeed((page, page[-1][0] if len(page) == limit else None))

    def replaceSealed(self, kind: str, rows: list[tuple[Any, bytes, bytes]]) -> Deferred[int]:
        current = dict(self._sealed(kind))
        replaced = 0
        for key, old, new in rows:
            if current.get(tuple(key)) != old:
                continue
            replaced += 1
            if kind == "message":
                m = self._messages[key[0]][key[1]]
                self._messages[key[0]][key[1]] = StoredMessage(m.conv, m.seq, m.mid, m.sender, new, m.state, m.created)
            elif kind == "inbox":
                conv, seq, _ = self._inbox[key[0]][key[1]]
                self._inbox[key[0]][key[1]] = (conv, seq, new)
            elif kind == "profile":
                self._profiles[key[0]] = new
            else:
                g = self._groups[key[0]]
                self._groups[key[0]] = Group(
                    g.gid, g.domain, g.founder, g.gtype, g.status, g.created, new, g.memberCap, g.mutedAll
                )
        return succeed(replaced)

    def sealedKeys(self, kind: str) -> Deferred[dict[int, int]]:
        counts: dict[int, int] = {}
        for _, blob in self._sealed(kind):
            first = blob[:1]
            keyId = 1 if first == b"\x01" else int.from_bytes(blob[1:3], "big") if first == b"\x02" else 0
            counts[keyId] = counts.get(keyId, 0) + 1
        return succeed(counts)

    # As a shard.

    def appendStaged(self, messages: list[NewMessage], intent: Intent) -> Deferred[list[list[int]]]:
        d = self.appendMessages(messages)
        d.addCallback(self._keep, intent)
        return d

    def stagedWrite(self, method: str, args: tuple[Any, ...], intent: Intent) -> Deferred[Any]:
        if method not in ("replaceMessage", "addInbox", "createGroup", "removeMembers"):
            return fail(ValueError(f"{method} is not written staged"))
        d: Deferred[Any] = getattr(self, method)(*args)
        d.addCallback(self._keep, intent)
        return d

    def _keep(self, result: Any, intent: Intent | None) -> Any:
        if intent is not None:
            self._intents[intent.id] = intent
        return result

    def applyParts(self, parts: list[Part], intent: Intent | None) -> Deferred[list[int]]:
        qids = []
        for part in parts:
            args = part.args
            if part.kind == "inbox":
                uid, conv, seq, stanza, _, ref = args
                qids.append(self._addInbox(uid, conv, seq, stanza, ref))
            elif part.kind == "dedupe":
                sender, clientId, conv, seq, mid, created = args
                self._duplicates[(sender, clientId)] = Duplicate(conv, seq, mid, created)
            elif part.kind == "stance":
                self.setStance(*args)
            elif part.kind == "member":
                gid, uid, role, joined, muted = args
                self._members.setdefault(gid, {})[uid] = Member(uid, role, joined, muted)
            elif part.kind == "unmember":
                gid, uid = args
                self._members.get(gid, {}).pop(uid, None)
            elif part.kind == "block":
                self.setGroupBlock(*args)
            else:
                return fail(ValueError(f"unknown part {part.kind!r}"))
        return succeed(qids).addCallback(self._keep, intent)

    def pendingIntents(self, before: float, limit: int) -> Deferred[list[Intent]]:
        found = sorted((i for i in self._intents.values() if i.created < before), key=lambda i: i.created)
        return succeed(found[:limit])

    def dropIntents(self, ids: list[bytes]) -> Deferred[None]:
        for id in ids:
            self._intents.pop(id, None)
        return succeed(None)

    def stanzasAt(self, rows: list[tuple[str, int]]) -> Deferred[dict[tuple[str, int], bytes]]:
        found = {}
        for conv, seq in rows:
            row = self._messages.get(conv, {}).get(seq)
            if row is not None:
                found[(conv, seq)] = row.stanza
        return succeed(found)

    def foundedBy(self, uid: str) -> Deferred[list[str]]:
        return succeed([g.gid for g in self._groups.values() if g.founder == uid and g.status == GROUP_ALIVE])

    def shardMap(self) -> Deferred[Any]:
        return succeed(self._shardMap)

    def createShardMap(self, shardMap: Any) -> Deferred[None]:
        if self._shardMap is None:
            self._shardMap = shardMap
        return succeed(None)

    def heartbeat(self, node: str, version: int) -> Deferred[tuple[int, bool]]:
        self.nodes[node] = version
        shardMap = self._shardMap
        return succeed((shardMap.version, shardMap.moving) if shardMap is not None else (0, False))

    def leave(self, node: str) -> Deferred[None]:
        self.nodes.pop(node, None)
        return succeed(None)

    def directoryStatus(self) -> Deferred[tuple[list[tuple[str, int, float]], list[dict[str, Any]]]]:
        return succeed(([(node, version, 0.0) for node, version in sorted(self.nodes.items())], []))


@implementer(IStoreFactory)
class MemoryStoreFactory:
    name = "memory"
    description = "Everything in memory; nothing survives a restart."

    def makeStore(self, config: Any, reactor: Any) -> MemoryStore:
        return MemoryStore()
