# -*- test-case-name: timtx.test.test_tap -*-
"""
C{twist tim --config node.ini}: the options and service of the C{tim} plugin.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python import usage

from timtx.config import ConfigError
from timtx.preflight import CONFIG_ERROR_STATUS, checkConfig, checkedConfig, checkProcesses
from timtx.processes.plan import childConfig, parseAdopt, processCount


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError("expected a number of processes (0: one per CPU core)")
    return int(text)


class Options(usage.Options):
    synopsis = "--config node.ini [--processes N]"
    longdesc = "Run a timtx node. Every setting lives in the INI file; see docs/configuration.md."
    optParameters = [
        ["config", "c", None, "Path to the node's INI file."],
        [
            "processes",
            "n",
            None,
            "Node processes to run on this host, sharing its client ports ([node] processes; 0: one per CPU core).",
            _count,
        ],
        # Given by the parent of many processes to each child; not for
        # people.
        ["process", None, None, "(set by the parent) This child's number, from 1.", int],
        ["adopt", None, "", "(set by the parent) Inherited listening sockets, as listener=fd,..."],
        ["peers", None, "", "(set by the parent) Every child's peer address, in order."],
    ]

    #: This process's number among its host's processes (a child's), or
    #: C{None}.
    index: int | None = None
    #: The inherited sockets of a child, by listener name.
    adopted: dict[str, int] = {}
    #: How many processes this one runs: more than 1 makes it their parent.
    count = 1

    def opt_version(self) -> None:
        """
        Display timtx's version and exit.
        """
        from timtx import __version__

        print(f"timtx {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            config = checkedConfig(self["config"])
            if self["process"]:
                config = self._childConfig(config)
            else:
                self.count = processCount(config, self["processes"])
                checkProcesses(config, self.count)
            self.config = config
        except ConfigError as e:
            # One line that names the file, section and key, not twist's
            # usage text after it.
            print(f"timtx: {e}", file=sys.stderr)
            sys.exit(CONFIG_ERROR_STATUS)

    def _childConfig(self, config: Any) -> Any:
        """
        The config of this child, as its parent computed it.
        """
        try:
            self.adopted = parseAdopt(self["adopt"])
        except ValueError as e:
            raise usage.UsageError(f"--adopt: {e}") from None
        peers = [p for p in self["peers"].split(",") if p]
        index = self["process"]
        if not 1 <= index <= len(peers):
            raise usage.UsageError("--process must be from 1 to the number of --peers")
        self.index = index
        config = childConfig(config, index, peers)
        checkConfig(config)
        return config


class NodeRunner(Service):
    """
    Runs a L{Node} and its admin side under C{twist}: a node that cannot
    start prints why and makes the process exit with status 1 instead of
    idling without ports.
    """

    def __init__(self, config: Any, reactor: Any, adopted: dict[str, int] | None = None):
        from timtx.admin.service import startAdmin
        from timtx.node import Node
        from timtx.processes.child import AdoptingNode

        self.reactor = reactor
        # A child of many processes serves the sockets its parent bound.
        self.node = AdoptingNode(config, reactor, adopted=adopted) if adopted else Node(config, reactor)
        #: The admin side (C{[admin] listen}), or C{None} when it is off.
        self.admin = startAdmin(self.node)
        #: The periodic full collection, once the node is ready.
        self.collections: LoopingCall | None = None

    def startService(self) -> None:
        from timtx.node import NodeStartError

        super().startService()
        try:
            self.node.startService()
        except NodeStartError as e:
            self._fail(str(e))
            return
        self.node.ready.addCallbacks(self._ready, lambda f: self._fail(f.getErrorMessage()))

    def _ready(self, node: Any) -> None:
        tuneGarbageCollector(node.config.node.gc_thresholds)
        self.collections = collectPeriodically(self.reactor, node.config.node.gc_full_interval)

    def _fail(self, message: str) -> None:
        print(f"timtx: cannot start: {message}", file=sys.stderr)
        sys.stderr.flush()
        if self.reactor.running:
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()
        else:
            os._exit(1)

    def stopService(self) -> Any:
        super().stopService()
        if self.collections is not None and self.collections.running:
            self.collections.stop()
        if self.node.running:
            return self.node.stopService()
        return None


def tuneGarbageCollector(thresholds: tuple[str, ...]) -> None:
    """
    Freeze what exists now (the node's long-lived objects) out of the
    garbage collector's scans and set its thresholds.  Process-wide, so only
    the C{twist} entry point does it; an application embedding a node may
    call this itself.  Measured in docs/benchmarks.md: p99 latency of 1:1
    messages at 2,000/s fell from 177 ms to under 10 ms.
    """
    if not thresholds:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*(int(t) for t in thresholds))


def collectPeriodically(clock: IReactorTime, interval: float) -> LoopingCall | None:
    """
    Run a full collection every C{interval} seconds (none if 0).

    With the thresholds L{tuneGarbageCollector} sets, a steady node runs a
    young collection when 100,000 more objects live than at the last one
    (about every 30 s in the soak); what is alive then (every open
    connection and its session, reference cycles all) moves to the middle
    generation, collected after 50 young collections (about 25 minutes),
    and what is still alive then to the oldest, collected after 1,000 of
    those: never.  So closed connections stayed in memory for tens of
    minutes or for good (issue 10, docs/benchmarks.md: about 100 more every
    30 s of the soak, 108,000 unreachable objects after five minutes).
    This pass frees them at a time of our choosing; its pause grows with
    the live objects that are not frozen.
    """
    if not interval:
        return None
    loop = LoopingCall(gc.collect)
    loop.clock = clock
    loop.start(interval, now=False)
    return loop


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    # Whatever the node writes (the database, its WAL, the key) is for the
    # node's user alone.
    os.umask(0o077)
    if options.count > 1:
        from timtx.processes.supervisor import Supervisor

        return Supervisor(options.config, reactor, options.count)
    tuneMalloc(options.config.node.malloc_mmap_threshold)
    if options.index is not None:
        from timtx.processes.child import detachFromTerminal, watchParent

        detachFromTerminal()
        watchParent(reactor)
        return NodeRunner(options.config, reactor, options.adopted)
    return NodeRunner(options.config, reactor)


def tuneMalloc(threshold: int) -> None:
    """
    Fix glibc's mmap threshold, so that large buffers (a frame being
    received, a big payload) are mapped and given back to the system when
    freed.  glibc otherwise raises the threshold each time such a buffer is
    freed, and the next ones come from the heap, which it rarely returns:
    300 connections that each buffered 1 MB left ~190 MB resident for good
    (C{timtx.test.test_memory}).  Process-wide, so only C{twist} does it; 0
    leaves glibc alone.
    """
    if not threshold or not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass
