# -*- test-case-name: timtx.test.test_memory -*-
"""
Memory held by connections that closed is given back: a node started with
C{twist tim} (so with its garbage-collector and allocator settings) takes
rounds of raw TCP connections that each buffer 1 MB of a frame and never
log in; after they are closed by the login timeout, the node's resident
memory returns to within a few MB of where it was.
"""

import os
import re
import socket
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from timtx.test.test_tap import childEnv, twistTim
from timtx.testing import requireOrSkip

CONNECTIONS = 300
FRAME = 1 << 20

CONFIG = f"""
[node]
data_dir = data
[client]
listen = tcp:0:interface=127.0.0.1
tcp_listen = tcp:0:interface=127.0.0.1
auth_timeout = 1
max_connections_per_ip = 0
max_frame_bytes = {4 << 20}
# Let an unauthenticated client buffer a whole 1 MB frame, as the node did
# before it had this limit, to see that closing gives the buffers back.
max_frame_bytes_before_login = {2 << 20}
[store]
backend = memory
"""


def residentMiB(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def buffersRound(port):
    """
    Open the connections, send each a length prefix announcing 1 MB and the
    1 MB, then wait until the node has closed every one (blocking: runs in
    a thread).
    """
    payload = FRAME.to_bytes(4, "big") + b"\x10" * FRAME
    sockets = []
    try:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(payload)
            sockets.append(sock)
        for sock in sockets:
            while sock.recv(65536):
                pass
    finally:
        for sock in sockets:
            sock.close()


class _Quiet(ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)


class ClosedConnectionMemoryTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_buffersGiveBack(self):
        """
        Three rounds of 300 connections that each buffered 1 MB leave the
        node's resident memory within a tenth of one round's buffers of
        what the first round left, and far below what the buffers took.
        """
        if not os.path.exists("/proc/self/status"):
            requireOrSkip("no /proc to read resident memory from")
        directory = FilePath(self.mktemp())
        directory.makedirs()
        directory.child("node.ini").setContent(CONFIG.encode())
        log = directory.child("node.log")
        process = _Quiet()
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            twistTim("node.ini", log.path),
            env=childEnv(),
            path=directory.path,
        )

        def stop():
            if not process.ended.called:
                transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(stop)
        port = None
        deadline = time.monotonic() + 30
        while port is None:
            self.assertLess(time.monotonic(), deadline, "node did not start")
            yield deferLater(reactor, 0.1, lambda: None)
            if log.exists():
                found = re.search(rb"client-tcp listening on 127\.0\.0\.1:(\d+)", log.getContent())
                port = int(found.group(1)) if found else None
        start = residentMiB(transport.pid)
        after = []
        for _ in range(3):
            yield deferToThread(buffersRound, port)
            yield deferLater(reactor, 0.5, lambda: None)
            after.append(residentMiB(transport.pid))
        # 300 MB passed through the node each round; a leak of the buffers
        # adds about that much per round (it did: 1.6 GB after five).
        # What stays is allocator and collector noise, which on a loaded
        # machine has reached 12 MB over two rounds: the bound is a tenth
        # of one round's buffers, not a few MB.
        self.assertLess(after[-1] - after[0], 30, (start, after))
        self.assertLess(after[-1] - start, 40, (start, after))
        self.assertNotIn(b"Traceback", log.getContent())
