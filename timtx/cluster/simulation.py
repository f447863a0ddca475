# -*- test-case-name: timtx.test.test_swim -*-
"""
A deterministic simulated network of SWIM nodes on a
L{twisted.internet.task.Clock}, for tests and for measuring the protocol.

Every node is a L{timtx.cluster.swim.Swim} core driven exactly as the real
driver drives it (time passed in, timers asked for, messages drained), over
a network with configurable loss, delay, partitions and crashes.  All
randomness comes from one C{random.Random(seed)}, and messages are encoded
and decoded as on the wire, so a run with the same seed repeats exactly and
exercises the codec too.

A node can be made I{slow} (L{Simulation.slow}), as a saturated process
is: its event loop runs in iterations that each take a random busy time;
at the start of one it runs the timers that are due, then reads what has
arrived, and what it sends leaves when the iteration ends.  Its driver does
what L{timtx.cluster.membership.ClusterService} does on such a loop (one
I/O pass before due timers run, the lag reported to the core), or, with
C{lagAware=False}, what a plain driver would (timers first, no lag).

    sim = Simulation(seed=1)
    sim.start(["n1", "n2", "n3"])
    sim.runUntil(sim.converged, limit=10)
    sim.crash("n2")
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from timtx.cluster.ownership import Ownership
from timtx.cluster.swim import MemberChange, MemberState, Message, Swim, SwimConfig, decodeMessage, encodeMessage


@dataclass
class SimulatedNode:
    """
    One node: its core, whether it runs, and what it has seen.

    @ivar changes: every membership change with the simulated time it
        happened at.
    """

    nodeId: str
    swim: Swim
    running: bool = True
    changes: list[tuple[float, MemberChange]] = field(default_factory=list)
    deadline: float | None = None
    generation: int = 0
    #: The range each event loop iteration's busy time is drawn from, for a
    #: slow node; C{None} for a node that handles everything at once.
    busy: tuple[float, float] | None = None
    #: Messages arrived and not read yet (a slow node's socket buffers).
    inbox: list[tuple[str, bytes]] = field(default_factory=list)
    #: A slow node's due timers wait for the I/O pass; since this deadline.
    tickAfterIO: float | None = None
    #: When what a slow node sends now leaves (its iteration's end).
    sendAt: float | None = None

    def view(self) -> dict[str, MemberState]:
        return {member.nodeId: member.state for member in self.swim.members()}

    def live(self) -> frozenset[str]:
        return frozenset(member.nodeId for member in self.swim.liveMembers())

    def ownership(self) -> Ownership:
        return Ownership(self.live())


class Simulation:
    """
    @ivar clock: the simulated time.
    @ivar loss: the probability that a message is lost.
    @ivar delay: the range a message's delay is drawn from, in seconds.
    @ivar messages: messages handed to the network so far.
    @ivar bytes: their encoded size.
    """

    def __init__(
        self,
        seed: int,
        config: SwimConfig | None = None,
        *,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0005, 0.005),
        clock: Clock | None = None,
        lagAware: bool = True,
    ):
        self.rng = random.Random(seed)
        self.config = config or SwimConfig()
        self.loss = loss
        self.delay = delay
        self.lagAware = lagAware
        self.clock = clock or Clock()
        self.nodes: dict[str, SimulatedNode] = {}
        self.messages = 0
        self.bytes = 0
        self._groups: dict[str, int] | None = None
        self._cuts: set[frozenset[str]] = set()
        self._events: list[tuple[float, int, tuple[object, ...]]] = []
        self._order = itertools.count()
        self._wakeup: IDelayedCall | None = None

    # Building.

    def now(self) -> float:
        return self.clock.seconds()

    def addNode(self, nodeId: str, seeds: Iterable[str] = (), incarnation: int = 0) -> SimulatedNode:
        """
        Start a node that joins through C{seeds} (node ids).
        """
        swim = Swim(
            nodeId,
            f"{nodeId}:7000",
            now=self.now(),
            config=self.config,
            rng=random.Random(self.rng.getrandbits(64)),
            clientAddresses=(f"ws://{nodeId}/tim",),
            incarnation=incarnation,
        )
        node = SimulatedNode(nodeId, swim)
        self.nodes[nodeId] = node
        self._join(node, tuple(seeds))
        return node

    #: Seconds between join attempts until a node has joined, as the
    #: driver keeps dialling its seeds.
    joinRetry = 1.0

    def _join(self, node: SimulatedNode, seeds: tuple[str, ...]) -> None:
        if not node.running or not seeds or node.swim.joined:
            return
        for seed in seeds:
            node.swim.join(seed, self.now())
        self._pump(node)
        self._at(self.now() + self.joinRetry, ("join", node, seeds))

    def start(self, nodeIds: Iterable[str]) -> None:
        """
        Start nodes that each join through the first.
        """
        nodeIds = list(nodeIds)
        for index, nodeId in enumerate(nodeIds):
            self.addNode(nodeId, nodeIds[:1] if index else ())

    # Faults.

    def crash(self, nodeId: str, reset: bool = False) -> None:
        """
        Stop C{nodeId} without a word.  With C{reset}, its peers notice
        their links break (as TCP peers of a killed process do), which is
        only a hint to SWIM.
        """
        node = self.nodes[nodeId]
        node.running = False
        node.generation += 1
        if reset:
            for other in self.running():
                other.swim.linkLost(nodeId, self.now())
                self._pump(other)

    def restart(self, nodeId: str, seeds: Iterable[str]) -> SimulatedNode:
        """
        Start a crashed node again, as a new process: a fresh core that
        remembers its incarnation (as the driver's member file does).
        """
        old = self.nodes[nodeId]
        return self.addNode(nodeId, seeds, incarnation=old.swim.incarnation + 1)

    def leave(self, nodeId: str) -> None:
        node = self.nodes[nodeId]
        node.swim.leave(self.now())
        self._pump(node)
        node.running = False

    def slow(self, nodeId: str, busy: tuple[float, float] | None) -> None:
        """
        Make C{nodeId}'s event loop busy: each iteration takes a time drawn
        from C{busy} (seconds); C{None} makes it prompt again.
        """
        node = self.nodes[nodeId]
        wasSlow = node.busy is not None
        node.busy = busy
        if busy is not None and not wasSlow:
            node.deadline = None
            node.generation += 1
            self._at(self.now(), ("iterate", node, node.generation))
        elif busy is None and wasSlow:
            node.generation += 1
            node.deadline = None
            node.tickAfterIO = None
            inbox, node.inbox = node.inbox, []
            for source, data in inbox:
                node.swim.receive(source, decodeMessage(data), self.now())
            node.swim.tick(self.now())
            self._pump(node)

    def partition(self, *groups: Iterable[str]) -> None:
        """
        Only nodes of the same group reach each other; nodes in no group
        reach no one.
        """
        self._groups = {nodeId: index for index, group in enumerate(groups) for nodeId in group}

    def cut(self, a: str, b: str) -> None:
        """
        Drop every message between C{a} and C{b}, both ways, while each
        still reaches the others.
        """
        self._cuts.add(frozenset((a, b)))

    def heal(self) -> None:
        """
        Undo every partition and cut.
        """
        self._groups = None
        self._cuts.clear()

    def reachable(self, source: str, target: str) -> bool:
        if frozenset((source, target)) in self._cuts:
            return False
        if self._groups is None:
            return True
        group = self._groups.get(source)
        return group is not None and group == self._groups.get(target)

    # Running.

    def running(self) -> list[SimulatedNode]:
        return [node for node in self.nodes.values() if node.running]

    def run(self, seconds: float) -> None:
        self.runUntil(lambda: False, seconds)

    def runUntil(self, predicate: Callable[[], bool], limit: float) -> float | None:
        """
        Advance time event by event until C{predicate} holds (checked after
        each event) or C{limit} seconds have passed.

        @return: the time it took, or C{None} if the limit was reached.
        """
        start = self.now()
        end = start + limit
        if predicate():
            return 0.0
        clock = self.clock
        while True:
            upcoming = min((call.getTime() for call in clock.getDelayedCalls()), default=None)
            if upcoming is None or upcoming > end:
                clock.advance(end - self.now())
                return None
            clock.advance(max(upcoming - self.now(), 0.0))
            if predicate():
                return self.now() - start

    # The event queue: node timers and message deliveries in one heap, with
    # one call on the clock for the earliest, so the clock's list (sorted on
    # every change) stays short.

    def _at(self, when: float, event: tuple[object, ...]) -> None:
        heapq.heappush(self._events, (when, next(self._order), event))
        self._wake()

    def _wake(self) -> None:
        if self._running or not self._events:
            return
        at = self._events[0][0]
        if self._wakeup is not None and self._wakeup.active():
            if self._wakeup.getTime() <= at:
                return
            self._wakeup.cancel()
        self._wakeup = self.clock.callLater(max(at - self.now(), 0.0), self._run)

    _running = False

    def _run(self) -> None:
        self._wakeup = None
        self._running = True
        try:
            self._runDue()
        finally:
            self._running = False
        self._wake()

    def _runDue(self) -> None:
        now = self.now()
        events = self._events
        while events and events[0][0] <= now:
            _, _, event = heapq.heappop(events)
            if event[0] == "tick":
                node, generation = event[1], event[2]
                assert isinstance(node, SimulatedNode)
                if node.running and node.generation == generation:
                    node.swim.tick(now)
                    self._pump(node)
            elif event[0] == "iterate":
                node, generation = event[1], event[2]
                assert isinstance(node, SimulatedNode)
                if node.running and node.generation == generation:
                    self._iterate(node, now)
            elif event[0] == "join":
                node, seeds = event[1], event[2]
                assert isinstance(node, SimulatedNode) and isinstance(seeds, tuple)
                self._join(node, seeds)
            else:
                _, source, target, data = event
                self._deliver(str(source), str(target), bytes(data), now)  # type: ignore[call-overload]

    def _iterate(self, node: SimulatedNode, now: float) -> None:
        """
        One iteration of a slow node's event loop, as Twisted runs one: due
        timers first, then the sockets; busy until the next.
        """
        assert node.busy is not None
        busy = self.rng.uniform(*node.busy)
        node.sendAt = now + busy
        swim = node.swim
        deadline = swim.nextTimer()
        if self.lagAware:
            if node.tickAfterIO is not None:
                swim.observeLag(now - node.tickAfterIO, now)
                node.tickAfterIO = None
                swim.tick(now)
            elif deadline is not None and deadline <= now:
                node.tickAfterIO = deadline
        elif deadline is not None and deadline <= now:
            swim.tick(now)
        inbox, node.inbox = node.inbox, []
        for source, data in inbox:
            swim.receive(source, decodeMessage(data), now)
        self._pump(node)
        node.sendAt = None
        self._at(now + busy, ("iterate", node, node.generation))

    def _pump(self, node: SimulatedNode) -> None:
        swim = node.swim
        now = self.now()
        for target, message in swim.messagesToSend():
            self._send(node.nodeId, target, message, node.sendAt)
        for change in swim.takeChanges():
            node.changes.append((now, change))
        if node.busy is not None:
            return
        deadline = swim.nextTimer()
        if deadline != node.deadline:
            node.generation += 1
            node.deadline = deadline
            if deadline is not None and node.running:
                self._at(deadline, ("tick", node, node.generation))

    def _send(self, source: str, target: str, message: Message, at: float | None = None) -> None:
        data = encodeMessage(message)
        self.messages += 1
        self.bytes += len(data)
        if self.rng.random() < self.loss:
            return
        leaves = self.now() if at is None else at
        self._at(leaves + self.rng.uniform(*self.delay), ("deliver", source, target, data))

    def _deliver(self, source: str, target: str, data: bytes, now: float) -> None:
        node = self.nodes.get(target)
        if node is None or not node.running:
            return
        if not self.reachable(source, target):
            return
        if node.busy is not None:
            node.inbox.append((source, data))
            return
        node.swim.receive(source, decodeMessage(data), now)
        self._pump(node)

    # Observations.

    def converged(self) -> bool:
        """
        Whether every running node sees exactly the running nodes as live.
        """
        expected = frozenset(node.nodeId for node in self.running())
        return all(node.live() == expected for node in self.running())

    def allSee(self, nodeId: str, states: Iterable[MemberState]) -> bool:
        """
        Whether every other running node sees C{nodeId} in one of
        C{states} (not knowing it counts as dead or left).
        """
        wanted = set(states)
        for node in self.running():
            if node.nodeId == nodeId:
                continue
            member = node.swim.member(nodeId)
            state = member.state if member is not None else MemberState.DEAD
            if state not in wanted:
                return False
        return True

    def sentBy(self) -> dict[str, int]:
        return {nodeId: node.swim.sent for nodeId, node in self.nodes.items()}


def detectionTime(nodes: int, seed: int, config: SwimConfig | None = None, reset: bool = False) -> float | None:
    """
    Start C{nodes} nodes, let them converge, crash one at random and return
    the simulated seconds until every other node has declared it dead
    (C{None} if not within 60 s).

    @param reset: whether its peers see their links to it break.
    """
    sim = Simulation(seed, config)
    nodeIds = [f"n{i:03d}" for i in range(nodes)]
    sim.start(nodeIds)
    if sim.runUntil(sim.converged, 30.0) is None:
        return None
    sim.run(sim.rng.uniform(0, 5))
    victim = nodeIds[sim.rng.randrange(1, nodes)]
    sim.crash(victim, reset=reset)
    return sim.runUntil(lambda: sim.allSee(victim, [MemberState.DEAD]), 60.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a measuring tool
    """
    C{python -m timtx.cluster.simulation [--nodes 3,5,10,20,50] [--runs 100]}:
    failure detection times, in simulated seconds, with the default
    configuration, for a node that stops silently and for one whose links
    break (a killed process).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m timtx.cluster.simulation", description=main.__doc__)
    parser.add_argument("--nodes", default="3,5,10,20,50")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    print("| nodes | silent: p50 | p90 | max | links break: p50 | p90 | max |")
    print("|---|---|---|---|---|---|---|")
    for nodes in (int(n) for n in args.nodes.split(",")):
        cells = [str(nodes)]
        for reset in (False, True):
            times = [detectionTime(nodes, seed, reset=reset) or float("inf") for seed in range(args.runs)]
            cells += [f"{_percentile(times, 0.5):.2f}", f"{_percentile(times, 0.9):.2f}", f"{max(times):.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()
