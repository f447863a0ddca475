"""
The node's CPU per delivered 1:1 message, without sockets or a load
generator: a before/after measure for changes of the service path that the
wall-clock benchmark (C{python -m bench direct}) cannot resolve on a shared
machine.

A node runs in this process (memory or SQLite store).  Its clients log in
over loopback; then each server-side connection's transport is swapped for
an in-memory one and the node is driven directly.  Each round, every user
hands its connection C{window} TIMMESSAGE frames to its partner in one read
(masked WebSocket frames, as C{bench direct} sends), the reactor runs until
every message is stored and pushed, and each recipient acknowledges its
pushes in one read.  The garbage collector is set as C{twist} sets it
for a node (frozen after startup, C{[node] gc_thresholds}).  Nothing else runs in the process meanwhile, so
C{time.process_time()} over the rounds is the node's CPU (its SQLite
thread's included), plus the driver's small and constant share: splitting
the pushes out of the recorded bytes and building the ack frames.

Run (from the repository root)::

    PYTHONPATH=$PWD python -m bench.pathcost --store memory
    PYTHONPATH=$PWD python -m bench.pathcost --store sqlite --rounds 100 --repeat 5

It prints the CPU per delivered message of each repeat, then the minimum
and the median; compare the minimum of runs before and after a change,
alternating them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from timtx.crypto.ids import NodeKeys
from timtx.node import Node
from timtx.protocols import codec
from timtx.protocols.constants import TimType
from timtx.protocols.frames import client_ack, client_frame, parse_server_frame
from timtx.protocols.structs import Tid, TimMessage
from timtx.tap import tuneGarbageCollector
from timtx.testing import loggedInClient, testConfig

_ZERO_MASK = b"\0\0\0\0"


def wsClientFrame(payload: bytes) -> bytes:
    """
    One final binary client frame, masked with a zero key (as bench.wire).
    """
    size = len(payload)
    if size < 126:
        header = bytes((0x82, 0x80 | size))
    else:
        header = bytes((0x82, 0x80 | 126)) + size.to_bytes(2, "big")
    return header + _ZERO_MASK + payload


def serverPayloads(data: bytes) -> list[bytes]:
    """
    The payloads of the unmasked, unfragmented server frames in C{data}.
    """
    out = []
    offset = 0
    while offset < len(data):
        size = data[offset + 1] & 0x7F
        start = offset + 2
        if size == 126:
            size = int.from_bytes(data[start : start + 2], "big")
            start += 2
        elif size == 127:
            size = int.from_bytes(data[start : start + 8], "big")
            start += 8
        out.append(data[start : start + size])
        offset = start + size
    return out


class Recorder(StringTransport):
    """
    An in-memory transport that fires C{waiter} once C{expected} pushes
    (TIMMESSAGE frames that ask for an ack) were written to the connections
    sharing C{tally}.
    """

    def __init__(self, tally: dict[str, Any]):
        super().__init__()
        self.tally = tally

    def write(self, data: bytes) -> None:
        super().write(data)
        # A push's tim header asks for an ack: the type byte, then 4 bytes.
        for payload in serverPayloads(data):
            if payload[:1] == bytes((TimType.TIMMESSAGE | 0x80,)):
                self.tally["pushed"] += 1
        if self.tally["pushed"] >= self.tally["expected"] and self.tally["waiter"] is not None:
            waiter, self.tally["waiter"] = self.tally["waiter"], None
            waiter.callback(None)


def acksFor(data: bytes) -> bytes:
    """
    The client frames acknowledging every frame of C{data} that asks.
    """
    frames = []
    for payload in serverPayloads(data):
        frame = parse_server_frame(payload)
        if frame.ackId is not None:
            frames.append(wsClientFrame(client_ack(frame.ackId)))
    return b"".join(frames)


@defer.inlineCallbacks
def measure(reactor: Any, options: argparse.Namespace) -> Any:
    directory = tempfile.mkdtemp(prefix="pathcost-")
    config = testConfig(
        directory,
        options.store,
        messages={"noauth": True},
        store={"backend": options.store, "synchronous": "full"},
    )
    node = Node(config, reactor, keys=NodeKeys(b"k" * 32))
    node.startService()
    yield node.ready
    try:
        clients = []
        for i in range(2 * options.pairs):
            clients.append((yield loggedInClient(reactor, node, f"cost{i}")))
        # Let every session go live (its inbox read at login).
        yield task.deferLater(reactor, 0.5, lambda: None)
        # The garbage collector as twist sets it for a node.
        tuneGarbageCollector(node.config.node.gc_thresholds)
        protocols = sorted(node.connections, key=lambda p: p.session.uid)
        tally: dict[str, Any] = {"pushed": 0, "expected": 0, "waiter": None}
        originals = [protocol.transport for protocol in protocols]
        for protocol in protocols:
            protocol.transport = Recorder(tally)
        body = "x" * options.body
        counter = [0]

        def frames(sender: Any, peer: Any) -> bytes:
            out = []
            for _ in range(options.window):
                counter[0] += 1
                message = TimMessage(
                    msType=2, odType=1, id=counter[0], toTid=Tid(node=peer.session.uid), dataString=body
                )
                out.append(wsClientFrame(client_frame(TimType.TIMMESSAGE, codec.encode_compact(message))))
            return b"".join(out)

        pairs = [(protocols[i], protocols[i + 1]) for i in range(0, len(protocols), 2)]
        users = [(a, b) for a, b in pairs] + [(b, a) for a, b in pairs]

        @defer.inlineCallbacks
        def rounds(count: int) -> Any:
            for _ in range(count):
                batch = [(sender, frames(sender, peer)) for sender, peer in users]
                tally["pushed"] = 0
                tally["expected"] = len(users) * options.window
                waiter = tally["waiter"] = defer.Deferred()
                for sender, data in batch:
                    sender.dataReceived(data)
                if tally["waiter"] is not None:
                    yield waiter
                for protocol in protocols:
                    written = protocol.transport.value()
                    protocol.transport.clear()
                    acks = acksFor(written)
                    if acks:
                        protocol.dataReceived(acks)
                # The acks' removals leave in the next reactor turn.
                yield task.deferLater(reactor, 0, lambda: None)

        yield rounds(options.warmup)
        results = []
        for _ in range(options.repeat):
            start = time.process_time()
            yield rounds(options.rounds)
            spent = time.process_time() - start
            delivered = options.rounds * len(users) * options.window
            results.append(spent / delivered * 1e6)
            print(f"{results[-1]:8.1f} us of CPU per delivered message ({delivered} messages)", flush=True)
        print(f"min {min(results):.1f}  median {statistics.median(results):.1f} us per message", flush=True)
        for protocol, transport in zip(protocols, originals, strict=True):
            protocol.transport = transport
        for client in clients:
            client.disconnect()
    finally:
        yield node.stopService()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=60, help="rounds per repeat")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured rounds first")
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    task.react(lambda reactor: measure(reactor, options))


if __name__ == "__main__":
    main()
