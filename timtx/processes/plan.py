# -*- test-case-name: timtx.test.test_processes -*-
"""
What the processes of one host are: how many, which sockets the parent
binds for them, and each child's config and command line.  Pure functions
of the config (but L{ensureClusterSecret}), so that the parent and each
child compute the same answers and tests can check them alone.
"""

from __future__ import annotations

import base64
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass
from typing import Mapping, Sequence

from timtx.admin.service import ADMIN_BACKLOG
from timtx.config import Config, replace, splitHostPort
from timtx.transports.admission import withBacklog

#: Where the children of a host without C{[cluster] listen} listen for each
#: other: loopback, on a port the system chooses once for each child.
LOOPBACK_PEERS = "tcp:0:interface=127.0.0.1"

#: The first file descriptor of the sockets a child inherits (after stdin,
#: stdout and stderr).
FIRST_INHERITED_FD = 3


@dataclass(frozen=True)
class SocketPlan:
    """
    One listening socket the parent binds.

    @ivar name: the listener it serves in a child: C{client-ws},
        C{client-tcp} (shared by all children), C{admin}, C{cluster} (one
        for each child).
    @ivar description: the endpoint string it is bound from.
    @ivar offset: added to the endpoint's port, unless that is 0 (the
        system's choice): child I{n} binds port + I{n} - 1.
    """

    name: str
    description: str
    offset: int = 0


def processCount(config: Config, override: int | None = None) -> int:
    """
    How many node processes to run: C{override} (C{--processes}) or C{[node]
    processes}; 0 means one per CPU core this process may run on.
    """
    count = config.node.processes if override is None else override
    if count == 0:
        try:
            count = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            count = os.cpu_count() or 1
    return count


def sharedSockets(config: Config) -> list[SocketPlan]:
    """
    The client listeners: one socket each, which every child accepts on.
    """
    client = config.client
    plans = []
    if client.listen:
        plans.append(SocketPlan("client-ws", withBacklog(client.listen, client.listen_backlog)))
    if client.tcp_listen:
        plans.append(SocketPlan("client-tcp", withBacklog(client.tcp_listen, client.listen_backlog)))
    return plans


def ownSockets(config: Config, index: int) -> list[SocketPlan]:
    """
    The sockets of child C{index} (from 1) alone: its admin side (the
    configured port plus C{index - 1}) and where its peers reach it (the
    same with C{[cluster] listen}, else a loopback port).
    """
    plans = []
    if config.admin.listen:
        plans.append(SocketPlan("admin", withBacklog(config.admin.listen, ADMIN_BACKLOG), index - 1))
    if config.cluster.listen:
        plans.append(SocketPlan("cluster", config.cluster.listen, index - 1))
    else:
        plans.append(SocketPlan("cluster", LOOPBACK_PEERS))
    return plans


def childDescriptors(config: Config, index: int) -> dict[str, int]:
    """
    The file descriptor each socket of child C{index} has in the child:
    from L{FIRST_INHERITED_FD} up, shared sockets first.
    """
    names = [plan.name for plan in [*sharedSockets(config), *ownSockets(config, index)]]
    return {name: FIRST_INHERITED_FD + i for i, name in enumerate(names)}


def peerAddress(config: Config, index: int, host: str, port: int) -> str:
    """
    The C{host:port} other nodes dial to reach child C{index}, whose peer
    socket the parent bound to C{host} and C{port}: C{[cluster] advertise}
    with its port moved as the listen port was, or the bound address.
    """
    advertise = config.cluster.advertise
    if advertise:
        advertisedHost, advertisedPort = splitHostPort(advertise)
        if ":" in advertisedHost:
            advertisedHost = f"[{advertisedHost}]"
        return f"{advertisedHost}:{advertisedPort + index - 1}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def clusterSecretPath(config: Config) -> str | None:
    """
    The secret file the parent makes for its children when the config names
    no cluster secret, or C{None} when it names one.
    """
    if config.cluster.secret or config.cluster.secret_file:
        return None
    return config.data_path("cluster.secret")


