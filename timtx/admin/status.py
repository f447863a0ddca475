# -*- test-case-name: timtx.test.test_admin -*-
"""
What the admin side reads of the cluster, the store and the keys, each
through a small interface, so that the parts that provide them (the mesh,
the store plugins, the vault) can grow without the admin side changing.

  - L{ClusterView}: C{node.cluster} when the node is in a cluster
    (L{timtx.cluster.membership.ClusterService} provides C{nodeId},
    C{members()} and C{ownership}; C{links()} and C{paths()} are optional).
    Without one, the node is a cluster of one.
  - L{StoreStatusSource}: a store may have C{status()}, a dict of what it
    alone knows (shards, an expansion under way); the admin side adds what
    every store has (its name, whether it is open and reachable, latency).
  - L{KeyStatusSource}: the vault may have C{rotationStatus()}; without it
    the node has one stanza key and nothing to rotate.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

from timtx.util.histogram import Histogram, percentile

if TYPE_CHECKING:
    from timtx.node import Node


@runtime_checkable
class ClusterView(Protocol):
    """
    The cluster as the admin side reads it.

    Each member has C{nodeId}, C{state} (an enum whose C{name} is C{ALIVE},
    C{SUSPECT}, C{DEAD} or C{LEFT}), C{address}, C{incarnation},
    C{clientAddresses}, C{meta} and C{since}, as
    L{timtx.cluster.swim.Member} does.  C{ownership.nodes} are the members
    that own keys now.
    """

    nodeId: str

    def members(self) -> Sequence[Any]: ...

    @property
    def ownership(self) -> Any: ...


@runtime_checkable
class StoreStatusSource(Protocol):
    def status(self) -> Mapping[str, Any]:
        """
        What this store alone knows: C{shards} (each with its name and
        state), C{expansion} (C{{"state", "done", "total"}} while data moves
        to new shards), anything else worth showing.
        """


@runtime_checkable
class KeyStatusSource(Protocol):
    def rotationStatus(self) -> Mapping[str, Any]:
        """
        C{active} (the key new stanzas are sealed with), C{keys} (every key
        still needed to open stored ones) and C{rotation}: C{None}, or
        C{{"state", "done", "total"}} while stored stanzas are sealed
        again under the active key.
        """


def nodeIdOf(node: Node) -> str:
    """
    This node's name: its cluster id, else C{[cluster] node_id}, else the
    host name.
    """
    cluster = getattr(node, "cluster", None)
    if isinstance(cluster, ClusterView):
        return cluster.nodeId
    return node.config.cluster.node_id or socket.gethostname()


def _state(member: Any) -> str:
    state = getattr(member, "state", "alive")
    return str(getattr(state, "name", state)).lower()


def clusterStatus(node: Node) -> dict[str, Any]:
    """
    The cluster as this node sees it: members and their health, who owns
    keys, and (where the mesh tells) the links and paths to each peer.
    """
    me = nodeIdOf(node)
    cluster = getattr(node, "cluster", None)
    if not isinstance(cluster, ClusterView):
        return {
            "clustered": False,
            "self": me,
            "size": 1,
            "live": 1,
            "members": [
                {
                    "id": me,
                    "state": "alive",
                    "self": True,
                    "address": None,
                    "incarnation": 0,
                    "since": node.startedAt,
                    "clientAddresses": [],
                    "meta": {},
                }
            ],
            "owners": [me],
            "links": None,
            "paths": None,
        }
    members = []
    for member in cluster.members():
        members.append(
            {
                "id": member.nodeId,
                "state": _state(member),
                "self": member.nodeId == me,
                "address": getattr(member, "address", None),
                "incarnation": getattr(member, "incarnation", 0),
                "since": getattr(member, "since", None),
                "clientAddresses": list(getattr(member, "clientAddresses", ())),
                "meta": dict(getattr(member, "meta", {}) or {}),
            }
        )
    live = sum(1 for m in members if m["state"] in ("alive", "suspect"))
    links = getattr(cluster, "links", None)
    paths = getattr(cluster, "paths", None)
    return {
        "clustered": True,
        "self": me,
        "size": len(members),
        "live": live,
        "members": members,
        "owners": list(getattr(cluster.ownership, "nodes", ())),
        "links": [dict(link) for link in links()] if callable(links) else None,
        "paths": [dict(path) for path in paths()] if callable(paths) else None,
    }


def summary(histogram: Histogram) -> dict[str, Any]:
    counts = histogram.counts
    return {
        "count": histogram.count,
        "mean": histogram.sum / histogram.count if histogram.count else None,
        "p50": percentile(histogram.bounds, counts, 0.5),
        "p99": percentile(histogram.bounds, counts, 0.99),
    }


def storeStatus(node: Node) -> dict[str, Any]:
    """
    The store: its backend, whether it is open and reachable, operations
    by outcome, latency per operation since the node started, and what the
    store itself reports (shards, expansion).
    """
    store = node.store
    stats = node.storeStats
    status: dict[str, Any] = {
        "backend": store.name,
        "open": bool(node.running and node.startedAt is not None),
        "available": stats.available,
        "operations": dict(stats.outcomes),
        "latency": {op: summary(h) for op, h in sorted(stats.latency.items())},
        "shards": None,
        "expansion": None,
    }
    own = getattr(store, "status", None)
    if callable(own):
        status.update(dict(own()))
    return status


def keyStatus(node: Node) -> dict[str, Any]:
    """
    The stanza keys: which one seals, which are still needed, and how far a
    rotation got.
    """
    vault = node.vault
    if isinstance(vault, KeyStatusSource):
        return {"rotatable": True, **dict(vault.rotationStatus())}
    return {"rotatable": False, "active": 1, "keys": [1], "rotation": None}
