# -*- test-case-name: timtx.test.test_messaging -*-
"""
Who may send to whom: the rules of a 1:1 message, shared by messages and
big payloads (frame types 95 and 96).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from timtx.chat.accounts import AccountService
from timtx.chat.roster import RelationCache, areFriends, blocked
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError


class MessagePermissions:
    """
    @param noauth: whether users who are not friends may message each other
        (C{[messages] noauth}).
    """

    def __init__(self, relations: RelationCache, accounts: AccountService, noauth: bool):
        self.relations = relations
        self.accounts = accounts
        self.noauth = noauth

    @inlineCallbacks
    def check(self, uid: str, other: str, private: bool = False) -> Any:
        """
        @param private: between two members of a group: no friendship
            needed, blocks still apply.
        @raise TimProtocolError: 4110 if either blocks the other, 4106 if
            C{other} does not exist, 4105 if they are not friends (unless
            C{noauth}).
        """
        relation = yield self.relations.between(uid, other)
        if blocked(relation):
            raise TimProtocolError(ErrorCode.ERR_BLOCK, "blocked")
        if private or areFriends(relation):
            return
        # As tim: an unknown user is 4106 before friendship is looked at.
        if not (yield self.accounts.exists(other)):
            raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such user")
        if not self.noauth:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not friends")

    def knownAllowed(self, uid: str, other: str, private: bool = False) -> bool:
        """
        Whether the caches alone show that C{uid} may message C{other}, so
        that the usual message is checked without a L{Deferred}.
        """
        relations = self.relations.peek(uid)
        if relations is None:
            return False
        relation = relations.get(other)
        if relation is not None and blocked(relation):
            return False
        if private or (relation is not None and areFriends(relation)):
            return True
        return self.noauth and self.accounts.isKnown(other)
