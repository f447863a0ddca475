"""
Time to a direct path in the mesh, in the network namespaces of docs/nat.md
(root, PostgreSQL on this machine):

    python -m bench.natmesh [--tries 20] [--kinds eim,eim]
    python -m bench.natmesh --throughput [--messages 2000] [--window 16]

Starts the example public node (C{examples/nat/pub.ini}) as C{twist tim},
then C{--tries} times starts the two NAT'd example nodes (C{h1.ini},
C{h2.ini}) behind two endpoint-independent NATs, with fresh data
directories, waits until each sees its link to the other as C{direct}, and
stops them.  Per try it records the initiator's time to direct (from the
start of its punch attempt, a STUN binding first, to the QUIC channel up:
what the members file calls C{timeToDirect}) and the time from starting the
two processes to both seeing the direct link (start-up, joining through the
relay, discovery and the punch).  Discovery runs with short STUN
retransmissions (as in the tests), so that its last probe, which times out
behind these NATs, takes seconds rather than the defaults' 20.

With C{--kinds eim,edm} (NAT 2 endpoint-dependent) a try succeeds when
both NAT'd nodes have discovered their mapping and, a settle time later,
their link is still relayed with no punch attempted: the pair stays on the
relay by design.

With C{--throughput}, 1:1 messages from a user on h1 to a user on h2
(C{bench.natmeshclient}, from this namespace through port forwards; every
node with C{conversation_owner = false}, so that each message crosses the
link between h1 and h2 once), three times with fresh NAT'd nodes: over
their direct path (QUIC), over the relay (C{direct = false}), and over a
TCP link (h2 made reachable by a port forward on its NAT, advertising the
NAT's address).  It reports messages per second, first send to last
receipt, and the CPU of the three node processes per message.

Not registered in C{python -m bench all}: it needs root and builds its own
topology.  Results go to C{bench/results/}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.conditions import collect, oneLine
from bench.nat import percentile
from bench.nodeproc import ROOT
from bench.report import writeMeasurement
from timtx.test import netns
from timtx.test.test_tap import twistTim

EXAMPLES = os.path.join(ROOT, "examples", "nat")
FAST_STUN = "stun_rto = 0.2\nstun_max_rto = 1.0\nstun_retransmissions = 4\n"


def config(name: str, directory: str, dsn: str, tryIndex: int, extra: str = "", cluster: str = "") -> str:
    with open(os.path.join(EXAMPLES, f"{name}.ini")) as f:
        text = f.read()
    for line in cluster.splitlines():
        key = line.split("=")[0].strip()
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)
    text = text.replace("[cluster]\n", "[cluster]\n" + cluster)
    if cluster:
        # A load generator: no per-connection request rate limit.
        text = text.replace("[client]\n", "[client]\nrequest_rate = 0\n")
    text = re.sub(r"(?m)^dsn = .*$", lambda m: f"dsn = {dsn}", text)
    data = os.path.join(directory, f"{name}-{tryIndex}-data")
    text = re.sub(r"(?m)^data_dir = .*$", lambda m: f"data_dir = {data}", text)
    if name != "pub":
        text += FAST_STUN
        for line in extra.splitlines():
            key = line.split("=")[0].strip()
            text = re.sub(rf"(?m)^{key} = .*\n", "", text)
        text += extra
    path = os.path.join(directory, f"{name}-{tryIndex}.ini")
    with open(path, "w") as f:
        f.write(text)
    return path


def members(directory: str, name: str, tryIndex: int) -> dict[str, Any]:
    path = os.path.join(directory, f"{name}-{tryIndex}-data", "cluster-members.json")
    try:
        with open(path) as f:
            return {m["nodeId"]: m for m in json.load(f)["members"]}
    except (OSError, ValueError, KeyError):
        return {}


def start(host: netns.Host, path: str, log: str, directory: str) -> subprocess.Popen[bytes]:
    argv = ["ip", "netns", "exec", host.namespace, *twistTim(path, log)]
    return subprocess.Popen(argv, env=netns.childEnvironment(), cwd=directory, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def database() -> tuple[str, Any]:
    import psycopg2

    name = f"txnatmesh{os.getpid()}"
    admin = psycopg2.connect("host=127.0.0.1 user=postgres dbname=test")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()

    # Every namespace shares the file system, so the Unix socket reaches it.
    return f"host=/var/run/postgresql user=postgres dbname={name}", drop


def run(args: argparse.Namespace) -> dict[str, Any]:
    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    dsn, drop = database()
    kinds = tuple(args.kinds.split(","))
    topology = netns.Topology(f"txm{os.urandom(2).hex()}", kinds)
    directory = tempfile.mkdtemp(prefix="txnatmesh")
    procs: list[subprocess.Popen[bytes]] = []
    tries: list[dict[str, Any]] = []
    try:
        topology.up()
        from timtx.crypto.ids import NodeKeys

        NodeKeys.fromFile(os.path.join(directory, "nat-node.key"))
        pub = start(topology.public, config("pub", directory, dsn, 0), os.path.join(directory, "pub.log"), directory)
        procs.append(pub)
        for index in range(1, args.tries + 1):
            started = time.monotonic()
            pair = [
                start(
                    topology.host(i),
                    config(f"h{i}", directory, dsn, index),
                    os.path.join(directory, f"h{i}-{index}.log"),
                    directory,
                )
                for i in (1, 2)
            ]
            procs += pair
            outcome: dict[str, Any] = {"try": index, "direct": False}
            deadline = started + args.timeout
            if kinds != ("eim", "eim"):
                outcome = staysRelayed(directory, index, started, deadline, args.settle)
                deadline = 0
            while time.monotonic() < deadline:
                a, b = members(directory, "h1", index), members(directory, "h2", index)
                if a.get("h2", {}).get("path") == "direct" and b.get("h1", {}).get("path") == "direct":
                    punch = a["h2"].get("punch", {})
                    outcome = {
                        "try": index,
                        "direct": True,
                        "start_to_direct_s": round(time.monotonic() - started, 3),
                        "time_to_direct_ms": round(punch.get("timeToDirect", 0) * 1000, 2),
                        "attempts": punch.get("attempts"),
                    }
                    break
                time.sleep(0.05)
            tries.append(outcome)
            sys.stderr.write(f"{outcome}\n")
            for proc in pair:
                stop(proc)
        return summarise(tries)
    finally:
        for proc in procs:
            stop(proc)
        topology.down()
        drop()
        shutil.rmtree(directory, ignore_errors=True)


def staysRelayed(directory: str, index: int, started: float, deadline: float, settle: float) -> dict[str, Any]:
    """
    Wait until both NAT'd nodes know each other's mapping over a relayed
    link, then C{settle} seconds: a success if still relayed, unpunched.
    """
    outcome: dict[str, Any] = {"try": index, "relayed": False}

    def state() -> tuple[bool, bool]:
        a, b = members(directory, "h1", index), members(directory, "h2", index)
        known = all(
            view.get(other, {}).get("meta", {}).get("nat.mapping") not in (None, "unknown")
            for view, other in ((a, "h2"), (b, "h1"))
        )
        relayed = a.get("h2", {}).get("path") == "relayed" and b.get("h1", {}).get("path") == "relayed"
        attempts = a.get("h2", {}).get("punch", {}).get("attempts", 0) + b.get("h1", {}).get("punch", {}).get(
            "attempts", 0
        )
        return known and relayed, attempts == 0

    while time.monotonic() < deadline:
        ready, _ = state()
        if ready:
            outcome["discovered_s"] = round(time.monotonic() - started, 3)
            time.sleep(settle)
            ready, unpunched = state()
            outcome["relayed"] = ready and unpunched
            break
        time.sleep(0.05)
    return outcome


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


THROUGHPUT_MODES = (
    # (mode, path to wait for, [nat] lines for h1 and h2, [cluster] lines for h2)
    ("direct", "direct", "", ""),
    ("relayed", "relayed", "direct = false\n", ""),
    ("tcp", "tcp", "", "advertise = 198.18.2.2:7946\n"),
)


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    dsn, drop = database()
    topology = netns.Topology(f"txm{os.urandom(2).hex()}", ("eim", "eim"))
    directory = tempfile.mkdtemp(prefix="txnatmesh")
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"messages": args.messages, "window": args.window, "size": args.size}
    owner = "conversation_owner = false\n"
    try:
        topology.up()
        router = topology.linkRoot()
        topology.exposeTcp(5120, topology.public.address, 5120)
        for i in (1, 2):
            topology.forwardTcp(i, 5120)
            topology.exposeTcp(5120 + i, topology.nat(i).address, 5120)
        topology.forwardTcp(2, 7946)
        from timtx.crypto.ids import NodeKeys

        NodeKeys.fromFile(os.path.join(directory, "nat-node.key"))
        pubConfig = config("pub", directory, dsn, 0, cluster=owner)
        pub = start(topology.public, pubConfig, os.path.join(directory, "pub.log"), directory)
        procs.append(pub)
        for index, (mode, path, nat, cluster) in enumerate(THROUGHPUT_MODES, 1):
            extra = nat + ("reachable = true\n" if mode == "tcp" else "")
            pair = []
            for i in (1, 2):
                text = config(
                    f"h{i}",
                    directory,
                    dsn,
                    index,
                    extra=nat if i == 1 else extra,
                    cluster=owner + (cluster if i == 2 else ""),
                )
                pair.append(start(topology.host(i), text, os.path.join(directory, f"h{i}-{index}.log"), directory))
            procs += pair
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                a, b = members(directory, "h1", index), members(directory, "h2", index)
                if a.get("h2", {}).get("path") == path and b.get("h1", {}).get("path") == path:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"{mode}: the link between h1 and h2 never became {path}")
            pids = [pub.pid, *(p.pid for p in pair)]
            before = sum(cpuSeconds(pid) for pid in pids)
            client = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.natmeshclient",
                    "--sender",
                    f"ws://{router}:5121/tim",
                    "--recipient",
                    f"ws://{router}:5122/tim",
                    "--messages",
                    str(args.messages),
                    "--window",
                    str(args.window),
                    "--size",
                    str(args.size),
                ],
                env=netns.childEnvironment(),
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if client.returncode:
                raise RuntimeError(f"{mode}: the client failed:\n{client.stderr[-3000:]}")
            cpu = sum(cpuSeconds(pid) for pid in pids) - before
            measured = json.loads(client.stdout.strip().splitlines()[-1])
            still = members(directory, "h1", index).get("h2", {}).get("path")
            result[mode] = {
                "path_after": still,
                "received": measured["received"],
                "messages_per_s": round(measured["messages"] / measured["seconds"]),
                "nodes_cpu_us_per_message": round(cpu / measured["messages"] * 1e6, 1),
            }
            sys.stderr.write(f"{mode}: {result[mode]}\n")
            for proc in pair:
                stop(proc)
        return result
    finally:
        for proc in procs:
            stop(proc)
        topology.down()
        drop()
        shutil.rmtree(directory, ignore_errors=True)


def throughputMarkdown(result: dict[str, Any], conditions: dict[str, Any]) -> str:
    lines = [
        f"Conditions: {oneLine(conditions)}",
        "",
        f"1:1, {result['messages']} messages of {result['size']} bytes, {result['window']} in flight",
        "",
        "| Link between h1 and h2 | Messages/s | CPU per message (3 nodes) | All received |",
        "|---|---|---|---|",
    ]
    for mode, label in (("direct", "direct (QUIC, punched)"), ("relayed", "relayed through pub"), ("tcp", "TCP")):
        r = result[mode]
        lines.append(
            f"| {label} | {r['messages_per_s']:,} | {r['nodes_cpu_us_per_message']} µs | "
            f"{r['received'] >= result['messages']} |"
        )
    return "\n".join(lines) + "\n"


def summarise(tries: list[dict[str, Any]]) -> dict[str, Any]:
    if tries and "relayed" in tries[0]:
        return {"tries": len(tries), "relayed": sum(1 for t in tries if t["relayed"]), "each": tries}
    direct = [t for t in tries if t["direct"]]
    ttd = [t["time_to_direct_ms"] for t in direct]
    total = [t["start_to_direct_s"] for t in direct]
    return {
        "tries": len(tries),
        "direct": len(direct),
        "first_attempt": sum(1 for t in direct if t["attempts"] == 1),
        "time_to_direct_p50_ms": percentile(ttd, 50) if ttd else None,
        "time_to_direct_p99_ms": percentile(ttd, 99) if ttd else None,
        "start_to_direct_p50_s": percentile(total, 50) if total else None,
        "start_to_direct_p99_s": percentile(total, 99) if total else None,
        "each": tries,
    }


def markdown(result: dict[str, Any], conditions: dict[str, Any]) -> str:
    r = result
    if "relayed" in r:
        return (
            f"Conditions: {oneLine(conditions)}\n\n"
            "| Two NAT'd nodes, one endpoint-dependent | Stayed relayed, no punch tried |\n"
            "|---|---|\n"
            f"| after both discovered their mapping | {r['relayed']}/{r['tries']} |\n"
        )
    return (
        f"Conditions: {oneLine(conditions)}\n\n"
        "| Two NAT'd nodes, both endpoint-independent | Direct | On the first attempt | p50 | p99 |\n"
        "|---|---|---|---|---|\n"
        f"| time to direct (punch attempt to QUIC channel up) | {r['direct']}/{r['tries']} | {r['first_attempt']} | "
        f"{r['time_to_direct_p50_ms']} ms | {r['time_to_direct_p99_ms']} ms |\n"
        f"| from starting both nodes to both seeing the direct link | {r['direct']}/{r['tries']} | "
        f"{r['first_attempt']} | {r['start_to_direct_p50_s']} s | {r['start_to_direct_p99_s']} s |\n"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.natmesh", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds one try may take")
    parser.add_argument("--kinds", default="eim,eim", help="the two NATs: eim,eim or eim,edm")
    parser.add_argument("--settle", type=float, default=3.0, help="eim,edm: seconds to watch after discovery")
    parser.add_argument("--throughput", action="store_true", help="1:1 over direct, relayed and TCP links")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    conditions = collect()
    if args.throughput:
        measured = throughput(args)
        writeMeasurement(args.out, "natmesh-throughput", conditions, measured, throughputMarkdown(measured, conditions))
        return
    result = run(args)
    name = "natmesh" if args.kinds == "eim,eim" else f"natmesh-{args.kinds.replace(',', '-')}"
    writeMeasurement(args.out, name, conditions, result, markdown(result, conditions))


if __name__ == "__main__":
    main(sys.argv[1:])
