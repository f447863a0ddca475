"""
A load-generator process: C{python -m bench.worker '<spec as JSON>'}.

The parent (L{bench.runner}) starts several of these so that ten thousand
clients do not share one process, one core or one file-descriptor limit.
Each reads commands as JSON lines on stdin, C{{"id", "op", "args"}}, runs
C{role.op_<op>(**args)} and answers C{{"id", "ok", "result"}} (or C{"error"})
on stdout.  Commands run concurrently: the parent may ask every worker to
expect messages, then one of them to send.

L{Role} holds what every scenario needs: registering users over C{/tim2},
logging them in over WebSocket, sending load messages (closed loop with a
window, or open loop at a rate) and counting what arrives: latency from the
timestamp in each message, duplicates, and how many of the expected ones
came.  Scenarios subclass it.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

from bench.stats import Histogram
from bench.wire import LeanConnection, Tim2, findMarkers, marker, nowNs, openConnection, padded
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode
from timtx.protocols.frames import client_frame
from timtx.protocols.structs import TimAck

PASSWORD = "bench-password"


def userName(index: int) -> str:
    return f"u{index}"


def encodingOf(name: str, index: int) -> Encoding:
    """
    A connection's encoding: C{compact}, C{json}, or C{mixed} (alternating
    by user index, so that every scenario exercises both).
    """
    if name == "mixed":
        return Encoding.JSON if index % 2 else Encoding.COMPACT
    return Encoding(name)


@dataclass
class Sender:
    """
    One connection sending load messages.

    @ivar build: C{build(seq, text) -> frame bytes}, the tim frame to send.
    @ivar echoed: whether the server echoes each message to its sender (the
        closed loop waits for echoes).
    """

    connection: LeanConnection
    build: Callable[[int, str], bytes]
    remaining: int
    echoed: bool = True
    inFlight: int = 0
    #: The frames sent lately, by seq, kept to send one again when the node
    #: answers 5103 ("may not be stored, send it again"); the oldest go
    #: first past L{Role.keptFrames}.
    sent: dict[int, bytes] = field(default_factory=dict)
    #: Times each seq was sent again.
    resent: dict[int, int] = field(default_factory=dict)


@dataclass
class Tally:
    """
    What one worker received in one measured run.
    """

    expected: int = 0
    received: int = 0
    duplicates: int = 0
    latency: Histogram = field(default_factory=Histogram)
    firstNs: int = 0
    lastNs: int = 0
    done: Deferred[None] | None = None

    def toJSON(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "received": self.received,
            "duplicates": self.duplicates,
            "latency": self.latency.toJSON(),
            "first_ns": self.firstNs,
            "last_ns": self.lastNs,
        }


class Role:
    """
    The worker side of a scenario; see the module docstring.
    """

    #: Connections logging in at once, per worker.
    loginConcurrency = 200
    #: Frames kept per sender to send again, and how many times each; the
    #: first resend waits L{resendDelay} seconds, each next one twice as long.
    keptFrames = 4096
    resendAttempts = 5
    resendDelay = 0.5

    def __init__(self, reactor: Any, spec: dict[str, Any]):
        self.reactor = reactor
        self.spec = spec
        self.params: dict[str, Any] = spec["params"]
        self.workerIndex: int = spec["index"]
        self.host = "127.0.0.1"
        self.port: int = spec["port"]
        #: The client ports of every node of the run (C{--nodes}), the
        #: first being C{port}.
        self.ports: list[int] = spec.get("ports") or [self.port]
        self.encodingName: str = self.params.get("encoding", "compact")
        self.tim2 = Tim2(reactor, spec["http"], concurrency=int(self.params.get("http_concurrency", 16)))
        self.uids: dict[int, str] = {}
        self.tokens: dict[int, int] = {}
        self.connections: dict[int, LeanConnection] = {}
        self.tally = Tally()
        self.echoLatency = Histogram()
        self.sendErrors = 0
        self.resends = 0
        self.errorSamples: list[str] = []
        self.lostConnections = 0
        self._sendDone: Deferred[None] | None = None
        self._senders: list[Sender] = []
        self._senderOf: dict[int, Sender] = {}
        self.seqs: dict[int, int] = {}
        self._loop: LoopingCall | None = None
        self._window = 0
        self._sendFirstNs = 0
        self._sendLastNs = 0

    # Setup.

    async def op_register(self, indices: list[int]) -> dict[str, Any]:
        start = time.monotonic()
        failures: list[str] = []

        async def one(i: int) -> None:
            ack = await self.tim2.register(userName(i), PASSWORD)
            if ack.ok:
                self.uids[i] = ack.n  # type: ignore[assignment]
            else:
                failures.append(f"{userName(i)}: {ack.error.code if ack.error else '?'}")

        await DeferredList([Deferred.fromCoroutine(one(i)) for i in indices], fireOnOneErrback=True, consumeErrors=True)
        return {
            "registered": len(indices) - len(failures),
            "failures": failures[:5],
            "seconds": time.monotonic() - start,
        }

    async def op_tokens(self, indices: list[int]) -> dict[str, Any]:
        start = time.monotonic()

        async def one(i: int) -> None:
            ack = await self.tim2.token(userName(i), PASSWORD)
            if ack.ok:
                self.tokens[i] = ack.t  # type: ignore[assignment]

        await DeferredList([Deferred.fromCoroutine(one(i)) for i in indices], fireOnOneErrback=True, consumeErrors=True)
        return {"tokens": len(self.tokens), "seconds": time.monotonic() - start}

    async def op_login(
        self, indices: list[int], useTokens: bool = False, concurrency: int = 0, nodes: list[int] | None = None
    ) -> dict[str, Any]:
        """
        Connect and log in every user in C{indices}, at most C{concurrency}
        at once.  Each login is timed from the TCP connect to the TIMAUTH
        ack.

        @param nodes: for each of C{indices}, which node (an index into
            C{ports}) the user connects to; all to the first by default.
        """
        portOf = dict(zip(indices, [self.ports[n] for n in nodes], strict=True)) if nodes else {}
        limit = DeferredSemaphore(concurrency or self.loginConcurrency)
        latency = Histogram()
        failures: list[str] = []
        startNs = nowNs()

        async def one(i: int) -> None:
            begin = nowNs()
            try:
                connection = await openConnection(
                    self.reactor, self.host, portOf.get(i, self.port), self, i, encodingOf(self.encodingName, i)
                )
                if useTokens:
                    ack = await connection.login(token=self.tokens[i])
                else:
                    ack = await connection.login(userName(i), PASSWORD)
            except Exception as e:
                failures.append(f"{userName(i)}: {e}")
                return
            if not ack.ok:
                failures.append(f"{userName(i)}: {ack.error.code if ack.error else '?'}")
                return
            latency.add((nowNs() - begin) // 1000)
            self.connections[i] = connection
            self.uids.setdefault(i, connection.uid or "")
            self.connectionReady(connection)

        await DeferredList([limit.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in indices])
        return {
            "logins": latency.count,
            "failures": failures[:5],
            "failed": len(failures),
            "start_ns": startNs,
            "end_ns": nowNs(),
            "latency": latency.toJSON(),
        }

    def connectionReady(self, connection: LeanConnection) -> None:
        """
        Called once a connection is logged in; override to set C{state}.
        """
        connection.state = set()

    async def op_logout(self) -> dict[str, Any]:
        connections = list(self.connections.values())
        self.connections.clear()
        await DeferredList([c.close() for c in connections])
        return {"closed": len(connections)}

    def op_uids(self, indices: list[int]) -> dict[str, Any]:
        return {"uids": {str(i): self.uids.get(i) for i in indices}}

    # Receiving.

    def op_expect(self, count: int) -> dict[str, Any]:
        """
        Start a run: expect C{count} load messages on this worker's
        connections and forget the previous run's counts.
        """
        self.tally = Tally(expected=count, done=Deferred())
        self.echoLatency = Histogram()
        self.sendErrors = 0
        self.resends = 0
        if count == 0:
            self.tally.done.callback(None)  # type: ignore[union-attr]
        return {}

    async def op_wait(self, timeout: float) -> dict[str, Any]:
        """
        Wait until every expected message arrived, or C{timeout} seconds.
        """
        tally = self.tally
        done = tally.done
        assert done is not None
        if not done.called:
            timer = self.reactor.callLater(timeout, lambda: done.called or done.callback(None))
            await done
            if timer.active():
                timer.cancel()
        return {
            **tally.toJSON(),
            "echo": self.echoLatency.toJSON(),
            "send_errors": self.sendErrors,
            "resends": self.resends,
            "error_samples": self.errorSamples[:5],
            "lost_connections": self.lostConnections,
            "send_first_ns": self._sendFirstNs,
            "send_last_ns": self._sendLastNs,
        }

    def frameReceived(self, connection: LeanConnection, timType: int, payload: bytes, acked: bool) -> None:
        now = 0
        for sender, seq, sentNs in findMarkers(payload):
            if sender == connection.index:
                self.echoReceived(connection, seq, sentNs)
                continue
            key = (sender << 32) | seq
            seen = connection.state
            tally = self.tally
            if key in seen:
                tally.duplicates += 1
                continue
            seen.add(key)
            if not now:
                now = nowNs()
            tally.latency.add((now - sentNs) // 1000)
            if not tally.received:
                tally.firstNs = now
            tally.lastNs = now
            tally.received += 1
            if tally.received >= tally.expected and tally.done is not None and not tally.done.called:
                tally.done.callback(None)

    def ackReceived(self, connection: LeanConnection, ack: TimAck) -> None:
        """
        A TIMACK nobody waited for: an error answering a load message.
        """
        if ack.ok:
            return
        sender = self._senderOf.get(connection.index)
        if sender is not None and ack.error is not None and ack.error.code == ErrorCode.ERR_DATABASE:
            if self._resend(sender, ack.t):
                return
        self.sendErrors += 1
        if len(self.errorSamples) < 5:
            self.errorSamples.append(
                f"{ack.timType}: {ack.error.code if ack.error else '?'} {ack.error.info if ack.error else ''}"
            )
        if sender is not None and sender.echoed:
            self._released(sender)

    def connectionLost(self, connection: LeanConnection) -> None:
        if self.connections.get(connection.index) is connection:
            self.lostConnections += 1

    # Sending.

    def messageText(self, sender: Sender, seq: int) -> str:
        return padded(marker(sender.connection.index, seq, nowNs()), int(self.params.get("body", 100)))

    def startSending(self, senders: list[Sender], window: int = 0, rate: float = 0.0) -> Deferred[None]:
        """
        Send every sender's messages: with C{rate} (messages per second for
        this worker, all senders together) open loop on a 10 ms tick;
        otherwise closed loop, at most C{window} unechoed messages per
        sender.

        @return: a L{Deferred} firing once everything is sent and, for
            echoed messages, echoed or refused.
        """
        self._senders = senders
        self._senderOf = {s.connection.index: s for s in senders}
        self._sendDone = Deferred()
        self._sendFirstNs = nowNs()
        # Open loop ignores the window: echoes must not trigger sends.
        self._window = 0 if rate > 0 else window
        if rate > 0:
            self._openLoop(rate)
        else:
            for sender in senders:
                for _ in range(min(window, sender.remaining)):
                    self._sendOne(sender)
        self._checkSent()
        return self._sendDone

    def _sendOne(self, sender: Sender) -> None:
        # Sequence numbers go on across runs, so that no two messages of a
        # sender share a client id or a marker.
        index = sender.connection.index
        seq = self.seqs[index] = self.seqs.get(index, 0) + 1
        sender.remaining -= 1
        if sender.echoed:
            sender.inFlight += 1
        frame = sender.build(seq, self.messageText(sender, seq))
        sender.sent[seq] = frame
        if len(sender.sent) > self.keptFrames:
            del sender.sent[next(iter(sender.sent))]
        sender.connection.sendRaw(frame)
        self._sendLastNs = nowNs()

    def _resend(self, sender: Sender, messageId: int | None) -> bool:
        """
        Send the message C{messageId} (its seq in the low 24 bits, as every
        sender builds ids) again, unchanged: the node recognises a resend by
        its id and answers with the first if that was stored.  Its marker
        keeps the first send's time, so latency counts the wait.

        @return: whether it will be sent again.
        """
        seq = (messageId or 0) & 0xFFFFFF
        frame = sender.sent.get(seq)
        attempts = sender.resent.get(seq, 0)
        if frame is None or attempts >= self.resendAttempts:
            return False
        sender.resent[seq] = attempts + 1
        self.resends += 1
        connection = sender.connection
        self.reactor.callLater(self.resendDelay * 2**attempts, connection.sendRaw, frame)
        return True

    def _openLoop(self, rate: float) -> None:
        state = {"budget": 0.0, "last": time.monotonic(), "next": 0}

        def tick() -> None:
            now = time.monotonic()
            state["budget"] += rate * (now - state["last"])
            state["last"] = now
            active = [s for s in self._senders if s.remaining > 0]
            while state["budget"] >= 1 and active:
                i = state["next"] % len(active)
                sender = active[i]
                self._sendOne(sender)
                state["budget"] -= 1
                if sender.remaining <= 0:
                    del active[i]
                else:
                    state["next"] = i + 1
            if not active:
                loop.stop()
                self._checkSent()

        loop = LoopingCall(tick)
        loop.clock = self.reactor
        loop.start(0.01, now=True)
        self._loop = loop

    def echoReceived(self, connection: LeanConnection, seq: int, sentNs: int) -> None:
        self.echoLatency.add((nowNs() - sentNs) // 1000)
        sender = self._senderOf.get(connection.index)
        if sender is not None and sender.echoed:
            self._released(sender)

    def _released(self, sender: Sender) -> None:
        sender.inFlight -= 1
        if self._window and sender.remaining > 0:
            self._sendOne(sender)
        self._checkSent()

    def _checkSent(self) -> None:
        done = self._sendDone
        if done is None or done.called:
            return
        loop = self._loop
        if loop is not None and loop.running:
            return
        if all(s.remaining <= 0 and (s.inFlight <= 0 or not s.echoed) for s in self._senders):
            done.callback(None)

    def frameBuilder(
        self, connection: LeanConnection, timType: int, make: Callable[[int, str], Any]
    ) -> Callable[[int, str], bytes]:
        """
        C{build(seq, text)} for L{Sender}: C{make(seq, text)} gives the
        struct, sent as a C{timType} frame in the connection's encoding.
        """
        from timtx.protocols import codec

        encoding = connection.encoding

        def build(seq: int, text: str) -> bytes:
            return client_frame(timType, codec.encode(make(seq, text), encoding), encoding)

        return build

    # Ending.

    async def op_close(self) -> dict[str, Any]:
        await self.op_logout()
        await self.tim2.close()
        return {}


class CommandChannel(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 28

    def __init__(self, role: Role, reactor: Any):
        self.role = role
        self.reactor = reactor

    def connectionMade(self) -> None:
        self.answer({"id": 0, "ok": True, "result": {"hello": self.role.workerIndex}})

    def lineReceived(self, line: bytes) -> None:
        command = json.loads(line)
        if command["op"] == "exit":
            self.reactor.stop()
            return
        method = getattr(self.role, "op_" + command["op"])
        d = maybeDeferred(lambda: _maybeCoroutine(method(**command.get("args", {}))))
        d.addCallbacks(
            lambda result: self.answer({"id": command["id"], "ok": True, "result": result}),
            lambda failure: self.answer(
                {"id": command["id"], "ok": False, "error": failure.getTraceback() or str(failure.value)}
            ),
        )

    def answer(self, message: dict[str, Any]) -> None:
        self.sendLine(json.dumps(message, separators=(",", ":")).encode("utf-8"))

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running:
            self.reactor.stop()


def _maybeCoroutine(result: Any) -> Any:
    import inspect

    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return result


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    from twisted.internet import reactor, stdio

    module, _, name = spec["role"].partition(":")
    role_class = getattr(__import__(module, fromlist=[name]), name)
    try:
        role = role_class(reactor, spec)
    except Exception:
        traceback.print_exc()
        raise
    stdio.StandardIO(CommandChannel(role, reactor))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
