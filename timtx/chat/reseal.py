# -*- test-case-name: timtx.test.test_reseal -*-
"""
Re-encryption at rest: moving every sealed blob (history rows, inbox
copies, profiles, group profiles) to the vault's write key, so that an
older key can be retired.

A pass pages through each kind of blob by primary key, reading only those
not sealed with the write key, opens each with the key that sealed it and
seals it again, and replaces it only if it is unchanged since it was read
(a recall or a profile change meanwhile wins).  It runs at a bounded rate,
in the background of a node (C{[store] reseal_rate}) or in the foreground
of C{python -m timtx keys reencrypt}; L{Resealer.status} says how far it
is, for the admin API.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from timtx.crypto.vault import SealError, StanzaVault, inboxAAD, messageAAD, profileAAD, roomAAD
from timtx.persistence.errors import StoreUnavailable
from timtx.persistence.interfaces import IMessageStore

#: The kinds of blobs, in the order a pass takes them.
KINDS = ("profile", "group", "inbox", "message")

_AAD: dict[str, Callable[[Any], bytes]] = {
    "message": lambda key: messageAAD(key[0], key[1]),
    "inbox": lambda key: inboxAAD(key[0]),
    "profile": lambda key: profileAAD(key[0]),
    "group": lambda key: roomAAD(key[0]),
}


class Resealer:
    """
    @param rate: most blobs re-encrypted per second (0: as fast as the
        store goes).
    @param batch: blobs read and replaced per store call.
    @param retryAfter: seconds to wait when the store is unavailable.
    """

    log = Logger()

    def __init__(
        self,
        *,
        store: IMessageStore,
        vault: StanzaVault,
        clock: IReactorTime,
        rate: float = 500.0,
        batch: int = 200,
        retryAfter: float = 5.0,
        progress: Callable[[str, int, int, str], None] | None = None,
    ):
        self.store = store
        self.vault = vault
        self.clock = clock
        self.rate = rate
        self.batch = batch
        self.retryAfter = retryAfter
        self.progress = progress
        self.state = "idle"
        self.kind: str | None = None
        self.resealed = 0
        self.unopened = 0
        self.total = 0
        self.byKey: dict[int, int] = {}
        self.started: float | None = None
        self.finished: float | None = None
        self.error = ""
        self._stopped = False
        self._running: Deferred[Any] | None = None
        self._sleeping: Deferred[None] | None = None

    def status(self) -> dict[str, Any]:
        """
        Where re-encryption is, for the admin API: C{state} (C{idle},
        C{counting}, C{running}, C{waiting} for the store, C{done},
        C{stopped}), the write key, the blob counts per key found when the
        pass started, how many were re-encrypted, how many did not open
        (a key missing from this node), and the kind being worked on.
        """
        return {
            "state": self.state,
            "writeKey": self.vault.writeKey,
            "keys": self.vault.keyIds,
            "byKey": dict(self.byKey),
            "total": self.total,
            "resealed": self.resealed,
            "unopened": self.unopened,
            "kind": self.kind,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
        }

    @inlineCallbacks
    def count(self) -> Any:
        """
        Blobs per key id, over every kind.

        @return: a L{Deferred} firing with a dict of key id to count.
        """
        counts: dict[int, int] = {}
        for kind in KINDS:
            found = yield self.store.sealedKeys(kind)
            for keyId, count in found.items():
                counts[keyId] = counts.get(keyId, 0) + count
        return counts

    def start(self) -> Deferred[Any]:
        """
        Run a pass in the background (once).
        """
        if self._running is None:
            self._running = self.run()
            self._running.addErrback(self._failed)
        return self._running

    def stop(self) -> None:
        """
        Stop after the batch under way.
        """
        self._stopped = True
        if self._sleeping is not None:
            self._sleeping.cancel()

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = deferLater(self.clock, seconds, lambda: None)
        d.addErrback(lambda f: f.trap(CancelledError) and None)
        self._sleeping = d

        def woke(_: object) -> None:
            self._sleeping = None

        d.addCallback(woke)
        return d

    def _failed(self, failure: Any) -> None:
        self.state = "stopped"
        self.error = failure.getErrorMessage()
        self.log.failure("re-encryption failed", failure)

    @inlineCallbacks
    def run(self) -> Any:
        """
        One pass over every kind.

        @return: a L{Deferred} firing with how many blobs were re-encrypted.
        """
        self.started = time.time()
        self.state = "counting"
        while True:
            try:
                self.byKey = yield self.count()
                break
            except StoreUnavailable as e:
                yield self._wait(str(e))
                if self._stopped:
                    return self.resealed
        self.total = sum(count for keyId, count in self.byKey.items() if keyId != self.vault.writeKey)
        self.state = "running"
        self._report("")
        for kind in KINDS:
            self.kind = kind
            yield self._kind(kind)
            if self._stopped:
                self.state = "stopped"
                return self.resealed
        self.kind = None
        self.state = "done"
        self.finished = time.time()
        self._report("done")
        if self.total:
            self.log.info(
                "re-encryption done: {count} blobs now sealed with key {key}; {unopened} did not open",
                count=self.resealed,
                key=self.vault.writeKey,
                unopened=self.unopened,
            )
        return self.resealed

    @inlineCallbacks
    def _kind(self, kind: str) -> Any:
        after: Any = None
        aad = _AAD[kind]
        keep = self.vault.writeHeader
        while not self._stopped:
            began = self.clock.seconds()
            try:
                rows, cursor = yield self.store.sealedRows(kind, after, self.batch, keep)
                replaced = []
                for key, blob in rows:
                    try:
                        new = self.vault.reseal(aad(key), blob)
                    except SealError:
                        self.unopened += 1
                        continue
                    if new is not None:
                        replaced.append((key, blob, new))
                if replaced:
                    self.resealed += yield self.store.replaceSealed(kind, replaced)
            except StoreUnavailable as e:
                yield self._wait(str(e))
                continue
            self.state = "running"
            self._report(kind)
            if cursor is None:
                return
            after = cursor
            if self.rate:
                pause = len(rows) / self.rate - (self.clock.seconds() - began)
                if pause > 0:
                    yield self._sleep(pause)

    def _wait(self, why: str) -> Deferred[None]:
        self.state = "waiting"
        self.error = why
        return self._sleep(0 if self._stopped else self.retryAfter)

    def _report(self, detail: str) -> None:
        if self.progress is not None:
            self.progress("reencrypt", self.resealed + self.unopened, self.total, detail)
