# -*- test-case-name: timtx.test.test_roster -*-
"""
Notices a user must get at least once: a friend request, a kick from a
group, a recall.  Each is written to the user's inbox, then pushed through
the router; it leaves the inbox when a session acknowledges it.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from timtx.crypto.vault import StanzaVault
from timtx.delivery.encoded import Encoded
from timtx.interfaces import IRouter
from timtx.persistence.interfaces import IMessageStore
from timtx.protocols.structs import TimMessage


class Notices:
    def __init__(self, *, store: IMessageStore, vault: StanzaVault, router: IRouter, clock: IReactorTime):
        self.store = store
        self.vault = vault
        self.router = router
        self.clock = clock

    def notify(self, uid: str, message: TimMessage) -> Deferred[None]:
        """
        Put C{message} in C{uid}'s inbox and push it to its live sessions.
        """
        d: Deferred[list[int]] = self.store.addInbox([(uid, self.vault.sealFor(uid, message))], self.clock.seconds())
        return d.addCallback(lambda qids: self.router.push(uid, qids[0], Encoded(message)))
