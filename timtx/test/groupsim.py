# -*- test-case-name: timtx.test.test_groupsim -*-
"""
A deterministic simulation of groups across nodes: real L{Node}s (SWIM,
peer links, group owners, L{GroupDelivery}, inboxes, the client protocol)
on one L{Clock}, linked in memory (L{timtx.test.simnet}), sharing one
memory store whose answers come after seeded delays, with real
L{TimClient}s as the members' devices.

One C{random.Random(seed)} draws everything: the operations (group
messages from random members, joins and leaves, devices that drop and log
in again on another node), node crashes and restarts, partitions and
heals; SWIM's verdicts then move the groups' owners.  At the end every
fault is repaired, devices still away log in again and read what they
missed, each steady member says one last thing, and L{GroupSim.check}
names every broken promise:

  - every message of a group is stored once (resends are recognised) and
    under one seq, and its seqs have no holes;
  - a message confirmed to its sender (its echo) is the one stored under
    that seq;
  - each device got a group's messages in seq order: nothing new older
    than what it already had (repeats of a seq are allowed);
  - each steady member (a member throughout) got every message up to the
    last confirmed one, with no hole on any device that stayed connected.

    sim = GroupSim(seed=7)
    sim.run()
    print("\\n".join(sim.check() or ["ok"]))
    print("\\n".join(sim.trace))

The same seed repeats the same run in one process.  In another the nodes
may order a few simultaneous events differently (they iterate sets of
objects, whose order follows memory addresses), so a rare seed passes in
one process and fails in another: the failing run's trace (with the
nodes' log lines, C{logs}) is the record.  C{python -m timtx.test.groupsim
--seed 7 --trace --logs} runs one seed and prints its trace.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import shutil
import tempfile
from functools import partial
from typing import Any, Callable, cast

from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.interface import Method

from timtx.client import TimClient, TimRequestFailed, _TimClientTcpProtocol
from timtx.cluster.membership import ClusterService
from timtx.cluster.ownership import groupKey
from timtx.crypto.ids import ACCOUNT_ID_BYTES, NodeKeys, b58encode
from timtx.delivery.fanout import groupConversation
from timtx.node import Node
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.memory import MemoryStore
from timtx.persistence.records import GROUP_ALIVE, ROLE_FOUNDER, Account, Group, Member, TokenGrant
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, ErrorCode, GroupType, TimType
from timtx.protocols.peer import SESSION_BYTES
from timtx.protocols.structs import Tid, TimRoomBean
from timtx.test.simnet import HeapClock, NodeClock, SimClientEndpoint, SimNetwork, SimServerEndpoint
from timtx.testing import testConfig
from timtx.transports.tcp import TimTcpServerFactory

SECRET = "cluster-secret-for-the-simulation"
#: Ports on the simulated network only (no socket is bound).
PEER_PORT = 7000
CLIENT_PORT = 7001
#: Seconds a device waits for an answer: longer than a node waits for
#: another (C{[cluster] request_timeout}), so it hears the node's verdict.
REQUEST_TIMEOUT = 25.0


@implementer(IMessageStore)
class DelayedStore:
    """
    One node's view of the shared store: each operation takes effect at
    once and answers after a seeded delay on the node's clock, so a node
    that crashes meanwhile never hears that its write was committed.
    """

    def __init__(self, wrapped: IMessageStore, clock: NodeClock, rng: random.Random, delay: tuple[float, float]):
        self.wrapped = wrapped
        self.clock = clock
        self.rng = rng
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def _later(self, name: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()

        def arrived(result: Any) -> None:
            fire = answer.errback if isinstance(result, Failure) else answer.callback
            self.clock.callLater(self.rng.uniform(*self.delay), fire, result)

        getattr(self.wrapped, name)(*args, **kwargs).addBoth(arrived)
        return answer

    def open(self) -> Deferred[None]:
        return self.wrapped.open()

    def close(self) -> Deferred[None]:
        # The store outlives every node.
        return succeed(None)


def _delayedMethod(name: str) -> Callable[..., Deferred[Any]]:
    def delayed(self: DelayedStore, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self._later(name, *args, **kwargs)

    delayed.__name__ = name
    return delayed


for _name, _description in IMessageStore.namesAndDescriptions(all=True):
    if isinstance(_description, Method) and _name not in ("open", "close"):
        setattr(DelayedStore, _name, _delayedMethod(_name))


def _code(failure: Failure) -> int | None:
    """
    The tim error code a request failed with, if the node refused it.
    """
    error = failure.value
    return error.code if isinstance(error, TimRequestFailed) else None


class SimClusterService(ClusterService):
    """
    A L{ClusterService} whose peer links are in memory.
    """

    network: SimNetwork

    def endpointFor(self, address: str) -> Any:
        host, _, port = address.rpartition(":")
        return SimClientEndpoint(self.network, self.nodeId, host, int(port))


class SimNode(Node):
    """
    A L{Node} on a L{NodeClock}, its peers and clients linked in memory.
    """

    def __init__(self, config: Any, clock: NodeClock, *, network: SimNetwork, rng: random.Random, **kwargs: Any):
        self.network = network
        self.rng = rng
        super().__init__(config, clock, clock=clock, **kwargs)
        ids = random.Random(rng.getrandbits(64))
        self.vrooms.newId = lambda size: b58encode(ids.randbytes(size))
        self.clientFactory = TimTcpServerFactory(self, self.protocols.lookup("client-tcp"), self.gate)

    def makeCluster(self) -> ClusterService:
        cluster = SimClusterService.fromConfig(
            self.config, self.reactor, protocol=self.protocols.lookup("peer"), rng=random.Random(self.rng.random())
        )
        assert isinstance(cluster, SimClusterService)
        cluster.network = self.network
        cluster.listenEndpoint = SimServerEndpoint(self.network, cluster.nodeId, PEER_PORT)
        # The run's id, which peers compare to tell a restart, from the seed.
        cluster.settings = dataclasses.replace(cluster.settings, session=self.rng.randbytes(SESSION_BYTES))
        return cluster

    def listenForClients(self) -> None:
        self.network.listen(self.cluster.nodeId if self.cluster else "", CLIENT_PORT, self.clientFactory)


@dataclasses.dataclass
class Device:
    """
    One member's device: a client, the node it is logged in to, and every
    group message it got, by connection.
    """

    name: str
    uid: str
    steady: bool
    client: TimClient | None = None
    node: str | None = None
    #: Connections made so far; each gets its own record.
    connections: int = 0
    #: (connection, gid, seq, text, offline) in the order they arrived;
    #: offline: read from the group's history (TIMOFFLINEMSG), not pushed.
    got: list[tuple[int, str, int, str, bool]] = dataclasses.field(default_factory=list)
    #: Whether the connection is logged in and has asked for what it missed.
    ready: bool = False
    busy: bool = False
    #: (connection, frame id, body) of every room frame, as they arrived.
    frames: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    #: The connection whose subscription to the room is confirmed.
    subscribed: int | None = None


@dataclasses.dataclass
class Sent:
    """
    One group message a member sent: its client id, text, and what came
    of it.
    """

    sender: str
    gid: str
    cid: int
    text: str
    tries: int = 0
    seq: int | None = None
    outcome: str = "waiting"


class GroupSim:
    """
    One seeded run; see the module docstring.

    @ivar trace: what happened, one line per event, with the simulated time.
    """

    nodeCount = 3
    steadyMembers = 4
    churnMembers = 2
    groups = 2
    #: Who pushes frames into the room (its founder first), and who
    #: subscribes to it.
    publishers = ("s1", "s2")
    subscribers = ("s3", "s4", "c2")
    #: Simulated seconds of random operations, then of settling.
    activeSeconds = 20.0
    settleSeconds = 25.0
    #: Mean seconds between operations.
    operationEvery = 0.08
    #: Whether crashed nodes start again while messages flow (else once
    #: the traffic is over): a restarted node delivers a group's next
    #: message without looking for a gap before it (docs/cluster.md,
    #: known limits), so with restarts only the store's promises and the
    #: order on each device are checked, not the absence of holes.
    restarts = False

    #: Whether the nodes' log lines go into the trace too.
    logs = False

    def __init__(self, seed: int, **overrides: Any):
        for key, value in overrides.items():
            setattr(self, key, value)
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = HeapClock()
        self.network = SimNetwork(self.clock, random.Random(self.rng.getrandbits(64)))
        self.store = MemoryStore()
        self.keys = NodeKeys(b"k" * 32)
        self.tempDir = tempfile.mkdtemp(prefix="groupsim-")
        self.trace: list[str] = []
        self.nodeIds = [f"n{i + 1}" for i in range(self.nodeCount)]
        self.nodes: dict[str, SimNode] = {}
        self.clocks: dict[str, NodeClock] = {}
        self.crashed: set[str] = set()
        self.partitioned = False
        self.devices: dict[str, Device] = {}
        self.gids: list[str] = []
        self.sent: list[Sent] = []
        self._cids = itertools.count(1)
        self._tokens = itertools.count(1)
        self.members: dict[str, set[str]] = {}
        self.room: str | None = None
        #: Nodes that crashed since the room was registered, and whether a
        #: subscription was refused because the room is gone.
        self.crashedSinceRoom: set[str] = set()
        self.roomGone = False
        #: Frames each publisher pushed so far.
        self.pushed: dict[str, int] = {}

    def log(self, text: str) -> None:
        self.trace.append(f"{self.clock.seconds():8.3f} {text}")

    def _nodeLogged(self, event: dict[str, Any]) -> None:
        source = event.get("log_source")
        for nodeId, node in self.nodes.items():
            parts = (node, node.cluster, node.vrooms, node.userDirectory, node.router, node.groups, node.inbox)
            if any(source is part for part in parts) or getattr(source, "service", None) is node.cluster:
                text = formatEvent(event)
                failure = event.get("log_failure")
                if failure is not None:
                    text += f": {failure.getErrorMessage()}"
                self.log(f"[{nodeId}] {text}")
                return

    # Nodes.

    def startNode(self, nodeId: str) -> SimNode:
        seeds = [f"{other}:{PEER_PORT}" for other in self.nodeIds if other != nodeId]
        config = testConfig(
            f"{self.tempDir}/{nodeId}",
            client={"listen": "", "tcp_listen": ""},
            devices={"limit": 0, "type_limit": 0},
            cluster={
                "listen": f"tcp:{PEER_PORT}",
                "advertise": f"{nodeId}:{PEER_PORT}",
                "secret": SECRET,
                "node_id": nodeId,
                "seeds": seeds,
            },
        )
        clock = self.clocks[nodeId] = NodeClock(self.clock)
        store = DelayedStore(self.store, clock, random.Random(self.rng.getrandbits(64)), (0.0002, 0.003))
        node = SimNode(
            config,
            clock,
            network=self.network,
            rng=random.Random(self.rng.getrandbits(64)),
            store=store,
            keys=self.keys,
        )
        self.nodes[nodeId] = node
        self.network.revive(nodeId)
        node.startService()
        node.listenForClients()
        self.crashed.discard(nodeId)
        self.log(f"node {nodeId} starts")
        return node

    def crash(self, nodeId: str, reset: bool) -> None:
        node = self.nodes[nodeId]
        self.clocks[nodeId].stop()
        node.threadPool.stop()
        self.network.crash(nodeId, reset=reset)
        self.crashed.add(nodeId)
        self.crashedSinceRoom.add(nodeId)
        self.log(f"node {nodeId} crashes ({'reset' if reset else 'silent'})")

    def liveNodes(self) -> list[str]:
        return [nodeId for nodeId in self.nodeIds if nodeId not in self.crashed]

    def converged(self) -> bool:
        live = set(self.liveNodes())
        for nodeId in live:
            cluster = self.nodes[nodeId].cluster
            assert cluster is not None
            if {member.nodeId for member in cluster.liveMembers()} != live:
                return False
        return True

    # Time.

    def runFor(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """
        Run the clock C{seconds}, or until C{until()} holds.
        """
        end = self.clock.seconds() + seconds
        while True:
            if until is not None and until():
                return True
            upcoming = self.clock.nextTime()
            if upcoming is None or upcoming > end:
                self.clock.advance(max(end - self.clock.seconds(), 0.0))
                return until is not None and until()
            self.clock.advance(max(upcoming - self.clock.seconds(), 0.0))

    # Devices.

    def addUser(self, name: str, steady: bool) -> Device:
        uid = self.keys.accountId(name, "")
        self.store.createAccount(Account(uid, "", "", 0.0))
        device = self.devices[name] = Device(name, uid, steady)
        return device

    def login(self, device: Device, nodeId: str) -> Deferred[Any]:
        """
        Connect C{device} to C{nodeId}, log in with a fresh token and ask
        for what it missed.
        """
        token = f"t{next(self._tokens)}"
        self.store.addToken(self.keys.tokenKeyFor(token), TokenGrant(device.uid, ""), 1e9)
        client = TimClient(self.clock, Encoding.COMPACT, autoAck=True)
        device.connections += 1
        connection = device.connections
        device.client, device.node, device.ready, device.busy = client, nodeId, False, True
        client.onFrame = lambda incoming: self._frame(device, connection, incoming)
        opened: Deferred[Any] = Deferred()

        class Factory:
            def buildProtocol(self, addr: Any) -> Any:
                protocol = _TimClientTcpProtocol()
                protocol.client = client
                protocol.opened = opened
                return protocol

        host = f"c-{device.name}-{connection}"
        self.network.everywhere.add(host)
        self.network.connect(host, nodeId, CLIENT_PORT, Factory()).addErrback(opened.errback)
        d = opened.addCallback(lambda _: client.login(token=token, timeout=REQUEST_TIMEOUT))

        def loggedIn(_: object) -> None:
            device.ready, device.busy = True, False
            client.requestOfflineMessages()
            self.log(f"{device.name} logged in on {nodeId} (connection {connection})")
            if self.room is not None and device.name in self.subscribers:
                self.subscribe(device)

        def failed(failure: Failure) -> None:
            device.busy = False
            self.log(f"{device.name} login on {nodeId} failed: {failure.getErrorMessage()}")
            self.dropDevice(device)

        client.closed.addCallback(lambda _: self._closed(device, client))
        return d.addCallbacks(loggedIn, failed)

    def _closed(self, device: Device, client: TimClient) -> None:
        if device.client is client:
            self.log(f"{device.name} lost its connection to {device.node}")
            device.client, device.node, device.ready = None, None, False

    def dropDevice(self, device: Device) -> None:
        client = device.client
        device.client, device.node, device.ready = None, None, False
        if client is not None and client.connected:
            client.disconnect()

    def _frame(self, device: Device, connection: int, incoming: Any) -> None:
        if incoming.timType == TimType.TIMSTREAM:
            stream = incoming.body
            device.frames.append((connection, stream.id, (stream.body or b"").decode()))
            return
        if incoming.timType == TimType.TIMMESSAGE:
            messages = [incoming.body]
        elif incoming.timType == TimType.TIMOFFLINEMSG:
            messages = list(incoming.body.messageList or ())
        else:
            return
        offline = incoming.timType == TimType.TIMOFFLINEMSG
        for message in messages:
            room = message.roomTid.node if message.roomTid is not None else None
            if room in self.gids and message.seq is not None:
                device.got.append((connection, room, message.seq, message.dataString or "", offline))

    # Operations.

    def say(self, device: Device, gid: str, sent: Sent | None = None) -> None:
        """
        C{device} sends a message to C{gid} (or sends C{sent} again, after
        the node said it may not be stored).
        """
        client = device.client
        if client is None or not device.ready:
            return
        if sent is None:
            cid = next(self._cids)
            sent = Sent(device.name, gid, cid, f"{device.name}#{cid}")
            self.sent.append(sent)
        sent.tries += 1
        connection = device.connections
        d = client.postMessage(None, sent.text, msType=3, roomTid=Tid(node=gid), id=sent.cid, timeout=REQUEST_TIMEOUT)

        def echoed(message: Any) -> None:
            seq = getattr(message, "seq", None)
            if seq is None:
                sent.outcome = "recognised"
                self.log(f"{sent.text} recognised as sent before")
                return
            sent.seq, sent.outcome = seq, "confirmed"
            # The echo is the sender's copy, in the stream where it came.
            device.got.append((connection, gid, seq, sent.text, False))
            self.log(f"{sent.text} confirmed as {gid}/{seq} via {device.node}")

        def refused(failure: Failure) -> None:
            if _code(failure) == ErrorCode.ERR_DATABASE and sent.tries < 4:
                sent.outcome = "resending"
                self.log(f"{sent.text} may not be stored: sending it again")
                self.clock.callLater(0.2, self.say, device, gid, sent)
                return
            sent.outcome = f"unknown ({failure.getErrorMessage()})"
            self.log(f"{sent.text}: {sent.outcome}")

        d.addCallbacks(echoed, refused)

    def subscribe(self, device: Device) -> None:
        client, connection, room = device.client, device.connections, self.room
        if client is None or room is None:
            return

        def subscribed(_: object) -> None:
            if device.client is client:
                device.subscribed = connection
                self.log(f"{device.name} subscribed to the room on {device.node} (connection {connection})")

        def failed(failure: Failure) -> None:
            if _code(failure) == ErrorCode.ERR_NOEXIST:
                self.roomGone = True
            self.log(f"{device.name} could not subscribe to the room on {device.node}: {failure.getErrorMessage()}")

        client.vroomSubscribe(room, timeout=REQUEST_TIMEOUT).addCallbacks(subscribed, failed)

    def push(self, device: Device) -> None:
        client = device.client
        if client is None or not device.ready or self.room is None:
            return
        count = self.pushed[device.name] = self.pushed.get(device.name, 0) + 1
        client.pushStream(self.room, f"{device.name}:{device.connections}:{count}".encode())
        self.log(f"{device.name} pushes frame {count} via {device.node}")

    def business(self, device: Device, rtype: int, gid: str, then: Callable[[], None]) -> None:
        client = device.client
        if client is None or not device.ready:
            return
        device.busy = True

        def done(result: Any) -> None:
            device.busy = False
            if isinstance(result, Failure):
                # A join whose answer was "may not be stored" may have been.
                if (rtype, _code(result)) in (
                    (Business.ADDROOM, ErrorCode.ERR_HASEXIST),
                    (Business.LEAVEROOM, ErrorCode.ERR_NOEXIST),
                ):
                    then()
                    return
            if isinstance(result, Failure):
                self.log(f"{device.name} {Business(rtype).name} {gid} failed: {result.getErrorMessage()}")
                return
            then()

        client.business(rtype, node=gid, timeout=REQUEST_TIMEOUT).addBoth(done)

    def operate(self) -> None:
        """
        One random operation.
        """
        rng = self.rng
        roll = rng.random()
        devices = list(self.devices.values())
        if roll < 0.20:
            self.push(self.devices[rng.choice(self.publishers)])
        elif roll < 0.70:
            device = rng.choice(devices)
            gids = [gid for gid in self.gids if device.name in self.members[gid]]
            if gids and not device.busy:
                self.say(device, rng.choice(gids))
        elif roll < 0.78:
            device = rng.choice([d for d in devices if not d.steady])
            gid = rng.choice(self.gids)
            if device.busy:
                return
            if device.name in self.members[gid]:
                self.log(f"{device.name} leaves {gid}")
                self.business(device, Business.LEAVEROOM, gid, lambda: self.members[gid].discard(device.name))
            else:
                self.log(f"{device.name} joins {gid}")
                self.business(device, Business.ADDROOM, gid, lambda: self.members[gid].add(device.name))
        elif roll < 0.88:
            device = rng.choice(devices)
            if device.client is not None and not device.busy:
                self.log(f"{device.name} disconnects from {device.node}")
                self.dropDevice(device)
            elif device.client is None:
                self.login(device, rng.choice(self.liveNodes()))
        elif roll < 0.91:
            live = self.liveNodes()
            if self.crashed:
                if self.restarts:
                    self.startNode(rng.choice(sorted(self.crashed)))
            elif len(live) > 2:
                self.crash(rng.choice(live), reset=rng.random() < 0.6)
        elif roll < 0.95:
            if self.partitioned:
                self.network.heal()
                self.partitioned = False
                self.log("the partition heals")
            else:
                alone = rng.choice(self.nodeIds)
                self.network.partition([alone], [n for n in self.nodeIds if n != alone])
                self.partitioned = True
                self.log(f"{alone} is cut off from the others")
        elif roll < 0.96:
            a, b = rng.sample(self.nodeIds, 2)
            self.network.cut(a, b)
            self.partitioned = True
            self.log(f"the link between {a} and {b} is cut")
        # Else nothing happens for a while.

    def _operateLoop(self, end: float) -> None:
        if self.clock.seconds() >= end:
            return
        self.operate()
        # Devices that lost their node log in again somewhere.
        for device in self.devices.values():
            if device.client is None and not device.busy and self.rng.random() < 0.1:
                self.login(device, self.rng.choice(self.liveNodes()))
        self.clock.callLater(self.rng.expovariate(1 / self.operationEvery), self._operateLoop, end)

    # The run.

    def setUp(self) -> None:
        for nodeId in self.nodeIds:
            self.startNode(nodeId)
        if not self.runFor(30.0, self.converged):
            raise RuntimeError("the nodes did not form a cluster")
        for i in range(self.steadyMembers):
            self.addUser(f"s{i + 1}", steady=True)
        for i in range(self.churnMembers):
            self.addUser(f"c{i + 1}", steady=False)
        founder = self.devices["s1"]
        for g in range(self.groups):
            # Made as a NEWROOM makes one, before anyone logs in (no node
            # caches anything of it yet), with an id from the seed: the
            # group's owner depends on it.
            gid = b58encode(self.rng.randbytes(ACCOUNT_ID_BYTES))
            profile = self.nodes[self.nodeIds[0]].vault.sealRoom(gid, TimRoomBean(topic=f"topic{g}"))
            now = self.clock.seconds()
            group = Group(gid, "", founder.uid, GroupType.OPEN, GROUP_ALIVE, now, profile)
            self.store.createGroup(group, Member(founder.uid, ROLE_FOUNDER, now))
            self.gids.append(gid)
            self.members[gid] = {founder.name}
            owner = self.nodes[self.nodeIds[0]].cluster.ownership.owner(groupKey(gid))  # type: ignore[union-attr]
            self.log(f"group {gid} created, owned by {owner}")
        for index, device in enumerate(self.devices.values()):
            self.login(device, self.nodeIds[index % len(self.nodeIds)])
        self.runFor(2.0)
        for gid in self.gids:
            for device in self.devices.values():
                if device is not founder and device.steady:
                    self.business(device, Business.ADDROOM, gid, partial(self.members[gid].add, device.name))
            self.runFor(2.0)
        self.openRoom()
        self.log("set up: " + ", ".join(f"{gid}: {sorted(members)}" for gid, members in self.members.items()))

    def openRoom(self) -> None:
        """
        The first publisher registers a room and lets the others push;
        the subscribers subscribe.
        """
        founder = self.devices[self.publishers[0]]
        assert founder.client is not None
        registered: list[str] = []
        founder.client.vroomRegister(timeout=REQUEST_TIMEOUT).addCallback(registered.append)
        self.runFor(REQUEST_TIMEOUT, lambda: bool(registered))
        room = self.room = registered[0]
        self.crashedSinceRoom.clear()
        for name in self.publishers[1:]:
            founder.client.vroomGrant(room, self.devices[name].uid, timeout=REQUEST_TIMEOUT)
        for name in self.subscribers:
            self.subscribe(self.devices[name])
        self.runFor(2.0)
        holder = self.nodes[self.nodeIds[0]].vrooms.holder(room)
        self.log(f"room {room} registered by {founder.name} on {founder.node}, held by {holder}")

    def run(self) -> None:
        if self.logs:
            globalLogPublisher.addObserver(cast(ILogObserver, self._nodeLogged))
        try:
            self.setUp()
            end = self.clock.seconds() + self.activeSeconds
            self._operateLoop(end)
            self.runFor(self.activeSeconds)
            self.repair()
        finally:
            if self.logs:
                globalLogPublisher.removeObserver(cast(ILogObserver, self._nodeLogged))
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def repair(self) -> None:
        """
        Heal, restart, log every device in, and have each steady member
        say one last thing; then let it settle.
        """
        self.network.heal()
        self.partitioned = False
        self.log("repair: the network heals")
        for nodeId in sorted(self.crashed):
            self.startNode(nodeId)
        if not self.runFor(self.settleSeconds, self.converged):
            self.log("repair: the nodes did not converge")
        self.runFor(3.0)
        for _ in range(5):
            away = [device for device in self.devices.values() if device.client is None and not device.busy]
            for device in away:
                self.login(device, self.rng.choice(self.liveNodes()))
            if not self.runFor(REQUEST_TIMEOUT + 1, lambda: all(d.ready for d in self.devices.values())):
                self.log(
                    "repair: devices still away: " + ", ".join(d.name for d in self.devices.values() if not d.ready)
                )
            else:
                break
        self.runFor(2.0)
        for device in self.devices.values():
            if device.steady:
                for gid in self.gids:
                    self.say(device, gid)
        # A room may be refused while views differ; what counts is whether
        # it is there once they agree.
        self.roomGone = False
        for name in self.subscribers:
            device = self.devices[name]
            if device.subscribed != device.connections:
                self.subscribe(device)
        self.runFor(self.settleSeconds)
        self.lastFrames = {}
        for _ in range(3):
            for name in self.publishers:
                self.push(self.devices[name])
                self.lastFrames[name] = self.pushed[name]
            self.runFor(0.5)
        self.runFor(5.0)
        self.log("repair: settled")

    # Checking.

    def storedMessages(self, gid: str) -> dict[int, str]:
        conv = groupConversation(gid)
        rows = self.store._messages.get(conv, {})
        vault = next(iter(self.nodes.values())).vault
        return {seq: vault.openMessage(conv, seq, row.stanza).dataString or "" for seq, row in rows.items()}

    def check(self) -> list[str]:
        """
        Every broken promise, one line each (none: the run is fine).
        """
        problems: list[str] = []
        for gid in self.gids:
            stored = self.storedMessages(gid)
            seqs = sorted(stored)
            if seqs and seqs != list(range(seqs[0], seqs[-1] + 1)):
                missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
                problems.append(f"{gid}: the stored seqs have holes at {missing}")
            texts: dict[str, int] = {}
            for seq, text in stored.items():
                if text and text in texts:
                    problems.append(f"{gid}: {text!r} stored twice, as {texts[text]} and {seq}")
                texts[text] = seq
            confirmed = [s for s in self.sent if s.gid == gid and s.seq is not None]
            for sent in confirmed:
                if stored.get(sent.seq or 0) != sent.text:
                    problems.append(
                        f"{gid}: {sent.text} confirmed as seq {sent.seq}, which holds {stored.get(sent.seq or 0)!r}"
                    )
            last = max((s.seq or 0 for s in confirmed), default=0)
            for device in self.devices.values():
                problems += self._checkDevice(device, gid, stored, last)
        return problems + self.checkRoom()

    def checkRoom(self) -> list[str]:
        """
        Each subscription got the room's frames with rising ids, those of
        each publisher's connection in the order pushed (a publisher that
        logs in on another node may overtake what it pushed before, still
        on its way from the first); once all was repaired, each subscriber
        got every publisher's last frame.
        """
        problems = []
        # Rooms live in memory: one is lost once every node holding a copy
        # of its rules died (docs/cluster.md, "When the holder moves"),
        # which only a run where every node crashed can do.
        lostAllowed = self.crashedSinceRoom >= set(self.nodeIds)
        if self.roomGone and not lostAllowed:
            problems.append(f"the room was lost, though only {sorted(self.crashedSinceRoom)} crashed")
        for name in self.subscribers:
            device = self.devices[name]
            byConnection: dict[int, list[tuple[int, str]]] = {}
            for connection, frameId, body in device.frames:
                byConnection.setdefault(connection, []).append((frameId, body))
            for connection, frames in byConnection.items():
                ids = [frameId for frameId, _ in frames]
                if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
                    problems.append(f"{name} (connection {connection}) got room frames with ids {ids}")
                counts: dict[str, list[int]] = {}
                for _, body in frames:
                    publisher, pushedOn, count = body.split(":")
                    counts.setdefault(f"{publisher} (connection {pushedOn})", []).append(int(count))
                for publisher, pushed in counts.items():
                    if any(b <= a for a, b in zip(pushed, pushed[1:], strict=False)):
                        problems.append(f"{name} (connection {connection}) got {publisher}'s frames as {pushed}")
            last = {
                (body.split(":")[0], int(body.split(":")[2])) for c, _, body in device.frames if c == device.connections
            }
            if self.roomGone:
                continue
            for publisher, count in getattr(self, "lastFrames", {}).items():
                if (publisher, count) not in last:
                    problems.append(
                        f"{name} (connection {device.connections}, subscribed on {device.subscribed}) "
                        f"did not get {publisher}'s last frame {count}"
                    )
        return problems

    def _checkDevice(self, device: Device, gid: str, stored: dict[int, str], last: int) -> list[str]:
        problems = []
        # Per connection, what was pushed and what was read from the
        # history, each in the order it came: a push may overtake what the
        # device has yet to read (it asked for it as it logged in), as the
        # protocol allows; the device sorts the two by seq.
        byStream: dict[tuple[int, bool], list[int]] = {}
        own = {seq for seq, text in stored.items() if text.startswith(device.name + "#")}
        for connection, room, seq, text, offline in device.got:
            if room != gid or seq in own:
                # Its own messages come as echoes, when it sends them.
                continue
            if stored.get(seq) != text and text:
                problems.append(f"{device.name} got {gid}/{seq} as {text!r}, stored as {stored.get(seq)!r}")
            byStream.setdefault((connection, offline), []).append(seq)
        for (connection, offline), seqs in byStream.items():
            how = "read" if offline else "pushed"
            seen: set[int] = set()
            top = 0
            for seq in seqs:
                if seq < top and seq not in seen:
                    problems.append(
                        f"{device.name} (connection {connection}) got {gid}/{seq} {how} after {top}: {seqs}"
                    )
                seen.add(seq)
                top = max(top, seq)
        if device.steady and not self.restarts:
            # No hole on any connection: between the first and the last seq
            # it got, it got every one.
            byConnection: dict[int, set[int]] = {}
            for (connection, _), seqs in byStream.items():
                byConnection.setdefault(connection, set()).update(seqs)
            for connection, seen in byConnection.items():
                holes = sorted(set(range(min(seen), max(seen) + 1)) - seen - own)
                if holes:
                    problems.append(f"{device.name} (connection {connection}) missed {gid} seqs {holes}")
            got = {seq for _, room, seq, _, _ in device.got if room == gid} | own
            first = min(got, default=1)
            missing = [seq for seq in sorted(stored) if first <= seq <= last and seq not in got]
            if missing:
                problems.append(f"{device.name} never got {gid} seqs {missing} (last confirmed {last})")
        return problems


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a tool
    """
    C{python -m timtx.test.groupsim --seed N [--trace]}: run one seed and
    print what broke (and the trace).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m timtx.test.groupsim", description=main.__doc__)
    parser.add_argument("--seed", type=int, action="append", required=True)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--restarts", action="store_true", help="restart crashed nodes while messages flow")
    parser.add_argument("--logs", action="store_true", help="put the nodes' log lines in the trace")
    parser.add_argument("--nodes", type=int, default=GroupSim.nodeCount, help="how many nodes")
    args = parser.parse_args(argv)
    for seed in args.seed:
        sim = GroupSim(seed, restarts=args.restarts, logs=args.logs, nodeCount=args.nodes)
        sim.run()
        problems = sim.check()
        print(f"seed {seed}: {'ok' if not problems else f'{len(problems)} problems'}")
        for line in problems:
            print("  " + line)
        if args.trace or problems:
            print("\n".join(sim.trace))


if __name__ == "__main__":  # pragma: no cover
    main()
