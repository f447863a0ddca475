# -*- test-case-name: timtx.test.test_sharded -*-
"""
One store over several databases of one backend (shards), placed by slot
(see L{timtx.persistence.placement}).

The shard map lives in the first shard, the I{directory}, and every node
reads it from there: at start, then every C{map_poll} seconds (ten times as
often while a move is under way), when each node also records that it is
alive and which map version its calls use (a heartbeat the mover waits
on).  A node that could not confirm the map for C{map_lease} seconds
refuses calls: the mover may have moved slots meanwhile.

Calls that touch one shard go to it.  Writes that span shards — a 1:1
message stored with its conversation while the recipient's inbox lives
elsewhere, a membership kept by the group and by the user — are written in
an order that a crash cannot break:

  1. on the shard of the call's home key (the conversation, the group, the
     owner), the part that lives there together with an I{intent} row
     naming what is left for other shards, in one transaction: the fence
     of C{appendMessages} (a taken seq, a stored duplicate key) is
     checked here, and nothing
     happens elsewhere if it fails;
  2. the parts on the other shards, each safe to repeat (an inbox entry is
     made once per intent and index);
  3. the intent is forgotten.

The call succeeds only after step 2, so nothing is confirmed before it is
complete.  If step 2 fails, the call fails with L{StoreOutcomeUnknown} (it
is stored where it started and will be completed), and every node looks
for intents older than C{repair_interval} seconds and completes them.  An
inbox entry is therefore never written before the message it refers to,
and a confirmed message never lacks its inbox entry.  An inbox entry that
refers to a history row on another shard is read with that row in a second
step.

Duplicate keys of messages: a key is written in step 1, on the
conversation's shard, where the store fences it in the same transaction as
the message (L{timtx.persistence.errors.DuplicateConflict}); and, when the
sender's shard is another, copied there in step 2, where
C{recentDuplicates} reads it (that copy is an upsert: it never fences). So
a resend to the same conversation is always fenced, as on one store. What
is not fenced: the same key sent to two conversations on different shards
(a client reusing an id for another message, not a resend).  The key is
placed by both (L{timtx.persistence.placement.TABLES}), so moves carry it
with either.

Order: results are released in the order calls were made, as every store
promises, and a call's writes reach each shard in call order: a call
reserves, when it is made, its place on the shards its later steps will
use, so that a read issued after a write on the same shard runs after it.

Moves (L{timtx.persistence.pgmove}): while the mover switches a slot range
to another shard, the map marks it I{held}; a call touching it waits (and
every later call with it, to keep the order) until the map names the new
shard, or fails after C{statement_timeout}.  A call touches every key of
the rows it writes, both keys of a row kept on both sides even where it
writes one copy (a repair: L{timtx.persistence.placement.rowSlots}).
"""

from __future__ import annotations

import os
import random
import socket
from collections import Counter, deque
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.persistence.errors import StoreOutcomeUnknown, StoreUnavailable
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.placement import ShardMap, convKey, evenRanges, rowSlots, slotOf, statusOf
from timtx.persistence.pool import InOrder
from timtx.persistence.records import (
    Account,
    Duplicate,
    Group,
    InboxEntry,
    Intent,
    Member,
    NewMessage,
    Part,
    Relation,
    StoredMessage,
    TokenGrant,
)

_CANCELLED = object()

#: The SQLSTATE of a write refused by a move's fence (L{timtx.persistence.pgmove}).
FENCED = "TX001"


class _Reservation:
    __slots__ = ("fn", "result", "keys")

    def __init__(self, keys: frozenset[Any] | None) -> None:
        self.fn: Any = None
        self.result: Deferred[Any] = Deferred()
        self.keys = keys


class _Lane:
    """
    The order in which calls reach one shard, per placement key: a call is
    issued once no earlier call that touches one of its keys is still
    waiting (a reservation for a later step, made when that call was made,
    not yet filled).  Calls on other keys pass.  Issuing does not wait for
    the shard's answer: the shard's store keeps the order from there.

    Keys C{None} stand for every key (a call on every row of the shard).
    """

    def __init__(self) -> None:
        self._queue: list[_Reservation] = []
        self._pumping = False

    def run(self, fn: Callable[[], Deferred[Any]], keys: frozenset[Any] | None) -> Deferred[Any]:
        """
        Issue C{fn} after every earlier waiting call on C{keys}.
        """
        if not self._queue:
            return maybeDeferred(fn)
        reservation = self.reserve(keys)
        self.issue(reservation, fn)
        return reservation.result

    def reserve(self, keys: frozenset[Any] | None) -> _Reservation:
        reservation = _Reservation(keys)
        self._queue.append(reservation)
        return reservation

    def issue(self, reservation: _Reservation, fn: Any) -> None:
        reservation.fn = fn
        self._pump()

    def cancel(self, reservation: _Reservation) -> None:
        self.issue(reservation, _CANCELLED)

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            progress = True
            while progress:
                progress = False
                waiting: list[frozenset[Any] | None] = []
                index = 0
                while index < len(self._queue):
                    reservation = self._queue[index]
                    if reservation.fn is not None and not any(_overlap(reservation.keys, w) for w in waiting):
                        del self._queue[index]
                        progress = True
                        if reservation.fn is not _CANCELLED:
                            maybeDeferred(reservation.fn).chainDeferred(reservation.result)
                        continue
                    waiting.append(reservation.keys)
                    index += 1
        finally:
            self._pumping = False


def _overlap(a: frozenset[Any] | None, b: frozenset[Any] | None) -> bool:
    return a is None or b is None or not a.isdisjoint(b)


