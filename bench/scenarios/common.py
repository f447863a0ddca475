"""
Helpers shared by the scenario drivers.
"""

from __future__ import annotations

from typing import Any

from bench.runner import Param, Result, Run, Unsupported
from bench.stats import Histogram, merged
from timtx.protocols.constants import ErrorCode

#: Parameters of the server stores (postgresql, mariadb): where to create
#: the run's database, and the pool.
SERVER_STORE = (
    Param(
        "dsn", str, "", "", "server stores: database the run creates its own database from (default: this machine's)"
    ),
    Param("pool", int, 4, 4, "server stores: connections"),
    Param("driver", str, "auto", "auto", "mariadb driver", ("auto", "mysqlclient", "pymysql")),
    Param("shards", int, 0, 0, "postgresql: split the store over this many databases (0: one)"),
)


def serverStore(params: dict[str, Any]) -> dict[str, Any]:
    """
    The C{[store]} keys of a server store's parameters (see
    L{bench.serverdb.forSections}).
    """
    if params.get("store") not in ("postgresql", "mariadb"):
        return {}
    keys: dict[str, Any] = {"pool_size": params["pool"]}
    if params["store"] == "postgresql" and params.get("shards"):
        keys["shard_count"] = params["shards"]
    if params["store"] == "mariadb":
        keys["mariadb_driver"] = params["driver"]
    if params["dsn"]:
        keys["admin_dsn"] = params["dsn"]
    return keys


def fmt(value: float) -> str:
    """
    A number for a table: thousands separated, at most one decimal.
    """
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}"


def mergeLatency(results: list[dict[str, Any]], key: str = "latency") -> Histogram:
    return merged([r[key] for r in results])


def latencyRows(label: str, latency: Histogram) -> list[tuple[str, str]]:
    s = latency.summary()
    return [(f"{label} p50 / p99 / max", f"{s['p50_ms']} / {s['p99_ms']} / {s['max_ms']} ms")]


def notSupported(code: int | None, info: str | None, what: str) -> bool:
    """
    Whether an error answer means "this node does not serve C{what} yet":
    4107 (interface incorrect), or 4104 naming an unknown business rtype
    (what today's L{timtx.chat.business.BusinessRouter} answers for group
    rtypes).
    """
    if code == ErrorCode.ERR_INTERFACE:
        return True
    return code == ErrorCode.ERR_PARAMS and "unknown business rtype" in (info or "")


def standIn(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """
    The node config that serves groups and vrooms with L{bench.standin},
    when the C{standin} parameter asks for it.
    """
    if params.get("standin"):
        return {"protocols": {"client-ws": "bench.standin:StandInProtocol"}}
    return {}


def raiseIfUnsupported(answer: dict[str, Any], what: str) -> None:
    if answer.get("unsupported"):
        raise Unsupported(f"{what} not supported by this node yet (answered {answer['unsupported']})")
    if answer.get("error"):
        raise RuntimeError(f"{what} failed: {answer['error']}")


async def measuredRun(
    run: Run,
    expect: Any,
    send: Any,
    timeout: float,
    senders: list[int] | None = None,
    profiled: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """
    One measured run: every worker expects its share, the sending workers
    send, everyone waits until all arrived or C{timeout}.

    @param expect: C{expect(worker) -> count}.
    @param send: C{send(worker) -> (op, args)} for the workers in
        C{senders} (all by default).
    @param profiled: whether a py-spy profile (C{--profile py-spy}) covers
        this run; warm-ups say no.
    @return: each worker's tally, and CPU seconds used by the node (all
        the nodes of a cluster) and by the workers while it ran.
    """
    workers = run.workers
    await workers.all("expect", lambda w: {"count": expect(w)})
    if profiled:
        run.node.profileBegin()
    nodeCpu, workerCpu = run.nodesCpuSeconds(), workers.cpuSeconds()
    waits = workers.all("wait", {"timeout": timeout})
    sending = []
    for w in senders if senders is not None else range(workers.count):
        op, args = send(w)
        sending.append(workers.one(w, op, **args))
    for d in sending:
        await d
    tallies = await waits
    cpu = {
        "node": run.nodesCpuSeconds() - nodeCpu,
        "workers": workers.cpuSeconds() - workerCpu,
        "node_rss_kb": run.nodesRssKB(),
    }
    run.node.profileEnd()
    return tallies, cpu


def deliverySummary(tallies: list[dict[str, Any]], cpu: dict[str, float]) -> dict[str, Any]:
    """
    Totals over the workers' tallies of one run.
    """
    expected = sum(t["expected"] for t in tallies)
    received = sum(t["received"] for t in tallies)
    firstSend = min((t["send_first_ns"] for t in tallies if t["send_first_ns"]), default=0)
    lastReceive = max((t["last_ns"] for t in tallies), default=0)
    seconds = (lastReceive - firstSend) / 1e9 if firstSend and lastReceive > firstSend else 0.0
    latency = mergeLatency(tallies)
    echo = mergeLatency(tallies, "echo")
    return {
        "expected": expected,
        "received": received,
        "lost": expected - received,
        "duplicates": sum(t["duplicates"] for t in tallies),
        "send_errors": sum(t["send_errors"] for t in tallies),
        "resends": sum(t.get("resends", 0) for t in tallies),
        "error_samples": [e for t in tallies for e in t["error_samples"]][:5],
        "lost_connections": sum(t["lost_connections"] for t in tallies),
        "seconds": round(seconds, 3),
        "per_second": round(received / seconds, 1) if seconds else 0.0,
        "latency": latency.summary(),
        "echo_latency": echo.summary(),
        "node_cpu_percent": round(100 * cpu["node"] / seconds, 1) if seconds else 0.0,
        "node_cpu_us_per_delivery": round(1e6 * cpu["node"] / received, 1) if received else 0.0,
        "generator_cpu_percent": round(100 * cpu["workers"] / seconds, 1) if seconds else 0.0,
        "node_rss_kb": int(cpu.get("node_rss_kb", 0)),
        "_latency": latency,
        "_echo": echo,
    }


def publish(summary: dict[str, Any], result: Result, prefix: str = "") -> None:
    """
    Copy a L{deliverySummary} into C{result.metrics} (without the
    histogram objects).
    """
    for key, value in summary.items():
        if not key.startswith("_"):
            result.metrics[prefix + key] = value
