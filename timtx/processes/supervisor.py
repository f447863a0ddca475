# -*- test-case-name: timtx.test.test_processes -*-
"""
The parent of a host's node processes (C{[node] processes} above 1).

It binds every listening socket once (the shared client ports, and each
child's admin and peer ports), then runs one C{twist tim} child for each
process, handing it its sockets as inherited descriptors and nothing else
(Twisted's C{spawnProcess} closes every other descriptor in the child).
A child that dies is started again with the same sockets, after a wait that
doubles with each death in a row.  Stopping the parent (SIGTERM, SIGINT)
sends SIGTERM to every child and waits for all of them, killing any that
outlive C{[node] stop_timeout}.  What a child logs (JSON on its stdout) is
logged again here, its namespace prefixed with C{process-N}.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from timtx.config import Config
from timtx.crypto.ids import NodeKeys
from timtx.preflight import CONFIG_ERROR_STATUS, privateDataDir
from timtx.processes.plan import (
    SocketPlan,
    childArgv,
    childDescriptors,
    ensureClusterSecret,
    ownSockets,
    peerAddress,
    restartDelay,
    sharedSockets,
)
from timtx.processes.sockets import CannotBind, bindListening

#: The longest line of a child's output kept whole; a longer one is logged
#: in pieces of this size.
MAX_LINE_BYTES = 1 << 20


@dataclass
class _Child:
    index: int
    pid: int | None = None
    transport: Any = None
    startedAt: float = 0.0
    #: Deaths in a row (reset by a run of at least restart_delay_max).
    deaths: int = 0
    restart: IDelayedCall | None = None
    ended: Deferred[None] | None = None
    sockets: list[tuple[SocketPlan, socket.socket]] = field(default_factory=list)


class Supervisor(Service):
    """
    Runs C{count} node processes for C{config} and keeps them running.

    @param executable: the Python that runs the children.
    @param publish: where the children's log events go.
    @param exit: ends this process with a status, once the reactor stopped
        (when the processes cannot start).
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        count: int,
        *,
        executable: str = sys.executable,
        publish: Callable[[dict[str, Any]], None] = globalLogPublisher,
        exit: Callable[[int], None] = os._exit,
    ):
        self.config = config
        self.reactor = reactor
        self.count = count
        self.executable = executable
        self.publish = publish
        self.exit = exit
        self.children = {index: _Child(index) for index in range(1, count + 1)}
        self.shared: list[tuple[SocketPlan, socket.socket]] = []
        #: The peer address of each child, in order.
        self.peers: list[str] = []

    # Starting.

    def startService(self) -> None:
        super().startService()
        try:
            self._prepare()
        except (CannotBind, OSError) as e:
            self._fail(str(e), 1)
            return
        for index in self.children:
            self._spawn(index)

    def _prepare(self) -> None:
        """
        What every child needs before any starts: the data directory, the
        node key and cluster secret they share (made once, here), and every
        socket, so that a port in use stops the host before a child runs.
        """
        config = self.config
        privateDataDir(config)
        NodeKeys.fromFile(config.key_path)
        ensureClusterSecret(config)
        try:
            for plan in sharedSockets(config):
                s = bindListening(plan.description, plan.offset)
                self.shared.append((plan, s))
                self._listening(plan.name, s, f"shared by {self.count} processes")
            for index, child in self.children.items():
                for plan in ownSockets(config, index):
                    s = bindListening(plan.description, plan.offset)
                    child.sockets.append((plan, s))
                    if plan.name == "cluster":
                        host, port = s.getsockname()[:2]
                        self.peers.append(peerAddress(config, index, host, port))
                    else:
                        self._listening(plan.name, s, f"for process {index}")
        except BaseException:
            self._closeSockets()
            raise

    def _listening(self, name: str, s: socket.socket, whose: str) -> None:
        host, port = s.getsockname()[:2]
        self.log.info("{name} listening on {host}:{port} ({whose})", name=name, host=host, port=port, whose=whose)

    def _spawn(self, index: int) -> None:
        child = self.children[index]
        child.restart = None
        config = self.config
        assert config.path is not None, "a host of processes runs from a config file"
        descriptors = childDescriptors(config, index)
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for plan, s in [*self.shared, *child.sockets]:
            childFDs[descriptors[plan.name]] = s.fileno()
        argv = childArgv(os.path.abspath(config.path), index, descriptors, self.peers, self.executable)
        protocol = _ChildProtocol(self, child)
        child.transport = self.reactor.spawnProcess(
            protocol, argv[0], argv, env=dict(os.environ), path=os.getcwd(), childFDs=childFDs
        )
        child.pid = child.transport.pid
        child.startedAt = self.reactor.seconds()
        self.log.info(
            "process {index} started (pid {pid}), its peers reach it at {peer}",
            index=index,
            pid=child.pid,
            peer=self.peers[index - 1],
        )

    # A child ended.

    def _ended(self, child: _Child, reason: Failure) -> None:
        child.transport = None
        status = getattr(reason.value, "exitCode", None)
        signalNumber = getattr(reason.value, "signal", None)
        how = f"signal {signalNumber}" if signalNumber else f"exit status {status}"
        if child.ended is not None:
            ended, child.ended = child.ended, None
            self.log.info("process {index} (pid {pid}) ended ({how})", index=child.index, pid=child.pid, how=how)
            ended.callback(None)
            return
        if not self.running:
            return
        if status == CONFIG_ERROR_STATUS:
            self._fail(f"process {child.index} refused its configuration (exit status {status})", status)
            return
        now = self.reactor.seconds()
        ran = now - child.startedAt
        node = self.config.node
        child.deaths = 1 if ran >= node.restart_delay_max else child.deaths + 1
        delay = restartDelay(child.deaths, node.restart_delay, node.restart_delay_max)
        self.log.error(
            "process {index} (pid {pid}) ended ({how}) after {ran:.1f}s; starting it again in {delay:.1f}s",
            index=child.index,
            pid=child.pid,
            how=how,
            ran=ran,
            delay=delay,
        )
        child.restart = self.reactor.callLater(delay, self._spawn, child.index)

    # Stopping.

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        waits = []
        for child in self.children.values():
            if child.restart is not None and child.restart.active():
                child.restart.cancel()
            child.restart = None
            if child.transport is None:
                continue
            child.ended = Deferred()
            waits.append(child.ended)
            self._signal(child, signal.SIGTERM)
        if not waits:
            self._closeSockets()
            return succeed(None)
        self.log.info("stopping {n} processes", n=len(waits))
        killer = self.reactor.callLater(self.config.node.stop_timeout, self._killAll)
        d = DeferredList(waits)

        def stopped(_: object) -> None:
            if killer.active():
                killer.cancel()
            self._closeSockets()
            self.log.info("every process ended")

        return d.addBoth(stopped)

    def _killAll(self) -> None:
        for child in self.children.values():
            if child.transport is not None:
                self.log.warn(
                    "process {index} (pid {pid}) outlived stop_timeout: killing it", index=child.index, pid=child.pid
                )
                self._signal(child, signal.SIGKILL)

    def _signal(self, child: _Child, number: int) -> None:
        try:
            child.transport.signalProcess(number)
        except ProcessExitedAlready:
            pass

    def _closeSockets(self) -> None:
        for _, s in self.shared:
            s.close()
        for child in self.children.values():
            for _, s in child.sockets:
                s.close()

    def _fail(self, message: str, status: int) -> None:
        print(f"timtx: cannot start: {message}", file=sys.stderr)
        sys.stderr.flush()
        self.log.critical("{message}", message=message)
        if self.reactor.running:
            self.reactor.addSystemEventTrigger("after", "shutdown", self.exit, status)
            self.reactor.stop()
        else:
            self.exit(status)

    # What a child logs.

    def relay(self, child: _Child, line: bytes) -> None:
        """
        Log one line of a child's stdout: a JSON log event, logged again
        with its namespace prefixed, or plain text.
        """
        text = line.lstrip(b"\x1e").decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            event = eventFromJSON(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "log_time" not in event:
            self.childSaid(child, text, "info")
            return
        prefix = f"process-{child.index}"
        event["log_namespace"] = f"{prefix} {event.get('log_namespace', '-')}"
        if event.get("log_system"):
            event["log_system"] = f"{prefix} {event['log_system']}"
        event["timtx_process"] = child.index
        event["timtx_pid"] = child.pid
        self.publish(event)

    def childSaid(self, child: _Child, text: str, level: str) -> None:
        """
        Log a line a child wrote outside its log (on stderr, or before its
        log started).
        """
        log = Logger(namespace=f"process-{child.index} output")
        getattr(log, level)("{text}", text=text, timtx_process=child.index, timtx_pid=child.pid)


class _ChildProtocol(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, child: _Child):
        self.supervisor = supervisor
        self.child = child
        self.buffers = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self.buffers:
            return
        buffered = self.buffers[childFD] + data
        *lines, rest = buffered.split(b"\n")
        while len(rest) > MAX_LINE_BYTES:
            lines.append(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        self.buffers[childFD] = rest
        for line in lines:
            self._line(childFD, line)

    def _line(self, childFD: int, line: bytes) -> None:
        if childFD == 1:
            self.supervisor.relay(self.child, line)
        elif line.strip():
            self.supervisor.childSaid(self.child, line.decode("utf-8", "replace").rstrip(), "warn")

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self.buffers.items():
            if rest:
                self._line(childFD, rest)
        self.buffers = {1: b"", 2: b""}
        self.supervisor._ended(self.child, reason)
