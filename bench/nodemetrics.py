"""
What each node process of a run says about itself: its C{/metrics}, read
from its admin port.

A node of the benchmarks normally runs without its admin side (a fixed
port would collide between nodes); scenarios that want these numbers give
it C{[admin] listen} on port 0, so each process takes a free port and logs
it: C{twist tim} alone as C{admin listening on HOST:PORT}, a host of
C{[node] processes} once per child as C{... (for process N)}.  That is how
the benchmark learns, for instance, how the kernel spread the connections
of one shared client port over the processes, and how many bytes went over
the peer links between them.
"""

from __future__ import annotations

import os
import re
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread

from bench.nodeproc import NodeProcess

#: The admin side of one run, on a loopback port the system chose.
ADMIN_SECTION = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}

_ADMIN_LISTENING = re.compile(r"admin listening on \S+?:(\d+)(?: \(for process (\d+)\))?")

#: Samples kept from a scrape: name -> label that tells the samples apart
#: (None: the family has one sample).
_WANTED = {
    "timtx_sessions": None,
    "timtx_deliveries_total": "kind",
    "timtx_group_fanouts_total": None,
    "timtx_cluster_peer_bytes_total": "direction",
}


def adminPorts(node: NodeProcess) -> dict[str, int]:
    """
    The admin port of each process of C{node}, by a name for the process:
    the node's directory name, with C{/pN} for child N of a host of
    processes.
    """
    name = os.path.basename(node.directory)
    with open(node.logPath, encoding="utf-8", errors="replace") as f:
        text = f.read()
    ports = {}
    for match in _ADMIN_LISTENING.finditer(text):
        port, child = match.groups()
        # A host's log holds its children's lines too, without the process.
        if node.processes > 1 and child:
            ports[f"{name}/p{child}"] = int(port)
        elif node.processes == 1 and not child:
            ports[name] = int(port)
    return ports


def scrape(port: int) -> dict[str, float]:
    """
    The samples of L{_WANTED} from one process's C{/metrics}, as
    C{name} or C{name{label}} -> value.  Blocking: call in a thread.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode("utf-8")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in _WANTED:
                continue
            label = _WANTED[sample.name]
            key = sample.name if label is None else f"{sample.name}{{{sample.labels.get(label, '')}}}"
            values[key] = sample.value
    return values


@dataclass
class Snapshot:
    """
    The wanted samples of every process at one moment.
    """

    processes: dict[str, dict[str, float]] = field(default_factory=dict)

    def minus(self, earlier: Snapshot) -> Snapshot:
        """
        Each sample's change since C{earlier} (gauges too, which is
        meaningless for them: read gauges from a snapshot, not a change).
        """
        return Snapshot(
            {
                name: {key: value - earlier.processes.get(name, {}).get(key, 0.0) for key, value in samples.items()}
                for name, samples in self.processes.items()
            }
        )

    def each(self, key: str) -> dict[str, float]:
        return {name: samples.get(key, 0.0) for name, samples in self.processes.items()}

    def total(self, key: str) -> float:
        return sum(self.each(key).values())


class NodeMetrics:
    """
    Reads the metrics of every process of the run's nodes.
    """

    def __init__(self, nodes: list[NodeProcess]):
        self.ports: dict[str, int] = {}
        for node in nodes:
            self.ports.update(adminPorts(node))
        expected = sum(node.processes for node in nodes)
        if len(self.ports) != expected:
            raise RuntimeError(f"found {len(self.ports)} admin ports in the nodes' logs, expected {expected}")

    async def snapshot(self) -> Snapshot:
        names = sorted(self.ports)
        values: list[Any] = await gatherResults(
            [deferToThread(scrape, self.ports[name]) for name in names], consumeErrors=True
        )
        return Snapshot(dict(zip(names, values, strict=True)))
