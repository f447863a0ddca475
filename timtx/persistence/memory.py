# -*- test-case-name: timtx.test.test_store -*-
"""
A store that keeps everything in memory: for tests and for nodes that must
not write to disk.  Unlike tim's no-database mode it still checks passwords;
nothing survives a restart.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from timtx.persistence.interfaces import IMessageStore, IStoreFactory
from timtx.persistence.records import Account, TokenGrant


@implementer(IMessageStore)
class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}
        self._tokens: dict[bytes, tuple[TokenGrant, float]] = {}

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


@implementer(IStoreFactory)
class MemoryStoreFactory:
    name = "memory"
    description = "Everything in memory; nothing survives a restart."

    def makeStore(self, config: Any, reactor: Any) -> MemoryStore:
        return MemoryStore()
