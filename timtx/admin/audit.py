# -*- test-case-name: timtx.test.test_admin -*-
"""
The audit log: one JSON line per admin action, appended to a file, and the
same as an event in the node's log.

Each line says when, who (the admin's name and role), from where (the
client's address), what (the action: the endpoint's name), on what (the
target: an account id, a room, an admin's name), and the outcome (C{ok},
or why it failed: C{unauthorized}, C{forbidden}, an error).  Refused logins
are recorded too.  Passwords, tokens and message bodies never are: each
endpoint names the few fields of its request that go into the line.
"""

from __future__ import annotations

import json
import os
from collections import deque
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: The most of the file's end L{AuditLog.tail} reads.
TAIL_BYTES = 1 << 20


class AuditLog:
    """
    @param path: the file lines are appended to.
    """

    log = Logger()

    def __init__(self, path: str, clock: IReactorTime):
        self.path = path
        self.clock = clock
        self._file: IO[str] | None = None
        #: Lines written since the node started, for metrics.
        self.records = 0

    def open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def record(
        self,
        action: str,
        *,
        admin: str | None,
        role: str | None,
        address: str | None,
        outcome: str = "ok",
        target: str | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        """
        Write one line and log it.

        @param details: a few plain fields worth keeping (a block's
            seconds, how many users a broadcast reached); never a secret.
        @return: the line, as a dict.
        """
        entry: dict[str, Any] = {
            "time": self.clock.seconds(),
            "admin": admin,
            "role": role,
            "address": address,
            "action": action,
            "target": target,
            "outcome": outcome,
        }
        entry.update(details)
        self.records += 1
        if self._file is not None:
            self._file.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            self._file.flush()
        self.log.info(
            "admin {adminAction} {adminTarget} by {adminName} from {adminAddress}: {adminOutcome}",
            adminAction=action,
            adminTarget=target or "-",
            adminName=admin or "-",
            adminAddress=address or "-",
            adminOutcome=outcome,
        )
        return entry

    def tail(self, limit: int) -> list[dict[str, Any]]:
        """
        The last C{limit} lines, newest last.
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - TAIL_BYTES))
                data = f.read()
        except FileNotFoundError:
            return []
        lines: deque[dict[str, Any]] = deque(maxlen=limit)
        for raw in data.splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # the first line of a partial read
            if isinstance(entry, dict):
                lines.append(entry)
        return list(lines)
