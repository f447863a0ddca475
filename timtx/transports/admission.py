# -*- test-case-name: timtx.test.test_admission -*-
"""
Which sockets a client listener accepts.

Every socket a client port accepts holds a file descriptor and some memory
from the moment it is accepted, whether it ever upgrades to WebSocket or
logs in.  So it is counted from then: the L{ConnectionGate} hands each
accepted socket a L{Ticket}, which the connection gives back when it
closes.  A socket is refused at once (closed before anything is read) when

  - the node holds C{max_connections} sockets already,
  - its address holds C{max_connections_per_ip} of them, or
  - taking it would leave fewer than C{fd_reserve} descriptors free, so
    that the store, logs and work already under way (a /tim2 request, a
    peer link) never meet EMFILE.

An HTTP connection on the client port must also deliver each request, head
and body, within C{request_timeout} seconds (L{TimHTTPChannel} in
L{timtx.transports.http}): a client that trickles bytes to hold a socket
(slowloris) is cut off however slowly it writes.
"""

from __future__ import annotations

import os
import resource

from twisted.logger import Logger


class Ticket:
    """
    One admitted socket; L{release} gives its place back, once.
    """

    __slots__ = ("_gate", "host")

    def __init__(self, gate: ConnectionGate, host: str):
        self._gate: ConnectionGate | None = gate
        self.host = host

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._released(self.host)


def openDescriptors() -> int:
    """
    How many file descriptors this process has open, or 0 if the system
    does not say (no C{/proc}).
    """
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class ConnectionGate:
    """
    Counts the sockets of every client listener of a node.

    @param maxConnections: sockets at once; 0 for no limit.
    @param maxPerHost: sockets from one address at once; 0 for no limit.
    @param fdReserve: descriptors to keep free.
    @param fdLimit: the process's descriptor limit; read from the system by
        default.
    @param fdBaseline: descriptors open besides client sockets (store,
        logs, listeners); counted when the gate is made, by default.
    """

    log = Logger()

    #: Seconds between two log lines about refused sockets.
    logEvery = 10.0

    def __init__(
        self,
        maxConnections: int,
        maxPerHost: int,
        fdReserve: int,
        fdLimit: int | None = None,
        fdBaseline: int | None = None,
    ):
        self.maxConnections = maxConnections
        self.maxPerHost = maxPerHost
        self.fdReserve = fdReserve
        if fdLimit is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            fdLimit = soft if soft != resource.RLIM_INFINITY else 1 << 30
        self.fdLimit = fdLimit
        self.fdBaseline = openDescriptors() if fdBaseline is None else fdBaseline
        self._byHost: dict[str, int] = {}
        self._count = 0
        #: Refused sockets by reason, for operators and metrics.
        self.refused: dict[str, int] = {"connections": 0, "per-ip": 0, "descriptors": 0}

    def __len__(self) -> int:
        return self._count

    def refusal(self, host: str) -> str | None:
        """
        Why a socket from C{host} would be refused now, or C{None}.
        """
        if self.maxConnections and self._count >= self.maxConnections:
            return "connections"
        if self.maxPerHost and self._byHost.get(host, 0) >= self.maxPerHost:
            return "per-ip"
        if self.fdBaseline + self._count + self.fdReserve >= self.fdLimit:
            return "descriptors"
        return None

    def admit(self, host: str) -> Ticket | None:
        """
        A L{Ticket} for a socket from C{host}, or C{None} if it must be
        refused (counted in L{refused}).
        """
        reason = self.refusal(host)
        if reason is not None:
            self.refused[reason] += 1
            if self.refused[reason] == 1 or not self.refused[reason] % 1000:
                self.log.warn(
                    "refusing client sockets ({reason}): {count} so far", reason=reason, count=self.refused[reason]
                )
            return None
        self._count += 1
        self._byHost[host] = self._byHost.get(host, 0) + 1
        return Ticket(self, host)

    def _released(self, host: str) -> None:
        self._count -= 1
        left = self._byHost[host] - 1
        if left:
            self._byHost[host] = left
        else:
            del self._byHost[host]


def withBacklog(description: str, backlog: int) -> str:
    """
    A TCP or SSL server endpoint string with C{backlog=} set, unless it sets
    one already.  Twisted's default is 50, which a burst of connections
    overflows: the kernel then drops or resets the surplus before the node
    sees them.
    """
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"
