# -*- test-case-name: timtx.test.test_nat_netns -*-
"""
The programs the NAT tests and benchmarks run inside network namespaces
(L{timtx.test.netns}), one JSON object per line on stdout:

    python -m timtx.test.natnode stun-server --secret HEX --address A --address B
    python -m timtx.test.natnode relay --address A --port P
    python -m timtx.test.natnode discover --secret HEX --servers A:3478,B:3478
    python -m timtx.test.natnode peer --role initiator --relay A:P --room R --servers ... --tries 20
    python -m timtx.test.natnode tcp-echo --port P | tcp-send --target A:P --frames N

C{relay} stands in for the mesh's relay link: it pairs two TCP clients that
name the same room and passes their lines between them; the punch
coordination messages cross it as hex.  Servers run until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.protocols.basic import LineReceiver

from timtx.nat import stun
from timtx.nat.client import NatSocket
from timtx.nat.coordination import PunchInitiator, PunchResponder
from timtx.nat.discovery import discover
from timtx.nat.punch import Puncher, PunchFailed
from timtx.nat.quic import NodeCertificate, QuicChannel
from timtx.nat.server import listenStun
from timtx.nat.stun import Address

FRAME = 200
STUN_PORT = 3478


def peerArguments(secret: str, relay: str, servers: str, room: str, *extra: str) -> tuple[list[str], list[str]]:
    """
    The C{peer} arguments of an initiator and a responder that meet in
    C{room} on the relay at C{relay}.
    """
    common = ["--secret", secret, "--relay", relay, "--room", room, "--servers", servers, *extra]
    return ["peer", "--role", "initiator", *common], ["peer", "--role", "responder", *common]


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def parseAddress(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address.of(host, int(port))


def untilStdinCloses(reactor: Any) -> defer.Deferred[None]:
    from twisted.internet import stdio

    done: defer.Deferred[None] = defer.Deferred()

    class Watch(protocol.Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            if not done.called:
                done.callback(None)

    stdio.StandardIO(Watch(), reactor=reactor)
    return done


# Relay stand-in.


class RelayLink(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65536

    def connectionMade(self) -> None:
        # As a mesh link would: no Nagle delay on small control messages.
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def lineReceived(self, line: bytes) -> None:
        rooms = self.factory.rooms
        if not hasattr(self, "room"):
            # A room: its two members and the lines the first sent alone.
            self.room = rooms.setdefault(line.decode(), {"members": [], "held": []})
            self.room["members"].append(self)
            for held in self.room["held"]:
                self.sendLine(held)
            self.room["held"].clear()
            return
        others = [m for m in self.room["members"] if m is not self]
        if not others:
            self.room["held"].append(line)
        for other in others:
            other.sendLine(line)


# Frames: a 4-byte sequence number padded to FRAME bytes.  The receiver
# checks the order and echoes each frame back.


class FrameEcho(protocol.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.expected = 0
        self.inOrder = True

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        whole = len(self.buffer) - len(self.buffer) % FRAME
        if not whole:
            return
        chunk, self.buffer = self.buffer[:whole], self.buffer[whole:]
        for i in range(0, whole, FRAME):
            (seq,) = struct.unpack_from("!I", chunk, i)
            self.inOrder = self.inOrder and seq == self.expected
            self.expected += 1
        assert self.transport is not None
        self.transport.write(chunk)


class FrameSender(protocol.Protocol):
    def __init__(self, frames: int):
        self.frames = frames
        self.echo = FrameEcho()
        self.done: defer.Deferred[tuple[float, float]] = defer.Deferred()

    def send(self) -> None:
        self.started = time.monotonic()
        self.cpu = _cpu()
        assert self.transport is not None
        pad = b"\x00" * (FRAME - 4)
        for seq in range(self.frames):
            self.transport.write(struct.pack("!I", seq) + pad)

    def dataReceived(self, data: bytes) -> None:
        self.echo.buffer += data
        whole = len(self.echo.buffer) - len(self.echo.buffer) % FRAME
        for i in range(0, whole, FRAME):
            (seq,) = struct.unpack_from("!I", self.echo.buffer, i)
            self.echo.inOrder = self.echo.inOrder and seq == self.echo.expected
            self.echo.expected += 1
        self.echo.buffer = self.echo.buffer[whole:]
        if self.echo.expected >= self.frames and not self.done.called:
            self.done.callback((time.monotonic() - self.started, _cpu() - self.cpu))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# Commands.


@defer.inlineCallbacks
def stunServer(reactor: Any, args: argparse.Namespace) -> Any:
    key = stun.clusterKey(bytes.fromhex(args.secret))
    for address in args.address:
        listenStun(reactor, reactor, key, port=STUN_PORT, alternatePort=STUN_PORT + 1, interface=address, rate=0)
    emit(event="ready")
    yield untilStdinCloses(reactor)


@defer.inlineCallbacks
def relay(reactor: Any, args: argparse.Namespace) -> Any:
    factory = protocol.Factory.forProtocol(RelayLink)
    factory.rooms = {}  # type: ignore[attr-defined]
    reactor.listenTCP(args.port, factory, interface=args.address)
    emit(event="ready")
    yield untilStdinCloses(reactor)


@defer.inlineCallbacks
def discovery(reactor: Any, args: argparse.Namespace) -> Any:
    key = stun.clusterKey(bytes.fromhex(args.secret))
    sock = NatSocket(reactor, key, rto=0.2, maxRto=1.0, retransmissions=4, finalWait=4)
    port = reactor.listenUDP(0, sock)
    report = yield discover(reactor, sock, [parseAddress(s) for s in args.servers.split(",")], dialBackWait=0.5)
    emit(
        event="report",
        mapped=str(report.mapped),
        local=str(report.local),
        mapping=report.mapping.value,
        filtering=report.filtering.value,
        reachable=report.reachable,
        behindNat=report.behindNat,
        punchable=report.punchable,
    )
    yield port.stopListening()


class Lines:
    """
    The relay link from a peer: send lines, await the next of a kind.
    """

    def __init__(self) -> None:
        self.waiting: dict[str, defer.Deferred[list[str]]] = {}
        self.early: dict[str, list[str]] = {}

    def got(self, line: bytes) -> None:
        parts = line.decode().split()
        key = " ".join(parts[:2])
        if key in self.waiting:
            self.waiting.pop(key).callback(parts[2:])
        else:
            self.early[key] = parts[2:]

    def wait(self, verb: str, index: int) -> defer.Deferred[list[str]]:
        key = f"{verb} {index}"
        if key in self.early:
            return defer.succeed(self.early.pop(key))
        d: defer.Deferred[list[str]] = defer.Deferred()
        self.waiting[key] = d
        return d


class PeerLink(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, lines: Lines):
        self.lines = lines
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def lineReceived(self, line: bytes) -> None:
        self.lines.got(line)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


@defer.inlineCallbacks
def peer(reactor: Any, args: argparse.Namespace) -> Any:
    secret = bytes.fromhex(args.secret)
    key = stun.clusterKey(secret)
    servers = [parseAddress(s) for s in args.servers.split(",")]
    lines = Lines()
    host, _, port = args.relay.rpartition(":")
    endpoint = protocol.ClientCreator(reactor, PeerLink, lines)
    link = yield endpoint.connectTCP(host, int(port))
    link.sendLine(args.room.encode())
    initiator = args.role == "initiator"
    certificate = NodeCertificate.generate()
    kept: Any = None
    for index in range(1, args.tries + 1):
        sock = NatSocket(reactor, key, rto=0.2, maxRto=1.0, retransmissions=4, finalWait=4)
        udp = reactor.listenUDP(0, sock)
        if args.discover:
            report = yield discover(reactor, sock, servers, dialBackWait=0.5)
            mapped, punchable = report.mapped, report.punchable
            emit(event="report", index=index, mapping=report.mapping.value, punchable=punchable)
        else:
            answer = yield sock.stun.request(servers[0])
            mapped, punchable = answer.xorMappedAddress, True
        # Both sides say whether a punch makes sense; if either cannot, the
        # pair stays on the relay.
        link.sendLine(f"READY {index} {int(bool(punchable))}".encode())
        (theirs,) = yield lines.wait("READY", index)
        if not (punchable and theirs == "1"):
            emit(event="try", index=index, ok=False, attempted=False)
            yield udp.stopListening()
            continue
        puncher: Puncher | None = None
        ok, elapsed = False, None
        if initiator:
            started = reactor.seconds()
            session = PunchInitiator(secret, [mapped])
            link.sendLine(f"CONNECT {index} {session.start(reactor.seconds()).hex()}".encode())
            (reply,) = yield lines.wait("CONNECT", index)
            step = session.receive(bytes.fromhex(reply), reactor.seconds())
            assert step.plan is not None and step.send is not None
            link.sendLine(f"SYNC {index} {step.send.hex()}".encode())
            puncher = Puncher(sock, step.plan, reactor, ttl=args.ttl, timeout=args.timeout, linger=args.timeout)
            puncher.preopen()
            d = puncher.start(step.plan.at)
        else:
            responder = PunchResponder(secret, [mapped], certificate.der)
            (connect,) = yield lines.wait("CONNECT", index)
            step = responder.receive(bytes.fromhex(connect), reactor.seconds())
            assert step.plan is not None and step.send is not None
            puncher = Puncher(sock, step.plan, reactor, ttl=args.ttl, timeout=args.timeout, linger=args.timeout)
            puncher.preopen()
            link.sendLine(f"CONNECT {index} {step.send.hex()}".encode())
            (sync,) = yield lines.wait("SYNC", index)
            step = responder.receive(bytes.fromhex(sync), reactor.seconds())
            assert step.plan is not None
            started = reactor.seconds()
            d = puncher.start(step.plan.at)
        try:
            path = yield d
            ok, elapsed = True, reactor.seconds() - started
        except PunchFailed:
            path = None
        emit(event="try", index=index, ok=ok, attempted=True, elapsed=elapsed, probes=puncher.stats.probesSent)
        link.sendLine(f"DONE {index}".encode())
        yield lines.wait("DONE", index)
        if args.quic and ok and index == args.tries:
            kept = (sock, udp, path)
        else:
            puncher.stop()
            yield udp.stopListening()
    if args.quic and kept is not None:
        yield quicPhase(reactor, args, certificate, *kept)
    emit(event="end")
    # Wait for the close, so that the last lines written reach the relay.
    link.transport.loseConnection()
    yield link.closed


@defer.inlineCallbacks
def quicPhase(
    reactor: Any, args: argparse.Namespace, certificate: NodeCertificate, sock: Any, udp: Any, path: Any
) -> Any:
    initiator = args.role == "initiator"
    proto = FrameSender(args.frames) if initiator else FrameEcho()
    channel = QuicChannel.connect(
        path,
        protocol.Factory.forProtocol(lambda: proto),
        reactor,
        certificate,
        keepalive=args.keepalive,
        consentTimeout=args.consent,
    )
    yield channel.ready
    if initiator:
        assert isinstance(proto, FrameSender)
        proto.send()
        seconds, cpu = yield proto.done
        emit(event="quic", ok=proto.echo.inOrder, frames=args.frames, seconds=seconds, cpu=cpu)
    emit(event="waiting")
    reason = yield channel.lost
    emit(event="lost", reason=type(reason).__name__, detail=str(reason))
    path.puncher.stop()
    yield udp.stopListening()


@defer.inlineCallbacks
def tcpEcho(reactor: Any, args: argparse.Namespace) -> Any:
    reactor.listenTCP(args.port, protocol.Factory.forProtocol(FrameEcho))
    emit(event="ready")
    yield untilStdinCloses(reactor)


@defer.inlineCallbacks
def tcpSend(reactor: Any, args: argparse.Namespace) -> Any:
    target = parseAddress(args.target)
    sender = FrameSender(args.frames)
    yield protocol.ClientCreator(reactor, lambda: sender).connectTCP(target.host, target.port)
    sender.send()
    seconds, cpu = yield sender.done
    emit(event="tcp", ok=sender.echo.inOrder, frames=args.frames, seconds=seconds, cpu=cpu)
    sender.transport.loseConnection()  # type: ignore[union-attr]


def main(argv: list[str]) -> None:
    top = argparse.ArgumentParser(prog="python -m timtx.test.natnode")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stun-server")
    p.add_argument("--secret", required=True)
    p.add_argument("--address", action="append", required=True)
    p = sub.add_parser("relay")
    p.add_argument("--address", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("discover")
    p.add_argument("--secret", required=True)
    p.add_argument("--servers", required=True)
    p = sub.add_parser("peer")
    p.add_argument("--secret", required=True)
    p.add_argument("--role", choices=("initiator", "responder"), required=True)
    p.add_argument("--relay", required=True)
    p.add_argument("--room", required=True)
    p.add_argument("--servers", required=True)
    p.add_argument("--tries", type=int, default=1)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--ttl", type=int, default=2, help="pre-open TTL; 0 skips the pre-open")
    p.add_argument("--discover", action="store_true", help="full discovery before each try, not one binding")
    p.add_argument("--quic", action="store_true")
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--keepalive", type=float, default=0.5)
    p.add_argument("--consent", type=float, default=2.0)
    p = sub.add_parser("tcp-echo")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("tcp-send")
    p.add_argument("--target", required=True)
    p.add_argument("--frames", type=int, default=1000)
    args = top.parse_args(argv)
    commands = {
        "stun-server": stunServer,
        "relay": relay,
        "discover": discovery,
        "peer": peer,
        "tcp-echo": tcpEcho,
        "tcp-send": tcpSend,
    }
    task.react(lambda reactor: commands[args.command](reactor, args))


if __name__ == "__main__":
    main(sys.argv[1:])
