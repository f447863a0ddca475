"""
Tests for the C{twist tim} plugin and C{python -m timtx}: they run the
commands a user runs, in child processes.
"""

import gc
import io
import os
import re
import signal
import sys
import weakref

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx import __version__
from timtx.client import connect, register
from timtx.tap import Options, collectPeriodically, tuneGarbageCollector
from timtx.testing import requireOrSkip, sourceRoot


def childEnv():
    """
    The environment of a child process: this one's, C{PYTHONPATH} included,
    so that a child runs the code under test (a checkout's or worktree's,
    not whatever copy of timtx is installed).
    """
    return dict(os.environ)


def twistTim(config, log=None):
    """
    The argv of C{twist tim --config config} in a child process, logging
    as text to C{log} (a path) or to its stdout.
    """
    logFile = [f"--log-file={log}"] if log else []
    return [sys.executable, "-m", "twisted", "--log-format=text", *logFile, "tim", "--config", config]


class PluginTests(SynchronousTestCase):
    def test_found(self):
        """
        The installed package provides the C{tim} plugin to twist.
        """
        plugins = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("tim", plugins)
        self.assertEqual(plugins["tim"].module, "timtx.tap")

    def test_options(self):
        """
        --config is required; a bad config is one line on stderr naming the
        file, section and key, and exit status 64.
        """
        self.assertRaises(usage.UsageError, Options().parseOptions, [])
        bad = FilePath(self.mktemp())
        bad.setContent(b"[client]\nlisten_on = 1\n")
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--config", bad.path])
        self.assertEqual(error.code, 64)
        self.assertIn(f"{bad.path}: [client] listen_on", stderr.getvalue())
        self.assertEqual(len(stderr.getvalue().splitlines()), 1)

    def test_version(self):
        """
        C{twist tim --version} prints timtx's version, not Twisted's.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--version"])
        self.assertEqual(error.code, 0)
        self.assertEqual(stdout.getvalue(), f"timtx {__version__}\n")


class _Cycle:
    """
    An object in a reference cycle, as a connection and its session are.
    """

    def __init__(self):
        self.me = self


class GarbageCollectorTests(SynchronousTestCase):
    def setUp(self):
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        self.addCleanup(gc.unfreeze)
        self.clock = Clock()
        tuneGarbageCollector(("100000", "50", "1000"))

    def oldGarbage(self):
        """
        A cycle that lived through a collection of the young generations,
        then became garbage.

        @return: a weak reference to it.
        """
        cycle = _Cycle()
        ref = weakref.ref(cycle)
        gc.collect(1)
        del cycle
        return ref

    def test_fullCollections(self):
        """
        Under the node's thresholds, a cycle that outlived the young
        generations stays until the periodic full collection frees it
        (issue 10: closed connections kept for good).
        """
        collections = collectPeriodically(self.clock, 60)
        self.addCleanup(collections.stop)
        ref = self.oldGarbage()
        self.clock.advance(59)
        self.assertIsNotNone(ref())
        self.clock.advance(1)
        self.assertIsNone(ref())

    def test_noFullCollections(self):
        """
        With an interval of 0 nothing is scheduled.
        """
        self.assertIsNone(collectPeriodically(self.clock, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Collect(ProcessProtocol):
    def __init__(self):
        self.output = []
        self.ended = Deferred()

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback((reason.value.exitCode, reason.value.signal))


class CommandTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_version(self):
        out, err, code = yield getProcessOutputAndValue(sys.executable, ["-m", "timtx", "--version"], env=childEnv())
        self.assertEqual(code, 0)
        self.assertIn(f"timtx {__version__} (C codec)".encode(), out)

    @inlineCallbacks
    def test_badConfigExits(self):
        """
        A bad config makes `twist tim` exit non-zero, naming the file,
        section and key, before listening.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        ini = directory.child("node.ini")
        ini.setContent(b"[client]\nmax_frame_bytes = lots\n")
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "twisted", "tim", "--config", ini.path], env=childEnv(), path=directory.path
        )
        self.assertNotEqual(code, 0)
        text = (out + err).decode()
        self.assertIn(f"{ini.path}: [client] max_frame_bytes: expected an integer", text)
        self.assertNotIn("listening", text)
        self.assertFalse(directory.child("timtx-data").exists(), "nothing was created")

    @inlineCallbacks
    def test_exampleStartsAndStops(self):
        """
        `twist tim --config examples/node.ini` starts a node that clients can
        register and log in to, and stops cleanly on SIGTERM.
        """
        root = sourceRoot()
        if root is None:
            requireOrSkip("no source checkout (examples/ is not installed)")
        directory = FilePath(self.mktemp())
        directory.makedirs()
        # The example as written, on ports the OS chooses, so that a node
        # already running on this machine never collides with the test.
        example = root.child("examples").child("node.ini").getContent()
        onPortZero = re.sub(rb"tcp:512[012]:", b"tcp:0:", example)
        self.assertEqual(onPortZero.count(b"tcp:0:"), 3)
        directory.child("node.ini").setContent(onPortZero)
        process = _Collect()
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            twistTim("node.ini"),
            env=childEnv(),
            path=directory.path,
        )
        self.addCleanup(lambda: process.ended.called or transport.signalProcess("KILL"))
        for _ in range(300):
            if b"timtx node ready" in b"".join(process.output):
                break
            if process.ended.called:
                self.fail(b"".join(process.output).decode())
            yield deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("node did not start: " + b"".join(process.output).decode())
        ports = dict(
            re.findall(r"(client-ws|client-tcp) listening on 127\.0\.0\.1:(\d+)", b"".join(process.output).decode())
        )
        ws, tcp = ports["client-ws"], ports["client-tcp"]
        uid = yield register(reactor, f"http://127.0.0.1:{ws}/tim2", "example", "pw1")
        for url in (f"ws://127.0.0.1:{ws}/tim", f"tcp://127.0.0.1:{tcp}"):
            client = yield connect(reactor, url)
            login = yield client.login("example", "pw1", termtyp=len(url))
            self.assertEqual(login.n, uid)
            yield client.ping()
            yield client.disconnect()
        transport.signalProcess(signal.SIGTERM)
        status = yield process.ended
        output = b"".join(process.output).decode()
        # twist ends by re-raising the signal that stopped it, as a shell
        # expects of a process stopped by SIGTERM.
        self.assertIn(status, [(0, None), (None, signal.SIGTERM)], output)
        self.assertIn("Main loop terminated", output)
        self.assertNotIn("Traceback", output)
        self.assertTrue(directory.child("timtx-data").child("tim.db").exists())
        self.assertEqual(os.stat(directory.child("timtx-data").child("node.key").path).st_mode & 0o777, 0o600)
