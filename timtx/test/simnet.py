# -*- test-case-name: timtx.test.test_groupsim -*-
"""
An in-memory network on one L{twisted.internet.task.Clock}, for whole
nodes: stream connections between named hosts, with seeded delays,
partitions, cut links and crashed hosts, and a clock per node that stops
when its node crashes.

Connections keep TCP's promises and no more: bytes arrive in order, each
write after a delay drawn from the connection's own seeded random source
(so the order in which code writes to different connections does not
shift the draws); across a partition they wait, and arrive once it heals
unless a timeout closed the connection first.  A crashed host's
connections are reset (its peers see them close) or, for a host that
vanishes, go silent.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

#: Seconds a dial across a partition (or to a vanished host) waits before
#: it fails.
CONNECT_TIMEOUT = 1.0


class HeapClock:
    """
    A L{Clock} whose calls wait in a heap: the simulation schedules
    thousands, and L{Clock} sorts its whole list on every call.  Calls due
    at the same time run in the order they were made, as with L{Clock}.
    """

    def __init__(self) -> None:
        self.rightNow = 0.0
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def seconds(self) -> float:
        return self.rightNow

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> DelayedCall:
        call = DelayedCall(self.rightNow + delay, f, args, kwargs, self._cancelled, self._push, seconds=self.seconds)
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        # A call reset or delayed is pushed again; its old entry is stale.
        heapq.heappush(self._heap, (call.getTime(), next(self._order), call))

    def _cancelled(self, call: DelayedCall) -> None:
        # Skipped when it comes up.
        pass

    def _live(self, entry: tuple[float, int, DelayedCall]) -> bool:
        when, _, call = entry
        return not (call.cancelled or call.called) and when == call.getTime()

    def getDelayedCalls(self) -> list[DelayedCall]:
        return list({id(entry[2]): entry[2] for entry in self._heap if self._live(entry)}.values())

    def nextTime(self) -> float | None:
        """
        When the next call is due, or C{None} if none waits.
        """
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        heap = self._heap
        while heap and heap[0][0] <= self.rightNow:
            entry = heapq.heappop(heap)
            if not self._live(entry):
                continue
            call = entry[2]
            call.called = 1
            call.func(*call.args, **call.kw)


@implementer(IDelayedCall)
class _DeadCall:
    """
    What a crashed node's clock returns: a call that never runs.
    """

    def __init__(self, when: float):
        self.when = when

    def getTime(self) -> float:
        return self.when

    def active(self) -> bool:
        return False

    def cancel(self) -> None:
        pass

    def delay(self, seconds: float) -> None:
        pass

    def reset(self, seconds: float) -> None:
        pass


@implementer(IReactorTime)
class NodeClock:
    """
    The shared clock as one node sees it: every call it schedules is
    cancelled when the node crashes (L{stop}), and none runs after.
    """

    def __init__(self, clock: HeapClock):
        self._clock = clock
        self._calls: set[IDelayedCall] = set()
        self.alive = True

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object) -> IDelayedCall:
        if not self.alive:
            dead: IDelayedCall = _DeadCall(self.seconds() + delay)
            return dead
        if len(self._calls) > 512:
            self._calls = {call for call in self._calls if call.active()}
        call = self._clock.callLater(delay, callable, *args, **kwargs)
        self._calls.add(call)
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [call for call in self._calls if call.active()]

    def stop(self) -> None:
        self.alive = False
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()


class SimTransport:
    """
    One end of a L{SimConnection}, as a protocol sees its TCP transport.
    """

    def __init__(self, connection: SimConnection, side: int):
        self.connection = connection
        self.side = side
        self.disconnecting = False
        self.connected = True
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        if data:
            self.connection.send(self.side, bytes(data))

    def writeSequence(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def loseConnection(self) -> None:
        self.connection.close(self.side, abort=False)

    def abortConnection(self) -> None:
        self.connection.close(self.side, abort=True)

    def getHost(self) -> IPv4Address:
        return self.connection.address(self.side)

    def getPeer(self) -> IPv4Address:
        return self.connection.address(1 - self.side)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.abortConnection()


class SimConnection:
    """
    A stream between a dialling host (side 0) and a listening one (side 1).

    Each direction is a queue in the order written; each thing written
    (bytes, or the close) gets one delivery, after a delay, of the queue's
    head.  While the two hosts cannot reach each other deliveries wait (a
    partition stalls a TCP stream; it does not lose bytes) and go on when
    the network heals, unless a timeout closed the connection meanwhile.

    @ivar broken: the other host vanished: nothing more arrives either way.
    """

    def __init__(self, network: SimNetwork, hosts: tuple[str, str], port: int, rng: random.Random):
        self.network = network
        self.hosts = hosts
        self.port = port
        self.rng = rng
        self.protocols: list[Any] = [None, None]
        self.transports = [SimTransport(self, 0), SimTransport(self, 1)]
        #: Whether each side's protocol has been told the connection closed.
        self.ended = [False, False]
        self.broken = False
        #: What each side sent and the other has not received: bytes, or
        #: the exception class a close gives the other side.
        self._queues: list[deque[bytes | type[Exception]]] = [deque(), deque()]
        #: Deliveries that found the hosts apart, by sending side.
        self._stalled = [0, 0]
        #: When the last delivery each way happens (for their order).
        self._arrivals = [0.0, 0.0]

    def address(self, side: int) -> IPv4Address:
        return IPv4Address("TCP", self.hosts[side], self.port if side == 1 else 40000)

    def _arrival(self, side: int) -> float:
        now = self.network.clock.seconds()
        at = max(now + self.rng.uniform(*self.network.delay), self._arrivals[side])
        self._arrivals[side] = at
        return at - now

    def _enqueue(self, side: int, item: bytes | type[Exception]) -> None:
        self._queues[side].append(item)
        self.network.clock.callLater(self._arrival(side), self._deliver, side)

    def _deliver(self, side: int) -> None:
        """
        Deliver the head of what C{side} sent, if the other side can get it.
        """
        queue = self._queues[side]
        if not queue or self.broken:
            return
        if not self.network.reachable(*self.hosts):
            self._stalled[side] += 1
            self.network.stalled[self] = None
            return
        item = queue.popleft()
        other = 1 - side
        if self.ended[other]:
            return
        if isinstance(item, bytes):
            # A transport closing reads no more (as Twisted's stops reading
            # at loseConnection).
            if not self.transports[other].disconnecting:
                self.protocols[other].dataReceived(item)
        else:
            self._end(other, item)

    def resume(self) -> None:
        """
        The network healed: deliver what waited, in order.
        """
        for side in (0, 1):
            stalled, self._stalled[side] = self._stalled[side], 0
            for _ in range(stalled):
                self.network.clock.callLater(self._arrival(side), self._deliver, side)

    def send(self, side: int, data: bytes) -> None:
        if self.ended[side] or self.transports[side].disconnecting or self.broken:
            return
        self.network.traffic += len(data)
        self._enqueue(side, data)

    def close(self, side: int, abort: bool) -> None:
        transport = self.transports[side]
        if transport.disconnecting or self.ended[side]:
            return
        transport.disconnecting = True
        reason = ConnectionLost if abort else ConnectionDone
        # This end closes at once (an abort) or once what it wrote is on
        # its way; the other end hears of it after that.
        self.network.clock.callLater(0 if abort or self.broken else self._arrival(side), self._end, side, reason)
        if not self.broken:
            self._enqueue(side, reason)

    def _end(self, side: int, reason: type[Exception]) -> None:
        if self.ended[side]:
            return
        self.ended[side] = True
        transport = self.transports[side]
        transport.connected = False
        transport.disconnecting = True
        self.protocols[side].connectionLost(Failure(reason()))
        if all(self.ended):
            self.network.connections.pop(self, None)

    def hostDown(self, host: str, reset: bool) -> None:
        """
        C{host} crashed: its end hears nothing more; with C{reset} the
        other end sees the connection close (after what was on its way),
        else it goes silent.
        """
        for side in (0, 1):
            if self.hosts[side] == host and not self.ended[side]:
                self.ended[side] = True
                self.transports[side].disconnecting = True
                if reset and not self.broken:
                    self._enqueue(side, ConnectionLost)
                else:
                    self.broken = True
        if all(self.ended):
            self.network.connections.pop(self, None)


@implementer(IListeningPort)
class SimPort:
    def __init__(self, network: SimNetwork, host: str, port: int):
        self.network = network
        self.host = host
        self.port = port

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        if self.network.listeners.get((self.host, self.port), (None,))[0] is self:
            del self.network.listeners[(self.host, self.port)]
        return succeed(None)


@implementer(IStreamServerEndpoint)
class SimServerEndpoint:
    def __init__(self, network: SimNetwork, host: str, port: int):
        self.network = network
        self.host = host
        self.port = port

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        port: IListeningPort = self.network.listen(self.host, self.port, factory)
        return succeed(port)


@implementer(IStreamClientEndpoint)
class SimClientEndpoint:
    def __init__(self, network: SimNetwork, source: str, host: str, port: int):
        self.network = network
        self.source = source
        self.host = host
        self.port = port

    def connect(self, factory: Any) -> Deferred[Any]:
        return self.network.connect(self.source, self.host, self.port, factory)


class SimNetwork:
    """
    Hosts by name, the listeners on them, and the connections between.

    @ivar delay: the range one write's delay is drawn from, in seconds.
    @ivar traffic: bytes handed to the network.
    """

    def __init__(self, clock: HeapClock, rng: random.Random, delay: tuple[float, float] = (0.0005, 0.005)):
        self.clock = clock
        self.rng = rng
        self.delay = delay
        self.traffic = 0
        self.listeners: dict[tuple[str, int], tuple[SimPort, Any]] = {}
        #: Open connections (a dict, for an order that does not depend on
        #: memory addresses).
        self.connections: dict[SimConnection, None] = {}
        self.down: set[str] = set()
        #: How many times each host crashed: what it dialled before does not
        #: concern its next run.
        self.epochs: dict[str, int] = {}
        #: Connections with deliveries waiting for the network to heal.
        self.stalled: dict[SimConnection, None] = {}
        self._groups: dict[str, int] | None = None
        self._cuts: set[frozenset[str]] = set()
        #: Hosts outside every partition (clients): they reach everyone.
        self.everywhere: set[str] = set()

    # Faults.

    def partition(self, *groups: Any) -> None:
        """
        Only hosts of the same group reach each other (and the hosts in
        L{everywhere} reach all).
        """
        self._groups = {host: index for index, group in enumerate(groups) for host in group}

    def cut(self, a: str, b: str) -> None:
        self._cuts.add(frozenset((a, b)))

    def heal(self) -> None:
        self._groups = None
        self._cuts.clear()
        stalled, self.stalled = self.stalled, {}
        for connection in stalled:
            connection.resume()

    def reachable(self, a: str, b: str) -> bool:
        if a in self.down or b in self.down:
            return False
        if a in self.everywhere or b in self.everywhere:
            return True
        if frozenset((a, b)) in self._cuts:
            return False
        if self._groups is None:
            return True
        group = self._groups.get(a)
        return group is not None and group == self._groups.get(b)

    def crash(self, host: str, reset: bool = True) -> None:
        """
        Stop C{host}: its listeners go, its connections are reset (or go
        silent).
        """
        self.epochs[host] = self.epochs.get(host, 0) + 1
        for key in [key for key in self.listeners if key[0] == host]:
            del self.listeners[key]
        for connection in list(self.connections):
            if host in connection.hosts:
                # Clients notice soon enough (their pings go unanswered).
                everywhere = any(other in self.everywhere for other in connection.hosts)
                connection.hostDown(host, reset or everywhere)
        if not reset:
            self.down.add(host)

    def revive(self, host: str) -> None:
        self.down.discard(host)

    # Connecting.

    def listen(self, host: str, port: int, factory: Any) -> SimPort:
        listening = SimPort(self, host, port)
        self.listeners[(host, port)] = (listening, factory)
        return listening

    def connect(self, source: str, host: str, port: int, factory: Any) -> Deferred[Any]:
        """
        Dial C{host:port} from C{source}: after a round trip the listener's
        factory and C{factory} build the two ends.
        """
        attempt: dict[str, Any] = {}

        def cancel(d: Deferred[Any]) -> None:
            call = attempt.get("call")
            if call is not None and call.active():
                call.cancel()

        d: Deferred[Any] = Deferred(cancel)
        rng = random.Random(self.rng.getrandbits(64))
        # A dialler that crashes meanwhile hears nothing of its dial.
        epoch = self.epochs.get(source, 0)

        def answer(result: Any) -> None:
            if self.epochs.get(source, 0) == epoch:
                d.callback(result) if not isinstance(result, Exception) else d.errback(result)

        if not self.reachable(source, host):
            attempt["call"] = self.clock.callLater(
                CONNECT_TIMEOUT, answer, TimeoutError(string=f"{source} -> {host}:{port}")
            )
            return d

        def arrive() -> None:
            if self.epochs.get(source, 0) != epoch:
                return
            listening = self.listeners.get((host, port))
            if listening is None:
                answer(ConnectionRefusedError(f"{host}:{port}"))
                return
            if not self.reachable(source, host):
                answer(TimeoutError(string=f"{source} -> {host}:{port}"))
                return
            connection = SimConnection(self, (source, host), port, rng)
            server = listening[1].buildProtocol(connection.address(0))
            if server is None:
                answer(ConnectionRefusedError(f"{host}:{port} refused"))
                return
            client = factory.buildProtocol(connection.address(1))
            if client is None:
                answer(ConnectionRefusedError(f"{source} built no protocol"))
                return
            connection.protocols[:] = [client, server]
            self.connections[connection] = None
            server.makeConnection(connection.transports[1])
            client.makeConnection(connection.transports[0])
            d.callback(client)

        attempt["call"] = self.clock.callLater(2 * rng.uniform(*self.delay), arrive)
        return d
