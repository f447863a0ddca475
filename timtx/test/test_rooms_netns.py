# -*- test-case-name: timtx.test.test_rooms_netns -*-
"""
A stream room across five node processes on five "hosts"
(L{timtx.test.processmesh}), sharing one PostgreSQL database: subscribers
on every host, and the node holding the room killed with SIGKILL while
frames flow (issue 13: a stream room with subscribers on every node
survives the death of its owner node).

Needs root, C{ip}, C{nft} and PostgreSQL; skips without them (fails under
CI).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.python import log
from twisted.trial.unittest import TestCase

from timtx.client import TimClient, TimRequestFailed
from timtx.cluster.ownership import Ownership, roomKey
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.test.base import waitUntil
from timtx.test.processmesh import ProcessMesh

NODES = 5
#: The founder's node, which usually holds the room (it draws room ids
#: until it draws one it holds, at most 4 x nodes times).
FOUNDER = 3
#: Seconds between frames of each publisher.
PERIOD = 0.04
#: Frames from each publisher every surviving subscriber must get after the
#: holder was declared dead.
AFTER = 25


class Publisher:
    """
    A granted user pushing C{phase}-tagged frames at a steady rate through
    whichever client it has; none while it has none connected.
    """

    def __init__(self, name: str, vnode: str, client: TimClient):
        self.name = name
        self.vnode = vnode
        self.client = client
        self.phase = "before"
        self.pushes = LoopingCall(self.push)

    def push(self) -> None:
        if self.client.connected:
            self.client.pushStream(self.vnode, f"{self.phase}-{self.name}".encode())

    def stop(self) -> None:
        if self.pushes.running:
            self.pushes.stop()


class RoomInNamespacesTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_holderKilledMidStream(self) -> Any:
        """
        A private stream room has subscribers on each of five nodes and two
        granted publishers pushing 25 frames a second each, one on the
        holder's node and one on another.  The holder's node is killed
        (SIGKILL): the publisher that was on it logs in again on another
        node and pushes on; once the others declare the holder dead, every
        subscriber on the four surviving hosts gets both publishers' frames
        again, each once and in order (frame ids only rise); and the room's
        rules held (still private: a user not allowed is refused).
        """
        mesh = yield ProcessMesh.start(self, NODES)
        tag = os.urandom(3).hex()
        names = [f"host{tag}", f"near{tag}", f"far{tag}", f"stranger{tag}"]
        viewerNames = [f"viewer{i}{tag}" for i in range(NODES + 1)]
        yield mesh.register(*names, *viewerNames)

        founder = yield mesh.login(FOUNDER, names[0])
        vnode = yield founder.vroomRegister(private=True)
        # Its holder: the owner of room:<vnode> among the five.
        holder = int(Ownership(f"node{n}" for n in mesh.nodes).owner(roomKey(vnode)).removeprefix("node"))
        survivors = [n for n in mesh.nodes if n != holder]
        viewerNodes = [*mesh.nodes, survivors[1]]

        viewers = []
        for i, (name, n) in enumerate(zip(viewerNames, viewerNodes, strict=True)):
            viewer = yield mesh.login(n, name, Encoding.JSON if i % 2 else Encoding.COMPACT)
            yield founder.vroomAllow(vnode, viewer.uid)
            yield viewer.vroomSubscribe(vnode)
            viewers.append((n, viewer))
        publishers = []
        for name, n in ((names[1], holder), (names[2], survivors[0])):
            client = yield mesh.login(n, name)
            yield founder.vroomGrant(vnode, client.uid)
            publisher = Publisher(name, vnode, client)
            publisher.pushes.start(PERIOD)
            self.addCleanup(publisher.stop)
            publishers.append(publisher)
        near = publishers[0]

        frames: dict[TimClient, list[Any]] = {}
        for n, viewer in viewers:
            if n != holder:
                frames[viewer] = [(yield viewer.next(TimType.TIMSTREAM, timeout=30)).body]

        log.msg(f"killing node{holder}, which holds {vnode}")
        yield mesh.kill(holder)
        # The publisher's client comes back through another node, as a tim
        # client with several server addresses does.
        yield waitUntil(lambda: not near.client.connected, 10)
        near.client = yield mesh.login(survivors[-1], near.name)
        log.msg(f"{near.name} logged in again on node{survivors[-1]}")
        for n in survivors:
            yield mesh.untilLive(n, NODES - 1)
        log.msg(f"node{holder} dead in every survivor's view")
        for publisher in publishers:
            publisher.phase = "after"

        wanted = {f"after-{publisher.name}".encode() for publisher in publishers}
        # Frames of one publisher keep each next() busy even if the other's
        # never come: bound the wait, and say what came.
        deadline = reactor.seconds() + 60
        for viewer, got in frames.items():
            while any(sum(f.body == body for f in got) < AFTER for body in wanted):
                if reactor.seconds() > deadline:
                    counts = {body: sum(f.body == body for f in got) for body in sorted(wanted)}
                    connected = {p.name: p.client.connected for p in publishers}
                    refusals = {
                        p.name: sorted(
                            {
                                (a.body.error.code, a.body.error.info)
                                for a in p.client.take(TimType.TIMACK)
                                if not a.body.ok and a.body.error is not None
                            }
                        )
                        for p in publishers
                    }
                    # What each survivor did with the room, for the diagnosis.
                    moves = [
                        f"node{n}: {line.decode('utf-8', 'replace')}"
                        for n in survivors
                        for line in mesh.log(n).getContent().splitlines()
                        if b"virtual room" in line or b"room." in line
                    ]
                    self.fail(
                        f"a viewer on node{next(n for n, v in viewers if v is viewer)} got {counts} after the holder"
                        f" died (publishers connected: {connected}; near on node{survivors[-1]}, far on"
                        f" node{survivors[0]}; errors they were answered: {refusals}); the room in the survivors'"
                        " logs:\n" + "\n".join(moves[-40:])
                    )
                got.append((yield viewer.next(TimType.TIMSTREAM, timeout=30)).body)
            ids = [f.id for f in got]
            self.assertEqual(ids, sorted(set(ids)))
        for publisher in publishers:
            publisher.stop()

        stranger = yield mesh.login(survivors[1], names[3])
        failure = yield self.assertFailure(stranger.vroomSubscribe(vnode), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        mesh.assertNoTracebacks()
