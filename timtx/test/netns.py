# -*- test-case-name: timtx.test.test_nat_netns -*-
"""
A NAT test topology in Linux network namespaces, for tests and benchmarks;
the same one C{examples/nat/topology.sh} builds (docs/nat.md):

                 PREFIX-pub  203.0.113.10, 203.0.113.20  (public host)
                      |
     PREFIX-wan  br0 203.0.113.1  ("the internet": a router)
       |  198.18.1.1                   |  198.18.2.1
       |  198.18.1.2                   |  198.18.2.2
     PREFIX-nat1 (NAT kind 1)      PREFIX-nat2 (NAT kind 2)   ...
       |  10.1.0.1                     |  10.2.0.1
     PREFIX-h1  10.1.0.10          PREFIX-h2  10.2.0.10

A router sits between the NATs so that a packet sent with IP TTL 2 leaves
its own NAT and dies before the other.  NAT kinds: C{eim} is endpoint-
independent mapping (nftables C{masquerade persistent}: Linux keeps the
source port for every destination when it is free); C{edm} is
endpoint-dependent (C{masquerade random,fully-random}: a new random port
per destination).  Both filter by address and port, as Linux's conntrack
does.

Every name starts with a prefix unique to the run, so parallel runs do not
collide; L{build} tears everything down when the test ends, failed or not.
Commands that build the topology run synchronously: each takes milliseconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

PUBLIC = ("203.0.113.10", "203.0.113.20")
ROUTER_PUBLIC = "203.0.113.1"

_NAT_RULES = {
    "eim": "masquerade persistent",
    "edm": "masquerade random,fully-random",
}


@dataclass
class Host:
    namespace: str
    address: str


@dataclass
class Topology:
    """
    The namespaces of one topology and how to reach them.
    """

    prefix: str
    kinds: tuple[str, ...]
    namespaces: list[str] = field(default_factory=list)

    @property
    def public(self) -> Host:
        return Host(f"{self.prefix}-pub", PUBLIC[0])

    def host(self, index: int) -> Host:
        """
        The host behind NAT C{index} (from 1).
        """
        return Host(f"{self.prefix}-h{index}", f"10.{index}.0.10")

    def nat(self, index: int) -> Host:
        """
        NAT router C{index} (from 1), with its public address.
        """
        return Host(f"{self.prefix}-nat{index}", f"198.18.{index}.2")

    def commands(self) -> list[list[str]]:
        """
        The C{ip} and C{nft} commands that build the topology, in order.
        """
        p = self.prefix
        wan, pub = f"{p}-wan", f"{p}-pub"
        cmds: list[list[str]] = []

        def ns(name: str, *args: str) -> None:
            cmds.append(["ip", "netns", "exec", name, *args])

        names = [wan, pub]
        for i in range(1, len(self.kinds) + 1):
            names += [f"{p}-nat{i}", f"{p}-h{i}"]
        for name in names:
            cmds.append(["ip", "netns", "add", name])
            ns(name, "ip", "link", "set", "lo", "up")
        ns(wan, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns(wan, "ip", "link", "add", "br0", "type", "bridge")
        ns(wan, "ip", "addr", "add", f"{ROUTER_PUBLIC}/24", "dev", "br0")
        ns(wan, "ip", "link", "set", "br0", "up")
        cmds.append(["ip", "-n", wan, "link", "add", "pub", "type", "veth", "peer", "name", "eth0", "netns", pub])
        ns(wan, "ip", "link", "set", "pub", "master", "br0", "up")
        for address in PUBLIC:
            ns(pub, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        ns(pub, "ip", "link", "set", "eth0", "up")
        ns(pub, "ip", "route", "add", "default", "via", ROUTER_PUBLIC)
        for i, kind in enumerate(self.kinds, 1):
            nat, host = f"{p}-nat{i}", f"{p}-h{i}"
            cmds.append(["ip", "-n", wan, "link", "add", f"n{i}", "type", "veth", "peer", "name", "wan", "netns", nat])
            ns(wan, "ip", "addr", "add", f"198.18.{i}.1/24", "dev", f"n{i}")
            ns(wan, "ip", "link", "set", f"n{i}", "up")
            ns(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            ns(nat, "ip", "addr", "add", f"198.18.{i}.2/24", "dev", "wan")
            ns(nat, "ip", "link", "set", "wan", "up")
            ns(nat, "ip", "route", "add", "default", "via", f"198.18.{i}.1")
            cmds.append(["ip", "-n", nat, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", host])
            ns(nat, "ip", "addr", "add", f"10.{i}.0.1/24", "dev", "lan")
            ns(nat, "ip", "link", "set", "lan", "up")
            ns(host, "ip", "addr", "add", f"10.{i}.0.10/24", "dev", "eth0")
            ns(host, "ip", "link", "set", "eth0", "up")
            ns(host, "ip", "route", "add", "default", "via", f"10.{i}.0.1")
            ns(nat, "nft", "add", "table", "ip", "nat")
            ns(nat, "nft", "add chain ip nat postrouting { type nat hook postrouting priority srcnat; }")
            ns(nat, "nft", f'add rule ip nat postrouting oifname "wan" {_NAT_RULES[kind]}')
        return cmds

    def up(self) -> None:
        for kind in self.kinds:
            if kind not in _NAT_RULES:
                raise ValueError(f"NAT kind {kind!r}: expected one of {', '.join(_NAT_RULES)}")
        _bringUp(self.commands(), self.namespaces, self.down)

    def down(self) -> None:
        """
        Delete every namespace (and so every interface and rule in it).
        """
        _deleteNamespaces(self.namespaces)
        subprocess.run(["ip", "link", "del", f"{self.prefix}r"], capture_output=True, check=False)

    def dropUdp(self, natIndex: int) -> None:
        """
        Make NAT C{natIndex} drop every UDP packet it would forward: a path
        that stops answering.
        """
        self._nft(
            natIndex,
            "add table inet txdrop",
            "add chain inet txdrop txfwd { type filter hook forward priority 0; }",
            "add rule inet txdrop txfwd meta l4proto udp drop",
        )

    def forwardTcp(self, natIndex: int, port: int) -> None:
        """
        Forward TCP C{port} on NAT C{natIndex}'s public address to its host
        (for a TCP baseline through the same routers).
        """
        self._nft(
            natIndex,
            "add chain ip nat prerouting { type nat hook prerouting priority dstnat; }",
            f'add rule ip nat prerouting iifname "wan" tcp dport {port} dnat to {self.host(natIndex).address}',
        )

    @property
    def rootSubnet(self) -> str:
        """
        The first three octets of the /30 between this (the root) namespace
        and the router (L{linkRoot}); from the prefix, so that runs side by
        side rarely share it.
        """
        return f"10.79.{int(self.prefix[-2:], 16)}"

    def linkRoot(self) -> str:
        """
        Link this (the root) namespace to the router by a /30 of its own,
        adding no route here, so the test reaches hosts through the ports
        L{exposeTcp} forwards.

        @return: the router's address on that link.
        """
        p, wan, subnet = self.prefix, f"{self.prefix}-wan", self.rootSubnet
        for cmd in (
            ["ip", "link", "add", f"{p}r", "type", "veth", "peer", "name", "root", "netns", wan],
            ["ip", "addr", "add", f"{subnet}.1/30", "dev", f"{p}r"],
            ["ip", "link", "set", f"{p}r", "up"],
            ["ip", "-n", wan, "addr", "add", f"{subnet}.2/30", "dev", "root"],
            ["ip", "-n", wan, "link", "set", "root", "up"],
            ["ip", "netns", "exec", wan, "nft", "add table ip expose"],
            [
                "ip",
                "netns",
                "exec",
                wan,
                "nft",
                "add chain ip expose pre { type nat hook prerouting priority dstnat; }",
            ],
        ):
            _run(cmd)
        return f"{subnet}.2"

    def exposeTcp(self, port: int, destination: str, destinationPort: int) -> None:
        """
        Forward TCP C{port} on the router's root-side address (L{linkRoot})
        to C{destination}:C{destinationPort} (a NAT's public address with
        L{forwardTcp}, for a host behind it).
        """
        _run(
            [
                "ip",
                "netns",
                "exec",
                f"{self.prefix}-wan",
                "nft",
                f'add rule ip expose pre iifname "root" tcp dport {port} dnat to {destination}:{destinationPort}',
            ]
        )

    def _nft(self, natIndex: int, *commands: str) -> None:
        for command in commands:
            _run(["ip", "netns", "exec", self.nat(natIndex).namespace, "nft", command])

    def command(self, host: Host, module: str, *args: str) -> list[str]:
        """
        The argv running C{python -m module args} inside C{host}'s namespace
        with this interpreter (the venv's, in CI) and this checkout of timtx.
        """
        return ["ip", "netns", "exec", host.namespace, sys.executable, "-m", module, *args]


@dataclass
class MeshTopology:
    """
    Hosts on one LAN, for the mesh: a bridge in its own namespace, a host
    namespace per node on it, and this (the root) namespace on it too, so
    that the test reaches every host and the hosts reach what the test
    forwards to them (the database):

        root  10.78.S.1 --+
        PREFIX-h1  10.78.S.11 --+-- br0 in PREFIX-br
        PREFIX-h2  10.78.S.12 --+
        ...

    C{S} comes from the prefix, so that runs side by side rarely share a
    subnet.
    """

    prefix: str
    hosts: int
    namespaces: list[str] = field(default_factory=list)

    @property
    def subnet(self) -> str:
        return f"10.78.{int(self.prefix[-2:], 16)}"

    @property
    def root(self) -> str:
        """
        This namespace's address on the LAN.
        """
        return f"{self.subnet}.1"

    def host(self, index: int) -> Host:
        """
        Host C{index} (from 1).
        """
        return Host(f"{self.prefix}-h{index}", f"{self.subnet}.{10 + index}")

    def commands(self) -> list[list[str]]:
        bridge, rootLink = f"{self.prefix}-br", f"{self.prefix}r"
        cmds: list[list[str]] = [
            ["ip", "netns", "add", bridge],
            ["ip", "-n", bridge, "link", "set", "lo", "up"],
            ["ip", "-n", bridge, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", bridge, "link", "set", "br0", "up"],
            ["ip", "link", "add", rootLink, "type", "veth", "peer", "name", "root", "netns", bridge],
            ["ip", "-n", bridge, "link", "set", "root", "master", "br0", "up"],
            ["ip", "addr", "add", f"{self.root}/24", "dev", rootLink],
            ["ip", "link", "set", rootLink, "up"],
        ]
        for i in range(1, self.hosts + 1):
            host = self.host(i)
            cmds += [
                ["ip", "netns", "add", host.namespace],
                ["ip", "-n", host.namespace, "link", "set", "lo", "up"],
                [
                    "ip",
                    "-n",
                    bridge,
                    "link",
                    "add",
                    f"h{i}",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.namespace,
                ],
                ["ip", "-n", bridge, "link", "set", f"h{i}", "master", "br0", "up"],
                ["ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0"],
                ["ip", "-n", host.namespace, "link", "set", "eth0", "up"],
            ]
        return cmds

    def up(self) -> None:
        _bringUp(self.commands(), self.namespaces, self.down)

    def down(self) -> None:
        """
        Delete every namespace; the root end of the LAN goes with its peer.
        """
        _deleteNamespaces(self.namespaces)
        subprocess.run(["ip", "link", "del", f"{self.prefix}r"], capture_output=True, check=False)

    def run(self, index: int, *argv: str) -> list[str]:
        """
        The argv running C{argv} inside host C{index}'s namespace.
        """
        return ["ip", "netns", "exec", self.host(index).namespace, *argv]

    def isolate(self, index: int) -> None:
        """
        Cut host C{index} off every other host (nftables drops in its
        namespace, both ways); it still reaches the root namespace, so the
        test and what the test forwards (the database).
        """
        others = ", ".join(self.host(i).address for i in range(1, self.hosts + 1) if i != index)
        for command in (
            "add table inet txsplit",
            "add chain inet txsplit in { type filter hook input priority 0; }",
            "add chain inet txsplit out { type filter hook output priority 0; }",
            f"add rule inet txsplit in ip saddr {{ {others} }} drop",
            f"add rule inet txsplit out ip daddr {{ {others} }} drop",
        ):
            _run(self.run(index, "nft", command))

    def reconnect(self, index: int) -> None:
        """
        Undo L{isolate}.
        """
        _run(self.run(index, "nft", "delete table inet txsplit"))


def buildMesh(testCase: Any, hosts: int) -> MeshTopology:
    """
    Build a LAN of C{hosts} hosts for C{testCase}, removed when it ends;
    skip (fail under CI) where namespaces are unavailable.
    """
    from timtx.testing import requireOrSkip

    reason = unavailable()
    if reason:
        requireOrSkip(reason)
    topology = MeshTopology(f"tx{os.urandom(3).hex()}", hosts)
    testCase.addCleanup(topology.down)
    topology.up()
    return topology


def _bringUp(commands: list[list[str]], namespaces: list[str], down: Any) -> None:
    """
    Run a topology's C{commands}, noting each namespace made in
    C{namespaces} so that C{down} removes exactly those, and call C{down}
    if any command fails: a half-built topology is never left behind.
    """
    try:
        for cmd in commands:
            if cmd[:3] == ["ip", "netns", "add"]:
                namespaces.append(cmd[3])
            _run(cmd)
    except BaseException:
        down()
        raise


def _deleteNamespaces(namespaces: list[str]) -> None:
    for name in reversed(namespaces):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    namespaces.clear()


def _run(cmd: Sequence[str]) -> None:
    result = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


def childEnvironment() -> dict[str, str]:
    """
    The environment for processes in the namespaces: this one, with the
    directory holding this C{timtx} first on the path.
    """
    import timtx

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(timtx.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def unavailable() -> str | None:
    """
    Why namespaces cannot be used here, or C{None}.
    """
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, nftables)"
    probe = f"txprobe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if result.returncode:
        return "ip netns add failed: " + result.stderr.decode(errors="replace").strip()
    try:
        check = subprocess.run(["ip", "netns", "exec", probe, "nft", "add", "table", "ip", "t"], capture_output=True)
        if check.returncode:
            return "nftables does not work in a namespace: " + check.stderr.decode(errors="replace").strip()
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def build(testCase: Any, kinds: Sequence[str]) -> Topology:
    """
    Build a topology with NATs of C{kinds} for C{testCase}, removed when it
    ends; skip (fail under CI) where namespaces are unavailable.
    """
    from timtx.testing import requireOrSkip

    reason = unavailable()
    if reason:
        requireOrSkip(reason)
    topology = Topology(f"tx{os.urandom(3).hex()}", tuple(kinds))
    testCase.addCleanup(topology.down)
    topology.up()
    return topology
