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
from timtx.preflight import CONFIG_ERROR_STATUS, checkedConfig


class Options(usage.Options):
    synopsis = "--config node.ini"
    longdesc = "Run a timtx node. Every setting lives in the INI file; see docs/configuration.md."
    optParameters = [["config", "c", None, "Path to the node's INI file."]]

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
            self.config = checkedConfig(self["config"])
        except ConfigError as e:
            # One line that names the file, section and key, not twist's
            # usage text after it.
            print(f"timtx: {e}", file=sys.stderr)
            sys.exit(CONFIG_ERROR_STATUS)


class NodeRunner(Service):
    """
    Runs a L{Node} and its admin side under C{twist}: a node that cannot
    start prints why and makes the process exit with status 1 instead of
    idling without ports.
    """

    def __init__(self, config: Any, reactor: Any):
        from timtx.admin.service import startAdmin
        from timtx.node import Node

        self.reactor = reactor
        self.node = Node(config, reactor)
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
    tuneMalloc(options.config.node.malloc_mmap_threshold)
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
