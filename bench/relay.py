"""
Relay overhead benchmark, in one process on loopback:

    python -m bench.relay [--messages 5000] [--size 200] [--window 32]

Three cluster services (the mesh's L{ClusterService}, real TCP on
127.0.0.1) form a cluster twice: once all reachable, so the first two talk
over their own TCP link, and once with those two marked as behind NAT
(C{reachable = false}), so their link goes through the third as a relay.
Each time the first node sends C{--size}-byte requests to the second, which
echoes them:

 - latency: C{--messages} requests one after another (p50, p99 of the round
   trip);
 - throughput and CPU: C{--messages} requests with C{--window} in flight;
   requests per second, and the process's CPU (user + system, all three
   nodes) per request.

The difference between the two is the relay's overhead: one more hop over
loopback and the relay's forwarding, with the peer protocol run end to end.
Results go to C{bench/results/}.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

from bench.conditions import collect, oneLine
from bench.nodeproc import ROOT
from bench.report import writeMeasurement
from timtx.cluster.membership import ClusterService
from timtx.config import ClusterConfig

SECRET = b"bench relay secret, 16 bytes or more"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@defer.inlineCallbacks
def cluster(reactor: Any, relayed: bool, directory: str) -> Any:
    """
    Start the relay (or third node) and the two nodes; wait until the two
    have their link, relayed or TCP.
    """
    services = {}
    seeds: tuple[str, ...] = ()
    for name in ("relay", "a", "b"):
        config = ClusterConfig(listen="tcp:0:interface=127.0.0.1", seeds=seeds, node_id=name)
        service = ClusterService(
            config,
            reactor,
            nodeId=name,
            secret=SECRET,
            dataDir=os.path.join(directory, f"{name}-{int(relayed)}"),
            rng=random.Random(name),
            reachable=not (relayed and name != "relay"),
        )
        service.startService()
        yield service.ready
        services[name] = service
        seeds = (services["relay"].address,)
    want = "relayed" if relayed else "tcp"
    for _ in range(600):
        if services["a"].linkPath("b")["path"] == want and services["b"].linkPath("a")["path"] == want:
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    else:
        raise RuntimeError(f"the two nodes never got a {want} link")
    return services


@defer.inlineCallbacks
def measure(reactor: Any, services: dict[str, Any], messages: int, size: int, window: int) -> Any:
    a, b = services["a"], services["b"]
    b.addHandler("echo", lambda node, payload: payload)
    payload = os.urandom(size)
    for _ in range(200):  # warm up
        yield a.request("b", "echo", payload)
    rtts = []
    for _ in range(messages):
        started = time.perf_counter()
        answer = yield a.request("b", "echo", payload)
        rtts.append(time.perf_counter() - started)
        assert answer == payload
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sent = 0

    @defer.inlineCallbacks
    def lane() -> Any:
        nonlocal sent
        while sent < messages:
            sent += 1
            answer = yield a.request("b", "echo", payload)
            assert answer == payload

    yield defer.gatherResults([lane() for _ in range(window)])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    relayStats = services["relay"].relay.stats
    return {
        "rtt_p50_ms": percentile(rtts, 0.5) * 1000,
        "rtt_p99_ms": percentile(rtts, 0.99) * 1000,
        "requests_per_s": messages / wall,
        "cpu_us_per_request": cpu / messages * 1e6,
        "relay_circuits_opened": relayStats.opened,
        "relay_bytes_from_a": relayStats.nodes["a"].bytesFrom if "a" in relayStats.nodes else 0,
    }


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    result: dict[str, Any] = {"messages": args.messages, "size": args.size, "window": args.window}
    with tempfile.TemporaryDirectory(prefix="txrelaybench") as directory:
        for relayed in (False, True):
            services = yield cluster(reactor, relayed, directory)
            try:
                result["relayed" if relayed else "tcp"] = yield measure(
                    reactor, services, args.messages, args.size, args.window
                )
            finally:
                for service in services.values():
                    yield service.stopService()
    return result


def markdown(result: dict[str, Any], conditions: dict[str, Any]) -> str:
    lines = [
        f"# Relay overhead ({result['messages']} requests of {result['size']} bytes, window {result['window']})",
        "",
        oneLine(conditions),
        "",
        "| Link between the two nodes | RTT p50 | RTT p99 | Requests/s (window) | CPU per request (3 nodes) |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("tcp", "their own TCP link"), ("relayed", "relayed through the third")):
        r = result[key]
        lines.append(
            f"| {label} | {r['rtt_p50_ms']:.3f} ms | {r['rtt_p99_ms']:.3f} ms | {r['requests_per_s']:,.0f} | "
            f"{r['cpu_us_per_request']:.1f} µs |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    conditions = collect()

    @defer.inlineCallbacks
    def body(reactor: Any) -> Any:
        result = yield run(reactor, args)
        writeMeasurement(args.out, "relay", conditions, result, markdown(result, conditions))

    # react() exits the process when body's Deferred fires.
    task.react(body)


if __name__ == "__main__":
    main(sys.argv[1:])
