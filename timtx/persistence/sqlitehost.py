# -*- test-case-name: timtx.test.test_hostedstore -*-
"""
The child process of L{timtx.persistence.hosted.HostedStore}: an ordinary
L{SQLiteStore} with an L{InlineWorker}, served by a
L{StoreHost<timtx.persistence.storehost.StoreHost>} on stdin and stdout.

    python -m timtx.persistence.sqlitehost PATH SYNCHRONOUS BATCH_MAX

It ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a service manager's
stop reach the whole process group): it ends when its parent closes its
stdin, or dies, after finishing and answering what it was given, so a
node that stops cleanly still has its last writes stored.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Any

from timtx.persistence.sqlite import SQLiteStore
from timtx.persistence.storehost import StoreHost
from timtx.persistence.worker import InlineWorker


def inlineStore(path: str, synchronous: str, batchMax: int) -> tuple[SQLiteStore, InlineWorker]:
    """
    A store of C{path} whose calls run when its worker is flushed, and
    that worker.
    """
    workers: list[InlineWorker] = []

    def inline(*args: Any, **kwargs: Any) -> InlineWorker:
        workers.append(InlineWorker(*args, **kwargs))
        return workers[-1]

    store = SQLiteStore(None, path, synchronous, batchMax, worker=inline)
    return store, workers[0]


def main(argv: list[str]) -> int:
    path, synchronous, batchMax = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The answers go out on the stdout we were given; anything else that
    # prints (a warning, a stray print) goes to stderr, not into a frame.
    answers = os.dup(1)
    os.dup2(2, 1)
    store, worker = inlineStore(path, synchronous, int(batchMax))
    poller = select.poll()
    poller.register(0, select.POLLIN)

    def writeAll(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(answers, view) :]

    host = StoreHost(store, worker, lambda n: os.read(0, n), lambda: bool(poller.poll(0)), writeAll)
    host.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
