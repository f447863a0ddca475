# -*- test-case-name: timtx.test.test_metrics -*-
"""
The node's numbers: Prometheus metrics at C{/metrics}, and the recent
history the dashboard draws.

Nothing here sits on a hot path.  The parts of the node count in plain
attributes and L{timtx.util.histogram.Histogram}s where they already work
(a connection refused, a message stored, a fan-out written, a store call
answered); L{NodeCollector} reads them only when Prometheus scrapes, and
L{Sampler} once a second, when it also measures how late the reactor runs
a timer (reactor lag: the time every client waits behind work in
progress).

Names follow Prometheus's conventions: C{timtx_} prefix, base units
(seconds, bytes), C{_total} for counters; labels have a few fixed values
(a frame type, an outcome, a store operation), never a user or room id.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from timtx import __version__
from timtx.admin.status import ClusterView, clusterStatus, nodeIdOf
from timtx.protocols.constants import TimType
from timtx.util.histogram import LATENCY_BOUNDS, Histogram, percentile

if TYPE_CHECKING:
    from timtx.node import Node


def _roomCounters(counters: dict[str, Any]) -> Iterator[Metric]:
    """
    Rooms across the cluster (L{timtx.cluster.rooms}): peer messages by
    kind, frames dropped for slow nodes, peer messages refused by reason.
    """
    messages = CounterMetricFamily(
        "timtx_cluster_room_messages", "Virtual-room messages between nodes.", labels=["direction", "kind"]
    )
    for direction in ("sent", "received"):
        for kind, count in sorted(counters[direction].items()):
            messages.add_metric([direction, kind], count)
    yield messages
    dropped = CounterMetricFamily(
        "timtx_cluster_room_dropped",
        "Stream frames and pushes not sent to a node that was too far behind.",
        labels=["kind"],
    )
    for kind, count in sorted(counters["dropped"].items()):
        dropped.add_metric([kind], count)
    yield dropped
    failed = CounterMetricFamily(
        "timtx_cluster_room_failed", "Virtual-room messages not sent: their node was unreachable.", labels=["kind"]
    )
    for kind, count in sorted(counters.get("failed", {}).items()):
        failed.add_metric([kind], count)
    yield failed
    refused = CounterMetricFamily(
        "timtx_cluster_room_refused", "Virtual-room messages from other nodes refused.", labels=["reason"]
    )
    for reason, count in sorted(counters["refused"].items()):
        refused.add_metric([reason], count)
    yield refused


def frameTypeLabel(timType: int) -> str:
    """
    C{TIMMESSAGE} -> C{message}; frame types tim does not define are
    C{unknown}, so that a client cannot make up label values.
    """
    try:
        return TimType(timType).name.lower().removeprefix("tim")
    except ValueError:
        return "unknown"


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    cumulative = histogram.cumulative()
    buckets = [(_le(bound), count) for bound, count in zip(histogram.bounds, cumulative, strict=False)]
    buckets.append(("+Inf", cumulative[-1]))
    family.add_metric(labels, buckets, histogram.sum)


def _le(bound: float) -> str:
    return repr(float(bound))


def transportCounts(node: Node) -> dict[str, int]:
    counts: dict[str, int] = {}
    for connection in list(node.connections):
        kind = str(getattr(connection, "frameKind", "other"))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


class NodeCollector(Collector):
    """
    Every metric of one node, read from its parts at scrape time.
    """

    def __init__(self, node: Node, sampler: Sampler, admin: Any = None):
        self.node = node
        self.sampler = sampler
        self.admin = admin

    def describe(self) -> list[Metric]:
        # Described by collecting: the registry is made with
        # auto_describe=False, so this is only asked for by choice.
        return []

    def collect(self) -> Iterator[Metric]:
        node = self.node
        info = GaugeMetricFamily("timtx_build_info", "Version of this node (always 1).", labels=["version", "node"])
        info.add_metric([__version__, nodeIdOf(node)], 1)
        yield info
        if node.startedAt is not None:
            yield GaugeMetricFamily(
                "timtx_start_time_seconds", "When the node became ready, in Unix seconds.", value=node.startedAt
            )

        # Connections.
        gate = node.gate
        yield GaugeMetricFamily(
            "timtx_client_sockets", "Sockets open on the client ports (admitted, before or after login).", len(gate)
        )
        refused = CounterMetricFamily(
            "timtx_client_sockets_refused", "Client sockets refused at accept, by reason.", labels=["reason"]
        )
        for reason, count in sorted(gate.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        connections = GaugeMetricFamily(
            "timtx_client_connections", "Client protocol connections (WebSocket, TCP) open.", labels=["transport"]
        )
        for kind, count in sorted(transportCounts(node).items()):
            connections.add_metric([kind], count)
        yield connections
        listener = node.listener("client-ws")
        slow = getattr(listener.factory, "slowRequests", None) if listener is not None else None
        if slow is not None:
            yield CounterMetricFamily(
                "timtx_http_slow_requests",
                "HTTP connections on the client port cut off for not sending a request in time.",
                value=slow,
            )
        yield CounterMetricFamily(
            "timtx_slow_readers_dropped",
            "Connections dropped for leaving more than [client] max_output_bytes unread.",
            value=node.slowReadersDropped,
        )

        # Sessions and logins.
        yield GaugeMetricFamily("timtx_sessions", "Logged-in sessions on this node.", value=len(node.sessions))
        yield GaugeMetricFamily(
            "timtx_users_online", "Accounts with a session on this node.", value=len(node.sessions.users())
        )
        yield CounterMetricFamily("timtx_logins", "Sessions started.", value=node.logins)
        failures = CounterMetricFamily("timtx_login_failures", "Logins refused, by reason.", labels=["reason"])
        for reason, count in sorted(node.loginFailures.items()):
            failures.add_metric([reason], count)
        yield failures
        guard = node.accounts.guard
        yield CounterMetricFamily(
            "timtx_login_guard_failures",
            "Wrong passwords and tokens counted against the failed-login budgets (logins and token requests).",
            value=guard.failures,
        )
        yield CounterMetricFamily(
            "timtx_login_guard_refusals",
            "Logins and token requests refused before any password was checked, while an address backs off.",
            value=guard.refusals,
        )
        yield CounterMetricFamily("timtx_logouts", "Sessions ended.", value=node.logouts)
        yield GaugeMetricFamily(
            "timtx_accounts_blocked", "Accounts an operator blocked from logging in.", value=len(node.bans.blocked())
        )

        # Frames and messages.
        frames = CounterMetricFamily(
            "timtx_frames_received",
            "Frames handled after login, by type (acks and pings are counted elsewhere or not at all).",
            labels=["type"],
        )
        byLabel: dict[str, int] = {}
        for timType, count in node.framesReceived.items():
            label = frameTypeLabel(timType)
            byLabel[label] = byLabel.get(label, 0) + count
        for label, count in sorted(byLabel.items()):
            frames.add_metric([label], count)
        yield frames
        yield CounterMetricFamily(
            "timtx_messages_stored", "Messages made durable (1:1 and group).", value=node.conversations.stored
        )
        yield CounterMetricFamily(
            "timtx_messages_resent",
            "Messages not stored again: resends the store refused by their duplicate key, or copies in one batch.",
            value=node.conversations.resent,
        )
        deliveries = CounterMetricFamily(
            "timtx_deliveries",
            "Messages written to sessions: direct (1:1 inbox pushes), group (fan-out), offline (in offline lists).",
            labels=["kind"],
        )
        deliveries.add_metric(["direct"], node.inbox.pushed)
        deliveries.add_metric(["group"], node.fanout.delivered)
        deliveries.add_metric(["offline"], node.inbox.offlineSent)
        yield deliveries
        acked = CounterMetricFamily("timtx_deliveries_acked", "Live pushes acknowledged by a client.", labels=["kind"])
        acked.add_metric(["direct"], node.inbox.acked)
        acked.add_metric(["group"], node.fanout.acked)
        yield acked
        ack = HistogramMetricFamily(
            "timtx_ack_latency_seconds",
            "Seconds from a live push to the client's ack (group: a sample of one ack in 16).",
            labels=["kind"],
        )
        _histogram(ack, ["direct"], node.inbox.ackSeconds)
        _histogram(ack, ["group"], node.fanout.ackSeconds)
        yield ack
        yield CounterMetricFamily("timtx_group_fanouts", "Group messages fanned out.", value=node.fanout.messages)
        fanout = HistogramMetricFamily(
            "timtx_fanout_duration_seconds", "Seconds to write one group message to every session on this node."
        )
        _histogram(fanout, [], node.fanout.fanoutSeconds)
        yield fanout

        # The store.
        stats = node.storeStats
        storeLatency = HistogramMetricFamily(
            "timtx_store_operation_duration_seconds",
            "Seconds from a store call to its result, by operation.",
            labels=["operation"],
        )
        for operation, histogram in sorted(stats.latency.items()):
            _histogram(storeLatency, [operation], histogram)
        yield storeLatency
        outcomes = CounterMetricFamily("timtx_store_operations", "Store calls by outcome.", labels=["outcome"])
        for outcome, count in sorted(stats.outcomes.items()):
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield GaugeMetricFamily(
            "timtx_store_available",
            "1 while the store answers, 0 after a call that could not reach the database.",
            value=1 if stats.available else 0,
        )

        # The reactor.
        lag = HistogramMetricFamily(
            "timtx_reactor_lag_seconds", "How late a once-a-second timer ran: time spent behind other work."
        )
        _histogram(lag, [], self.sampler.lag)
        yield lag

        # Virtual rooms.
        rooms = node.vrooms.allStats()
        yield GaugeMetricFamily("timtx_vrooms", "Virtual rooms open on this node.", value=len(rooms))
        yield GaugeMetricFamily(
            "timtx_vroom_subscribers", "Subscriptions to virtual rooms.", value=sum(r.subscribers for r in rooms)
        )
        counters = getattr(node.vrooms, "counters", None)
        if callable(counters):
            yield from _roomCounters(counters())

        # The cluster.
        cluster = clusterStatus(node)
        members = GaugeMetricFamily("timtx_cluster_members", "Members this node knows, by state.", labels=["state"])
        states: dict[str, int] = {"alive": 0, "suspect": 0, "dead": 0, "left": 0}
        for member in cluster["members"]:
            states[member["state"]] = states.get(member["state"], 0) + 1
        for state, count in sorted(states.items()):
            members.add_metric([state], count)
        yield members
        if isinstance(getattr(node, "cluster", None), ClusterView):
            if cluster["links"] is not None:
                yield GaugeMetricFamily(
                    "timtx_cluster_peer_links",
                    "Peer links established.",
                    value=sum(1 for link in cluster["links"] if link.get("up", True)),
                )
            if cluster["paths"] is not None:
                paths = GaugeMetricFamily(
                    "timtx_cluster_paths", "Peers by the path that reaches them.", labels=["path"]
                )
                kinds: dict[str, int] = {}
                for path in cluster["paths"]:
                    kind = str(path.get("path", "unknown"))
                    kinds[kind] = kinds.get(kind, 0) + 1
                for kind, count in sorted(kinds.items()):
                    paths.add_metric([kind], count)
                yield paths
            # Not every cluster view counts its links' bytes (test doubles).
            traffic = getattr(node.cluster, "traffic", None)
            if traffic is not None:
                peerBytes = CounterMetricFamily(
                    "timtx_cluster_peer_bytes",
                    "Bytes over this node's peer links since it started, by direction.",
                    labels=["direction"],
                )
                peerBytes.add_metric(["sent"], traffic.sent)
                peerBytes.add_metric(["received"], traffic.received)
                yield peerBytes

        # The admin side itself.
        if self.admin is not None:
            yield CounterMetricFamily(
                "timtx_admin_actions",
                "Admin actions and refusals written to the audit log.",
                value=self.admin.audit.records,
            )


def registryFor(node: Node, sampler: Sampler, admin: Any = None) -> CollectorRegistry:
    """
    A registry of this node's metrics and the process's (CPU, memory, open
    files), apart from prometheus_client's global one, so that nodes in one
    process (tests) do not mix.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, sampler, admin))
    ProcessCollector(registry=registry)
    return registry


