# -*- test-case-name: timtx.test.test_swim -*-
"""
SWIM membership without I/O (Das, Gupta and Motivala, 2002), with the
Lifeguard refinements, as hashicorp/memberlist does it.

Theory of operation.  Each node keeps a list of members, each with an
I{incarnation} number that only the member itself raises, and a state:
alive, suspect, dead or left.  Every probe period a node pings the next
member of a shuffled round-robin list.  Without an ack within the probe
timeout it asks C{indirectChecks} other members to ping the target for it;
without any ack by the end of the period it marks the target I{suspect} and
tells the others.  A suspect that hears of it I{refutes} by raising its
incarnation and announcing itself alive, which overrides the suspicion
everywhere.  A suspicion not refuted within the suspicion timeout becomes
I{dead}.  The timeout starts at C{suspicionMaxMult} times the minimum and
falls to the minimum, C{suspicionMult * max(1, log10(n)) * probeInterval},
as other members independently suspect the same node (Lifeguard); the ping
of a suspect carries the suspicion, so it learns of it quickly.  A node that
misses acks it should have had, or finds itself suspected, trusts its own
judgement less (its I{awareness} score): its probe interval and timeout
stretch, so a slow node does not accuse healthy ones.

Guards against a node that is alive but slow (a saturated event loop),
beyond memberlist's.  The driver reports how late its event loop ran a due
timer (L{Swim.observeLag}): lag beyond half the probe timeout counts against
the local health score, and every timeout of this node is padded by its
recent lag (at most the longest suspicion timeout), so a node that cannot
keep time does not accuse others for answers it has not yet read.  Each
ack's round trip is measured, acks that come after their probe ended too: a
member whose acks came late lately gets that much longer to answer a probe
and twice that to refute a suspicion, at most the shortest suspicion timeout
more, so a slow member is not declared dead while a silent one still is
within the usual bound.  And another node's verdict of death is only a
suspicion for a node that heard from the member itself within the shortest
suspicion timeout: a stale verdict, sent when a partition heals by a node
that had no one to tell, does not kill a member that is alive.

Changes (alive, suspect, dead) are broadcast by piggybacking them on
probes and acks, and on small gossip messages to C{gossipNodes} random
members every C{gossipInterval} while there is something to tell; each
change is sent C{retransmitMult * ceil(log10(n + 1))} times, at most
C{maxPiggyback} per message.  A node joins by a push-pull I{sync} with a
member it has reached (a seed): both send their full state and merge the
other's.  Syncs also run every C{pushPullInterval} with a random member, and
every C{reconnectInterval} with a random dead member, which heals partitions.
A graceful L{Swim.leave} tells every member at once.  So every node sends a
constant number of messages per period whatever the cluster's size.

This class has no sockets and no clock: the driver passes C{now} (seconds)
into every call, calls L{Swim.tick} when L{Swim.nextTimer} says, sends what
L{Swim.messagesToSend} returns to the named nodes, and reads membership
changes from L{Swim.takeChanges}.  Randomness comes from an injected
C{random.Random}, so a simulation with a seed repeats exactly.

Messages are encoded as compact JSON by L{encodeMessage}; L{decodeMessage}
checks every field and bound and raises L{SwimDecodeError} for anything
else.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Mapping, Sequence

from timtx.protocols.peer import NODE_ID_PATTERN

# Bounds on what a member may advertise, checked on decode.
MAX_ADDRESS_CHARS = 255
MAX_CLIENT_ADDRESSES = 16
MAX_CLIENT_ADDRESS_CHARS = 512
MAX_META_ENTRIES = 32
MAX_META_KEY_CHARS = 64
MAX_META_VALUE_CHARS = 512
#: Most updates one message may carry.
MAX_UPDATES = 256
#: Most members a sync may carry, and a node will remember.
MAX_MEMBERS = 10000
#: Incarnations and sequence numbers stay below 2**53, exact in JSON.
MAX_NUMBER = (1 << 53) - 1
#: Probes remembered after they end, so that a late ack still measures how
#: slow its member is.
MAX_ENDED_PROBES = 64
#: How many probe intervals a measured lag or round trip is kept for, at
#: least (then it fades linearly to nothing over as long).
SLOWNESS_MEMORY_PROBES = 10


class MemberState(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


ALIVE = MemberState.ALIVE
SUSPECT = MemberState.SUSPECT
DEAD = MemberState.DEAD
LEFT = MemberState.LEFT
_LIVE = (ALIVE, SUSPECT)


@dataclass(frozen=True, slots=True)
class Member:
    """
    What one node knows of a member.

    @ivar nodeId: the member's node id.
    @ivar incarnation: raised only by the member itself, to refute.
    @ivar state: a L{MemberState}.
    @ivar address: where peers reach it (C{host:port}).
    @ivar clientAddresses: the URLs its clients use (WebSocket, TCP), for
        dashboards and redirects.
    @ivar meta: a small dict of strings (NAT information, say).
    @ivar since: local time of the last change of L{state}; not sent.
    """

    nodeId: str
    incarnation: int
    state: MemberState
    address: str
    clientAddresses: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    since: float = 0.0

    @property
    def live(self) -> bool:
        """
        Alive or suspect: still counted as a member, and still owns keys.
        """
        return self.state in _LIVE

    def sameAdvertisement(self, other: Member) -> bool:
        return (
            self.address == other.address
            and self.clientAddresses == other.clientAddresses
            and dict(self.meta) == dict(other.meta)
        )


# Updates, piggybacked on messages.


@dataclass(frozen=True, slots=True)
class Alive:
    nodeId: str
    incarnation: int
    address: str
    clientAddresses: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Suspect:
    nodeId: str
    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True)
class Dead:
    """
    C{nodeId} is dead; when C{accuser} is C{nodeId} itself, it left.
    """

    nodeId: str
    incarnation: int
    accuser: str


Update = Alive | Suspect | Dead


# Messages.


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    """
    Ping C{target} for me and forward its ack (or a L{Nack}).
    """

    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """
    An indirect probe got no ack in time: the relay is healthy, the target
    may not be (Lifeguard).
    """

    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Gossip:
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Sync:
    """
    A push-pull: the sender's whole member list; answered with the
    receiver's (C{reply} set) unless it is itself a reply.
    """

    members: tuple[Member, ...]
    reply: bool = False
    updates: tuple[Update, ...] = ()


Message = Ping | PingReq | Ack | Nack | Gossip | Sync


class ChangeKind(Enum):
    #: New, or back after being dead or gone.
    JOINED = "joined"
    #: Its addresses or metadata changed.
    UPDATED = "updated"
    SUSPECTED = "suspected"
    #: A suspect refuted the suspicion.
    RECOVERED = "recovered"
    DIED = "died"
    LEFT = "left"
    #: Dead or left for longer than C{deadMemberTTL}: no longer listed.
    FORGOTTEN = "forgotten"


@dataclass(frozen=True, slots=True)
class MemberChange:
    """
    One change of the member list.

    @ivar member: the member now (for L{ChangeKind.FORGOTTEN}, as it was
        last known).
    @ivar previous: the member before, or C{None} if it was unknown.
    """

    kind: ChangeKind
    member: Member
    previous: Member | None


@dataclass(frozen=True)
class SwimConfig:
    """
    Timing and bounds of the protocol; see L{timtx.config.ClusterConfig}
    for each.  Times are in seconds.
    """

    probeInterval: float = 0.3
    probeTimeout: float = 0.15
    indirectChecks: int = 3
    suspicionMult: int = 3
    suspicionMaxMult: int = 3
    retransmitMult: int = 4
    maxPiggyback: int = 32
    gossipInterval: float = 0.2
    gossipNodes: int = 3
    pushPullInterval: float = 30.0
    reconnectInterval: float = 5.0
    deadMemberTTL: float = 3600.0
    awarenessMax: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.probeTimeout < self.probeInterval:
            raise ValueError("the probe timeout must be positive and shorter than the probe interval")
        if self.suspicionMult < 1 or self.suspicionMaxMult < 1:
            raise ValueError("suspicion multipliers must be at least 1")
        if self.gossipInterval <= 0 or self.pushPullInterval <= 0 or self.reconnectInterval <= 0:
            raise ValueError("intervals must be positive")
        if min(self.indirectChecks, self.gossipNodes, self.retransmitMult, self.maxPiggyback) < 0:
            raise ValueError("counts cannot be negative")
        if self.awarenessMax < 1:
            raise ValueError("awarenessMax must be at least 1")

    def suspicionTimeout(self, members: int) -> float:
        """
        The shortest suspicion timeout in a cluster of C{members} live
        members: C{suspicionMult * max(1, log10(n)) * probeInterval}.
        """
        return self.suspicionMult * max(1.0, math.log10(max(1, members))) * self.probeInterval

    def retransmitLimit(self, members: int) -> int:
        """
        How many times each change is piggybacked.
        """
        return self.retransmitMult * max(1, math.ceil(math.log10(members + 1)))


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[float], None]):
        self.callback = callback
        self.cancelled = False


class _Timers:
    """
    Deadlines in a heap; cancelled ones are skipped when they come up.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()

    def at(self, deadline: float, callback: Callable[[float], None]) -> _Timer:
        timer = _Timer(callback)
        heapq.heappush(self._heap, (deadline, next(self._order), timer))
        return timer

    def next(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if not timer.cancelled:
                timer.callback(now)

    def clear(self) -> None:
        self._heap.clear()


class _RecentPeak:
    """
    The largest value seen lately: each is kept for C{memory} seconds,
    then fades linearly to 0 over as long, unless a larger one comes.
    """

    __slots__ = ("value", "at")

    def __init__(self) -> None:
        self.value = 0.0
        self.at = 0.0

    def get(self, now: float, memory: float) -> float:
        age = max(now - self.at, 0.0)
        if age <= memory:
            return self.value
        return self.value * max(0.0, 2.0 - age / memory)

    def add(self, value: float, now: float, memory: float) -> None:
        if value >= self.get(now, memory):
            self.value = value
            self.at = now


class _Suspicion:
    """
    A suspicion timer whose deadline moves from C{longest} toward
    C{shortest} as C{k} independent confirmations arrive.
    """

    def __init__(self, accuser: str, k: int, shortest: float, longest: float, start: float, extra: float):
        self.confirmations = {accuser}
        self.k = k
        self.shortest = shortest
        self.longest = longest
        self.start = start
        #: Added for a slow suspect or a lagging local node; only grows.
        self.extra = extra
        self.n = 0
        self.timer: _Timer | None = None

    def deadline(self) -> float:
        start = self.start + self.extra
        if self.k < 1:
            return start + self.shortest
        fraction = math.log(self.n + 1) / math.log(self.k + 1)
        return start + max(self.shortest, self.longest - fraction * (self.longest - self.shortest))

    def confirm(self, accuser: str) -> bool:
        """
        Count a confirmation from C{accuser}; whether it was new.
        """
        if self.n >= self.k or accuser in self.confirmations:
            return False
        self.confirmations.add(accuser)
        self.n += 1
        return True


@dataclass
class _Probe:
    target: str
    sentAt: float = 0.0
    acked: bool = False
    expectedNacks: int = 0
    nacks: int = 0
    timers: list[_Timer] = field(default_factory=list)


@dataclass
class _Relay:
    origin: str
    originSeq: int


class _Broadcasts:
    """
    Pending changes, at most one per member (a newer change replaces an
    older one), each sent a bounded number of times, least-sent first.
    """

    def __init__(self) -> None:
        self._items: dict[str, list[Any]] = {}
        self._order = itertools.count()

    def add(self, update: Update) -> None:
        self._items[update.nodeId] = [update, 0, next(self._order)]

    def __len__(self) -> int:
        return len(self._items)

    def take(self, limit: int, retransmitLimit: int) -> tuple[Update, ...]:
        if not self._items or limit <= 0:
            return ()
        chosen = sorted(self._items.values(), key=lambda item: (item[1], -item[2]))[:limit]
        for item in chosen:
            item[1] += 1
            if item[1] >= retransmitLimit:
                del self._items[item[0].nodeId]
        return tuple(item[0] for item in chosen)


class Swim:
    """
    One node's view of the cluster and its part in the protocol.

    @ivar nodeId: this node's id.
    @ivar config: a L{SwimConfig}.
    @ivar awareness: the Lifeguard health score, from 0 (healthy) to
        C{awarenessMax - 1}; timeouts are multiplied by C{awareness + 1}
        (and padded by the recent lag of the driver's event loop).
    @ivar left: whether L{leave} was called; the node then takes no part.
    @ivar sent: messages returned by L{messagesToSend} so far, for
        measurements.
    """

    def __init__(
        self,
        nodeId: str,
        address: str,
        *,
        now: float,
        config: SwimConfig | None = None,
        rng: random.Random | None = None,
        clientAddresses: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        incarnation: int = 0,
    ):
        if not NODE_ID_PATTERN.match(nodeId):
            raise ValueError(f"invalid node id {nodeId!r}")
        self.nodeId = nodeId
        self.config = config or SwimConfig()
        self.rng = rng or random.Random()
        self.awareness = 0
        self.left = False
        self.sent = 0
        self._members: dict[str, Member] = {
            nodeId: Member(nodeId, incarnation, ALIVE, address, tuple(clientAddresses), dict(meta or {}), now)
        }
        self._timers = _Timers()
        self._out: list[tuple[str, Message]] = []
        self._changes: list[MemberChange] = []
        self._broadcasts = _Broadcasts()
        self._suspicions: dict[str, _Suspicion] = {}
        self._acks: dict[int, _Probe | _Relay] = {}
        self._seq = itertools.count(1)
        self._probeList: list[str] = []
        self._probeIndex = 0
        self._urgent: list[str] = []
        self._liveCount: int | None = None
        self._strangers: dict[str, float] = {}
        self._lag = _RecentPeak()
        self._lagPenaltyAt: float | None = None
        self._roundTrips: dict[str, _RecentPeak] = {}
        self._lastHeard: dict[str, float] = {}
        self._endedProbes: dict[int, tuple[str, float]] = {}
        config = self.config
        # Start each periodic task at a random phase, so nodes started
        # together do not act in step.
        rng = self.rng
        self._timers.at(now + rng.uniform(0, config.probeInterval), self._probeTick)
        self._timers.at(now + rng.uniform(0, config.gossipInterval), self._gossipTick)
        self._timers.at(now + rng.uniform(0.5, 1.0) * config.pushPullInterval, self._pushPullTick)
        self._timers.at(now + rng.uniform(0.5, 1.0) * config.reconnectInterval, self._reconnectTick)
        self._timers.at(now + self._reapInterval(), self._reapTick)

    # Queries.

    @property
    def local(self) -> Member:
        return self._members[self.nodeId]

    @property
    def incarnation(self) -> int:
        return self.local.incarnation

    def member(self, nodeId: str) -> Member | None:
        return self._members.get(nodeId)

    def members(self) -> list[Member]:
        """
        Every member known, this node included, in node id order.
        """
        return [self._members[nodeId] for nodeId in sorted(self._members)]

    def liveMembers(self) -> list[Member]:
        return [member for member in self.members() if member.live]

    @property
    def joined(self) -> bool:
        """
        Whether another live member is known.
        """
        return any(member.live and member.nodeId != self.nodeId for member in self._members.values())

    def liveCount(self) -> int:
        """
        How many members are live, this node included.
        """
        if self._liveCount is None:
            self._liveCount = sum(1 for member in self._members.values() if member.live)
        return self._liveCount

    # Outputs.

    def nextTimer(self) -> float | None:
        """
        When L{tick} should next be called, or C{None} if never.
        """
        return self._timers.next()

    def messagesToSend(self) -> list[tuple[str, Message]]:
        """
        The messages to send since the last call, as (node id, message).
        Any may be lost: the protocol copes.
        """
        out, self._out = self._out, []
        self.sent += len(out)
        return out

    def takeChanges(self) -> list[MemberChange]:
        """
        The member changes since the last call, in order.
        """
        changes, self._changes = self._changes, []
        return changes

    # Inputs.

    def tick(self, now: float) -> None:
        """
        Run what is due at C{now}.
        """
        self._timers.run(now)

    def observeLag(self, lag: float, now: float) -> None:
        """
        The driver's event loop ran a due timer (or handled input) C{lag}
        seconds later than asked: the node is busy, and its timeouts end
        before it has read the answers that came in time.  Lag beyond half
        the probe timeout raises the awareness score (at most once per
        probe interval), and every timeout is padded by the recent lag.
        """
        if lag <= 0 or self.left:
            return
        config = self.config
        self._lag.add(lag, now, self._slownessMemory())
        if lag > config.probeTimeout / 2 and (
            self._lagPenaltyAt is None or now - self._lagPenaltyAt >= config.probeInterval
        ):
            self._lagPenaltyAt = now
            self._adjustAwareness(1)

    def localLag(self, now: float) -> float:
        """
        The recent lag of the driver's event loop (see L{observeLag}), at
        most the longest suspicion timeout: the most any timeout is padded.
        """
        config = self.config
        cap = config.suspicionTimeout(self.liveCount()) * config.suspicionMaxMult
        return min(self._lag.get(now, self._slownessMemory()), cap)

    def slowness(self, nodeId: str, now: float) -> float:
        """
        The extra time C{nodeId} is given to answer a probe and to refute a
        suspicion: its recent round trip, late acks included, at most the
        shortest suspicion timeout.
        """
        peak = self._roundTrips.get(nodeId)
        if peak is None:
            return 0.0
        cap = self.config.suspicionTimeout(self.liveCount())
        return min(peak.get(now, self._slownessMemory()), cap)

    def receive(self, sender: str, message: Message, now: float) -> None:
        """
        Handle a message from C{sender}, whose identity the transport has
        authenticated.
        """
        if self.left:
            return
        if sender in self._members:
            self._lastHeard[sender] = now
        for update in message.updates:
            self._apply(update, now)
        known = self._members.get(sender)
        if (known is None or not known.live) and not isinstance(message, Sync):
            self._syncWithStranger(sender, now)
        if isinstance(message, Ping):
            if message.target == self.nodeId:
                self._send(sender, Ack(message.seq, self._piggyback()))
        elif isinstance(message, Ack):
            self._ackReceived(message.seq, now)
        elif isinstance(message, Nack):
            waiter = self._acks.get(message.seq)
            if isinstance(waiter, _Probe):
                waiter.nacks += 1
        elif isinstance(message, PingReq):
            self._relay(sender, message, now)
        elif isinstance(message, Sync):
            self._merge(sender, message.members, now)
            if not message.reply:
                self._send(sender, Sync(self._state(), reply=True))

    def _syncWithStranger(self, sender: str, now: float) -> None:
        """
        A message from a node this one does not count as live: it missed
        that node's news (a lost broadcast, a healed partition), so it asks
        for a sync, at most once per probe interval per sender.
        """
        last = self._strangers.get(sender)
        if last is not None and now - last < self.config.probeInterval:
            return
        if len(self._strangers) >= 1024:
            self._strangers.clear()
        self._strangers[sender] = now
        self._send(sender, Sync(self._state()))

    def join(self, nodeId: str, now: float) -> None:
        """
        Start a push-pull sync with C{nodeId}, a node the driver has just
        reached (a seed, or a member remembered from an earlier run).
        """
        if nodeId != self.nodeId and not self.left:
            self._send(nodeId, Sync(self._state()))

    def linkLost(self, nodeId: str, now: float) -> None:
        """
        The driver's link to C{nodeId} failed.  Not a verdict: the member is
        probed next, and SWIM decides.
        """
        member = self._members.get(nodeId)
        if member is not None and member.live and nodeId not in self._urgent and nodeId != self.nodeId:
            self._urgent.append(nodeId)

    def update(
        self,
        now: float,
        *,
        address: str | None = None,
        clientAddresses: Sequence[str] | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """
        Change what this node advertises and tell the cluster.
        """
        local = self.local
        self._setMember(
            Member(
                self.nodeId,
                local.incarnation + 1,
                ALIVE,
                local.address if address is None else address,
                local.clientAddresses if clientAddresses is None else tuple(clientAddresses),
                local.meta if meta is None else dict(meta),
                local.since,
            )
        )
        self._broadcastSelf()

    def leave(self, now: float) -> None:
        """
        Leave the cluster: every live member is told at once, and this node
        stops taking part.
        """
        if self.left:
            return
        local = self.local
        update = Dead(self.nodeId, local.incarnation, self.nodeId)
        targets = [m.nodeId for m in self._members.values() if m.live and m.nodeId != self.nodeId]
        self._setMember(
            Member(self.nodeId, local.incarnation, LEFT, local.address, local.clientAddresses, local.meta, now)
        )
        self.left = True
        self._timers.clear()
        for probe in self._acks.values():
            if isinstance(probe, _Probe):
                probe.timers.clear()
        self._acks.clear()
        for nodeId in targets:
            self._send(nodeId, Gossip((update,)))

    # Sending.

    def _send(self, nodeId: str, message: Message) -> None:
        self._out.append((nodeId, message))

    def _piggyback(self, extra: Update | None = None) -> tuple[Update, ...]:
        limit = self.config.maxPiggyback
        updates = self._broadcasts.take(limit - (extra is not None), self.config.retransmitLimit(self.liveCount()))
        return (extra, *updates) if extra is not None else updates

    def _broadcast(self, update: Update) -> None:
        self._broadcasts.add(update)

    def _broadcastSelf(self) -> None:
        local = self.local
        self._broadcast(Alive(self.nodeId, local.incarnation, local.address, local.clientAddresses, local.meta))

    def _scaled(self, seconds: float, now: float) -> float:
        return seconds * (self.awareness + 1) + self.localLag(now)

    def _slownessMemory(self) -> float:
        """
        How long a lag or a slow round trip is remembered: long enough to
        cover a round of probes of every member.
        """
        return max(SLOWNESS_MEMORY_PROBES, 2 * self.liveCount()) * self.config.probeInterval

    def _roundTrip(self, nodeId: str, seconds: float, now: float) -> None:
        member = self._members.get(nodeId)
        if member is None or nodeId == self.nodeId:
            return
        peak = self._roundTrips.get(nodeId)
        if peak is None:
            peak = self._roundTrips[nodeId] = _RecentPeak()
        peak.add(seconds, now, self._slownessMemory())

    def _adjustAwareness(self, delta: int) -> None:
        self.awareness = min(max(self.awareness + delta, 0), self.config.awarenessMax - 1)

    def _randomMembers(self, count: int, exclude: Iterable[str], states: Iterable[MemberState] = _LIVE) -> list[str]:
        excluded = {self.nodeId, *exclude}
        wanted = tuple(states)
        candidates = sorted(
            nodeId for nodeId, member in self._members.items() if member.state in wanted and nodeId not in excluded
        )
        if len(candidates) <= count:
            self.rng.shuffle(candidates)
            return candidates
        return self.rng.sample(candidates, count)

    # Probing.

    def _nextProbeTarget(self) -> str | None:
        while self._urgent:
            nodeId = self._urgent.pop(0)
            member = self._members.get(nodeId)
            if member is not None and member.live:
                return nodeId
        for _ in range(len(self._probeList) + 2):
            if self._probeIndex >= len(self._probeList):
                self._probeList = sorted(
                    nodeId for nodeId, member in self._members.items() if member.live and nodeId != self.nodeId
                )
                self.rng.shuffle(self._probeList)
                self._probeIndex = 0
                if not self._probeList:
                    return None
            nodeId = self._probeList[self._probeIndex]
            self._probeIndex += 1
            member = self._members.get(nodeId)
            if member is not None and member.live:
                return nodeId
        return None

    def _probeTick(self, now: float) -> None:
        interval = self._scaled(self.config.probeInterval, now)
        self._timers.at(now + interval, self._probeTick)
        target = self._nextProbeTarget()
        if target is None:
            return
        member = self._members[target]
        seq = next(self._seq)
        probe = _Probe(target, now)
        self._acks[seq] = probe
        # The buddy system: a suspect learns of the suspicion from the ping.
        extra = Suspect(target, member.incarnation, self.nodeId) if member.state is SUSPECT else None
        self._send(target, Ping(seq, target, self._piggyback(extra)))
        slowness = self.slowness(target, now)
        probe.timers = [
            self._timers.at(
                now + self._scaled(self.config.probeTimeout, now) + slowness, lambda t: self._probeTimedOut(seq, t)
            ),
            self._timers.at(now + interval + slowness, lambda t: self._probeEnded(seq, t)),
        ]

    def _probeTimedOut(self, seq: int, now: float) -> None:
        probe = self._acks.get(seq)
        if not isinstance(probe, _Probe) or probe.acked:
            return
        relays = self._randomMembers(self.config.indirectChecks, (probe.target,), (ALIVE,))
        probe.expectedNacks = len(relays)
        for relay in relays:
            self._send(relay, PingReq(seq, probe.target, self._piggyback()))

    def _probeEnded(self, seq: int, now: float) -> None:
        probe = self._acks.pop(seq, None)
        if not isinstance(probe, _Probe):
            return
        self._endedProbes[seq] = (probe.target, probe.sentAt)
        if len(self._endedProbes) > MAX_ENDED_PROBES:
            del self._endedProbes[next(iter(self._endedProbes))]
        if probe.expectedNacks > 0:
            self._adjustAwareness(max(probe.expectedNacks - probe.nacks, 0))
        else:
            self._adjustAwareness(1)
        member = self._members.get(probe.target)
        if member is not None and member.live:
            self._suspect(Suspect(probe.target, member.incarnation, self.nodeId), now)

    def _ackReceived(self, seq: int, now: float) -> None:
        waiter = self._acks.pop(seq, None)
        if waiter is None:
            # An ack after its probe ended: the member lives, slowly.
            ended = self._endedProbes.pop(seq, None)
            if ended is not None:
                self._roundTrip(ended[0], now - ended[1], now)
            return
        if isinstance(waiter, _Probe):
            self._roundTrip(waiter.target, now - waiter.sentAt, now)
            waiter.acked = True
            for timer in waiter.timers:
                timer.cancelled = True
            self._adjustAwareness(-1)
        elif isinstance(waiter, _Relay):
            self._send(waiter.origin, Ack(waiter.originSeq, self._piggyback()))

    def _relay(self, origin: str, request: PingReq, now: float) -> None:
        target = request.target
        member = self._members.get(target)
        if member is None or target in (self.nodeId, origin):
            return
        seq = next(self._seq)
        self._acks[seq] = _Relay(origin, request.seq)
        self._send(target, Ping(seq, target, self._piggyback()))

        def timedOut(now: float) -> None:
            if isinstance(self._acks.get(seq), _Relay):
                del self._acks[seq]
                self._send(origin, Nack(request.seq))

        self._timers.at(now + self._scaled(self.config.probeTimeout, now) + self.slowness(target, now), timedOut)

    # Periodic tasks.

    def _gossipTick(self, now: float) -> None:
        self._timers.at(now + self.config.gossipInterval, self._gossipTick)
        if not self._broadcasts:
            return
        for nodeId in self._randomMembers(self.config.gossipNodes, ()):
            updates = self._piggyback()
            if not updates:
                return
            self._send(nodeId, Gossip(updates))

    def _pushPullTick(self, now: float) -> None:
        interval = self.config.pushPullInterval
        members = self.liveCount()
        if members > 32:
            # As memberlist: sync less often in big clusters, where a sync
            # carries more.
            interval *= math.ceil(math.log2(members) - math.log2(32)) + 1
        self._timers.at(now + interval, self._pushPullTick)
        for nodeId in self._randomMembers(1, ()):
            self._send(nodeId, Sync(self._state()))

    def _reconnectTick(self, now: float) -> None:
        self._timers.at(now + self.config.reconnectInterval, self._reconnectTick)
        for nodeId in self._randomMembers(1, (), (DEAD,)):
            self._send(nodeId, Sync(self._state()))

    def _reapInterval(self) -> float:
        return min(max(self.config.deadMemberTTL / 10, 1.0), 60.0)

    def _reapTick(self, now: float) -> None:
        self._timers.at(now + self._reapInterval(), self._reapTick)
        ttl = self.config.deadMemberTTL
        for nodeId, member in list(self._members.items()):
            if not member.live and nodeId != self.nodeId and now - member.since >= ttl:
                del self._members[nodeId]
                self._roundTrips.pop(nodeId, None)
                self._lastHeard.pop(nodeId, None)
                self._liveCount = None
                self._changes.append(MemberChange(ChangeKind.FORGOTTEN, member, member))

    # State changes.

    def _state(self) -> tuple[Member, ...]:
        return tuple(self._members.values())

    def _setMember(self, member: Member) -> None:
        previous = self._members.get(member.nodeId)
        self._members[member.nodeId] = member
        self._liveCount = None
        kind = _changeKind(previous, member)
        if kind is not None:
            self._changes.append(MemberChange(kind, member, previous))

    def _apply(self, update: Update, now: float) -> None:
        if isinstance(update, Alive):
            self._alive(update, now)
        elif isinstance(update, Suspect):
            self._suspect(update, now)
        else:
            if self._doubtedVerdict(update, now):
                # Then it is only a suspicion (or a confirmation of the one
                # here): the member gets its chance to refute.  So a stale
                # verdict (from the far side of a healed partition, say)
                # does not kill a member that is alive and reachable.
                self._suspect(Suspect(update.nodeId, update.incarnation, update.accuser), now)
            else:
                self._dead(update, now)

    def _doubtedVerdict(self, update: Dead, now: float) -> bool:
        """
        Whether C{update}, another node's verdict of death, is contradicted
        here: this node heard from the member itself within the shortest
        suspicion timeout, later than any verdict made by the rules could
        have been reached.
        """
        nodeId = update.nodeId
        if update.accuser in (nodeId, self.nodeId) or nodeId == self.nodeId:
            return False
        current = self._members.get(nodeId)
        heard = self._lastHeard.get(nodeId)
        if current is None or not current.live or current.incarnation != update.incarnation or heard is None:
            return False
        return now - heard < self.config.suspicionTimeout(self.liveCount())

    def _refute(self, accusedIncarnation: int) -> None:
        local = self.local
        incarnation = max(local.incarnation, accusedIncarnation) + 1
        self._members[self.nodeId] = Member(
            self.nodeId, incarnation, ALIVE, local.address, local.clientAddresses, local.meta, local.since
        )
        self._broadcastSelf()
        self._adjustAwareness(1)

    def _alive(self, update: Alive, now: float) -> None:
        nodeId = update.nodeId
        if nodeId == self.nodeId:
            local = self.local
            # A claim about us newer than ours (from an earlier run of this
            # node), or different at the same incarnation: overrule it.
            if update.incarnation > local.incarnation or (
                update.incarnation == local.incarnation and not local.sameAdvertisement(_fromAlive(update, ALIVE, 0))
            ):
                self._refute(update.incarnation)
            return
        current = self._members.get(nodeId)
        if current is None:
            if len(self._members) >= MAX_MEMBERS:
                return
            self._probeList.insert(self.rng.randint(0, len(self._probeList)), nodeId)
        elif update.incarnation <= current.incarnation:
            return
        self._cancelSuspicion(nodeId)
        since = current.since if current is not None and current.state is ALIVE else now
        self._setMember(_fromAlive(update, ALIVE, since))
        self._broadcast(update)

    def _suspect(self, update: Suspect, now: float) -> None:
        nodeId = update.nodeId
        current = self._members.get(nodeId)
        if current is None or update.incarnation < current.incarnation:
            return
        if nodeId == self.nodeId:
            if not self.left:
                self._refute(update.incarnation)
            return
        if current.state is SUSPECT:
            suspicion = self._suspicions.get(nodeId)
            if suspicion is not None and suspicion.confirm(update.accuser):
                self._scheduleSuspicion(nodeId, suspicion)
                self._broadcast(update)
            return
        if current.state is not ALIVE:
            return
        self._setMember(
            Member(nodeId, update.incarnation, SUSPECT, current.address, current.clientAddresses, current.meta, now)
        )
        self._broadcast(update)
        config = self.config
        members = self.liveCount()
        k = config.suspicionMult - 2
        if members - 2 < k:
            k = 0
        shortest = config.suspicionTimeout(members)
        suspicion = _Suspicion(
            update.accuser, k, shortest, shortest * config.suspicionMaxMult, now, self._suspicionExtra(nodeId, now)
        )
        self._suspicions[nodeId] = suspicion
        self._scheduleSuspicion(nodeId, suspicion)

    def _scheduleSuspicion(self, nodeId: str, suspicion: _Suspicion) -> None:
        if suspicion.timer is not None:
            suspicion.timer.cancelled = True

        def expired(now: float) -> None:
            if self._suspicions.get(nodeId) is suspicion:
                # Late acks may have shown since that the suspect is slow.
                extra = self._suspicionExtra(nodeId, now)
                if extra > suspicion.extra:
                    suspicion.extra = extra
                    if suspicion.deadline() > now:
                        self._scheduleSuspicion(nodeId, suspicion)
                        return
                member = self._members[nodeId]
                self._dead(Dead(nodeId, member.incarnation, self.nodeId), now)

        suspicion.timer = self._timers.at(suspicion.deadline(), expired)

    def _suspicionExtra(self, nodeId: str, now: float) -> float:
        """
        A suspect seen slow lately needs a round trip through its slow
        event loop to learn of the suspicion and another for its refutation
        to leave, and a lagging local node reads it late: the suspicion
        waits that much longer.
        """
        return 2 * self.slowness(nodeId, now) + self.localLag(now)

    def _cancelSuspicion(self, nodeId: str) -> None:
        suspicion = self._suspicions.pop(nodeId, None)
        if suspicion is not None and suspicion.timer is not None:
            suspicion.timer.cancelled = True

    def _dead(self, update: Dead, now: float) -> None:
        nodeId = update.nodeId
        current = self._members.get(nodeId)
        if current is None or update.incarnation < current.incarnation:
            return
        leaving = update.accuser == nodeId
        if current.state is LEFT or (current.state is DEAD and not leaving):
            return
        if nodeId == self.nodeId:
            if not self.left:
                self._refute(update.incarnation)
            return
        self._cancelSuspicion(nodeId)
        state = LEFT if leaving else DEAD
        self._setMember(
            Member(nodeId, update.incarnation, state, current.address, current.clientAddresses, current.meta, now)
        )
        self._broadcast(update)

    def _merge(self, sender: str, members: Sequence[Member], now: float) -> None:
        for remote in members:
            local = self._members.get(remote.nodeId)
            if local is not None and local.state is remote.state and remote.nodeId != self.nodeId:
                if remote.state is not ALIVE or remote.incarnation <= local.incarnation:
                    continue
            if remote.state is ALIVE:
                self._alive(
                    Alive(remote.nodeId, remote.incarnation, remote.address, remote.clientAddresses, remote.meta), now
                )
            elif remote.state is LEFT:
                self._dead(Dead(remote.nodeId, remote.incarnation, remote.nodeId), now)
            else:
                # Someone else's verdict of death is only a suspicion here:
                # the member gets its chance to refute.
                self._suspect(Suspect(remote.nodeId, remote.incarnation, sender), now)


def _fromAlive(update: Alive, state: MemberState, since: float) -> Member:
    return Member(
        update.nodeId, update.incarnation, state, update.address, tuple(update.clientAddresses), update.meta, since
    )


def _changeKind(previous: Member | None, member: Member) -> ChangeKind | None:
    if previous is None or not previous.live:
        if member.live:
            return ChangeKind.JOINED
        if previous is None:
            return None
        if member.state is LEFT and previous.state is DEAD:
            return ChangeKind.LEFT
        return None
    if member.state is DEAD:
        return ChangeKind.DIED
    if member.state is LEFT:
        return ChangeKind.LEFT
    if previous.state is ALIVE and member.state is SUSPECT:
        return ChangeKind.SUSPECTED
    if previous.state is SUSPECT and member.state is ALIVE:
        return ChangeKind.RECOVERED
    if not previous.sameAdvertisement(member):
        return ChangeKind.UPDATED
    return None


# Encoding.


class SwimDecodeError(ValueError):
    """
    A membership message that is not valid; it is dropped.
    """


def _encodeUpdate(update: Update) -> list[Any]:
    if isinstance(update, Alive):
        return [
            "alive",
            update.nodeId,
            update.incarnation,
            update.address,
            list(update.clientAddresses),
            dict(update.meta),
        ]
    if isinstance(update, Suspect):
        return ["suspect", update.nodeId, update.incarnation, update.accuser]
    return ["dead", update.nodeId, update.incarnation, update.accuser]


def _encodeMember(member: Member) -> list[Any]:
    return [
        member.nodeId,
        member.incarnation,
        member.state.value,
        member.address,
        list(member.clientAddresses),
        dict(member.meta),
    ]


def encodeMessage(message: Message) -> bytes:
    """
    The compact JSON of C{message}.
    """
    body: dict[str, Any]
    if isinstance(message, Ping):
        body = {"t": "ping", "seq": message.seq, "target": message.target}
    elif isinstance(message, PingReq):
        body = {"t": "ping-req", "seq": message.seq, "target": message.target}
    elif isinstance(message, Ack):
        body = {"t": "ack", "seq": message.seq}
    elif isinstance(message, Nack):
        body = {"t": "nack", "seq": message.seq}
    elif isinstance(message, Gossip):
        body = {"t": "gossip"}
    else:
        body = {"t": "sync", "reply": message.reply, "members": [_encodeMember(m) for m in message.members]}
    if message.updates:
        body["up"] = [_encodeUpdate(update) for update in message.updates]
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise SwimDecodeError(what)


def _nodeId(value: Any) -> str:
    _check(isinstance(value, str) and NODE_ID_PATTERN.match(value) is not None, "invalid node id")
    return str(value)


def _number(value: Any) -> int:
    _check(type(value) is int and 0 <= value <= MAX_NUMBER, "invalid number")
    return int(value)


def _address(value: Any) -> str:
    _check(isinstance(value, str) and len(value) <= MAX_ADDRESS_CHARS, "invalid address")
    return str(value)


def _clientAddresses(value: Any) -> tuple[str, ...]:
    _check(isinstance(value, list) and len(value) <= MAX_CLIENT_ADDRESSES, "invalid client addresses")
    for item in value:
        _check(isinstance(item, str) and len(item) <= MAX_CLIENT_ADDRESS_CHARS, "invalid client address")
    return tuple(value)


def _meta(value: Any) -> dict[str, str]:
    _check(isinstance(value, dict) and len(value) <= MAX_META_ENTRIES, "invalid metadata")
    for key, item in value.items():
        _check(
            len(key) <= MAX_META_KEY_CHARS and isinstance(item, str) and len(item) <= MAX_META_VALUE_CHARS,
            "invalid metadata entry",
        )
    return dict(value)


def _decodeUpdate(raw: Any) -> Update:
    _check(isinstance(raw, list) and len(raw) >= 4, "invalid update")
    kind = raw[0]
    if kind == "alive":
        _check(len(raw) == 6, "invalid alive update")
        return Alive(_nodeId(raw[1]), _number(raw[2]), _address(raw[3]), _clientAddresses(raw[4]), _meta(raw[5]))
    _check(len(raw) == 4, "invalid update")
    if kind == "suspect":
        return Suspect(_nodeId(raw[1]), _number(raw[2]), _nodeId(raw[3]))
    _check(kind == "dead", "unknown update kind")
    return Dead(_nodeId(raw[1]), _number(raw[2]), _nodeId(raw[3]))


_STATES = {state.value: state for state in MemberState}


def _decodeMember(raw: Any) -> Member:
    _check(isinstance(raw, list) and len(raw) == 6, "invalid member")
    _check(raw[2] in _STATES, "invalid member state")
    return Member(
        _nodeId(raw[0]), _number(raw[1]), _STATES[raw[2]], _address(raw[3]), _clientAddresses(raw[4]), _meta(raw[5])
    )


def decodeMessage(data: bytes) -> Message:
    """
    @raise SwimDecodeError: for anything but a valid message.
    """
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise SwimDecodeError("not JSON") from None
    _check(isinstance(body, dict), "not an object")
    rawUpdates = body.get("up", [])
    _check(isinstance(rawUpdates, list) and len(rawUpdates) <= MAX_UPDATES, "invalid updates")
    updates = tuple(_decodeUpdate(raw) for raw in rawUpdates)
    kind = body.get("t")
    if kind in ("ping", "ping-req"):
        cls = Ping if kind == "ping" else PingReq
        return cls(_number(body.get("seq")), _nodeId(body.get("target")), updates)
    if kind == "ack":
        return Ack(_number(body.get("seq")), updates)
    if kind == "nack":
        return Nack(_number(body.get("seq")), updates)
    if kind == "gossip":
        return Gossip(updates)
    _check(kind == "sync", "unknown message type")
    members = body.get("members")
    _check(isinstance(members, list) and len(members) <= MAX_MEMBERS, "invalid members")
    reply = body.get("reply", False)
    _check(isinstance(reply, bool), "invalid reply flag")
    return Sync(tuple(_decodeMember(raw) for raw in members), reply, updates)
