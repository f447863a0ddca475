# -*- test-case-name: timtx.test.test_admin -*-
"""
Accounts an operator blocked from logging in (tim's C{/timBlockUser}).

A block lasts a number of seconds, as in tim; a blocked account cannot log
in until it ends or is lifted.  Unlike tim, whose list lives only in the
memory of one node, blocks are written to a file in the data directory, so
that a restart does not lift them.  Every node of a cluster reads its own
file: the cluster must copy a block to every node (see C{docs/admin.md}).
"""

from __future__ import annotations

import json
import os
import tempfile

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: The longest block: 100 years, far beyond any account's life.
MAX_BLOCK_SECONDS = 100 * 365 * 86400


class UserBans:
    """
    Blocked accounts and when each block ends (Unix seconds of C{clock}).

    @param path: the file the list is kept in, or C{None} to keep it in
        memory only (tests).
    @param maxEntries: most blocks held; blocking more fails.
    """

    log = Logger()

    def __init__(self, path: str | None, clock: IReactorTime, maxEntries: int = 1_000_000):
        self.path = path
        self.clock = clock
        self.maxEntries = maxEntries
        self._until: dict[str, float] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # Refusing to start would leave the node down over a list an
            # operator can rebuild; say so loudly instead.
            self.log.error("cannot read blocked accounts from {path}: {error}", path=path, error=str(e))
            return
        if isinstance(stored, dict):
            for uid, until in stored.items():
                if isinstance(uid, str) and isinstance(until, (int, float)):
                    self._until[uid] = float(until)

    def _save(self) -> None:
        if self.path is None:
            return
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".blocks-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._until, f)
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise

    def block(self, uid: str, seconds: float) -> float:
        """
        Block C{uid} for C{seconds} from now (a new block replaces an old
        one).

        @return: when the block ends.
        @raise ValueError: if C{seconds} is not positive, or too many
            accounts are blocked.
        """
        if not 0 < seconds <= MAX_BLOCK_SECONDS:
            raise ValueError(f"seconds must be from 1 to {MAX_BLOCK_SECONDS}")
        self._purge()
        if uid not in self._until and len(self._until) >= self.maxEntries:
            raise ValueError(f"at most {self.maxEntries} accounts may be blocked")
        until = self.clock.seconds() + seconds
        self._until[uid] = until
        self._save()
        return until

    def unblock(self, uid: str) -> bool:
        """
        Lift the block on C{uid}.

        @return: whether there was one.
        """
        found = self._until.pop(uid, None) is not None
        if found:
            self._save()
        return found

    def blockedUntil(self, uid: str) -> float | None:
        """
        When the block on C{uid} ends, or C{None} if it is not blocked.
        """
        until = self._until.get(uid)
        if until is None:
            return None
        if until <= self.clock.seconds():
            del self._until[uid]
            return None
        return until

    def blocked(self) -> dict[str, float]:
        """
        Every account blocked now, with when its block ends.
        """
        self._purge()
        return dict(self._until)

    def _purge(self) -> None:
        now = self.clock.seconds()
        for uid in [uid for uid, until in self._until.items() if until <= now]:
            del self._until[uid]