@dataclass(frozen=True)
class Sample:
    """
    The node's counters at one moment, for rates and recent percentiles.
    """

    time: float
    counters: dict[str, int]
    gauges: dict[str, float]
    histograms: dict[str, tuple[list[int], float]]


#: Seconds of history the dashboard gets.
HISTORY = 120


class Sampler:
    """
    Once a second: how late the timer ran (reactor lag), and a L{Sample} of
    the node's numbers; the last L{HISTORY} are kept.

    @ivar lag: reactor lag in seconds, since the sampler started.
    """

    log = Logger()

    def __init__(self, node: Node, clock: IReactorTime, interval: float = 1.0):
        self.node = node
        self.clock = clock
        self.interval = interval
        self.lag = Histogram(LATENCY_BOUNDS)
        self.samples: deque[Sample] = deque(maxlen=HISTORY + 1)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self._expected: float | None = None

    def start(self) -> None:
        self._expected = None
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        now = self.clock.seconds()
        if self._expected is not None:
            self.lag.observe(max(0.0, now - self._expected))
        self._expected = now + self.interval
        self.samples.append(self.sample(now))

    def sample(self, now: float) -> Sample:
        node = self.node
        inbox, fanout = node.inbox, node.fanout
        counters = {
            "stored": node.conversations.stored,
            "deliveries": inbox.pushed + fanout.delivered + inbox.offlineSent,
            "acked": inbox.acked + fanout.acked,
            "logins": node.logins,
            "loginFailures": sum(node.loginFailures.values()),
            "slowReadersDropped": node.slowReadersDropped,
            "fanouts": fanout.messages,
        }
        rooms = node.vrooms.allStats()
        gauges = {
            "sessions": float(len(node.sessions)),
            "connections": float(len(node.connections)),
            "users": float(len(node.sessions.users())),
            "vrooms": float(len(rooms)),
            "subscribers": float(sum(r.subscribers for r in rooms)),
        }
        histograms = {
            "fanout": fanout.fanoutSeconds.snapshot(),
            "store": node.storeStats.merged().snapshot(),
            "ackDirect": inbox.ackSeconds.snapshot(),
            "ackGroup": fanout.ackSeconds.snapshot(),
            "lag": self.lag.snapshot(),
        }
        return Sample(now, counters, gauges, histograms)

    def recent(self, window: int = 10) -> dict[str, Any]:
        """
        Rates per second and latency percentiles over the last C{window}
        seconds, and a per-second history for charts.
        """
        samples = list(self.samples)
        # Now, not as of the last tick: totals and gauges are current.
        last = self.sample(self.clock.seconds())
        first = samples[max(0, len(samples) - window)] if samples else last
        span = last.time - first.time
        rates = {
            name: ((value - first.counters[name]) / span if span > 0 else 0.0) for name, value in last.counters.items()
        }
        latency = {}
        for name in last.histograms:
            counts = [a - b for a, b in zip(last.histograms[name][0], first.histograms[name][0], strict=True)]
            total = last.histograms[name][1] - first.histograms[name][1]
            observed = sum(counts)
            latency[name] = {
                "count": observed,
                "mean": total / observed if observed else None,
                "p50": percentile(LATENCY_BOUNDS, counts, 0.5),
                "p90": percentile(LATENCY_BOUNDS, counts, 0.9),
                "p99": percentile(LATENCY_BOUNDS, counts, 0.99),
            }
        series: dict[str, list[Any]] = {
            "time": [],
            "messages": [],
            "deliveries": [],
            "sessions": [],
            "fanoutP99": [],
            "storeP99": [],
            "lag": [],
        }
        for before, after in zip(samples, samples[1:], strict=False):
            step = after.time - before.time
            if step <= 0:
                continue
            series["time"].append(after.time)
            series["messages"].append((after.counters["stored"] - before.counters["stored"]) / step)
            series["deliveries"].append((after.counters["deliveries"] - before.counters["deliveries"]) / step)
            series["sessions"].append(after.gauges["sessions"])
            for key, name in (("fanoutP99", "fanout"), ("storeP99", "store"), ("lag", "lag")):
                counts = [a - b for a, b in zip(after.histograms[name][0], before.histograms[name][0], strict=True)]
                series[key].append(percentile(LATENCY_BOUNDS, counts, 0.99))
        return {
            "window": span,
            "rates": rates,
            "totals": dict(last.counters),
            "gauges": dict(last.gauges),
            "latency": latency,
            "series": series,
        }
