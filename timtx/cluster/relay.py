# -*- test-case-name: timtx.test.test_nat_relay -*-
"""
Relayed peer links: how two members that cannot dial each other (both
behind NATs, say) still get a peer link.

A node that cannot be dialled (C{[nat] reachable = false}) dials the
reachable members itself and names one of them, its I{relay}, in its
membership metadata.  Another node that needs a link to it asks that relay
to open a I{circuit}: the relay forwards bytes between the two over the
peer links it already has with each, as ordinary peer messages.  On the
circuit the two ends run the unchanged peer protocol, handshake included,
so the link is authenticated end to end with the cluster secret; the relay
only forwards bytes (with TLS on the peer links it can read them, as any
member can; it cannot forge or alter them).

The messages (each payload starts with the 16-byte circuit id the opener
chose):

  - C{relay.connect} (opener to relay): the target's node id;
  - C{relay.incoming} (relay to target): the opener's node id;
  - C{relay.data} (an end to the relay) and C{relay.deliver} (the relay to
    the other end): bytes of the circuit;
  - C{relay.close} (an end to the relay) and C{relay.closed} (the relay to
    an end): the reason, in words.

L{Relay} is the forwarding role, with per-node limits: circuits open at
once, and a byte rate whose excess waits in a bounded queue (past it the
circuit that overflows is closed).  A request from a node that is not a
live member, for a target that is not one or has no link here, is refused:
counted, logged, answered with C{relay.closed}, and nothing else happens.
L{Circuits} is the endpoint role: each circuit end is a L{RelayedTransport}
under an ordinary L{PeerProtocol}.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

RELAY_CONNECT = "relay.connect"
RELAY_INCOMING = "relay.incoming"
RELAY_DATA = "relay.data"
RELAY_DELIVER = "relay.deliver"
RELAY_CLOSE = "relay.close"
RELAY_CLOSED = "relay.closed"
#: Every message kind the relay uses; applications cannot take them.
RELAY_KINDS = (RELAY_CONNECT, RELAY_INCOMING, RELAY_DATA, RELAY_DELIVER, RELAY_CLOSE, RELAY_CLOSED)

CIRCUIT_ID_BYTES = 16
#: Circuit bytes per relay message: well under the smallest peer frame
#: limit, so a relayed frame of any size fits the peer links under it.
CHUNK_BYTES = 16 << 10
#: The longest node id a relay message may name.
MAX_NODE_ID_BYTES = 128
#: The longest close reason sent.
MAX_REASON_BYTES = 200


class RelayHost(Protocol):
    """
    What the relay needs from the cluster service.
    """

    nodeId: str
    clock: IReactorTime

    def isLiveMember(self, nodeId: str) -> bool:
        """
        Whether C{nodeId} is a live member (alive or suspect).
        """

    def sendOnLink(self, nodeId: str, kind: str, payload: bytes) -> bool:
        """
        Write a message on the established link to C{nodeId} now.

        @return: whether it was written (no link: not).
        """

    def relayedResponderFactory(self) -> Factory:
        """
        The factory of peer links this node answers (as its listener's).
        """


@dataclass(frozen=True)
class RelayLimits:
    """
    The relay's per-node limits (C{[nat] relay*} in docs/configuration.md).
    """

    enabled: bool = True
    rate: int = 1 << 20
    burst: int = 256 << 10
    maxQueuedBytes: int = 4 << 20
    maxCircuits: int = 64

    @classmethod
    def fromConfig(cls, nat: Any) -> RelayLimits:
        return cls(
            enabled=nat.relay,
            rate=nat.relay_rate,
            burst=nat.relay_burst,
            maxQueuedBytes=nat.relay_max_queued_bytes,
            maxCircuits=nat.relay_max_circuits,
        )


@dataclass
class RelayNodeStats:
    """
    What one node did through this relay.

    @ivar bytesFrom: circuit bytes it sent.
    @ivar bytesTo: circuit bytes delivered to it.
    @ivar circuits: circuits it is an end of, now.
    @ivar delayed: messages held back because it was over its rate.
    @ivar limited: its circuits closed because its queue overflowed.
    """

    bytesFrom: int = 0
    bytesTo: int = 0
    circuits: int = 0
    delayed: int = 0
    limited: int = 0


@dataclass
class RelayStats:
    """
    @ivar opened: circuits opened.
    @ivar refused: refused requests, by reason.
    @ivar dropped: circuit messages for no circuit of the sender.
    @ivar nodes: per node (kept while it has circuits or queued bytes, and
        its totals after).
    """

    opened: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    nodes: dict[str, RelayNodeStats] = field(default_factory=dict)

    def node(self, nodeId: str) -> RelayNodeStats:
        stats = self.nodes.get(nodeId)
        if stats is None:
            stats = self.nodes[nodeId] = RelayNodeStats()
        return stats


@dataclass(eq=False)
class _Circuit:
    id: bytes
    opener: str
    target: str

    def other(self, nodeId: str) -> str:
        return self.target if nodeId == self.opener else self.opener


class _Budget:
    """
    One node's byte rate through the relay: a token bucket whose excess
    waits in order, bounded.
    """

    def __init__(self, limits: RelayLimits, now: float):
        self.limits = limits
        self.tokens = float(limits.burst)
        self.last = now
        #: Waiting: (circuit, bytes, whether they are the close's reason).
        self.queue: deque[tuple[_Circuit, bytes, bool]] = deque()
        self.queuedBytes = 0
        self.timer: IDelayedCall | None = None

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.limits.burst), self.tokens + (now - self.last) * self.limits.rate)
        self.last = now

    def take(self, size: int, now: float) -> bool:
        if not self.limits.rate:
            return True
        self.refill(now)
        if self.tokens >= size:
            self.tokens -= size
            return True
        return False

    def wait(self, size: int) -> float:
        """
        Seconds until C{size} tokens are there.
        """
        return max(size - self.tokens, 0.0) / self.limits.rate


def _split(payload: bytes) -> tuple[bytes, bytes]:
    if len(payload) < CIRCUIT_ID_BYTES:
        raise ValueError("shorter than a circuit id")
    return payload[:CIRCUIT_ID_BYTES], payload[CIRCUIT_ID_BYTES:]


def _nodeId(raw: bytes) -> str:
    if not 0 < len(raw) <= MAX_NODE_ID_BYTES:
        raise ValueError("bad node id")
    return raw.decode("utf-8")


def _reason(text: str) -> bytes:
    return text.encode("utf-8")[:MAX_REASON_BYTES]


class Relay:
    """
    The forwarding role: circuits between other nodes, through this one.
    """

    log = Logger()

    def __init__(self, host: RelayHost, limits: RelayLimits):
        self.host = host
        self.limits = limits
        self.stats = RelayStats()
        self._circuits: dict[bytes, _Circuit] = {}
        self._budgets: dict[str, _Budget] = {}

    def circuits(self) -> int:
        return len(self._circuits)

    def _refuse(self, source: str, circuitId: bytes, reason: str) -> None:
        self.stats.refused[reason] += 1
        self.log.info("refused to relay for node {node}: {reason}", node=source, reason=reason)
        self.host.sendOnLink(source, RELAY_CLOSED, circuitId + _reason(f"relay refused: {reason}"))

    def connectReceived(self, source: str, payload: bytes) -> None:
        try:
            circuitId, rest = _split(payload)
            target = _nodeId(rest)
        except (ValueError, UnicodeDecodeError):
            self.stats.refused["malformed"] += 1
            self.log.warn("malformed relay request from node {node}", node=source)
            return
        if not self.limits.enabled:
            return self._refuse(source, circuitId, "this node does not relay")
        if not self.host.isLiveMember(source):
            return self._refuse(source, circuitId, "not a live member")
        if target in (source, self.host.nodeId):
            return self._refuse(source, circuitId, "no relaying to itself")
        if not self.host.isLiveMember(target):
            return self._refuse(source, circuitId, "the target is not a live member")
        if circuitId in self._circuits:
            return self._refuse(source, circuitId, "circuit id in use")
        for end in (source, target):
            if self.stats.node(end).circuits >= self.limits.maxCircuits:
                return self._refuse(source, circuitId, f"node {end} has {self.limits.maxCircuits} circuits")
        if not self.host.sendOnLink(target, RELAY_INCOMING, circuitId + source.encode("utf-8")):
            return self._refuse(source, circuitId, "no link to the target")
        self._circuits[circuitId] = _Circuit(circuitId, source, target)
        self.stats.opened += 1
        self.stats.node(source).circuits += 1
        self.stats.node(target).circuits += 1

    def _circuitOf(self, source: str, payload: bytes) -> tuple[_Circuit, bytes] | None:
        try:
            circuitId, rest = _split(payload)
        except ValueError:
            self.stats.dropped += 1
            return None
        circuit = self._circuits.get(circuitId)
        if circuit is None or source not in (circuit.opener, circuit.target):
            self.stats.dropped += 1
            return None
        return circuit, rest

    def dataReceived(self, source: str, payload: bytes) -> None:
        found = self._circuitOf(source, payload)
        if found is None:
            return
        circuit, data = found
        self.stats.node(source).bytesFrom += len(data)
        budget = self._budget(source)
        now = self.host.clock.seconds()
        if not budget.queue and budget.take(len(data), now):
            self._deliver(circuit, circuit.other(source), data)
            return
        if budget.queuedBytes + len(data) > self.limits.maxQueuedBytes:
            self.stats.node(source).limited += 1
            self.log.warn(
                "node {node} is over its relay rate with {queued} bytes waiting: closing a circuit",
                node=source,
                queued=budget.queuedBytes,
            )
            self._close(circuit, f"node {source} exceeded its relay rate")
            return
        self.stats.node(source).delayed += 1
        budget.queue.append((circuit, data, False))
        budget.queuedBytes += len(data)
        self._schedule(source, budget)

    def closeReceived(self, source: str, payload: bytes) -> None:
        found = self._circuitOf(source, payload)
        if found is None:
            return
        circuit, reason = found
        budget = self._budgets.get(source)
        if budget is not None and budget.queue:
            # Behind what the closing end sent before.
            budget.queue.append((circuit, reason, True))
            return
        self._finish(circuit, source, reason)

    def _finish(self, circuit: _Circuit, closer: str, reason: bytes) -> None:
        if self._circuits.pop(circuit.id, None) is None:
            return
        self._forget(circuit)
        self.host.sendOnLink(circuit.other(closer), RELAY_CLOSED, circuit.id + reason)

    def nodeGone(self, nodeId: str) -> None:
        """
        The link to C{nodeId} is lost: close every circuit it is an end of.
        """
        for circuit in [c for c in self._circuits.values() if nodeId in (c.opener, c.target)]:
            self._finish(circuit, nodeId, _reason(f"the relay lost its link to node {nodeId}"))
        budget = self._budgets.pop(nodeId, None)
        if budget is not None and budget.timer is not None and budget.timer.active():
            budget.timer.cancel()

    def stop(self) -> None:
        for nodeId in list(self._budgets):
            budget = self._budgets.pop(nodeId)
            if budget.timer is not None and budget.timer.active():
                budget.timer.cancel()
        self._circuits.clear()

    def _close(self, circuit: _Circuit, why: str) -> None:
        if self._circuits.pop(circuit.id, None) is None:
            return
        self._forget(circuit)
        for end in (circuit.opener, circuit.target):
            self.host.sendOnLink(end, RELAY_CLOSED, circuit.id + _reason(why))

    def _forget(self, circuit: _Circuit) -> None:
        for end in (circuit.opener, circuit.target):
            self.stats.node(end).circuits -= 1

    def _deliver(self, circuit: _Circuit, target: str, data: bytes) -> None:
        if self.host.sendOnLink(target, RELAY_DELIVER, circuit.id + data):
            self.stats.node(target).bytesTo += len(data)
        else:
            self._close(circuit, f"the relay has no link to node {target}")

    def _budget(self, nodeId: str) -> _Budget:
        budget = self._budgets.get(nodeId)
        if budget is None:
            budget = self._budgets[nodeId] = _Budget(self.limits, self.host.clock.seconds())
        return budget

    def _schedule(self, nodeId: str, budget: _Budget) -> None:
        if budget.timer is not None or not budget.queue:
            return
        circuit, data, closing = budget.queue[0]
        budget.refill(self.host.clock.seconds())
        delay = 0.0 if closing else budget.wait(len(data))
        budget.timer = self.host.clock.callLater(delay, self._drain, nodeId, budget)

    def _drain(self, nodeId: str, budget: _Budget) -> None:
        budget.timer = None
        now = self.host.clock.seconds()
        while budget.queue:
            circuit, data, closing = budget.queue[0]
            if not closing and not budget.take(len(data), now):
                break
            budget.queue.popleft()
            if closing:
                self._finish(circuit, nodeId, data)
                continue
            budget.queuedBytes -= len(data)
            if circuit.id in self._circuits:
                self._deliver(circuit, circuit.other(nodeId), data)
        self._schedule(nodeId, budget)


@implementer(IAddress)
@dataclass(frozen=True)
class RelayedAddress:
    """
    One end of a relayed link: the node, and the relay it goes through.
    """

    nodeId: str
    relay: str


@implementer(ITransport)
class RelayedTransport:
    """
    One end of a circuit, as a transport for a peer protocol.
    """

    disconnecting = False
    producer: Any = None
    #: How the link goes, for the members file.
    linkPath = "relayed"

    def __init__(self, circuits: Circuits, relay: str, circuitId: bytes, peer: str, initiator: bool):
        self.circuits = circuits
        self.relay = relay
        self.circuitId = circuitId
        #: The node at the other end; the link must authenticate as it.
        self.peerNodeId = peer
        self.initiator = initiator
        self.protocol: Any = None
        self.bytesSent = 0
        self.bytesReceived = 0

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        self.bytesSent += len(data)
        self.circuits.send(self, data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.circuits.close(self, "closed by the end", ConnectionDone("relayed link closed"))

    def abortConnection(self) -> None:
        self.circuits.close(self, "aborted by the end", ConnectionLost("relayed link aborted"))

    def getPeer(self) -> RelayedAddress:
        return RelayedAddress(self.peerNodeId, self.relay)

    def getHost(self) -> RelayedAddress:
        return RelayedAddress(self.circuits.host.nodeId, self.relay)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class Circuits:
    """
    The endpoint role: this node's ends of circuits, each under a peer
    protocol.
    """

    log = Logger()

    def __init__(self, host: RelayHost):
        self.host = host
        self._ends: dict[tuple[str, bytes], RelayedTransport] = {}
        #: Messages for circuits this node has no end of.
        self.dropped = 0

    def ends(self) -> list[RelayedTransport]:
        return list(self._ends.values())

    def connect(self, relay: str, target: str, factory: IProtocolFactory) -> Deferred[Any]:
        """
        Open a circuit to C{target} through C{relay} and run
        C{factory}'s protocol (the initiator of a peer link) on it.
        """
        circuitId = os.urandom(CIRCUIT_ID_BYTES)
        if not self.host.sendOnLink(relay, RELAY_CONNECT, circuitId + target.encode("utf-8")):
            return fail(ConnectError(string=f"no link to the relay, node {relay}"))
        transport = RelayedTransport(self, relay, circuitId, target, initiator=True)
        protocol = factory.buildProtocol(transport.getPeer())
        if protocol is None:
            self.host.sendOnLink(relay, RELAY_CLOSE, circuitId + b"refused")
            return fail(ConnectError(string="the factory refused the link"))
        self._attach(transport, protocol)
        return succeed(protocol)

    def _attach(self, transport: RelayedTransport, protocol: Any) -> None:
        self._ends[(transport.relay, transport.circuitId)] = transport
        transport.protocol = protocol
        protocol.makeConnection(transport)

    def incomingReceived(self, relay: str, payload: bytes) -> None:
        try:
            circuitId, rest = _split(payload)
            source = _nodeId(rest)
        except (ValueError, UnicodeDecodeError):
            self.log.warn("malformed relayed link from relay {relay}", relay=relay)
            return
        if (relay, circuitId) in self._ends:
            return
        transport = RelayedTransport(self, relay, circuitId, source, initiator=False)
        protocol = self.host.relayedResponderFactory().buildProtocol(transport.getPeer())
        if protocol is None:
            self.host.sendOnLink(relay, RELAY_CLOSE, circuitId + b"refused")
            return
        self._attach(transport, protocol)

    def deliverReceived(self, relay: str, payload: bytes) -> None:
        transport = self._transport(relay, payload)
        if transport is not None and transport.protocol is not None:
            data = payload[CIRCUIT_ID_BYTES:]
            transport.bytesReceived += len(data)
            transport.protocol.dataReceived(data)

    def closedReceived(self, relay: str, payload: bytes) -> None:
        transport = self._transport(relay, payload)
        if transport is not None:
            reason = payload[CIRCUIT_ID_BYTES:].decode("utf-8", "replace")
            self._lost(transport, ConnectionLost(f"relayed link closed by the relay: {reason}"))

    def _transport(self, relay: str, payload: bytes) -> RelayedTransport | None:
        transport = self._ends.get((relay, payload[:CIRCUIT_ID_BYTES]))
        if transport is None:
            self.dropped += 1
        return transport

    def send(self, transport: RelayedTransport, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = transport.circuitId + bytes(view[start : start + CHUNK_BYTES])
            if not self.host.sendOnLink(transport.relay, RELAY_DATA, chunk):
                self._lost(transport, ConnectionLost(f"link to the relay, node {transport.relay}, lost"))
                return

    def close(self, transport: RelayedTransport, reason: str, error: Exception) -> None:
        if transport.disconnecting:
            return
        self.host.sendOnLink(transport.relay, RELAY_CLOSE, transport.circuitId + _reason(reason))
        self._lost(transport, error)

    def linkLost(self, nodeId: str) -> None:
        """
        The link to C{nodeId} is lost: every circuit through it is too.
        """
        for transport in [t for t in self._ends.values() if t.relay == nodeId]:
            self._lost(transport, ConnectionLost(f"link to the relay, node {nodeId}, lost"))

    def _lost(self, transport: RelayedTransport, error: Exception) -> None:
        if transport.disconnecting:
            return
        transport.disconnecting = True
        self._ends.pop((transport.relay, transport.circuitId), None)
        protocol = transport.protocol
        if protocol is not None:
            # As a TCP transport does: never inside the caller's write.
            self.host.clock.callLater(0, protocol.connectionLost, Failure(error))


@implementer(IStreamClientEndpoint)
class RelayEndpoint:
    """
    An C{IStreamClientEndpoint} reaching C{target} through C{relay}.
    """

    def __init__(self, circuits: Circuits, relay: str, target: str):
        self.circuits = circuits
        self.relay = relay
        self.target = target

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        return self.circuits.connect(self.relay, self.target, factory)
