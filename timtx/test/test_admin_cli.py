# -*- test-case-name: timtx.test.test_admin_cli -*-
"""
Tests for C{python -m timtx admin ...} and for the logs of C{twist tim}:
commands run as an operator runs them, in child processes, against a node
in this process or one started with C{twist tim}.
"""

import json
import os
import re
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

import timtx
from timtx.admin.accounts import AdminFile
from timtx.admin.cli import urlFromListen
from timtx.client import connect, register
from timtx.test.admintools import WATCHER_PASSWORD, AdminTestCase
from timtx.test.base import within
from timtx.test.test_tap import _Collect
from timtx.testing import TEST_SCRYPT_N

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(timtx.__file__)))


def childEnv(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIMTX_ADMIN")}
    env["PYTHONPATH"] = SOURCE
    env.update(extra)
    return env


class UrlTests(SynchronousTestCase):
    def test_fromListen(self):
        """
        The API's URL is read from [admin] listen.
        """
        self.assertEqual(urlFromListen("tcp:5122:interface=127.0.0.1"), "http://127.0.0.1:5122")
        self.assertEqual(urlFromListen("tcp:5122"), "http://127.0.0.1:5122")
        self.assertEqual(urlFromListen(r"ssl:8443:interface=\:\:1:privateKey=k.pem"), "https://[::1]:8443")
        self.assertIsNone(urlFromListen("unix:/run/timtx.sock"))


class CommandTests(AdminTestCase):
    """
    The commands against a node in this process.
    """

    timeout = 120

    def writeIni(self):
        config = self.node.config
        port = self.node.listeningAddress("admin").port
        ini = FilePath(self.mktemp())
        ini.setContent(
            (
                f"[node]\ndata_dir = {os.path.abspath(config.resolve(config.node.data_dir))}\n"
                f"[accounts]\nscrypt_n = {TEST_SCRYPT_N}\nscrypt_r = 1\n"
                f"[admin]\nlisten = tcp:{port}:interface=127.0.0.1\n"
            ).encode()
        )
        return ini.path

    @inlineCallbacks
    def admin_(self, *args, password=None):
        env = childEnv(**({"TIMTX_ADMIN_PASSWORD": password} if password else {}))
        out, err, code = yield getProcessOutputAndValue(sys.executable, ["-m", "timtx", "admin", *args], env=env)
        return out.decode(), err.decode(), code

    @inlineCallbacks
    def test_commands(self):
        """
        create-admin writes the admins file (the running node takes the new
        account at once); the other commands call the API.
        """
        ini = self.writeIni()
        out, err, code = yield self.admin_("--config", ini, "create-admin", "ops", password="ops-password-1")
        self.assertEqual(code, 0, err)
        self.assertIn("admin ops (admin) written", out)
        self.assertEqual(AdminFile(self.admin.accounts.path).get("ops").role, "admin")
        out, err, code = yield self.admin_("--config", ini, "create-admin", "ops", password="ops-password-2")
        self.assertEqual(code, 1)
        self.assertIn("exists", err)

        alice = yield self.user(self.node, "alice")
        api = ("--config", ini, "--user", "ops")
        out, err, code = yield self.admin_(*api, "node", password="ops-password-1")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["sessions"], 1)
        out, err, code = yield self.admin_(*api, "sessions", password="ops-password-1")
        self.assertIn(alice.uid, out)
        self.assertIn("(1 of 1 sessions)", out)
        out, err, code = yield self.admin_(*api, "cluster", password="ops-password-1")
        self.assertIn("alive", out)
        self.assertIn("no cluster", out)
        for command in ("store", "keys", "vrooms", "admins", "blocks"):
            out, err, code = yield self.admin_(*api, command, password="ops-password-1")
            self.assertEqual(code, 0, (command, err))
        out, err, code = yield self.admin_(*api, "broadcast", "hello everyone", password="ops-password-1")
        self.assertEqual(json.loads(out), {"sent": 1})
        incoming = yield within(alice.next(lambda i: i.body is not None and getattr(i.body, "msType", None) == 1))
        self.assertEqual(incoming.body.dataString, "hello everyone")
        out, err, code = yield self.admin_(*api, "block", alice.uid, "600", password="ops-password-1")
        self.assertEqual(code, 0, err)
        yield within(alice.closed)
        out, err, code = yield self.admin_(*api, "blocks", password="ops-password-1")
        self.assertIn(alice.uid, out)
        out, err, code = yield self.admin_(*api, "unblock", alice.uid, password="ops-password-1")
        self.assertEqual(json.loads(out), {"ok": True})

        # A token from `login` works without a password.
        out, err, code = yield self.admin_(*api, "login", password="ops-password-1")
        token = out.strip()
        self.assertEqual(code, 0, err)
        self.assertTrue(token, (out, err))
        env = childEnv(TIMTX_ADMIN_TOKEN=token)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "timtx", "admin", "--config", ini, "kick", alice.uid], env=env
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), {"kicked": 0})

    @inlineCallbacks
    def test_errors(self):
        """
        A wrong password, a role that may not, a node that is not there and
        a missing --config each get one clear line and their exit status.
        """
        ini = self.writeIni()
        out, err, code = yield self.admin_("--config", ini, "--user", "watcher", "kick", "x", password="wrong-password")
        self.assertEqual(code, 2)
        self.assertIn("not logged in: wrong name or password", err)
        out, err, code = yield self.admin_("--config", ini, "--user", "watcher", "kick", "x", password=WATCHER_PASSWORD)
        self.assertEqual(code, 2)
        self.assertIn("forbidden", err)
        out, err, code = yield self.admin_("--url", "http://127.0.0.1:9", "--user", "x", "node", password="whatever-pw")
        self.assertEqual(code, 3)
        self.assertIn("cannot reach the admin API at http://127.0.0.1:9", err)
        self.assertIn("is the node running", err)
        self.assertNotIn("Traceback", err)
        out, err, code = yield self.admin_("create-admin", "x", password="whatever-pw")
        self.assertEqual(code, 2)
        self.assertIn("needs --config", err)
        out, err, code = yield self.admin_("--config", ini, "create-admin", "bad name", password="whatever-pw")
        self.assertEqual(code, 2)


class TwistTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_jsonLogsAndAdmin(self):
        """
        Under C{twist tim} with its output not a terminal, every log line is
        a JSON event; logins and logouts are events of their own; the admin
        side listens and the command line reaches it.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        ini = directory.child("node.ini")
        ini.setContent(
            b"[client]\nlisten = tcp:0:interface=127.0.0.1\ntcp_listen =\n"
            b"[accounts]\nscrypt_n = 16\nscrypt_r = 1\n"
            b"[store]\nbackend = memory\n"
            b"[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
        )
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "timtx", "admin", "--config", ini.path, "create-admin", "ops"],
            env=childEnv(TIMTX_ADMIN_PASSWORD="ops-password-1"),
        )
        self.assertEqual(code, 0, err)
        process = _Collect()

        def text():
            return b"".join(process.output).decode()

        transport = reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "twisted", "tim", "--config", ini.path], env=childEnv()
        )
        self.addCleanup(lambda: process.ended.called or transport.signalProcess("KILL"))
        for _ in range(400):
            if "timtx node ready" in text() or process.ended.called:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        events = [json.loads(line.lstrip("\x1e")) for line in text().splitlines() if line.strip()]
        ports = {e["name"]: e["port"] for e in events if e.get("log_format", "").startswith("{name} listening")}
        self.assertEqual(set(ports), {"client-ws", "admin"}, text())
        url = f"http://127.0.0.1:{ports['client-ws']}"
        yield register(reactor, url + "/tim2", "dora", "dora-password")
        client = yield connect(reactor, f"ws://127.0.0.1:{ports['client-ws']}/tim")
        yield client.login("dora", "dora-password")
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "timtx", "admin", "--url", f"http://127.0.0.1:{ports['admin']}", "--user", "ops", "sessions"],
            env=childEnv(TIMTX_ADMIN_PASSWORD="ops-password-1"),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(client.uid, out.decode())
        yield client.disconnect()
        for _ in range(100):
            if "logout " in text():
                break
            yield deferLater(reactor, 0.05, lambda: None)
        transport.signalProcess(signal.SIGTERM)
        yield process.ended
        lines = [line for line in text().splitlines() if line.strip()]
        events = [json.loads(line.lstrip("\x1e")) for line in lines]
        formats = [e.get("log_format", "") for e in events]
        self.assertIn("login {uid} termtyp={termtyp} tim {generation}", formats)
        self.assertIn("logout {uid} termtyp={termtyp} after {seconds:.0f}s", formats)
        self.assertTrue(any(f.startswith("admin {adminAction}") for f in formats))
        login = next(e for e in events if e.get("log_format", "").startswith("login {uid}"))
        self.assertEqual(login["uid"], client.uid)
        for secret in ("dora-password", "ops-password-1"):
            self.assertNotIn(secret, text())
        self.assertFalse(re.search(r"Traceback", text()), text())
