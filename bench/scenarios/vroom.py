"""
d) Virtual-room stream fan-out: one publisher, S subscribers, M stream
frames at R frames/s.

As tim documents it: the publisher registers a vroom (TIMVROOM rtype 1,
the id comes back in the TimAck's C{n}), subscribers subscribe (rtype 5,
C{node} = the id), the publisher sends TIMSTREAM C{TimStream{VNode, body}}
and every subscriber gets C{TimStream{id, VNode, fromNode, body}}: no ack,
no storage.  Measured like group fan-out.  A node without vrooms answers
4107 and the scenario is skipped.

With C{--nodes N} (N > 1) the run starts N nodes forming one cluster on a
shared server store (C{--store postgresql}): the publisher (the room's
founder, so its node holds the room) is on the first node, and subscriber
C{i} on node C{i mod N}, so each frame crosses to every other node once.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore

from bench.runner import COMMON, Param, Result, Run, Scenario
from bench.scenarios.common import (
    SERVER_STORE,
    deliverySummary,
    fmt,
    latencyRows,
    measuredRun,
    notSupported,
    publish,
    raiseIfUnsupported,
    serverStore,
    standIn,
)
from bench.wire import LeanConnection
from bench.worker import Role, Sender
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType, VRoomOp
from timtx.protocols.structs import TimReq, TimStream


class VroomRole(Role):
    async def op_create(self, index: int) -> dict[str, Any]:
        ack = await self.connections[index].request(TimType.TIMVROOM, TimReq(rtype=VRoomOp.REGISTER))
        if not ack.ok:
            code, info = (ack.error.code, ack.error.info) if ack.error else (None, None)
            if notSupported(code, info, "vrooms"):
                return {"unsupported": f"{code} {info}"}
            return {"error": f"{code} {info}"}
        return {"vnode": ack.n}

    async def op_subscribe(self, indices: list[int], vnode: str) -> dict[str, Any]:
        limit = DeferredSemaphore(100)
        failures: list[str] = []

        async def one(i: int) -> None:
            ack = await self.connections[i].request(TimType.TIMVROOM, TimReq(rtype=VRoomOp.SUB, node=vnode))
            if not ack.ok:
                failures.append(f"u{i}: {ack.error.code if ack.error else '?'}")

        await DeferredList([limit.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in indices])
        return {"subscribed": len(indices) - len(failures), "failed": len(failures), "failures": failures[:5]}

    def frameReceived(self, connection: LeanConnection, timType: int, payload: bytes, acked: bool) -> None:
        if timType == TimType.TIMSTREAM and connection.encoding is Encoding.JSON:
            # Binary fields are base64 in JSON: the marker is inside.
            payload = base64.b64decode(json.loads(payload).get("body") or "")
        super().frameReceived(connection, timType, payload, acked)

    def op_send(self, index: int, vnode: str, count: int, rate: float) -> Any:
        connection = self.connections[index]

        def make(seq: int, text: str) -> TimStream:
            return TimStream(VNode=vnode, dtype=1, body=text.encode("ascii"))

        sender = Sender(connection, self.frameBuilder(connection, TimType.TIMSTREAM, make), count, echoed=False)
        return self.startSending([sender], rate=rate).addCallback(lambda _: {"sent": count})


STORES = ("memory", "sqlite", "postgresql", "mariadb")


class VroomFanout(Scenario):
    name = "vroom"
    letter = "d"
    title = "Virtual-room stream fan-out"
    role = "bench.scenarios.vroom:VroomRole"
    params = (
        Param("subscribers", int, 1000, 20, "subscribers, all online"),
        Param("messages", int, 100, 10, "stream frames the publisher sends"),
        Param("rate", float, 10.0, 20.0, "stream frames/s"),
        Param("warmup", int, 2, 1, "unmeasured frames first"),
        Param("body", int, 100, 100, "bytes per stream frame"),
        Param("standin", int, 0, 0, "1: serve it with bench/standin.py, to test the generator itself"),
        Param("timeout", float, 120.0, 30.0, "seconds to wait for frames after the last send"),
        Param("store", str, "memory", "memory", "node store (a cluster needs a server store)", STORES),
        *SERVER_STORE,
        Param("nodes", int, 1, 1, "nodes forming one cluster on a server store; subscribers spread over them"),
        Param(
            "probe_timeout",
            float,
            0.0,
            0.0,
            "cluster: [cluster] probe_timeout in seconds, probe_interval twice it (0: the node's defaults)",
        ),
        *COMMON,
    )

    def variant(self, params: dict) -> str:
        name = f"vroom-{params['subscribers']}" + ("-standin" if params["standin"] else "")
        if params["store"] != "memory":
            name += f"-{params['store']}"
        if params["nodes"] > 1:
            name += f"-{params['nodes']}nodes"
            if params["probe_timeout"]:
                name += f"-probe{params['probe_timeout']:g}s"
        return name

    def nodeSections(self, params: dict) -> dict:
        sections: dict = {"store": {"backend": params["store"], **serverStore(params)}, **standIn(params)}
        if params["nodes"] > 1 and params["probe_timeout"]:
            timeout = params["probe_timeout"]
            sections["cluster"] = {"probe_timeout": timeout, "probe_interval": 2 * timeout}
        return sections

    async def drive(self, run: Run) -> Result:
        p = run.params
        workers = run.workers
        publisher = 0
        nodes = len(run.nodes)
        if nodes > 1 and p["store"] not in ("postgresql", "mariadb"):
            raise ValueError("--nodes needs a store the nodes share: postgresql or mariadb")
        run.log("probing vroom support")
        await workers.one(0, "register", indices=[publisher])
        await workers.one(0, "login", indices=[publisher])
        probe = await workers.one(0, "create", index=publisher)
        raiseIfUnsupported(probe, "virtual rooms (TIMVROOM rtype 1)")
        vnode = probe["vnode"]
        subscribers = list(range(1, p["subscribers"] + 1))
        usersOf = run.share(subscribers)
        run.log(f"registering, logging in and subscribing {len(subscribers)} users")
        await workers.all("register", lambda w: {"indices": usersOf(w)})
        await workers.all("login", lambda w: {"indices": usersOf(w), "nodes": [i % nodes for i in usersOf(w)]})
        answers = await workers.all("subscribe", lambda w: {"indices": usersOf(w), "vnode": vnode})
        failed = sum(a["failed"] for a in answers)
        if failed:
            raise RuntimeError(f"{failed} subscriptions failed: {[f for a in answers for f in a['failures']][:5]}")

        def send(count: int) -> Any:
            return lambda w: ("send", {"index": publisher, "vnode": vnode, "count": count, "rate": p["rate"]})

        timeout = p["timeout"] + p["messages"] / p["rate"]
        lost = 0
        if p["warmup"]:
            tallies, cpu = await measuredRun(
                run, lambda w: len(usersOf(w)) * p["warmup"], send(p["warmup"]), timeout, [0], profiled=False
            )
            lost += deliverySummary(tallies, cpu)["lost"]
        run.log(f"measured: {p['messages']} frames at {p['rate']}/s to {len(subscribers)} subscribers")
        tallies, cpu = await measuredRun(
            run, lambda w: len(usersOf(w)) * p["messages"], send(p["messages"]), timeout, [0]
        )
        s = deliverySummary(tallies, cpu)
        lost += s["lost"]
        result = Result(lost=lost)
        publish(s, result)
        result.metrics["lost_including_warmup"] = lost
        result.rows = [
            ("subscribers (online)", str(len(subscribers)) + (f" over {nodes} nodes" if nodes > 1 else "")),
            ("frames × rate", f"{p['messages']} at {fmt(p['rate'])}/s, {p['body']} bytes"),
            ("deliveries", f"{s['received']} of {s['expected']} (duplicates {s['duplicates']})"),
            ("deliveries/s", fmt(s["per_second"])),
            *latencyRows("send → receive", s["_latency"]),
            ("lost", str(s["lost"])),
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
        return result
