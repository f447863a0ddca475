# -*- test-case-name: timtx.test.test_nat_netns -*-
"""
NAT traversal through real Linux NATs in network namespaces
(L{timtx.test.netns}): discovery tells the two NAT kinds apart, punching
between endpoint-independent NATs succeeds, an endpoint-dependent side stays
on the relay, and the QUIC channel carries a protocol's bytes over the
punched path and reports the path's loss.

Needs root, C{ip} and C{nft}; skips without them (fails under CI).  Each test
builds its own topology with a unique prefix and removes it; the module
takes about half a minute.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any, Callable

from twisted.internet import defer, error, protocol, reactor
from twisted.trial.unittest import TestCase

from timtx.test import netns
from timtx.test.natnode import peerArguments

SECRET = b"netns test secret".hex()
RELAY_PORT = 7777


class JsonLines(protocol.ProcessProtocol):
    """
    Collects the JSON lines a L{timtx.test.natnode} program prints.
    """

    def __init__(self, name: str):
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._buffer = b""
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred[dict[str, Any]]]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            event = json.loads(line)
            event["at"] = reactor.seconds()
            self.events.append(event)
            for waiter in list(self._waiters):
                if waiter[0](event):
                    self._waiters.remove(waiter)
                    waiter[1].callback(event)

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-4000:]

    def processEnded(self, reason: Any) -> None:
        for _, d in self._waiters:
            d.errback(RuntimeError(f"{self.name} ended: {self.stderr.decode(errors='replace')}"))
        self._waiters = []
        self.ended.callback(None)

    def next(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20) -> defer.Deferred[dict[str, Any]]:
        """
        The first event (past or future) C{predicate} accepts.
        """
        for event in self.events:
            if predicate(event):
                return defer.succeed(event)
        if self.ended.called:
            return defer.fail(RuntimeError(f"{self.name} ended: {self.stderr.decode(errors='replace')}"))
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiters.append((predicate, d))
        d.addTimeout(timeout, reactor)
        return d


def kind(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("event") == name


class NamespaceTestsMixin:
    """
    Start L{timtx.test.natnode} programs inside a topology's namespaces,
    stopped when the test ends.
    """

    def spawn(self, topology: netns.Topology, host: netns.Host, *args: str) -> JsonLines:
        proto = JsonLines(f"{host.namespace} {args[0]}")
        argv = topology.command(host, "timtx.test.natnode", *args)
        reactor.spawnProcess(proto, argv[0], argv, env=netns.childEnvironment())
        self.addCleanup(self._stop, proto)  # type: ignore[attr-defined]
        return proto

    @defer.inlineCallbacks
    def _stop(self, proto: JsonLines) -> Any:
        if proto.ended.called:
            return
        proto.transport.closeStdin()  # type: ignore[union-attr]
        timer = reactor.callLater(5, self._kill, proto)
        yield proto.ended
        if timer.active():
            timer.cancel()

    def _kill(self, proto: JsonLines) -> None:
        try:
            proto.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass

    @defer.inlineCallbacks
    def public(self, topology: netns.Topology) -> Any:
        """
        The public host's STUN servers (on both its addresses) and the
        relay stand-in.
        """
        pub = topology.public
        servers = self.spawn(
            topology, pub, "stun-server", "--secret", SECRET, "--address", netns.PUBLIC[0], "--address", netns.PUBLIC[1]
        )
        relay = self.spawn(topology, pub, "relay", "--address", netns.PUBLIC[0], "--port", str(RELAY_PORT))
        yield servers.next(kind("ready"))
        yield relay.next(kind("ready"))

    def peers(self, topology: netns.Topology, *extra: str, room: str = "r") -> tuple[JsonLines, JsonLines]:
        initiator, responder = peerArguments(
            SECRET,
            f"{netns.PUBLIC[0]}:{RELAY_PORT}",
            f"{netns.PUBLIC[0]}:3478,{netns.PUBLIC[1]}:3478",
            room,
            *extra,
        )
        return self.spawn(topology, topology.host(1), *initiator), self.spawn(topology, topology.host(2), *responder)


class NatTraversalTests(NamespaceTestsMixin, TestCase):
    """
    The NAT building blocks through real Linux NATs.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_discovery(self):
        """
        Behind the endpoint-independent NAT discovery reports
        endpoint-independent mapping, behind the endpoint-dependent one
        endpoint-dependent; both filter by address and port and are not
        reachable unasked; the public host is reachable and not NAT'd.
        """
        topology = netns.build(self, ["eim", "edm"])
        yield self.public(topology)
        servers = f"{netns.PUBLIC[0]}:3478,{netns.PUBLIC[1]}:3478"
        reports = []
        for host in (topology.host(1), topology.host(2), topology.public):
            proc = self.spawn(topology, host, "discover", "--secret", SECRET, "--servers", servers)
            reports.append((yield proc.next(kind("report"))))
        eim, edm, public = reports
        self.assertEqual(eim["mapping"], "endpoint-independent")
        self.assertEqual(eim["mapped"].split(":")[0], topology.nat(1).address)
        self.assertEqual(eim["filtering"], "address-and-port-dependent")
        self.assertEqual((eim["behindNat"], eim["reachable"], eim["punchable"]), (True, False, True))
        self.assertEqual(edm["mapping"], "endpoint-dependent")
        self.assertEqual((edm["behindNat"], edm["reachable"], edm["punchable"]), (True, False, False))
        self.assertEqual(public["mapping"], "endpoint-independent")
        self.assertEqual((public["behindNat"], public["reachable"]), (False, True))

    @defer.inlineCallbacks
    def test_punchTwentyTimes(self):
        """
        Between two hosts behind endpoint-independent NATs, at least 19 of
        20 punches give a direct path within 2 s.
        """
        topology = netns.build(self, ["eim", "eim"])
        yield self.public(topology)
        a, b = self.peers(topology, "--tries", "20", "--timeout", "2")
        yield a.ended
        yield b.ended
        tries = [e for e in a.events if e["event"] == "try"]
        self.assertEqual(len(tries), 20, a.stderr)
        good = [t for t in tries if t["ok"] and t["elapsed"] < 2.0]
        self.assertGreaterEqual(len(good), 19, tries)

    @defer.inlineCallbacks
    def test_endpointDependentStaysRelayed(self):
        """
        With one side behind an endpoint-dependent NAT, discovery says so on
        that side and no punch is attempted: the pair stays on the relay.
        """
        topology = netns.build(self, ["eim", "edm"])
        yield self.public(topology)
        a, b = self.peers(topology, "--tries", "2", "--discover")
        yield a.ended
        yield b.ended
        reportsB = [e for e in b.events if e["event"] == "report"]
        self.assertEqual([r["mapping"] for r in reportsB], ["endpoint-dependent"] * 2)
        tries = [e for e in a.events + b.events if e["event"] == "try"]
        self.assertEqual(len(tries), 4, a.stderr + b.stderr)
        self.assertEqual({(t["ok"], t["attempted"]) for t in tries}, {(False, False)})

    @defer.inlineCallbacks
    def test_quicOverPunchedPath(self):
        """
        Over a punched path the QUIC channel carries 2,000 frames from one
        protocol to the other and back, in order; when one NAT drops the
        path's UDP, both sides report L{PathLost} within the consent
        timeout (2 s here).
        """
        topology = netns.build(self, ["eim", "eim"])
        yield self.public(topology)
        consent = 2.0
        a, b = self.peers(
            topology, "--tries", "1", "--quic", "--frames", "2000", "--keepalive", "0.5", "--consent", str(consent)
        )
        result = yield a.next(kind("quic"), timeout=30)
        self.assertTrue(result["ok"])
        yield a.next(kind("waiting"))
        yield b.next(kind("waiting"))
        dropped = reactor.seconds()
        topology.dropUdp(1)
        for side in (a, b):
            lost = yield side.next(kind("lost"), timeout=10)
            self.assertEqual(lost["reason"], "PathLost")
            self.assertLess(lost["at"] - dropped, consent + 1.0)

    def test_topologyRemoved(self) -> None:
        """
        Tearing a topology down leaves none of its namespaces.
        """
        topology = netns.build(self, ["eim"])
        names = list(topology.namespaces)
        self.assertEqual(len(names), 4)
        topology.down()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        self.assertFalse([n for n in names if n in listed])
