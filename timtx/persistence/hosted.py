# -*- test-case-name: timtx.test.test_hostedstore -*-
"""
The SQLite store, run in a child process of the node.

Why: in one process, the SQLite thread's Python work (binding each row,
reading each result) holds the GIL the reactor needs, so the node's two
threads share about one core however many the machine has
(docs/benchmarks.md, "The SQLite 1:1 path").  In a child process the
database work has a core, and a GIL, of its own; the node pays for
pickling each call and its answer over a pipe.

The child (L{timtx.persistence.sqlitehost}) runs an ordinary
L{SQLiteStore<timtx.persistence.sqlite.SQLiteStore>}, so the guarantees
are that store's: a call's answer is sent after its commit, calls run in
the order they were made, and writes queued together commit together.

If the child dies (killed, out of memory), the calls it had not answered
fail with L{StoreOutcomeUnknown} (an append may have been committed: its
sender is asked to resend, and the duplicate keys answer a resend of one
that was), the store reports itself unavailable and refuses calls with
L{StoreUnavailable}, and a new child is started after a backoff that
doubles.  If the node dies, the child reads the end of its stdin,
finishes and commits what it was given, and exits.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import timtx
from timtx.persistence.errors import StoreOutcomeUnknown, StoreUnavailable
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.storehost import FORWARDED, OPENED, FrameReader, packFrame

log = Logger()


def childEnvironment() -> dict[str, str]:
    """
    This process's environment, with which the child imports the timtx
    this one runs, installed or not.
    """
    home = os.path.dirname(os.path.dirname(os.path.abspath(timtx.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
    return env


#: Bytes of a line of the child's stderr kept whole; a longer one is
#: logged in pieces of this size.
MAX_ERROR_LINE = 4096


class _Child(ProcessProtocol):
    """
    One child process: its answers go to the store, and so does its end.
    What it writes on stderr (a traceback as it dies, a warning) goes to
    the node's log, line by line, where an operator looks.

    @ivar lastError: the last line it wrote on stderr.
    """

    def __init__(self, store: HostedStore):
        self.store = store
        self.reader = FrameReader()
        self.lastError = ""
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        for callId, ok, value in self.reader.feed(data):
            self.store._answered(callId, ok, value)

    def errReceived(self, data: bytes) -> None:
        *lines, partial = (self._partial + data).split(b"\n")
        while len(partial) > MAX_ERROR_LINE:
            lines.append(partial[:MAX_ERROR_LINE])
            partial = partial[MAX_ERROR_LINE:]
        self._partial = partial
        for line in lines:
            self._said(line)

    def _said(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            self.lastError = text
            pid = self.transport.pid if self.transport is not None else None
            log.warn("SQLite store process {pid}: {line}", pid=pid, line=text)

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._said(self._partial)
            self._partial = b""
        self.store._childEnded(self, reason)


def _forward(name: str) -> Callable[..., Deferred[Any]]:
    def call(self: HostedStore, *args: Any) -> Deferred[Any]:
        return self._call(name, args)

    call.__name__ = name
    call.__doc__ = f"L{{IMessageStore.{name}}}, run by the child process."
    return call


@implementer(IMessageStore)
class HostedStore:  # type: ignore[misc]  # the interface's methods are set below
    """
    An L{IMessageStore} whose SQLite work runs in a child process.

    @param path: the database file.
    @param synchronous: C{"full"} or C{"normal"}, as for L{SQLiteStore}.
    @param batchMax: most operations committed in one transaction.
    @param restartInitial: seconds before the first restart of a child
        that died; the wait doubles up to C{restartMax}, and is back to
        C{restartInitial} once a child has opened the database.
    """

    name = "sqlite"

    def __init__(
        self,
        reactor: Any,
        path: str,
        synchronous: str = "full",
        batchMax: int = 256,
        *,
        restartInitial: float = 0.5,
        restartMax: float = 10.0,
    ):
        self.path = path
        self._reactor = reactor
        self._argv = [sys.executable, "-m", "timtx.persistence.sqlitehost", path, synchronous, str(batchMax)]
        self._restartInitial = self._restartWait = restartInitial
        self._restartMax = restartMax
        self._ids = itertools.count(OPENED + 1)
        self._calls: dict[int, Deferred[Any]] = {}
        self._child: _Child | None = None
        self._ready = False
        self._opened: Deferred[None] | None = None
        self._closed: Deferred[None] | None = None
        self._restart: IDelayedCall | None = None
        #: Children started after one died, for tests and monitoring.
        self.restarts = 0

    @property
    def available(self) -> bool:
        """
        Whether a child has the database open and takes calls.
        """
        return self._ready and self._closed is None

    @property
    def pid(self) -> int | None:
        """
        The child's process id, while there is a child.
        """
        return self._child.transport.pid if self._child is not None and self._child.transport else None

    def status(self) -> dict[str, Any]:
        """
        For the admin API's store status: the child process.
        """
        return {"process": {"pid": self.pid, "restarts": self.restarts}}

    def open(self) -> Deferred[None]:
        self._opened = Deferred()
        self._spawn()
        return self._opened

    def close(self) -> Deferred[None]:
        if self._closed is None:
            self._closed = Deferred()
            if self._restart is not None and self._restart.active():
                self._restart.cancel()
            if self._child is None:
                self._closed.callback(None)
            elif self._child.transport is not None:
                # The child answers what it has, closes the database and
                # exits; _childEnded fires the Deferred.
                self._child.transport.closeStdin()
        return self._closed

    def _spawn(self) -> None:
        self._restart = None
        child = _Child(self)
        self._child = child
        self._reactor.spawnProcess(
            child, sys.executable, self._argv, env=childEnvironment(), childFDs={0: "w", 1: "r", 2: "r"}
        )

    def _call(self, name: str, args: tuple[Any, ...]) -> Deferred[Any]:
        if not self.available or self._child is None or self._child.transport is None:
            return fail(StoreUnavailable("the SQLite store process is not running"))
        callId = next(self._ids)
        d: Deferred[Any] = Deferred()
        self._calls[callId] = d
        self._child.transport.write(packFrame((callId, name, args)))
        return d

    def _answered(self, callId: int, ok: bool, value: Any) -> None:
        if callId == OPENED:
            self._childOpened(ok, value)
            return
        d = self._calls.pop(callId, None)
        if d is None:
            return
        if ok:
            d.callback(value)
        else:
            d.errback(Failure(value))

    def _childOpened(self, ok: bool, error: BaseException | None) -> None:
        opened, self._opened = self._opened, None
        if ok:
            self._ready = True
            self._restartWait = self._restartInitial
            if self.restarts:
                log.info("SQLite store process {pid} has the database open again", pid=self.pid)
            if opened is not None:
                opened.callback(None)
        elif opened is not None:
            # The first child could not open the database (a schema newer
            # than this timtx, a file that is not a database): the node
            # does not start.
            self._closed = Deferred()
            opened.errback(Failure(error))
        else:
            log.error("SQLite store process could not open the database: {error}", error=error)

    def _childEnded(self, child: _Child, reason: Failure) -> None:
        if child is not self._child:
            return
        self._child = None
        self._ready = False
        calls, self._calls = self._calls, {}
        for d in calls.values():
            d.errback(StoreOutcomeUnknown("the SQLite store process ended before it answered"))
        if self._closed is not None:
            if not self._closed.called:
                self._closed.callback(None)
            return
        if self._opened is not None:
            opened, self._opened = self._opened, None
            said = f" (its last words: {child.lastError})" if child.lastError else ""
            opened.errback(
                StoreUnavailable(f"the SQLite store process ended before it opened the database: {reason.value}{said}")
            )
            self._closed = Deferred()
            self._closed.callback(None)
            return
        wait = self._restartWait
        self._restartWait = min(wait * 2, self._restartMax)
        log.error(
            "SQLite store process ended ({why}{said}); calls fail as unavailable, restarting in {wait:.1f} s",
            why=reason.value,
            said=f"; its last words: {child.lastError}" if child.lastError else "",
            wait=wait,
        )
        self.restarts += 1
        self._restart = self._reactor.callLater(wait, self._spawn)


for _name in FORWARDED:
    setattr(HostedStore, _name, _forward(_name))
del _name
