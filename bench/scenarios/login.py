"""
a) Login storm: N sessions log in with one-time tokens as fast as the node
takes them; then they sit idle, and the node's RSS growth per session is
what an idle authenticated session costs.

Registration and token requests (over C{/tim2}) are set-up, not measured.
A login is timed from the TCP connect through the WebSocket upgrade to the
TIMAUTH ack, at most C{concurrency} in flight per worker.
"""

from __future__ import annotations

from bench.nodeproc import waitFor
from bench.runner import COMMON, Param, Result, Run, Scenario
from bench.scenarios.common import fmt, latencyRows, mergeLatency
from bench.worker import Role

#: The issue's goal for an idle authenticated session, in KB.
RSS_GOAL_KB = 20


class LoginRole(Role):
    pass


class LoginStorm(Scenario):
    name = "login"
    letter = "a"
    title = "Login storm"
    role = "bench.scenarios.login:LoginRole"
    params = (
        Param("sessions", int, 10000, 300, "sessions that log in"),
        Param("concurrency", int, 200, 50, "logins in flight per worker"),
        Param("idle", float, 5.0, 1.0, "seconds to sit idle before measuring RSS"),
        Param("store", str, "sqlite", "sqlite", "node store", ("sqlite", "memory")),
        *COMMON,
    )

    def nodeSections(self, params: dict) -> dict:
        return {"store": {"backend": params["store"]}}

    async def drive(self, run: Run) -> Result:
        p = run.params
        sessions = p["sessions"]
        mine = run.share(range(sessions))
        run.log(f"registering {sessions} accounts")
        await run.workers.all("register", lambda w: {"indices": mine(w)})
        run.log("requesting tokens")
        await run.workers.all("tokens", lambda w: {"indices": mine(w)})
        await waitFor(run.reactor, 1.0)
        rssBefore = run.node.rssKB()
        run.node.profileBegin()
        cpuBefore = run.node.cpuSeconds()
        workerCpuBefore = run.workers.cpuSeconds()
        run.log(f"login storm: {sessions} sessions (node RSS {rssBefore} kB)")
        results = await run.workers.all(
            "login", lambda w: {"indices": mine(w), "useTokens": True, "concurrency": p["concurrency"]}
        )
        cpu = run.node.cpuSeconds() - cpuBefore
        run.node.profileEnd()
        workerCpu = run.workers.cpuSeconds() - workerCpuBefore
        logins = sum(r["logins"] for r in results)
        failed = sum(r["failed"] for r in results)
        seconds = (max(r["end_ns"] for r in results) - min(r["start_ns"] for r in results)) / 1e9
        await waitFor(run.reactor, p["idle"])
        rssAfter = run.node.rssKB()
        files = run.node.openFiles()
        perSession = (rssAfter - rssBefore) / logins if logins else 0.0
        run.log(f"{logins} logins in {seconds:.2f}s; node RSS {rssAfter} kB, {perSession:.1f} kB/session")
        await run.workers.all("logout")
        await waitFor(run.reactor, 1.0)
        rssLoggedOut = run.node.rssKB()
        latency = mergeLatency(results)
        result = Result(lost=sessions - logins)
        result.metrics = {
            "sessions": sessions,
            "logins": logins,
            "failed": failed,
            "seconds": round(seconds, 3),
            "logins_per_s": round(logins / seconds, 1) if seconds else 0,
            "login_latency": latency.summary(),
            "node_rss_kb_before": rssBefore,
            "node_rss_kb_idle": rssAfter,
            "node_rss_kb_after_logout": rssLoggedOut,
            "rss_kb_per_idle_session": round(perSession, 2),
            "node_open_files_idle": files,
            "node_cpu_s": round(cpu, 2),
            "node_cpu_percent": round(100 * cpu / seconds, 1) if seconds else 0,
            "node_cpu_us_per_login": round(1e6 * cpu / logins, 1) if logins else 0,
            "generator_cpu_percent": round(100 * workerCpu / seconds, 1) if seconds else 0,
            "failure_samples": [f for r in results for f in r["failures"]][:5],
        }
        m = result.metrics
        result.rows = [
            ("sessions logged in", f"{logins} of {sessions}"),
            ("logins/s", fmt(m["logins_per_s"])),
            *latencyRows("login (connect → TIMAUTH ack)", latency),
            ("node RSS before / idle / after logout", f"{rssBefore} / {rssAfter} / {rssLoggedOut} kB"),
            ("RSS per idle authenticated session", f"{perSession:.1f} kB"),
            (
                "node CPU during the storm",
                f"{m['node_cpu_percent']}% of one core, {m['node_cpu_us_per_login']} µs per login",
            ),
            ("generator CPU during the storm", f"{m['generator_cpu_percent']}% of one core (all workers)"),
        ]
        result.goals = [
            (
                f"RSS per idle authenticated session ≤ {RSS_GOAL_KB} KB",
                f"{perSession:.1f} KB",
                perSession <= RSS_GOAL_KB,
            )
        ]
        return result
