"""
c) Group fan-out: groups of S members, all online; each group's founder
sends M messages at R messages/s; every other member must receive each one.

Set-up goes through the protocol as tim documents it: the founder creates
an open group (TIMBUSINESS rtype 8, C{reqInt} 2) and gets its id in the
TimAck's C{n}; every other member joins it (rtype 9), answered by
C{TimAck{t: 9}} (tim 2.0) or a PASSROOM notice (tim 2.1).  Messages are
TIMMESSAGE with msType 3 and C{roomTid}; members acknowledge each push.

Measured: send → receive latency over every delivery (p50, p99, max),
deliveries/s from the first send to the last delivery, and lost: deliveries
expected and never seen.

With C{--processes N} the node is one C{twist tim} with C{[node] processes
= N} behind one client port, and the kernel decides which process accepts
each member; with C{--nodes N}, N nodes in one cluster, member C{i} on node
C{i mod N}.  Either way the nodes share a server store, the group's owner
sends each message once to every process holding members, and the run
reads every process's C{/metrics} (an admin port of its own) to report how
the members ended up spread and the bytes over the peer links per group
message, less what the mesh sends when idle (measured just before).  A node without groups answers the create with
4107 (or, today, 4104 "unknown business rtype"), and the scenario is
skipped.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore

from bench.nodemetrics import ADMIN_SECTION, NodeMetrics, Snapshot
from bench.nodeproc import waitFor
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
from timtx.protocols import codec
from timtx.protocols.constants import Business, ErrorCode, GroupType, TimType
from timtx.protocols.structs import Tid, TimAck, TimMessage, TimReq

#: The issue's goals for fan-out.
P99_GOAL_MS = 1000
DELIVERIES_GOAL = 30000
#: Issue 11's goal for fan-out on PostgreSQL: 1,000 members at 1 msg/s.
SERVER_P99_GOAL_MS = 100
#: Issue 13's goal for 10,000 members spread over node processes at 1 msg/s.
SPREAD_P99_GOAL_MS = 500

_PEER_SENT = "timtx_cluster_peer_bytes_total{sent}"
_PEER_RECEIVED = "timtx_cluster_peer_bytes_total{received}"
_GROUP_DELIVERIES = "timtx_deliveries_total{group}"

#: Notices that tell a member it is in a group (tim 2.1 answers an open
#: join with PASSROOM instead of a TimAck).
_JOINED_NOTICES = (Business.PASSROOM, Business.PULLROOM)


class GroupRole(Role):
    joinConcurrency = 100
    joinAttempts = 5

    def connectionReady(self, connection: LeanConnection) -> None:
        super().connectionReady(connection)
        connection.joining = None  # type: ignore[attr-defined]

    async def op_create(self, indices: list[int]) -> dict[str, Any]:
        """
        Each user in C{indices} creates an open group.
        """
        gids = {}
        for i in indices:
            request = TimReq(rtype=Business.NEWROOM, node=f"bench group {i}", reqInt=GroupType.OPEN)
            ack = await self.connections[i].request(TimType.TIMBUSINESS, request)
            if not ack.ok:
                code, info = (ack.error.code, ack.error.info) if ack.error else (None, None)
                if notSupported(code, info, "groups"):
                    return {"unsupported": f"{code} {info}"}
                return {"error": f"{code} {info}"}
            gids[str(i)] = ack.n
        return {"gids": gids}

    async def op_join(self, memberships: list[tuple[int, str]], timeout: float = 60.0) -> dict[str, Any]:
        """
        Each user C{index} joins group C{gid}.  A join answered 5103 ("may
        not be stored, send it again": the node's cluster was too slow) is
        sent again, as a client would, up to C{joinAttempts} times; "already
        a member" answering a resend means the first went through.
        """
        limit = DeferredSemaphore(self.joinConcurrency)
        failures: list[str] = []
        resent = 0

        async def one(index: int, gid: str) -> None:
            nonlocal resent
            for attempt in range(self.joinAttempts):
                try:
                    answer = await self._joinOnce(self.connections[index], gid, timeout)
                except Exception as e:
                    failures.append(f"u{index}: {e!r}")
                    return
                code = answer.error.code if isinstance(answer, TimAck) and answer.error else None
                if isinstance(answer, TimAck) and not answer.ok:
                    if code == ErrorCode.ERR_DATABASE and attempt + 1 < self.joinAttempts:
                        resent += 1
                        continue
                    if code == ErrorCode.ERR_HASEXIST and attempt:
                        return
                    failures.append(f"u{index}: {code if code is not None else '?'}")
                return

        await DeferredList([limit.run(lambda i=i, g=g: Deferred.fromCoroutine(one(i, g))) for i, g in memberships])
        return {
            "joined": len(memberships) - len(failures),
            "failures": failures[:5],
            "failed": len(failures),
            "resent": resent,
        }

    async def _joinOnce(self, connection: LeanConnection, gid: str, timeout: float) -> Any:
        """
        Ask to join C{gid}: the answer is the TimAck, or the notice saying
        the user joined, whichever comes first.
        """
        joined: Deferred[Any] = Deferred()
        connection.joining = (gid, joined)  # type: ignore[attr-defined]
        acked = connection.request(TimType.TIMBUSINESS, TimReq(rtype=Business.ADDROOM, node=gid))
        acked.addCallback(lambda ack: joined.called or joined.callback(ack))
        acked.addErrback(lambda f: joined.called or joined.errback(f))
        joined.addTimeout(timeout, self.reactor)
        try:
            return await joined
        finally:
            connection.joining = None  # type: ignore[attr-defined]

    def frameReceived(self, connection: LeanConnection, timType: int, payload: bytes, acked: bool) -> None:
        joining = getattr(connection, "joining", None)
        if joining is not None and timType == TimType.TIMMESSAGE and b"~B" not in payload:
            gid, joined = joining
            notice = codec.decode(TimMessage, payload, connection.encoding)
            room = notice.roomTid.node if notice.roomTid else None
            if notice.bnType in _JOINED_NOTICES and room == gid and not joined.called:
                joined.callback(notice)
            return
        super().frameReceived(connection, timType, payload, acked)

    def op_send(self, groups: dict[str, str], count: int, rate: float) -> Any:
        """
        Each founder C{index} in C{groups} sends C{count} messages to its
        group C{gid}; C{rate} is the total for this worker.
        """
        senders = []
        for index, gid in groups.items():
            connection = self.connections[int(index)]
            roomTid = Tid(node=gid)
            base = connection.index << 24

            def make(seq: int, text: str, roomTid: Tid = roomTid, base: int = base) -> TimMessage:
                return TimMessage(msType=3, odType=1, id=base | seq, roomTid=roomTid, dataString=text)

            senders.append(
                Sender(connection, self.frameBuilder(connection, TimType.TIMMESSAGE, make), count, echoed=False)
            )
        return self.startSending(senders, rate=rate).addCallback(lambda _: {"sent": count * len(senders)})


class GroupFanout(Scenario):
    name = "group"
    letter = "c"
    title = "Group fan-out"
    role = "bench.scenarios.group:GroupRole"
    params = (
        Param("size", int, 1000, 20, "members per group, founder included"),
        Param("groups", int, 1, 1, "groups, each with its own members"),
        Param("messages", int, 30, 5, "messages each founder sends"),
        Param("rate", float, 1.0, 5.0, "messages/s each founder sends"),
        Param("warmup", int, 1, 1, "unmeasured messages per founder first"),
        Param("body", int, 100, 100, "characters of text per message"),
        Param("store", str, "sqlite", "sqlite", "node store", ("sqlite", "memory", "postgresql", "mariadb")),
        *SERVER_STORE,
        Param("processes", int, 1, 1, "node processes behind one client port ([node] processes) on a server store"),
        Param("nodes", int, 1, 1, "nodes forming one cluster on a server store; member i on node i mod N"),
        Param("idle", float, 5.0, 1.0, "processes or nodes: seconds the mesh's idle traffic is measured"),
        Param("standin", int, 0, 0, "1: serve it with bench/standin.py, to test the generator itself"),
        Param("timeout", float, 600.0, 60.0, "seconds to wait for deliveries after the last send"),
        *COMMON,
    )

    def variant(self, params: dict) -> str:
        store = "" if params["store"] == "sqlite" else f"-{params['store']}"
        if params["store"] == "postgresql" and params["shards"]:
            store += f"-{params['shards']}shards"
        if params["processes"] > 1:
            store += f"-{params['processes']}processes"
        if params["nodes"] > 1:
            store += f"-{params['nodes']}nodes"
        return f"group-{params['size']}{store}" + ("-standin" if params["standin"] else "")

    def nodeSections(self, params: dict) -> dict:
        sections = {"store": {"backend": params["store"], **serverStore(params)}, **standIn(params)}
        if params["processes"] > 1:
            sections["node"] = {"processes": params["processes"]}
        if spread(params):
            sections.update(ADMIN_SECTION)
        return sections

    async def drive(self, run: Run) -> Result:
        p = run.params
        size, groups = p["size"], p["groups"]
        workers = run.workers
        nodes = len(run.nodes)
        if spread(p) and p["store"] not in ("postgresql", "mariadb"):
            raise ValueError("--processes and --nodes need a store the nodes share: postgresql or mariadb")
        # Member i on node i mod N (with one node, all on it).
        nodesOf = lambda indices: {"nodes": [i % nodes for i in indices]} if nodes > 1 else {}  # noqa: E731
        founders = [g * size for g in range(groups)]
        ownerOfFounder = {f: f % workers.count for f in founders}
        run.log("probing group support")
        first = founders[0]
        await workers.one(ownerOfFounder[first], "register", indices=[first])
        await workers.one(ownerOfFounder[first], "login", indices=[first], **nodesOf([first]))
        probe = await workers.one(ownerOfFounder[first], "create", indices=[first])
        raiseIfUnsupported(probe, "groups (TIMBUSINESS rtype 8)")
        gids = dict(probe["gids"])
        others = [i for i in range(size * groups) if i != first]
        usersOf = run.share(others)
        run.log(f"registering and logging in {len(others)} more users")
        await workers.all("register", lambda w: {"indices": usersOf(w)})
        await workers.all("login", lambda w: {"indices": usersOf(w), **nodesOf(usersOf(w))})
        for f in founders[1:]:
            answer = await workers.one(ownerOfFounder[f], "create", indices=[f])
            raiseIfUnsupported(answer, "groups (TIMBUSINESS rtype 8)")
            gids.update(answer["gids"])
        members = [i for i in others if i not in ownerOfFounder]
        membersOf = run.share(members)
        run.log(f"{len(members)} members joining {groups} group(s)")
        joins = await workers.all(
            "join", lambda w: {"memberships": [(i, gids[str(i - i % size)]) for i in membersOf(w)]}
        )
        failed = sum(j["failed"] for j in joins)
        resent = sum(j["resent"] for j in joins)
        if resent:
            run.log(f"{resent} joins answered 5103 were sent again")
        if failed:
            raise RuntimeError(f"{failed} joins failed: {[f for j in joins for f in j['failures']][:5]}")
        sendersOf = {
            w: {str(f): gids[str(f)] for f in founders if ownerOfFounder[f] == w} for w in range(workers.count)
        }
        sending = sorted({ownerOfFounder[f] for f in founders})

        def send(count: int) -> Any:
            return lambda w: ("send", {"groups": sendersOf[w], "count": count, "rate": p["rate"] * len(sendersOf[w])})

        timeout = p["timeout"] + p["messages"] / p["rate"]
        lost = 0
        if p["warmup"]:
            run.log("warm-up")
            tallies, cpu = await measuredRun(
                run, lambda w: len(membersOf(w)) * p["warmup"], send(p["warmup"]), timeout, sending, profiled=False
            )
            lost += deliverySummary(tallies, cpu)["lost"]
        metrics = NodeMetrics(run.nodes) if spread(p) else None
        idle = None
        if metrics is not None:
            run.log(f"measuring the mesh's idle traffic for {p['idle']:g}s")
            idle = await idleTraffic(run, metrics, p["idle"])
            before = await metrics.snapshot()
            run.log("sessions per process: " + perProcess(before.each("timtx_sessions")))
        run.log(f"measured: {p['messages']} messages at {p['rate']}/s to {len(members)} members")
        tallies, cpu = await measuredRun(
            run, lambda w: len(membersOf(w)) * p["messages"], send(p["messages"]), timeout, sending
        )
        s = deliverySummary(tallies, cpu)
        lost += s["lost"]
        run.log(f"{s['received']} deliveries in {s['seconds']}s: {s['per_second']}/s, lost {s['lost']}")
        result = Result(lost=lost)
        publish(s, result)
        result.metrics["lost_including_warmup"] = lost
        result.metrics["joins_resent"] = resent
        result.rows = [
            ("groups × members (online)", f"{groups} × {size}"),
            ("messages × rate", f"{p['messages']} per founder at {fmt(p['rate'])}/s"),
            ("deliveries", f"{s['received']} of {s['expected']} (duplicates {s['duplicates']})"),
            ("deliveries/s", fmt(s["per_second"])),
            *latencyRows("send → receive", s["_latency"]),
            ("lost", str(s["lost"])),
            ("sends answered 5103 and sent again / other send errors", f"{s['resends']} / {s['send_errors']}"),
            ("node CPU", f"{s['node_cpu_percent']}% of one core, {s['node_cpu_us_per_delivery']} µs per delivery"),
            ("node RSS after the run", f"{s['node_rss_kb'] / 1024:.1f} MiB"),
            ("generator CPU", f"{s['generator_cpu_percent']}% of one core (all workers)"),
        ]
        if metrics is not None and idle is not None:
            after = await metrics.snapshot()
            peers = peerReport(before, after, idle, p["messages"] * groups, s["seconds"])
            result.metrics["per_process"] = peers.pop("per_process")
            result.metrics.update(peers)
            result.rows += peerRows(result.metrics)
        p99 = s["latency"]["p99_ms"]
        if size >= 10000 and p["rate"] <= 1:
            result.goals.append(
                (f"fan-out to 10k online members p99 < {P99_GOAL_MS} ms at 1 msg/s", f"{p99} ms", p99 < P99_GOAL_MS)
            )
        if p["store"] == "postgresql" and size >= 1000 and p["rate"] <= 1:
            result.goals.append(
                (
                    f"fan-out to 1,000 members p99 < {SERVER_P99_GOAL_MS} ms at 1 msg/s on PostgreSQL",
                    f"{p99} ms",
                    p99 < SERVER_P99_GOAL_MS,
                )
            )
        if spread(p) and size >= 10000 and p["rate"] <= 1:
            result.goals.append(
                (
                    f"10,000 members over {max(nodes, p['processes'])} node processes at 1 msg/s:"
                    f" p99 < {SPREAD_P99_GOAL_MS} ms, 0 lost",
                    f"{p99} ms, lost {lost}",
                    p99 < SPREAD_P99_GOAL_MS and not lost,
                )
            )
        result.goals.append(
            (
                f"≥ {DELIVERIES_GOAL:,} deliveries/s per node process",
                f"{fmt(s['per_second'])}/s",
                s["per_second"] >= DELIVERIES_GOAL,
            )
        )
        return result


def spread(params: dict[str, Any]) -> bool:
    """
    Whether the members are spread over more than one node process.
    """
    return bool(params["processes"] > 1 or params["nodes"] > 1)


async def idleTraffic(run: Run, metrics: NodeMetrics, seconds: float) -> dict[str, float]:
    """
    Peer bytes/s each process sends while no client sends anything:
    membership probes and the like, taken off what a measured run sent.
    """
    first = await metrics.snapshot()
    started = run.reactor.seconds()
    await waitFor(run.reactor, seconds)
    change = (await metrics.snapshot()).minus(first)
    elapsed = run.reactor.seconds() - started
    return {name: sent / elapsed for name, sent in change.each(_PEER_SENT).items()}


def peerReport(
    before: Snapshot, after: Snapshot, idle: dict[str, float], messages: int, seconds: float
) -> dict[str, Any]:
    """
    Peer bytes per group message, per process and on average, raw and less
    the idle traffic over the run's C{seconds}.
    """
    change = after.minus(before)
    processes = {}
    for name in sorted(after.processes):
        sent = change.processes[name].get(_PEER_SENT, 0.0)
        processes[name] = {
            "sessions": int(after.processes[name].get("timtx_sessions", 0)),
            "group_deliveries": int(change.processes[name].get(_GROUP_DELIVERIES, 0)),
            "peer_bytes_sent": int(sent),
            "peer_bytes_received": int(change.processes[name].get(_PEER_RECEIVED, 0.0)),
            "peer_bytes_idle_per_second": round(idle.get(name, 0.0), 1),
            "peer_bytes_sent_per_message": round(sent / messages, 1) if messages else 0.0,
        }
    count = len(processes) or 1
    sent = change.total(_PEER_SENT)
    background = sum(idle.values()) * seconds
    return {
        "per_process": processes,
        "peer_bytes_sent": int(sent),
        "peer_bytes_idle_per_second": round(sum(idle.values()), 1),
        "peer_bytes_per_message_per_node": round(sent / messages / count, 1) if messages else 0.0,
        "peer_bytes_per_message_per_node_less_idle": (
            round(max(sent - background, 0.0) / messages / count, 1) if messages else 0.0
        ),
    }


def peerRows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    processes = metrics["per_process"]
    sessions = {name: float(v["sessions"]) for name, v in processes.items()}
    deliveries = {name: float(v["group_deliveries"]) for name, v in processes.items()}
    sent = {name: float(v["peer_bytes_sent_per_message"]) for name, v in processes.items()}
    return [
        ("sessions per process", perProcess(sessions)),
        ("group deliveries per process (measured run)", perProcess(deliveries)),
        ("peer bytes sent per group message, per process", perProcess(sent)),
        (
            "peer bytes per group message per node (all sent / messages / processes)",
            f"{fmt(metrics['peer_bytes_per_message_per_node'])}"
            f" ({fmt(metrics['peer_bytes_per_message_per_node_less_idle'])} less idle traffic"
            f" of {fmt(metrics['peer_bytes_idle_per_second'])} B/s in all)",
        ),
    ]


def perProcess(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {fmt(value)}" for name, value in sorted(values.items()))
