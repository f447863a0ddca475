# -*- test-case-name: timtx.test.test_preflight -*-
"""
Tests for L{timtx.preflight} and the commands that use it: every problem a
config can have is caught before anything listens, as one message naming
the file, section and key, with one exit status; the node's files are
private.
"""

import os
import stat
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from timtx.config import ConfigError
from timtx.crypto.ids import NodeKeys
from timtx.node import Node
from timtx.preflight import CONFIG_ERROR_STATUS, checkedConfig
from timtx.test.test_tap import childEnv
from timtx.testing import testConfig


class CheckConfigTests(TestCase):
    """
    C{python -m timtx --check-config} and C{twist tim} on bad configs.
    """

    timeout = 60

    def ini(self, text, name="node.ini"):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        ini = directory.child(name)
        ini.setContent(text.encode())
        return directory, ini

    @inlineCallbacks
    def check(self, text, expected, twist=True):
        """
        Both commands refuse the config with status 64 and one line holding
        C{expected}; C{twist} creates nothing.
        """
        directory, ini = self.ini(text)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "timtx", "--check-config", ini.path], env=childEnv(), path=directory.path
        )
        self.assertEqual(code, CONFIG_ERROR_STATUS, (out + err).decode())
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"timtx: {ini.path}: {expected}"), lines[0])
        if twist:
            out, err, code = yield getProcessOutputAndValue(
                sys.executable, ["-m", "twisted", "tim", "--config", ini.path], env=childEnv(), path=directory.path
            )
            self.assertEqual(code, CONFIG_ERROR_STATUS, (out + err).decode())
            self.assertIn(f"timtx: {ini.path}: {expected}", err.decode())
            self.assertNotIn("Traceback", (out + err).decode())

    def test_portOutOfRange(self):
        return self.check("[client]\nlisten = tcp:71200\n", "[client] listen: expected a port from 0 to 65535")

    def test_unknownBackend(self):
        return self.check("[store]\nbackend = nosuch\n", "[store] backend: no storage plugin 'nosuch'")

    def test_badKeyAndMissingFileAlike(self):
        """
        A bad key and a missing file give the same status.
        """
        return self.check("[client]\nlisten_on = 1\n", "[client] listen_on: unknown key", twist=False)

    @inlineCallbacks
    def test_missingFile(self):
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "timtx", "--check-config", "/nonexistent/node.ini"], env=childEnv()
        )
        self.assertEqual(code, CONFIG_ERROR_STATUS)
        self.assertIn("/nonexistent/node.ini: cannot read the file", err.decode())

    def test_unwritableDataDir(self):
        if os.getuid() == 0:
            # root writes anywhere: a data_dir under a file cannot be made.
            return self.check("[node]\ndata_dir = node.ini/data\n", "[node] data_dir: ", twist=True).addCallback(
                lambda _: None
            )
        return self.check("[node]\ndata_dir = /proc/timtx\n", "[node] data_dir: ")

    def test_clusterChecked(self):
        """
        A C{[cluster]} without a secret, or with a secret file that cannot
        be read, is a config error naming the key (checked in process: the
        commands above run the installed timtx).
        """
        for text, expected in [
            ("[cluster]\nlisten = tcp:0:interface=127.0.0.1\n", "[cluster] secret: a cluster needs secret"),
            (
                "[cluster]\nlisten = tcp:0:interface=127.0.0.1\nsecret_file = nosuch.secret\n",
                "[cluster] secret_file: cannot read",
            ),
        ]:
            directory, ini = self.ini(text)
            error = self.assertRaises(ConfigError, checkedConfig, ini.path)
            self.assertIn(expected, str(error))

    def test_storePathIsDirectory(self):
        return self.check("[node]\ndata_dir = .\n[store]\npath = .\n", "[store] path: ")

    @inlineCallbacks
    def test_storePathNotDatabase(self):
        directory, ini = self.ini("[node]\ndata_dir = .\n[store]\npath = node.ini\n")
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "timtx", "--check-config", ini.path], env=childEnv()
        )
        self.assertEqual(code, CONFIG_ERROR_STATUS)
        self.assertIn("[store] path: ", err.decode())
        self.assertIn("is not an SQLite database", err.decode())

    @inlineCallbacks
    def test_goodConfig(self):
        directory, ini = self.ini("[client]\nlisten = tcp:0\n")
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "timtx", "--check-config", ini.path], env=childEnv()
        )
        self.assertEqual((code, out.decode().strip()), (0, f"{ini.path}: ok"))


class FileModeTests(TestCase):
    def test_privateDataDir(self):
        """
        The node makes its data directory 0700.
        """
        config = testConfig(self.mktemp())
        Node(config, reactor, keys=NodeKeys(b"k" * 32))
        self.assertEqual(stat.S_IMODE(os.stat(config.data_path()).st_mode), 0o700)

    def test_warnsAboutWideFiles(self):
        """
        An existing data directory or file that others may read is named in
        a warning at start.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        config = testConfig(self.mktemp())
        os.makedirs(config.data_path())
        os.chmod(config.data_path(), 0o755)
        with open(config.data_path("tim.db"), "wb") as f:
            f.write(b"")
        os.chmod(config.data_path("tim.db"), 0o644)
        Node(config, reactor, keys=NodeKeys(b"k" * 32))
        warnings = [e for e in observer if e["log_level"] == LogLevel.warn and "paths" in e]
        self.assertEqual(len(warnings), 1)
        self.assertIn("(0755)", warnings[0]["paths"])
        self.assertIn("tim.db (0644)", warnings[0]["paths"])
