"""
NAT traversal benchmark, in the network namespaces of docs/nat.md (root):

    python -m bench.nat [--tries 20] [--frames 20000]

Measures, between two hosts behind endpoint-independent Linux NATs:

 - time to a direct path over C{--tries} punches (p50, p99), from the
   initiator's first coordination message to its confirmed path, with the
   TTL-2 pre-open and, for comparison, without it;
 - 200-byte frames echoed over the QUIC channel on the punched path, against
   the same frames over TCP between the same namespaces (the responder's NAT
   forwards a TCP port to it, so both cross the same routers): frames per
   second and sender CPU per frame.

Not registered in C{python -m bench all}: it needs root and builds its own
topology instead of starting a node.  Results go to C{bench/results/}.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from typing import Any

from bench.conditions import collect, oneLine
from bench.nodeproc import ROOT
from bench.report import writeMeasurement
from timtx.test import netns
from timtx.test.natnode import peerArguments

SECRET = b"bench nat secret".hex()
RELAY_PORT = 7777
TCP_PORT = 7000


class Child:
    """
    A L{timtx.test.natnode} program in a namespace, read line by line.
    """

    def __init__(self, topology: netns.Topology, host: netns.Host, *args: str):
        argv = topology.command(host, "timtx.test.natnode", *args)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=netns.childEnvironment(), text=True
        )
        self.events: list[dict[str, Any]] = []

    def until(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                parsed = json.loads(line)
                self.events.append(parsed)
                if parsed.get("event") == event:
                    return parsed
        raise RuntimeError(f"no {event} event from {self.proc.args}")

    def wait(self, timeout: float = 120) -> list[dict[str, Any]]:
        assert self.proc.stdout is not None
        out, _ = self.proc.communicate(timeout=timeout)
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        return self.events

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def peers(topology: netns.Topology, room: str, *extra: str) -> tuple[Child, Child]:
    initiator, responder = peerArguments(
        SECRET, f"{netns.PUBLIC[0]}:{RELAY_PORT}", f"{netns.PUBLIC[0]}:3478,{netns.PUBLIC[1]}:3478", room, *extra
    )
    return Child(topology, topology.host(1), *initiator), Child(topology, topology.host(2), *responder)


def punches(topology: netns.Topology, room: str, tries: int, ttl: int) -> dict[str, Any]:
    a, b = peers(topology, room, "--tries", str(tries), "--timeout", "2", "--ttl", str(ttl))
    events = a.wait()
    b.wait()
    done = [e for e in events if e["event"] == "try"]
    times = [e["elapsed"] * 1000 for e in done if e["ok"]]
    return {
        "ttl": ttl,
        "tries": len(done),
        "direct": len(times),
        "p50_ms": round(percentile(times, 50), 2) if times else None,
        "p99_ms": round(percentile(times, 99), 2) if times else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    topology = netns.Topology(f"txb{os.urandom(2).hex()}", ("eim", "eim"))
    children: list[Child] = []
    try:
        topology.up()
        pub = topology.public
        servers = Child(
            topology, pub, "stun-server", "--secret", SECRET, "--address", netns.PUBLIC[0], "--address", netns.PUBLIC[1]
        )
        relay = Child(topology, pub, "relay", "--address", netns.PUBLIC[0], "--port", str(RELAY_PORT))
        children += [servers, relay]
        servers.until("ready")
        relay.until("ready")
        result: dict[str, Any] = {"punch": punches(topology, "p", args.tries, 2)}
        result["punch_without_preopen"] = punches(topology, "q", args.tries, 0)

        a, b = peers(topology, "quic", "--tries", "1", "--quic", "--frames", str(args.frames), "--consent", "5")
        children += [a, b]
        quic = a.until("quic", timeout=300)
        a.stop()
        b.stop()
        topology.forwardTcp(2, TCP_PORT)
        echo = Child(topology, topology.host(2), "tcp-echo", "--port", str(TCP_PORT))
        children.append(echo)
        echo.until("ready")
        sender = Child(
            topology,
            topology.host(1),
            "tcp-send",
            "--target",
            f"{topology.nat(2).address}:{TCP_PORT}",
            "--frames",
            str(args.frames),
        )
        children.append(sender)
        tcp = sender.until("tcp", timeout=300)
        for name, measured in (("quic", quic), ("tcp", tcp)):
            result[name] = {
                "frames": measured["frames"],
                "in_order": measured["ok"],
                "frames_per_s": round(measured["frames"] / measured["seconds"]),
                "sender_cpu_us_per_frame": round(measured["cpu"] / measured["frames"] * 1e6, 1),
            }
        return result
    finally:
        for child in children:
            child.stop()
        topology.down()


def markdown(result: dict[str, Any], conditions: dict[str, Any]) -> str:
    p, q = result["punch"], result["punch_without_preopen"]
    lines = [
        f"Conditions: {oneLine(conditions)}",
        "",
        "| Punch | Direct paths | p50 | p99 |",
        "|---|---|---|---|",
        f"| TTL-2 pre-open, then probes at the agreed moment | {p['direct']}/{p['tries']} | {p['p50_ms']} ms | {p['p99_ms']} ms |",
        f"| Probes at the agreed moment, no pre-open | {q['direct']}/{q['tries']} | {q['p50_ms']} ms | {q['p99_ms']} ms |",
        "",
        "| 200-byte frames, echoed | Frames/s | Sender CPU per frame | In order |",
        "|---|---|---|---|",
    ]
    for name, label in (("quic", "QUIC channel over the punched path"), ("tcp", "TCP, same namespaces and routers")):
        r = result[name]
        lines.append(f"| {label} | {r['frames_per_s']:,} | {r['sender_cpu_us_per_frame']} µs | {r['in_order']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nat", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    conditions = collect()
    result = run(args)
    writeMeasurement(args.out, "nat", conditions, result, markdown(result, conditions))


if __name__ == "__main__":
    main(sys.argv[1:])
