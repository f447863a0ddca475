# -*- test-case-name: timtx.test.test_loginguard -*-
"""
Budgets of failed logins, so that guessing passwords is slow and loud.

Three budgets, each with a number of free failures within C{window}
seconds, and past it an exponential backoff (1 s, 2 s, 4 s, ... up to
C{maxBackoff}) during which attempts are refused before any password is
hashed:

  - per address: one address guessing at many accounts;
  - per account and address: one address guessing at one account.  A
    legitimate user of that account from another address is not affected;
  - per account, across addresses: once more than C{spread} addresses have
    failed at one account within the window (a distributed guess), the
    account takes attempts only from addresses that logged in to it
    successfully before, until the window passes.

A success clears the account-and-address budget.  Memory is bounded: at
most C{maxKeys} addresses and accounts are remembered, least recently used
first forgotten.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

from twisted.internet.interfaces import IReactorTime

K = TypeVar("K", bound=Hashable)


class _Budget:
    __slots__ = ("failures", "last", "blockedUntil")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0
        self.blockedUntil = 0.0


class _Bounded(Generic[K]):
    """
    An LRU map of at most C{maxKeys} entries.
    """

    def __init__(self, maxKeys: int):
        self.maxKeys = maxKeys
        self._items: OrderedDict[K, object] = OrderedDict()

    def get(self, key: K) -> object | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: K, item: object) -> None:
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > self.maxKeys:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)


class LoginGuard:
    """
    @param freePerAddress: failures one address may make within C{window}
        before it backs off.
    @param freePerAccountAddress: failures one address may make at one
        account within C{window} before it backs off for that account.
    @param spread: addresses that may fail at one account within C{window}
        before the account takes logins only from addresses it knows.
    @param window: seconds after its last failure that a budget is
        forgotten.
    @param maxBackoff: the longest wait.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        freePerAddress: int = 20,
        freePerAccountAddress: int = 5,
        spread: int = 10,
        window: float = 900.0,
        maxBackoff: float = 900.0,
        maxKeys: int = 100_000,
    ):
        self.clock = clock
        self.freePerAddress = freePerAddress
        self.freePerAccountAddress = freePerAccountAddress
        self.spread = spread
        self.window = window
        self.maxBackoff = maxBackoff
        self._byAddress: _Bounded[str] = _Bounded(maxKeys)
        self._byAccountAddress: _Bounded[tuple[str, str]] = _Bounded(maxKeys)
        #: account -> {address: last failure}
        self._failingAddresses: _Bounded[str] = _Bounded(maxKeys)
        #: account -> {address: last success}
        self._knownAddresses: _Bounded[str] = _Bounded(maxKeys)
        #: Failed logins seen, and attempts refused by a budget.
        self.failures = 0
        self.refusals = 0

    def wait(self, uid: str | None, address: str) -> float:
        """
        Seconds until a login to C{uid} (C{None} for a token login) from
        C{address} may be tried; 0 if it may be tried now.  A refusal is
        counted.
        """
        now = self.clock.seconds()
        waits = [self._blocked(self._byAddress.get(address), now)]
        if uid is not None:
            waits.append(self._blocked(self._byAccountAddress.get((uid, address)), now))
            waits.append(self._spreadWait(uid, address, now))
        wait = max(waits)
        if wait > 0:
            self.refusals += 1
        return wait

    def failed(self, uid: str | None, address: str) -> None:
        """
        A login to C{uid} from C{address} failed.
        """
        now = self.clock.seconds()
        self.failures += 1
        self._fail(self._byAddress, address, self.freePerAddress, now)
        if uid is not None:
            self._fail(self._byAccountAddress, (uid, address), self.freePerAccountAddress, now)
            failing = self._failingAddresses.get(uid)
            if not isinstance(failing, dict):
                failing = {}
                self._failingAddresses.put(uid, failing)
            failing[address] = now
            if len(failing) > 4 * self.spread:
                # Bounded per account: keep the most recent.
                for old in sorted(failing, key=failing.__getitem__)[: len(failing) - 4 * self.spread]:
                    del failing[old]

    def succeeded(self, uid: str, address: str) -> None:
        """
        A login to C{uid} from C{address} succeeded.
        """
        self._byAccountAddress.pop((uid, address))
        known = self._knownAddresses.get(uid)
        if not isinstance(known, dict):
            known = {}
            self._knownAddresses.put(uid, known)
        known[address] = self.clock.seconds()
        if len(known) > 64:
            del known[min(known, key=known.__getitem__)]

    def _blocked(self, budget: object | None, now: float) -> float:
        if not isinstance(budget, _Budget) or now - budget.last > self.window:
            return 0.0
        return max(0.0, budget.blockedUntil - now)

    def _fail(self, table: _Bounded[K], key: K, free: int, now: float) -> None:
        budget = table.get(key)
        if not isinstance(budget, _Budget) or now - budget.last > self.window:
            budget = _Budget()
            table.put(key, budget)
        budget.failures += 1
        budget.last = now
        over = budget.failures - free
        if over > 0:
            budget.blockedUntil = now + min(self.maxBackoff, 2.0 ** (over - 1))

    def _spreadWait(self, uid: str, address: str, now: float) -> float:
        failing = self._failingAddresses.get(uid)
        if not isinstance(failing, dict):
            return 0.0
        recent: list[float] = [t for t in failing.values() if now - t <= self.window]
        if len(recent) <= self.spread:
            return 0.0
        known = self._knownAddresses.get(uid)
        if isinstance(known, dict) and address in known:
            return 0.0
        # Until enough of the failing addresses age out of the window.
        recent.sort()
        return max(0.0, recent[len(recent) - self.spread - 1] + self.window - now)