class _Call:
    __slots__ = ("ticket", "deferred", "done", "ok", "value", "start", "slots", "parkedAt", "version")

    def __init__(self, ticket: int, start: Callable[[_Call], Deferred[Any]], slots: Iterable[int]):
        self.ticket = ticket
        self.deferred: Deferred[Any] = Deferred()
        self.done = False
        self.ok = False
        self.value: Any = None
        self.start: Callable[[_Call], Deferred[Any]] | None = start
        self.slots = tuple(slots)
        self.parkedAt = 0.0
        self.version = 0


@implementer(IMessageStore)
class ShardedStore:
    """
    @param openShard: makes the store (an L{IShardStore}, not yet opened)
        of a DSN.
    @param bootstrap: the DSNs of the first shards, the first being the
        directory: the map is made from them if the directory has none.
    @param backend: the shards' plugin name, for logs.
    @param mapPoll: seconds between two looks at the map (a tenth of it
        while a move is under way).
    @param mapLease: seconds after which a node that could not confirm the
        map refuses calls.
    @param repairInterval: seconds between two looks for unfinished
        intents, and how old one must be to be finished by anyone.
    @param holdTimeout: seconds a call waits for a held slot.
    @param nodeName: this node's name in the heartbeats.
    """

    log = Logger()

    def __init__(
        self,
        openShard: Callable[[str], Any],
        bootstrap: list[str],
        clock: IReactorTime,
        *,
        backend: str,
        mapPoll: float = 1.0,
        mapLease: float = 10.0,
        repairInterval: float = 5.0,
        holdTimeout: float = 10.0,
        nodeName: str | None = None,
    ):
        if not bootstrap:
            raise ValueError("a sharded store needs at least one shard")
        self.name = f"{backend}, sharded"
        self._openShard = openShard
        self._bootstrap = list(bootstrap)
        self._clock = clock
        self.mapPoll = mapPoll
        self.mapLease = mapLease
        self.repairInterval = repairInterval
        self.holdTimeout = holdTimeout
        self.nodeName = nodeName or f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.directory: Any = None
        #: Shard id to its opened store.
        self.shards: dict[int, Any] = {}
        self._dsns: dict[int, str] = {}
        self._lanes: dict[int, _Lane] = {}
        self.map: ShardMap | None = None
        self._calls = InOrder(self._maybeClosed)
        self._parked: deque[_Call] = deque()
        self._ticket = 0
        self._inflight: Counter[int] = Counter()
        self._confirmed = 0.0
        self._pollCall: IDelayedCall | None = None
        self._repairCall: IDelayedCall | None = None
        self._holdCall: IDelayedCall | None = None
        self._polling: Deferred[Any] | None = None
        self._repairing: Deferred[Any] | None = None
        self._drops: dict[int, list[bytes]] = {}
        self._dropCall: IDelayedCall | None = None
        self._closing = False
        self._acking = False
        self._shutDown = False
        self._closed: Deferred[None] | None = None
        self._opening: dict[int, Deferred[Any]] = {}
        #: Intents finished by this node's repairs, for tests and monitoring.
        self.repaired = 0
        self._incidents = 0

    # Opening and closing.

    def open(self) -> Deferred[None]:
        d = maybeDeferred(self._open)
        return d

    def _open(self) -> Deferred[None]:
        self.directory = self._openShard(self._bootstrap[0])
        d: Deferred[Any] = self.directory.open()
        d.addCallback(lambda _: self.directory.shardMap())
        d.addCallback(self._bootstrapMap)
        d.addCallback(self._openShards)
        d.addCallback(lambda _: self._poll())
        d.addCallback(self._opened)
        d.addErrback(self._openFailed)
        return d

    def _bootstrapMap(self, found: ShardMap | None) -> Deferred[ShardMap]:
        if found is not None:
            extra = [dsn for dsn in self._bootstrap if dsn not in found.shards.values()]
            if extra:
                self.log.warn(
                    "[store] shards lists {count} databases the shard map does not: add them with "
                    "`python -m timtx shards add` (the map in the directory is what nodes use)",
                    count=len(extra),
                )
            return succeed(found)
        shards = dict(enumerate(self._bootstrap))
        proposed = ShardMap(1, shards, evenRanges(list(shards)))
        d: Deferred[Any] = self.directory.createShardMap(proposed)
        d.addCallback(lambda _: self.directory.shardMap())
        return d

    def _openShards(self, shardMap: ShardMap) -> Deferred[Any]:
        self.shards[0] = self.directory
        self._dsns[0] = shardMap.shards.get(0, self._bootstrap[0])
        waits = [self._openShardId(shard, dsn) for shard, dsn in shardMap.shards.items() if shard != 0]
        d = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        d.addCallback(lambda _: self._useMap(shardMap))
        d.addErrback(_first)
        return d

    def _openShardId(self, shard: int, dsn: str) -> Deferred[Any]:
        """
        Open the store of shard C{shard} (once).
        """
        if shard in self.shards:
            return succeed(self.shards[shard])
        if shard in self._opening:
            return self._opening[shard]
        store = self._openShard(dsn)
        d: Deferred[Any] = store.open()

        def opened(_: object) -> Any:
            self._opening.pop(shard, None)
            if self._closing:
                return store.close()
            self.shards[shard] = store
            self._dsns[shard] = dsn
            return store

        def failed(failure: Failure) -> Failure:
            self._opening.pop(shard, None)
            store.close()
            return failure

        d.addCallbacks(opened, failed)
        self._opening[shard] = d
        return d

    def _opened(self, _: object) -> None:
        self._schedulePoll()
        self._repairCall = self._clock.callLater(self.repairInterval, self._repair)

    def _openFailed(self, failure: Failure) -> Failure:
        for store in {id(s): s for s in [self.directory, *self.shards.values()] if s is not None}.values():
            store.close()
        self.shards.clear()
        return failure

    def close(self) -> Deferred[None]:
        if self._closed is not None:
            return self._closed
        self._closing = True
        self._closed = Deferred()
        for timer in (self._pollCall, self._repairCall, self._holdCall):
            if timer is not None and timer.active():
                timer.cancel()
        for parked in list(self._parked):
            self._finish(parked, False, Failure(StoreUnavailable(f"{self.name}: store closed")))
        self._parked.clear()
        self._flushDrops()
        self._maybeClosed()
        return self._closed

    def _maybeClosed(self) -> None:
        if not self._closing or self._calls or self._closed is None or self._shutDown:
            return
        self._shutDown = True
        waits = [d for d in (self._polling, self._repairing) if d is not None]
        closed = self._closed

        def closeStores(_: object) -> None:
            stores = {id(s): s for s in [self.directory, *self.shards.values()] if s is not None}
            if self.directory is not None and self.map is not None:
                leaving = self.directory.leave(self.nodeName)
                leaving.addErrback(lambda _: None)
            else:
                leaving = succeed(None)

            def shut(_: object) -> Deferred[Any]:
                return DeferredList([maybeDeferred(s.close) for s in stores.values()], consumeErrors=True)

            leaving.addCallback(shut)
            leaving.addCallback(lambda _: closed.callback(None))

        DeferredList(waits, consumeErrors=True).addCallback(closeStores)

    # Health.

    @property
    def available(self) -> bool:
        """
        Whether every shard can be reached and the map is confirmed.
        """
        if self.map is None or self._leaseExpired():
            return False
        return all(getattr(store, "available", True) for store in self.shards.values())

    @property
    def incidents(self) -> int:
        """
        The shards' incidents, and this store's own: a write left pending
        on another shard (its caller was told L{StoreOutcomeUnknown}) and
        each repair that completed one.  After either, a message may be
        stored (and its inbox entries made) that no one was pushed: its
        sender's resend is answered with it, matched by its duplicate key
        (L{timtx.delivery.inbox.InboxDelivery.recheckLive} delivers it).
        """
        return self._incidents + sum(getattr(store, "incidents", 0) for store in self.shards.values())

    def _leaseExpired(self) -> bool:
        return self._clock.seconds() - self._confirmed > self.mapLease

    def shardStatus(self) -> Deferred[dict[str, Any]]:
        """
        The shard map, the nodes' heartbeats and the recent moves with
        their progress, as C{python -m timtx shards status} shows them: for
        the admin API.

        @return: a L{Deferred} firing with a dict: C{version}, C{moving},
            C{shards} (id, database, slots, ranges), C{nodes} (node,
            version, seen), C{moves} (id, slots, source, target, phase,
            copied, total, started, updated, finished, detail).
        """
        if self.map is None or self.directory is None:
            return fail(StoreUnavailable(f"{self.name}: not open"))
        shardMap = self.map
        names = {
            self._dsns[shard]: getattr(store, "describe", None) or _describe(self._dsns[shard])
            for shard, store in self.shards.items()
            if shard in self._dsns
        }
        d: Deferred[Any] = self.directory.directoryStatus()
        d.addCallback(
            lambda found: statusOf(shardMap, found[0], found[1], lambda dsn: names.get(dsn) or _describe(dsn))
        )
        return d

    # The map.

    def _schedulePoll(self) -> None:
        if self._closing:
            return
        interval = self.mapPoll / 10 if (self.map is not None and (self.map.moving or self._parked)) else self.mapPoll
        self._pollCall = self._clock.callLater(interval, self._pollAgain)

    def _pollAgain(self) -> None:
        self._pollCall = None
        d = self._poll()
        d.addErrback(self._pollFailed)
        d.addBoth(lambda _: self._schedulePoll())

    def _poll(self) -> Deferred[Any]:
        """
        Record this node's heartbeat, and read the map if it changed.
        """
        started = self._clock.seconds()
        version = min(self._inflight) if self._inflight else (self.map.version if self.map else 0)
        d: Deferred[Any] = self.directory.heartbeat(self.nodeName, version)

        def seen(current: tuple[int, bool]) -> Any:
            latest, moving = current
            if self.map is not None and latest == self.map.version:
                self._confirmed = started
                if moving != self.map.moving:
                    self.map = ShardMap(self.map.version, self.map.shards, self.map.ranges, moving)
                return None
            reading: Deferred[Any] = self.directory.shardMap()
            reading.addCallback(self._newMap, started)
            return reading

        d.addCallback(seen)
        self._polling = d

        def done(result: Any) -> Any:
            self._polling = None
            if self._closing:
                self._maybeClosed()
            return result

        d.addBoth(done)
        return d

    def _newMap(self, shardMap: ShardMap, started: float) -> Deferred[Any]:
        new = {shard: dsn for shard, dsn in shardMap.shards.items() if shard not in self.shards}
        waits = [self._openShardId(shard, dsn) for shard, dsn in new.items()]
        d = DeferredList(waits, consumeErrors=True)

        def use(results: list[tuple[bool, Any]]) -> None:
            for ok, value in results:
                if not ok:
                    self.log.error("cannot open a new shard: {why}", why=value.getErrorMessage())
            self._useMap(shardMap)
            self._confirmed = started
            if not self._inflight.keys() - {shardMap.version}:
                self._acknowledge()

        d.addCallback(use)
        return d

    def _useMap(self, shardMap: ShardMap) -> None:
        old = self.map
        self.map = shardMap
        if old is not None and old.version != shardMap.version:
            self.log.info(
                "shard map {old} -> {new} ({held} slots held)",
                old=old.version,
                new=shardMap.version,
                held=sum(r.hi - r.lo + 1 for r in shardMap.ranges if r.held),
            )
        self._unpark()

    def _pollFailed(self, failure: Failure) -> None:
        self.log.warn("cannot read the shard map: {why}", why=failure.getErrorMessage())

    # Calls.

    def _submit(self, slots: Iterable[int], start: Callable[[_Call], Deferred[Any]]) -> Deferred[Any]:
        self._ticket += 1
        call = _Call(self._ticket, start, slots)
        self._calls.add(call)
        if self._closing:
            self._finish(call, False, Failure(StoreUnavailable(f"{self.name}: store closed")))
        elif self.map is None:
            self._finish(call, False, Failure(StoreUnavailable(f"{self.name}: not open")))
        elif self._leaseExpired():
            why = f"the shard map could not be confirmed for {self._clock.seconds() - self._confirmed:.0f}s"
            self._finish(call, False, Failure(StoreUnavailable(f"{self.name} is unavailable: {why}")))
        elif self._parked or (self.map.anyHeld and any(self.map.isHeld(s) for s in call.slots)):
            call.parkedAt = self._clock.seconds()
            self._parked.append(call)
            self._watchParked()
        else:
            self._start(call)
        return call.deferred

    def _start(self, call: _Call) -> None:
        assert self.map is not None and call.start is not None
        start, call.start = call.start, None
        call.version = self.map.version
        self._inflight[call.version] += 1
        try:
            d = start(call)
        except Exception:
            d = fail()
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(call,), errbackArgs=(call,))

    def _succeeded(self, value: Any, call: _Call) -> None:
        self._ended(call)
        self._finish(call, True, value)

    def _failed(self, failure: Failure, call: _Call) -> None:
        self._ended(call)
        self._finish(call, False, failure)

    def _ended(self, call: _Call) -> None:
        self._inflight[call.version] -= 1
        if not self._inflight[call.version]:
            del self._inflight[call.version]
            if (
                self.map is not None
                and call.version < self.map.version
                and not self._inflight.keys() - {self.map.version}
            ):
                # The last call under an older map is done: tell the mover
                # now rather than at the next look.
                self._acknowledge()

    def _acknowledge(self) -> None:
        """
        Send a heartbeat now, so that a mover waiting for this node to use
        the current map goes on at once.
        """
        if self._closing or self.map is None or self._acking:
            return
        self._acking = True

        def sent(_: object) -> None:
            self._acking = False

        d: Deferred[Any] = self.directory.heartbeat(self.nodeName, min(self._inflight, default=self.map.version))
        d.addBoth(sent)

    def _finish(self, call: _Call, ok: bool, value: Any) -> None:
        self._calls.finish(call, ok, value)

    def _unpark(self) -> None:
        shardMap = self.map
        assert shardMap is not None
        while self._parked:
            call = self._parked[0]
            if shardMap.anyHeld and any(shardMap.isHeld(s) for s in call.slots):
                return
            self._parked.popleft()
            self._start(call)

    def _watchParked(self) -> None:
        if self._holdCall is not None and self._holdCall.active():
            return
        if not self._parked:
            return
        if self._pollCall is not None and self._pollCall.active() and not (self.map and self.map.moving):
            # Look at the map soon: something is held.
            self._pollCall.cancel()
            self._pollCall = self._clock.callLater(self.mapPoll / 10, self._pollAgain)
        oldest = self._parked[0].parkedAt
        self._holdCall = self._clock.callLater(
            max(0.0, oldest + self.holdTimeout - self._clock.seconds()), self._holdExpired
        )

    def _holdExpired(self) -> None:
        self._holdCall = None
        now = self._clock.seconds()
        while self._parked and self._parked[0].parkedAt + self.holdTimeout <= now:
            call = self._parked.popleft()
            why = f"{self.name}: slots are being moved to another shard and did not come back within {self.holdTimeout:g}s"
            self._finish(call, False, Failure(StoreUnavailable(why)))
        self._watchParked()

    # Routing.

    def _shard(self, key: str | bytes) -> int:
        assert self.map is not None
        return self.map.shardOf(slotOf(key))

    def _lane(self, shard: int) -> _Lane:
        lane = self._lanes.get(shard)
        if lane is None:
            lane = self._lanes[shard] = _Lane()
        return lane

    def _store(self, shard: int) -> Any:
        store = self.shards.get(shard)
        if store is None:
            raise StoreUnavailable(f"{self.name}: shard {shard} is not open")
        return store

    def _run(self, shard: int, keys: frozenset[Any] | None, method: str, *args: Any) -> Deferred[Any]:
        """
        Call C{method(*args)} on shard C{shard}, in its order for C{keys}.
        """
        d = self._lane(shard).run(lambda: getattr(self._store(shard), method)(*args), keys)
        d.addErrback(self._fenced, shard)
        return d

    def _fenced(self, failure: Failure, shard: int) -> Failure:
        """
        A shard refused a write because its slot moved (the mover's fence):
        this node's map is out of date.  Say so as an outage, and look at
        the map at once.
        """
        if getattr(failure.value, "pgcode", None) != FENCED:
            return failure
        if self._pollCall is not None and self._pollCall.active():
            self._pollCall.reset(0)
        return Failure(StoreUnavailable(f"{self.name}: shard {shard} no longer holds that slot; try again"))

    def _on(self, key: str | bytes, method: str, *args: Any) -> Deferred[Any]:
        """
        Call C{method(*args)} on the shard of C{key}.
        """

        def start(call: _Call) -> Deferred[Any]:
            return self._run(self._shard(key), frozenset((key,)), method, *args)

        return self._submit((slotOf(key),), start)

    def _everywhere(self, method: str, *args: Any) -> Deferred[list[tuple[int, Any]]]:
        """
        Call C{method(*args)} on every shard.

        @return: C{(shard, result)} pairs.
        """

        def start(call: _Call) -> Deferred[Any]:
            shards = sorted(self.shards)
            waits = [self._run(s, None, method, *args) for s in shards]
            d = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
            d.addCallback(lambda results: [(s, value) for s, (_, value) in zip(shards, results, strict=True)])
            d.addErrback(_first)
            return d

        return self._submit((), start)

    def _staged(
        self,
        home: str | bytes,
        first: Callable[[Any, Intent | None], Any],
        parts: list[Part],
        combine: Callable[[Any, list[int]], Any],
    ) -> Deferred[Any]:
        """
        A write that spans shards: C{first(store, intent)} on the shard of
        C{home}, then C{parts} on theirs (see the module docstring).

        @param parts: every part, local ones included; those on C{home}'s
            shard are given to C{first} through its own arguments by the
            caller, so they are dropped here.
        @param combine: makes the call's result from C{first}'s and the
            qids of the remote inbox parts, in order.
        """
        slots = {slotOf(home), *(slotOf(p.key) for p in parts)}

        def start(call: _Call) -> Deferred[Any]:
            shard = self._shard(home)
            remote: dict[int, list[Part]] = {}
            for part in parts:
                target = self._shard(part.key)
                if target != shard:
                    remote.setdefault(target, []).append(part)
            local = frozenset([home, *(p.key for p in parts if self._shard(p.key) == shard)])
            if not remote:
                alone = self._lane(shard).run(lambda: first(self._store(shard), None), local)
                alone.addErrback(self._fenced, shard)
                alone.addCallback(combine, [])
                return alone
            intent = Intent(os.urandom(16), self._clock.seconds(), tuple(p for ps in remote.values() for p in ps))
            reservations = {
                target: self._lane(target).reserve(frozenset(p.key for p in ps)) for target, ps in remote.items()
            }
            d = self._lane(shard).run(lambda: first(self._store(shard), intent), local)
            d.addErrback(self._fenced, shard)

            def firstFailed(failure: Failure) -> Failure:
                for target, reservation in reservations.items():
                    self._lane(target).cancel(reservation)
                return failure

            def firstDone(value: Any) -> Deferred[Any]:
                waits = []
                for target, reservation in reservations.items():
                    targetParts = remote[target]
                    self._lane(target).issue(
                        reservation, lambda t=target, ps=targetParts: self._store(t).applyParts(ps, None)
                    )
                    waits.append(reservation.result)
                rest = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

                def done(results: list[tuple[bool, list[int]]]) -> Any:
                    self._drop(shard, intent.id)
                    qids: dict[int, list[int]] = {t: list(r) for t, (_, r) in zip(reservations, results, strict=True)}
                    remoteQids = []
                    for part in intent.parts:
                        if part.kind == "inbox":
                            remoteQids.append(qids[self._shard(part.key)].pop(0))
                    return combine(value, remoteQids)

                def incomplete(failure: Failure) -> Failure:
                    self._incidents += 1
                    why = _first(failure).getErrorMessage()
                    return Failure(
                        StoreOutcomeUnknown(
                            f"{self.name}: stored on shard {shard}, the rest is pending on another shard ({why}); "
                            "it will be completed"
                        )
                    )

                rest.addCallbacks(done, incomplete)
                return rest

            d.addCallbacks(firstDone, firstFailed)
            return d

        return self._submit(slots, start)

    #: Seconds intents that are done wait to be deleted together: one
    #: statement per shard for all of them, rather than one more commit
    #: per batch.  Well below L{repairInterval}, so that a repair never
    #: finds one that is done.
    dropDelay = 0.2

    def _drop(self, shard: int, intentId: bytes) -> None:
        """
        Forget an intent that is done, with the others of the next moment.
        """
        self._drops.setdefault(shard, []).append(intentId)
        if self._dropCall is None:
            self._dropCall = self._clock.callLater(min(self.dropDelay, self.repairInterval / 10), self._flushDrops)

    def _flushDrops(self) -> None:
        if self._dropCall is not None and self._dropCall.active():
            self._dropCall.cancel()
        self._dropCall = None
        drops, self._drops = self._drops, {}
        for shard, ids in drops.items():
            store = self.shards.get(shard)
            if store is not None:
                # Left for the repair if it fails: finishing twice is safe.
                store.dropIntents(ids).addErrback(lambda _: None)

    # Repairs.

    def _repair(self) -> None:
        """
        Finish intents that stayed unfinished (a node died between the
        steps of a write, or a shard was unreachable).
        """
        self._repairCall = None
        if self._closing:
            return
        d = self._repairOnce()
        self._repairing = d

        def again(result: Any) -> None:
            self._repairing = None
            if isinstance(result, Failure):
                self.log.warn("finishing writes left pending failed: {why}", why=result.getErrorMessage())
            if self._closing:
                self._maybeClosed()
            else:
                self._repairCall = self._clock.callLater(self.repairInterval, self._repair)

        d.addBoth(again)

    def repair(self) -> Deferred[int]:
        """
        Finish every intent older than C{repair_interval} now.

        @return: a L{Deferred} firing with how many were finished.
        """
        return self._repairOnce()

    def _repairOnce(self) -> Deferred[int]:
        before = self._clock.seconds() - self.repairInterval
        shards = sorted(self.shards)
        waits = [self._repairShard(shard, before) for shard in shards]
        d: Deferred[Any] = DeferredList(waits, consumeErrors=True)

        def counted(results: list[tuple[bool, Any]]) -> int:
            for ok, value in results:
                if not ok:
                    raise value.value
            return sum(value for _, value in results)

        d.addCallback(counted)
        return d

    def _repairShard(self, shard: int, before: float) -> Deferred[int]:
        store = self.shards[shard]
        d: Deferred[Any] = store.pendingIntents(before, 100)

        def finish(intents: list[Intent]) -> Deferred[int]:
            waits = [self._finishIntent(shard, intent) for intent in intents]
            return DeferredList(waits, consumeErrors=True).addCallback(lambda rs: sum(1 for ok, _ in rs if ok))

        d.addCallback(finish)
        return d

    def _finishIntent(self, home: int, intent: Intent) -> Deferred[None]:
        def start(call: _Call) -> Deferred[Any]:
            byShard: dict[int, list[Part]] = {}
            for part in intent.parts:
                byShard.setdefault(self._shard(part.key), []).append(part)
            waits = [self._run(s, frozenset(p.key for p in ps), "applyParts", ps, None) for s, ps in byShard.items()]
            d: Deferred[Any] = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

            def done(_: object) -> Any:
                self.repaired += 1
                self._incidents += 1
                dropped: Deferred[None] = self._store(home).dropIntents([intent.id])
                return dropped

            d.addCallbacks(done, _first)
            return d

        # Every key of the rows written, not only the parts' own: a part is
        # a row's copy on one side, and the row's other key may be held.
        return self._submit((slot for p in intent.parts for slot in rowSlots(p)), start)

    # IMessageStore: accounts and tokens.

    def createAccount(self, account: Account) -> Deferred[bool]:
        return self._on(account.uid, "createAccount", account)

    def getAccount(self, uid: str) -> Deferred[Account | None]:
        return self._on(uid, "getAccount", uid)

    def setPasswordHash(self, uid: str, passwordHash: str) -> Deferred[bool]:
        return self._on(uid, "setPasswordHash", uid, passwordHash)

    def addToken(self, key: bytes, grant: TokenGrant, expires: float) -> Deferred[None]:
        return self._on(key, "addToken", key, grant, expires)

    def takeToken(self, key: bytes, now: float) -> Deferred[TokenGrant | None]:
        return self._on(key, "takeToken", key, now)

    def purgeTokens(self, now: float) -> Deferred[int]:
        return self._purge("purgeTokens", now)

    def _purge(self, method: str, *args: Any) -> Deferred[int]:
        # A move copies rows: a purge meanwhile could differ between the
        # copies.  Expired rows wait for the next purge.
        if self.map is not None and self.map.moving:
            return succeed(0)
        d: Deferred[Any] = self._everywhere(method, *args)
        d.addCallback(lambda results: sum(count for _, count in results))
        return d

    # Messages.

    def appendMessages(self, messages: list[NewMessage]) -> Deferred[list[list[int]]]:
        if not messages:
            return succeed([])
        home = convKey(messages[0].conv)
        if self.map is not None and len({self._shard(convKey(m.conv)) for m in messages}) > 1:
            return fail(ValueError("a sharded store appends messages of conversations on one shard per call"))
        parts: list[Part] = []
        refBase = os.urandom(12)
        index = 0
        for m in messages:
            for uid, stanza in m.inbox:
                index += 1
                ref = refBase + index.to_bytes(4, "big")
                parts.append(
                    Part("inbox", uid, (uid, m.conv, m.seq if stanza is None else None, stanza, m.created, ref))
                )
            if m.dedupe is not None:
                sender, clientId = m.dedupe
                parts.append(Part("dedupe", sender, (sender, clientId, m.conv, m.seq, m.mid, m.created)))

        def first(store: Any, intent: Intent | None) -> Any:
            if intent is None:
                return store.appendMessages(messages)
            local = self._localMessages(messages, intent)
            return store.appendStaged(local, intent)

        def combine(localQids: list[list[int]], remoteQids: list[int]) -> list[list[int]]:
            shard = self._shard(home)
            remote = iter(remoteQids)
            result = []
            for m, own in zip(messages, localQids, strict=True):
                mine = iter(own)
                result.append([next(mine) if self._shard(uid) == shard else next(remote) for uid, _ in m.inbox])
            return result

        return self._staged(home, first, parts, combine)

    def _localMessages(self, messages: list[NewMessage], intent: Intent) -> list[NewMessage]:
        """
        C{messages} with only the inbox entries that live on their
        conversation's shard, and every duplicate key: a key is always
        written with its message, where the store fences it (see the module
        docstring), and copied to its sender's shard as a part.
        """
        shard = self._shard(convKey(messages[0].conv))
        local = []
        for m in messages:
            inbox = tuple(entry for entry in m.inbox if self._shard(entry[0]) == shard)
            local.append(NewMessage(m.conv, m.seq, m.mid, m.sender, m.stanza, m.created, inbox, m.dedupe))
        return local

    def lastMessage(self, conv: str) -> Deferred[tuple[int, int]]:
        return self._on(convKey(conv), "lastMessage", conv)

    def getMessage(self, conv: str, mid: int) -> Deferred[StoredMessage | None]:
        return self._on(convKey(conv), "getMessage", conv, mid)

    def replaceMessage(
        self, conv: str, seq: int, stanza: bytes, state: int, notices: list[tuple[str, bytes]], created: float
    ) -> Deferred[list[int]]:
        home = convKey(conv)
        parts = self._inboxParts(notices, conv, created)

        def first(store: Any, intent: Intent | None) -> Any:
            if intent is None:
                return store.replaceMessage(conv, seq, stanza, state, notices, created)
            shard = self._shard(home)
            local = [(uid, body) for uid, body in notices if self._shard(uid) == shard]
            return store.stagedWrite("replaceMessage", (conv, seq, stanza, state, local, created), intent)

        return self._staged(home, first, parts, self._mergedQids(home, [uid for uid, _ in notices]))

    def _inboxParts(self, entries: list[tuple[str, bytes]], conv: str | None, created: float) -> list[Part]:
        refBase = os.urandom(12)
        return [
            Part("inbox", uid, (uid, conv, None, body, created, refBase + i.to_bytes(4, "big")))
            for i, (uid, body) in enumerate(entries)
        ]

    def _mergedQids(self, home: str, uids: list[str]) -> Callable[[list[int], list[int]], list[int]]:
        def combine(local: list[int], remote: list[int]) -> list[int]:
            shard = self._shard(home)
            mine, theirs = iter(local), iter(remote)
            return [next(mine) if self._shard(uid) == shard else next(theirs) for uid in uids]

        return combine

    def history(self, conv: str, beforeMid: int | None, limit: int) -> Deferred[list[StoredMessage]]:
        return self._on(convKey(conv), "history", conv, beforeMid, limit)

    def recentDuplicates(self, sender: str, since: float) -> Deferred[dict[int, Duplicate]]:
        return self._on(sender, "recentDuplicates", sender, since)

    def purgeDuplicates(self, before: float) -> Deferred[int]:
        return self._purge("purgeDuplicates", before)

    def messagesAfter(self, conv: str, afterSeq: int, limit: int) -> Deferred[list[StoredMessage]]:
        return self._on(convKey(conv), "messagesAfter", conv, afterSeq, limit)

    # Inboxes.

    def addInbox(self, entries: list[tuple[str, bytes]], created: float) -> Deferred[list[int]]:
        if not entries:
            return succeed([])
        home = entries[0][0]
        parts = self._inboxParts(entries, None, created)

        def first(store: Any, intent: Intent | None) -> Any:
            if intent is None:
                return store.addInbox(entries, created)
            shard = self._shard(home)
            local = [(uid, body) for uid, body in entries if self._shard(uid) == shard]
            return store.stagedWrite("addInbox", (local, created), intent)

        return self._staged(home, first, parts, self._mergedQids(home, [uid for uid, _ in entries]))

    def readInbox(self, uid: str, afterQid: int, limit: int) -> Deferred[list[InboxEntry]]:
        def start(call: _Call) -> Deferred[Any]:
            shard = self._shard(uid)
            d = self._lane(shard).run(lambda: self._store(shard).readInboxRaw(uid, afterQid, limit), frozenset((uid,)))
            d.addCallback(self._resolved, uid, shard)
            return d

        return self._submit((slotOf(uid),), start)

    def _resolved(
        self, rows: list[tuple[int, str | None, int | None, bytes | None]], uid: str, shard: int
    ) -> Deferred[Any]:
        """
        Entries with the stanzas of history rows on other shards read from
        there (a row missing everywhere drops its entry, as on one store).
        """
        wanted: dict[int, list[tuple[str, int]]] = {}
        for _, conv, seq, stanza in rows:
            if stanza is None and conv is not None and seq is not None:
                home = self._shard(convKey(conv))
                if home != shard:
                    wanted.setdefault(home, []).append((conv, seq))
        if not wanted:
            return succeed([InboxEntry(q, uid, c, s, b) for q, c, s, b in rows if b is not None])
        homes = list(wanted)
        d = DeferredList(
            [self._store(h).stanzasAt(wanted[h]) for h in homes], fireOnOneErrback=True, consumeErrors=True
        )

        def entries(results: list[tuple[bool, dict[tuple[str, int], bytes]]]) -> list[InboxEntry]:
            found: dict[tuple[str, int], bytes] = {}
            for _, stanzas in results:
                found.update(stanzas)
            out = []
            for qid, conv, seq, stanza in rows:
                if stanza is None and conv is not None and seq is not None:
                    stanza = found.get((conv, seq))
                if stanza is not None:
                    out.append(InboxEntry(qid, uid, conv, seq, stanza))
            return out

        d.addCallbacks(entries, _first)
        return d

    def deleteInbox(self, uid: str, qids: list[int]) -> Deferred[int]:
        return self._on(uid, "deleteInbox", uid, qids)

    def countInbox(self, uid: str) -> Deferred[int]:
        return self._on(uid, "countInbox", uid)

    # Relations and profiles.

    def relationsOf(self, uid: str) -> Deferred[list[Relation]]:
        return self._on(uid, "relationsOf", uid)

    def setStance(self, owner: str, other: str, stance: int) -> Deferred[None]:
        primary = Part("stance", owner, (owner, other, stance))
        mirror = Part("stance", other, (owner, other, stance))

        def first(store: Any, intent: Intent | None) -> Any:
            return store.applyParts([primary] if intent is not None else [primary, mirror], intent)

        return self._staged(owner, first, [mirror], lambda *_: None)

    def getProfile(self, uid: str) -> Deferred[bytes | None]:
        return self._on(uid, "getProfile", uid)

    def putProfile(self, uid: str, stanza: bytes) -> Deferred[None]:
        return self._on(uid, "putProfile", uid, stanza)

    def getInvisible(self, uid: str) -> Deferred[bool]:
        return self._on(uid, "getInvisible", uid)

    def setInvisible(self, uid: str, invisible: bool) -> Deferred[None]:
        return self._on(uid, "setInvisible", uid, invisible)

    # Groups.

    def createGroup(self, group: Group, founder: Member) -> Deferred[None]:
        mirror = Part("member", founder.uid, (group.gid, founder.uid, founder.role, founder.joined, founder.mutedUntil))

        def first(store: Any, intent: Intent | None) -> Any:
            if intent is None:
                return store.createGroup(group, founder)
            return store.stagedWrite("createGroup", (group, founder), intent)

        return self._staged(group.gid, first, [mirror], lambda *_: None)

    def getGroup(self, gid: str) -> Deferred[Group | None]:
        return self._on(gid, "getGroup", gid)

    def updateGroup(self, group: Group) -> Deferred[None]:
        return self._on(group.gid, "updateGroup", group)

    def countFounded(self, uid: str) -> Deferred[int]:
        # Groups live by group, so every shard is asked; a group is counted
        # on the shard the map gives it (a copy left by a move is not).
        d: Deferred[Any] = self._everywhere("foundedBy", uid)

        def count(results: list[tuple[int, list[str]]]) -> int:
            return sum(1 for shard, gids in results for gid in gids if self._shard(gid) == shard)

        d.addCallback(count)
        return d

    def groupMembers(self, gid: str) -> Deferred[list[Member]]:
        return self._on(gid, "groupMembers", gid)

    def groupsOf(self, uid: str) -> Deferred[list[str]]:
        return self._on(uid, "groupsOf", uid)

    def putMember(self, gid: str, member: Member) -> Deferred[None]:
        args = (gid, member.uid, member.role, member.joined, member.mutedUntil)
        primary = Part("member", gid, args)
        mirror = Part("member", member.uid, args)

        def first(store: Any, intent: Intent | None) -> Any:
            return store.applyParts([primary] if intent is not None else [primary, mirror], intent)

        return self._staged(gid, first, [mirror], lambda *_: None)

    def removeMembers(self, gid: str, uids: list[str]) -> Deferred[int]:
        mirrors = [Part("unmember", uid, (gid, uid)) for uid in uids]

        def first(store: Any, intent: Intent | None) -> Any:
            if intent is None:
                return store.removeMembers(gid, uids)
            return store.stagedWrite("removeMembers", (gid, uids), intent)

        return self._staged(gid, first, mirrors, lambda count, _: count)

    def addJoinRequest(self, gid: str, uid: str, created: float) -> Deferred[None]:
        return self._on(gid, "addJoinRequest", gid, uid, created)

    def takeJoinRequest(self, gid: str, uid: str) -> Deferred[bool]:
        return self._on(gid, "takeJoinRequest", gid, uid)

    def setGroupBlock(self, gid: str, uid: str, by: int, blocked: bool) -> Deferred[None]:
        primary = Part("block", gid, (gid, uid, by, blocked))
        mirror = Part("block", uid, (gid, uid, by, blocked))

        def first(store: Any, intent: Intent | None) -> Any:
            return store.applyParts([primary] if intent is not None else [primary, mirror], intent)

        return self._staged(gid, first, [mirror], lambda *_: None)

    def groupBlocks(self, gid: str) -> Deferred[dict[str, set[int]]]:
        return self._on(gid, "groupBlocks", gid)

    def userGroupBlocks(self, uid: str) -> Deferred[list[str]]:
        return self._on(uid, "userGroupBlocks", uid)

    def saveCursors(self, cursors: list[tuple[str, str, int]]) -> Deferred[None]:
        # Cursors only move forward, so a part saved twice, or saved where
        # another failed, does no harm: no intent is needed.
        def start(call: _Call) -> Deferred[Any]:
            byShard: dict[int, list[tuple[str, str, int]]] = {}
            for cursor in cursors:
                byShard.setdefault(self._shard(cursor[0]), []).append(cursor)
            waits = [self._run(s, frozenset(c[0] for c in cs), "saveCursors", cs) for s, cs in byShard.items()]
            d = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
            d.addCallbacks(lambda _: None, _first)
            return d

        return self._submit((slotOf(uid) for uid, _, _ in cursors), start)

    def cursorsOf(self, uid: str) -> Deferred[dict[str, int]]:
        return self._on(uid, "cursorsOf", uid)

    # Sealed blobs: shard by shard, the rows each shard owns.

    def _notMoving(self) -> None:
        if self.map is not None and self.map.moving:
            raise StoreUnavailable(f"{self.name}: a move is under way; re-encryption waits for it")

    def sealedRows(
        self, kind: str, after: Any, limit: int, keep: bytes
    ) -> Deferred[tuple[list[tuple[Any, bytes]], Any]]:
        try:
            self._notMoving()
        except StoreUnavailable:
            return fail()
        shards = sorted(self.shards)
        shard, inner = after if after is not None else (shards[0], None)
        placed = _PLACED[kind]

        def page(found: tuple[list[tuple[Any, bytes]], Any]) -> tuple[list[tuple[Any, bytes]], Any]:
            rows, cursor = found
            mine = [(key, blob) for key, blob in rows if self._shard(placed(key)) == shard]
            if cursor is not None:
                return mine, (shard, cursor)
            later = [s for s in shards if s > shard]
            return mine, ((later[0], None) if later else None)

        d: Deferred[Any] = self._run(shard, None, "sealedRows", kind, inner, limit, keep)
        d.addCallback(page)
        return d

    def replaceSealed(self, kind: str, rows: list[tuple[Any, bytes, bytes]]) -> Deferred[int]:
        try:
            self._notMoving()
        except StoreUnavailable:
            return fail()
        byShard: dict[int, list[tuple[Any, bytes, bytes]]] = {}
        placed = _PLACED[kind]
        for key, old, new in rows:
            byShard.setdefault(self._shard(placed(key)), []).append((key, old, new))
        waits = [
            self._run(shard, frozenset(placed(k) for k, _, _ in some), "replaceSealed", kind, some)
            for shard, some in byShard.items()
        ]
        d: Deferred[Any] = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        d.addCallbacks(lambda results: sum(count for _, count in results), _first)
        return d

    def sealedKeys(self, kind: str) -> Deferred[dict[int, int]]:
        try:
            self._notMoving()
        except StoreUnavailable:
            return fail()
        d: Deferred[Any] = self._everywhere("sealedKeys", kind)

        def total(results: list[tuple[int, dict[int, int]]]) -> dict[int, int]:
            counts: dict[int, int] = {}
            for _, found in results:
                for keyId, count in found.items():
                    counts[keyId] = counts.get(keyId, 0) + count
            return counts

        d.addCallback(total)
        return d


#: The placement key of a sealed row's key, by kind.
_PLACED: dict[str, Callable[[Any], str]] = {
    "message": lambda key: convKey(key[0]),
    "inbox": lambda key: key[0],
    "profile": lambda key: key[0],
    "group": lambda key: key[0],
}


def _describe(dsn: str) -> str:
    """
    A shard's database without what may be secret in its DSN.
    """
    words = [w for w in dsn.split() if not w.startswith("password=")]
    if "://" in dsn and "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        return f"{scheme}://{rest.rsplit('@', 1)[1]}"
    return " ".join(words)


def _first(failure: Failure) -> Failure:
    """
    The failure inside a L{DeferredList}'s C{FirstError}.
    """
    sub = getattr(failure.value, "subFailure", None)
    return sub if isinstance(sub, Failure) else failure