def ensureClusterSecret(config: Config) -> None:
    """
    Make the cluster secret L{clusterSecretPath} names, if it is needed and
    missing: 32 random bytes, base64, mode 0600.  The parent does it before
    any child starts.
    """
    path = clusterSecretPath(config)
    if path is None or os.path.exists(path):
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".cluster-secret-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(base64.b64encode(secrets.token_bytes(32)).decode("ascii") + "\n")
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)


def childDataDir(config: Config, index: int) -> str:
    """
    The data directory of child C{index}: its node id and the cluster
    members it last saw are its own.
    """
    return config.data_path(f"process-{index}")


def childConfig(config: Config, index: int, peers: Sequence[str]) -> Config:
    """
    The config of child C{index} (from 1) of C{len(peers)}, whose peer
    addresses are C{peers}: the host's config with its own data directory,
    the files every child shares made absolute (the node key, the data keys,
    the admin accounts and audit log: all in the host's data directory), its
    own peer address, and every sibling among its seeds.
    """
    own = peers[index - 1]
    cluster = config.cluster
    host, port = splitHostPort(own)
    if cluster.advertise:
        listen, advertise = cluster.listen, own
    else:
        # What the inherited socket is bound to; the child listens on that
        # socket, not on this description.
        listen, advertise = f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}", ""
    clusterChanges: dict[str, object] = {
        "listen": listen,
        "advertise": advertise,
        "seeds": tuple(dict.fromkeys([*peers, *cluster.seeds])),
    }
    secretPath = clusterSecretPath(config)
    if secretPath is not None:
        clusterChanges["secret_file"] = secretPath
    if cluster.node_id:
        clusterChanges["node_id"] = f"{cluster.node_id}-{index}"
    return replace(
        config,
        node={"data_dir": childDataDir(config, index), "key_file": config.key_path, "processes": 1},
        store={"data_keys": tuple(sorted(config.data_key_paths.items()))},
        admin={
            "admins_file": config.data_path(config.admin.admins_file),
            "audit_log": config.data_path(config.admin.audit_log),
        },
        cluster=clusterChanges,
    )


def childArgv(
    configPath: str,
    index: int,
    descriptors: Mapping[str, int],
    peers: Sequence[str],
    executable: str = sys.executable,
) -> list[str]:
    """
    The command line of child C{index}: C{twist tim} on the same config,
    logging JSON to its stdout (which the parent reads), told its number,
    the sockets it inherits and its siblings' addresses.
    """
    adopt = ",".join(f"{name}={fd}" for name, fd in descriptors.items())
    return [
        executable,
        "-m",
        "twisted",
        "--log-format=json",
        "tim",
        "--config",
        configPath,
        "--process",
        str(index),
        "--adopt",
        adopt,
        "--peers",
        ",".join(peers),
    ]


def parseAdopt(text: str) -> dict[str, int]:
    """
    C{--adopt}'s C{name=fd,...}.

    @raise ValueError: if it is not of that form.
    """
    found: dict[str, int] = {}
    for word in filter(None, (w.strip() for w in text.split(","))):
        name, sep, fd = word.partition("=")
        if not sep or not name or not fd.isdigit():
            raise ValueError(f"expected name=fd, comma-separated, got {word!r}")
        found[name] = int(fd)
    return found


def restartDelay(deaths: int, first: float, most: float) -> float:
    """
    The wait before restarting a child after its C{deaths}-th death in a row
    (from 1): C{first}, doubled each time, at most C{most}.
    """
    return float(min(first * 2 ** min(max(deaths - 1, 0), 32), most))


__all__ = [
    "SocketPlan",
    "childArgv",
    "childConfig",
    "childDataDir",
    "childDescriptors",
    "clusterSecretPath",
    "ensureClusterSecret",
    "ownSockets",
    "parseAdopt",
    "peerAddress",
    "processCount",
    "restartDelay",
    "sharedSockets",
]
