"""
b) 1:1 messaging: P pairs of online users exchange messages, both ways.

Each user sends C{messages} messages to its partner.  By default the load
is closed loop: each sender keeps at most C{window} messages unechoed, so
the run measures the most the node delivers.  With C{--rate} the senders
send open loop at that total rate, which measures latency at a load below
saturation.  Delivered counts messages that reached the recipient (each
acknowledged by it); latency is from the sender's clock before encoding to
the recipient's after reading the frame.

Both sides of a pair live in the same worker, and the node runs with
C{[messages] noauth = true}, so no friendship set-up is needed.

With C{--nodes N} (N > 1) the run starts N nodes forming one cluster on the
shared store (PostgreSQL), and the two sides of every pair log in to
different nodes: pair C{k} puts its first user on node C{k mod N} and its
second on the next one, so every message crosses the mesh.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

from twisted.internet.defer import ensureDeferred

from bench.nodeproc import ROOT
from bench.runner import COMMON, Param, Result, Run, Scenario
from bench.scenarios.common import SERVER_STORE, deliverySummary, fmt, latencyRows, measuredRun, publish, serverStore
from bench.worker import Role, Sender
from timtx.protocols.constants import TimType
from timtx.protocols.structs import Tid, TimMessage

#: The issue's goal for 1:1 with the SQLite store, delivered messages/s.
SQLITE_GOAL = 5000
#: Issue 11's later goal for the embedded default: SQLite with
#: C{synchronous = full}, every guarantee kept.
SQLITE_FULL_GOAL = 9000
#: Issue 11's goal for 1:1 with the PostgreSQL and MariaDB stores.
SERVER_GOAL = 5000


class DirectRole(Role):
    def op_send(self, pairs: list[int], count: int, window: int = 0, rate: float = 0.0) -> Any:
        senders = []
        for k in pairs:
            a, b = self.connections[2 * k], self.connections[2 * k + 1]
            senders.append(self._sender(a, b.uid, count))
            senders.append(self._sender(b, a.uid, count))
        return self.startSending(senders, window, rate).addCallback(lambda _: {"sent": 2 * len(pairs) * count})

    def _sender(self, connection: Any, peer: str, count: int) -> Sender:
        toTid = Tid(node=peer)
        base = connection.index << 24

        def make(seq: int, text: str) -> TimMessage:
            return TimMessage(msType=2, odType=1, id=base | seq, toTid=toTid, dataString=text)

        return Sender(connection, self.frameBuilder(connection, TimType.TIMMESSAGE, make), count)


class Direct(Scenario):
    name = "direct"
    letter = "b"
    title = "1:1 messaging"
    role = "bench.scenarios.direct:DirectRole"
    params = (
        Param("pairs", int, 100, 10, "pairs of users"),
        Param("messages", int, 1000, 30, "messages each user sends"),
        Param("window", int, 8, 4, "closed loop: unechoed messages per sender"),
        Param("rate", float, 0.0, 0.0, "open loop: messages/s in total (0: closed loop)"),
        Param("warmup", int, 5, 2, "unmeasured messages per user first"),
        Param("body", int, 100, 100, "characters of text per message"),
        Param("store", str, "sqlite", "sqlite", "node store", ("sqlite", "memory", "postgresql", "mariadb")),
        Param("synchronous", str, "full", "full", "SQLite synchronous", ("full", "normal")),
        Param(
            "sqlite_process",
            str,
            "true",
            "true",
            "SQLite work in a child process of the node ([store] sqlite_process)",
            ("true", "false"),
        ),
        *SERVER_STORE,
        Param(
            "move",
            float,
            0.0,
            0.0,
            "sharded postgresql: seconds into the measured run to move half the slots to a new shard",
        ),
        Param(
            "nodes",
            int,
            1,
            1,
            "nodes forming one cluster on a server store; each pair's two users on different nodes",
        ),
        Param(
            "processes",
            int,
            1,
            1,
            "node processes behind one client port ([node] processes) on a server store",
        ),
        Param(
            "probe_timeout",
            float,
            0.0,
            0.0,
            "cluster: [cluster] probe_timeout in seconds, probe_interval twice it (0: the node's defaults)",
        ),
        Param("timeout", float, 600.0, 60.0, "seconds to wait for deliveries"),
        *COMMON,
    )

    def variant(self, params: dict) -> str:
        name = f"direct-{params['store']}"
        if params["store"] == "mariadb" and params["driver"] != "auto":
            name += f"-{params['driver']}"
        if params["store"] == "sqlite" and params["sqlite_process"] == "false":
            name += "-thread"
        if params["encoding"] != "compact":
            name += f"-{params['encoding']}"
        if params["rate"]:
            name += f"-rate{params['rate']:g}"
        if params["shards"] and params["store"] == "postgresql":
            name += f"-{params['shards']}shards" + ("-move" if params["move"] else "")
        if params["processes"] > 1:
            name += f"-{params['processes']}processes"
        if params["nodes"] > 1:
            name += f"-{params['nodes']}nodes"
            if params["probe_timeout"]:
                name += f"-probe{params['probe_timeout']:g}s"
        return name

    def nodeSections(self, params: dict) -> dict:
        sections = {
            "messages": {"noauth": True},
            "store": {
                "backend": params["store"],
                "synchronous": params["synchronous"],
                "sqlite_process": params["sqlite_process"],
                **serverStore(params),
            },
        }
        if params["processes"] > 1:
            sections["node"] = {"processes": params["processes"]}
        if params["nodes"] > 1 and params["probe_timeout"]:
            timeout = params["probe_timeout"]
            sections["cluster"] = {"probe_timeout": timeout, "probe_interval": 2 * timeout}
        return sections

    async def drive(self, run: Run) -> Result:
        p = run.params
        pairs = p["pairs"]
        nodes = len(run.nodes)
        if nodes > 1 and p["store"] not in ("postgresql", "mariadb"):
            raise ValueError("--nodes needs a store the nodes share: postgresql or mariadb")
        workers = run.workers.count
        pairsOf = run.share(range(pairs))
        usersOf = lambda w: [u for k in pairsOf(w) for u in (2 * k, 2 * k + 1)]  # noqa: E731
        # Pair k: its first user on node k mod N, its second on the next.
        nodesOf = lambda w: [(k + side) % nodes for k in pairsOf(w) for side in (0, 1)]  # noqa: E731
        run.log(f"registering and logging in {2 * pairs} users" + (f" on {nodes} nodes" if nodes > 1 else ""))
        await run.workers.all("register", lambda w: {"indices": usersOf(w)})
        await run.workers.all("login", lambda w: {"indices": usersOf(w), "nodes": nodesOf(w)})
        rate = p["rate"] / workers

        def send(count: int) -> Any:
            return lambda w: ("send", {"pairs": pairsOf(w), "count": count, "window": p["window"], "rate": rate})

        lost = 0
        if p["warmup"]:
            run.log("warm-up")
            tallies, cpu = await measuredRun(
                run, lambda w: 2 * len(pairsOf(w)) * p["warmup"], send(p["warmup"]), p["timeout"], profiled=False
            )
            lost += deliverySummary(tallies, cpu)["lost"]
        mode = f"open loop at {fmt(p['rate'])}/s" if p["rate"] else f"closed loop, window {p['window']}"
        run.log(f"measured: {2 * pairs * p['messages']} messages, {mode}")
        moving = None
        if p["move"] and p["shards"] and p["store"] == "postgresql":
            moving = ensureDeferred(moveHalf(run, p["move"]))
        tallies, cpu = await measuredRun(
            run, lambda w: 2 * len(pairsOf(w)) * p["messages"], send(p["messages"]), p["timeout"]
        )
        moved = await moving if moving is not None else None
        s = deliverySummary(tallies, cpu)
        lost += s["lost"]
        run.log(f"{s['received']} delivered in {s['seconds']}s: {s['per_second']}/s, lost {s['lost']}")
        result = Result(lost=lost)
        publish(s, result)
        result.metrics["lost_including_warmup"] = lost
        result.rows = [
            ("load", mode),
            ("messages delivered", f"{s['received']} of {s['expected']} (duplicates {s['duplicates']})"),
            ("delivered msgs/s", fmt(s["per_second"])),
            *latencyRows("send → receive", s["_latency"]),
            *latencyRows("send → echo (stored)", s["_echo"]),
            ("send errors", str(s["send_errors"])),
            (
                "node CPU" + (f" (all {nodes} nodes)" if nodes > 1 else ""),
                f"{s['node_cpu_percent']}% of one core, {s['node_cpu_us_per_delivery']} µs per delivery",
            ),
            (
                "node RSS after the run" + (f" (all {nodes} nodes)" if nodes > 1 else ""),
                f"{s['node_rss_kb'] / 1024:.1f} MiB",
            ),
            ("generator CPU", f"{s['generator_cpu_percent']}% of one core (all workers)"),
        ]
        if moved is not None:
            result.rows.append(("slot move (half the slots to a new shard)", moved["summary"]))
            result.metrics["move"] = moved
        if p["store"] == "sqlite" and not p["rate"]:
            result.goals = [
                (
                    f"1:1 with the SQLite store ≥ {SQLITE_GOAL:,} delivered msgs/s",
                    f"{fmt(s['per_second'])}/s",
                    s["per_second"] >= SQLITE_GOAL,
                )
            ]
            if p["synchronous"] == "full":
                result.goals.append(
                    (
                        f"1:1 with the SQLite store, synchronous = full, ≥ {SQLITE_FULL_GOAL:,} delivered msgs/s, 0 lost",
                        f"{fmt(s['per_second'])}/s, lost {lost}",
                        s["per_second"] >= SQLITE_FULL_GOAL and not lost,
                    )
                )
        if p["store"] in ("postgresql", "mariadb") and not p["rate"]:
            result.goals = [
                (
                    f"1:1 with the {p['store']} store ≥ {SERVER_GOAL:,} delivered msgs/s, 0 lost",
                    f"{fmt(s['per_second'])}/s, lost {lost}",
                    s["per_second"] >= SERVER_GOAL and not lost,
                )
            ]
        return result


async def moveHalf(run: Run, after: float) -> dict[str, Any]:
    """
    C{after} seconds from now, add the spare database as a shard and move
    half the slots to it (a quarter from each of the first two shards),
    with C{python -m timtx shards}, as an operator would.
    """
    from twisted.internet.task import deferLater
    from twisted.internet.utils import getProcessOutputAndValue

    from timtx.persistence.placement import SLOTS

    database = run.database
    await deferLater(run.reactor, after, lambda: None)
    directory = database.dsns[0]
    env = dict(os.environ, PYTHONPATH=ROOT)
    started = time.monotonic()
    run.log("adding a shard and moving half the slots to it")
    for args in (
        ["add", database.spare, "--directory", directory],
        [
            "move",
            "--directory",
            directory,
            "--slots",
            f"{SLOTS // 4}-{SLOTS * 3 // 4 - 1}",
            "--to",
            str(len(database.dsns)),
        ],
    ):
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "timtx", "shards", *args], env=env, reactor=run.reactor
        )
        if code:
            raise RuntimeError(f"shards {args[0]} failed: {(out + err).decode()[-2000:]}")
    seconds = time.monotonic() - started
    text = out.decode()
    for line in text.splitlines():
        if "held" in line and "(nodes" in line:
            run.log(line.strip())
    copied = sum(int(m.replace(",", "")) for m in re.findall(r"([\d,]+) rows copied", text))
    held = [float(h) for h in re.findall(r"are on shard \d+, held ([\d.]+)s", text)]
    rate = copied / seconds if seconds else 0.0
    summary = (
        f"{copied:,} rows in {seconds:.1f}s ({rate:,.0f} rows/s), ranges held {', '.join(f'{h:.2f}s' for h in held)}"
    )
    run.log(f"moved: {summary}")
    return {
        "rows": copied,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rate),
        "held": held,
        "summary": summary,
    }
