# -*- test-case-name: timtx.test.test_store -*-
"""
What the engine keeps, behind one interface per storage plugin.

Every method returns a L{Deferred}; none blocks the reactor thread.  A
plugin may answer synchronously (the memory store does) or from a worker
thread (SQLite).  Results are delivered in the order the calls were made, so
a read issued after a write sees it.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IMessageStore(Interface):
    """
    The node's durable state: accounts and login tokens (this module), and,
    as later features land, messages, offline queues, rosters, groups and
    profiles.
    """

    name = Attribute("The plugin name, such as C{'sqlite'}.")

    def open():
        """
        Connect and bring the schema to the current version.

        @return: a L{Deferred} that fires when the store is usable.
        """

    def close():
        """
        Finish pending work and release connections.

        @return: a L{Deferred} that fires when done.
        """

    def createAccount(account):
        """
        Add an account unless its uid exists.

        @type account: L{timtx.persistence.records.Account}
        @return: a L{Deferred} firing with C{True}, or C{False} if the uid
            was taken (nothing is changed then).
        """

    def getAccount(uid):
        """
        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.Account}, or C{None}.
        """

    def setPasswordHash(uid, passwordHash):
        """
        @return: a L{Deferred} firing with C{True}, or C{False} if there is
            no such account.
        """

    def addToken(key, grant, expires):
        """
        Remember a one-time login token.

        @param key: the keyed hash of the token (bytes); the token itself is
            never stored.
        @type grant: L{timtx.persistence.records.TokenGrant}
        @param expires: Unix seconds after which the token is void.
        @return: a L{Deferred} that fires when it is stored.
        """

    def takeToken(key, now):
        """
        Use up a token: remove it and say what it granted.  A token can be
        taken once; an expired token grants nothing.

        @return: a L{Deferred} firing with the
            L{timtx.persistence.records.TokenGrant}, or C{None}.
        """

    def purgeTokens(now):
        """
        Forget expired tokens.

        @return: a L{Deferred} firing with how many were removed.
        """


class IStoreFactory(Interface):
    """
    A named storage plugin.  Built-in plugins are found by name in
    L{timtx.persistence}; others provide this interface from a module in
    C{twisted/plugins/}, as C{twisted.cred} finds checkers.
    """

    name = Attribute("The name used in C{[store] backend}.")
    description = Attribute("One line for operators.")

    def makeStore(config, reactor):
        """
        @type config: L{timtx.config.Config}
        @return: an L{IMessageStore} provider, not yet opened.
        """
