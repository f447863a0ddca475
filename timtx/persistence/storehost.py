# -*- test-case-name: timtx.test.test_hostedstore -*-
"""
The child's side of L{timtx.persistence.hosted.HostedStore}: a store
serving the calls its parent sends over a pipe, and the framing both sides
use.

Both directions carry frames: a 4-byte big-endian length, then a pickle.
The parent sends C{(callId, method, args)}; the child answers
C{(callId, ok, value)}, where C{value} is the result or, if C{ok} is
false, the exception.  Call id 0 is the child's word on opening the
database, sent once.  The pipe joins a process to its own child, so
nothing it unpickles comes from anyone else.

The process itself is L{timtx.persistence.sqlitehost}.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Callable, Iterator

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from zope.interface.interface import Method

from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.worker import InlineWorker

_LENGTH = struct.Struct(">I")

#: Most bytes taken from the pipe at once.
_READ = 1 << 20

#: The call id of the child's answer to opening the database.
OPENED = 0


def packFrame(value: Any) -> bytes:
    """
    One frame: the length of C{value}'s pickle, then the pickle.
    """
    body = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """
    Splits a byte stream into the values of its frames.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        """
        Take C{data}; yield the value of each frame it completes.
        """
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if end - start - 4 < length:
                break
            value = pickle.loads(memoryview(buffer)[start + 4 : start + 4 + length])
            start += 4 + length
            yield value
        del buffer[:start]


#: The L{IMessageStore} calls that cross the pipe: every method but
#: opening and closing, which each side does for itself.
FORWARDED = frozenset(
    name for name in IMessageStore.names() if name not in ("open", "close") and isinstance(IMessageStore[name], Method)
)


def storeMethods(store: Any) -> frozenset[str]:
    """
    The L{FORWARDED} calls C{store} has: what a parent may call (and all
    it may call).
    """
    return frozenset(name for name in FORWARDED if callable(getattr(store, name, None)))


def sendable(error: BaseException) -> BaseException:
    """
    C{error}, or a plain L{RuntimeError} saying what it was if it cannot
    be pickled (a driver's exception holding a connection, say).
    """
    try:
        pickle.loads(pickle.dumps(error, pickle.HIGHEST_PROTOCOL))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


class StoreHost:
    """
    Serves one parent: reads the calls that have arrived, runs them as one
    batch (one transaction, group commit), writes their answers, and again
    until the parent closes the pipe.

    No reactor and no thread: the process does nothing else, and a second
    thread would only take the GIL from the first.  While a batch commits,
    the next calls wait in the pipe, and become the next batch.

    @param store: the store, not yet opened, whose worker is an
        L{InlineWorker}.
    @param read: C{read(n)} returns up to C{n} bytes, blocking for at
        least one; C{b""} at the end.
    @param ready: C{ready()} tells whether C{read} would not block.
    @param write: writes all of a C{bytes}.
    """

    def __init__(
        self,
        store: Any,
        worker: InlineWorker,
        read: Callable[[int], bytes],
        ready: Callable[[], bool],
        write: Callable[[bytes], None],
    ):
        self.store = store
        self._worker = worker
        self._read = read
        self._ready = ready
        self._write = write
        self._methods = storeMethods(store)
        self._reader = FrameReader()
        self._answers: list[bytes] = []
        self._parentGone = False

    def serve(self) -> None:
        """
        Open the store, serve until the end of the input, close the store.
        """
        opened: list[Any] = []
        self.store.open().addBoth(opened.append)
        if isinstance(opened[0], Failure):
            self._refuse(opened[0], OPENED)
            self._send()
            return
        self._answer(None, OPENED)
        self._send()
        try:
            while self._take():
                self._worker.flush()
                self._send()
        finally:
            self.store.close()
            self._send()

    def _take(self) -> bool:
        """
        Read what has arrived (waiting for something) and queue its calls.

        @return: C{False} at the end of the input.
        """
        data = self._read(_READ)
        while data:
            for callId, name, args in self._reader.feed(data):
                self._call(callId, name, args)
            if not self._ready() or self._worker.pending >= self._worker.batchMax:
                # Nothing more now, or a batch's worth: a parent that
                # never stops writing must still get answers.
                return True
            data = self._read(_READ)
        return False

    def _call(self, callId: int, name: str, args: tuple[Any, ...]) -> None:
        if name not in self._methods:
            self._answer(AttributeError(f"the store has no method {name!r}"), callId, ok=False)
            return
        d = maybeDeferred(getattr(self.store, name), *args)
        d.addCallbacks(self._answer, self._refuse, callbackArgs=(callId,), errbackArgs=(callId,))

    def _refuse(self, failure: Failure, callId: int) -> None:
        error = failure.value if failure.value is not None else RuntimeError(failure.getErrorMessage())
        self._answer(sendable(error), callId, ok=False)

    def _answer(self, value: Any, callId: int, ok: bool = True) -> None:
        try:
            frame = packFrame((callId, ok, value))
        except Exception as e:
            frame = packFrame((callId, False, RuntimeError(f"the store's answer cannot be sent: {e}")))
        self._answers.append(frame)

    def _send(self) -> None:
        answers, self._answers = b"".join(self._answers), []
        if answers and not self._parentGone:
            try:
                self._write(answers)
            except OSError:
                # The parent is gone; what it sent is still committed.
                self._parentGone = True
