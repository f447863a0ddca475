"""
Tests for many node processes on one host (L{timtx.processes}): the plan
each child is started with, the sockets handed from parent to child, and
C{twist tim} with C{[node] processes} run as a real process tree on
PostgreSQL.
"""

import io
import json
import os
import re
import signal
import socket
import stat
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, eventAsJSON
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from timtx.client import connect, register
from timtx.config import Config, ConfigError, from_sections, replace
from timtx.preflight import checkProcesses
from timtx.processes.child import _ParentPipe
from timtx.processes.plan import (
    childArgv,
    childConfig,
    childDescriptors,
    clusterSecretPath,
    ensureClusterSecret,
    ownSockets,
    parseAdopt,
    peerAddress,
    processCount,
    restartDelay,
    sharedSockets,
)
from timtx.processes.sockets import AdoptedEndpoint, CannotBind, bindListening
from timtx.processes.supervisor import Supervisor, _Child
from timtx.protocols.constants import TimType
from timtx.tap import Options
from timtx.test.databases import postgresqlDatabase
from timtx.test.test_tap import _Collect, childEnv, twistTim


def hostConfig(**sections):
    config = from_sections({"store": {"backend": "postgresql"}}, path="/etc/timtx/node.ini", base_dir="/etc/timtx")
    return replace(config, **sections)


class PlanTests(SynchronousTestCase):
    def test_count(self):
        """
        The command line's count wins over C{[node] processes}; 0 means one
        for each core.
        """
        config = hostConfig(node={"processes": 3})
        self.assertEqual(processCount(config), 3)
        self.assertEqual(processCount(config, 2), 2)
        self.assertGreaterEqual(processCount(config, 0), 1)
        self.assertEqual(processCount(Config()), 1)

    def test_sockets(self):
        """
        The client listeners are shared, with the configured backlog; the
        admin and peer sockets are each child's, their ports moved by its
        number; without C{[cluster] listen} the peers meet on loopback.
        """
        config = hostConfig(client={"listen_backlog": 99})
        self.assertEqual(
            [(p.name, p.description) for p in sharedSockets(config)],
            [
                ("client-ws", "tcp:5120:interface=127.0.0.1:backlog=99"),
                ("client-tcp", "tcp:5121:interface=127.0.0.1:backlog=99"),
            ],
        )
        self.assertEqual(
            [(p.name, p.description, p.offset) for p in ownSockets(config, 3)],
            [("admin", "tcp:5122:interface=127.0.0.1:backlog=128", 2), ("cluster", "tcp:0:interface=127.0.0.1", 0)],
        )
        clustered = hostConfig(cluster={"listen": "tcp:7946:interface=10.0.0.1"}, admin={"listen": ""})
        self.assertEqual(
            [(p.name, p.description, p.offset) for p in ownSockets(clustered, 2)],
            [("cluster", "tcp:7946:interface=10.0.0.1", 1)],
        )
        self.assertEqual(childDescriptors(config, 1), {"client-ws": 3, "client-tcp": 4, "admin": 5, "cluster": 6})

    def test_childConfig(self):
        """
        A child has its own data directory (its node id and members), shares
        the host's node key, data keys, admin files and a cluster secret
        made for it, listens for peers where its parent bound, and seeds
        every sibling.
        """
        config = hostConfig(store={"backend": "postgresql", "data_keys": ((1, "keys/one.key"),)})
        peers = ["127.0.0.1:4001", "127.0.0.1:4002"]
        child = childConfig(config, 2, peers)
        self.assertEqual(child.node.data_dir, "/etc/timtx/timtx-data/process-2")
        self.assertEqual(child.node.processes, 1)
        self.assertEqual(child.key_path, "/etc/timtx/timtx-data/node.key")
        self.assertEqual(child.data_key_paths, {1: "/etc/timtx/timtx-data/keys/one.key"})
        self.assertEqual(child.data_path(child.admin.admins_file), "/etc/timtx/timtx-data/admins.json")
        self.assertEqual(child.data_path(child.admin.audit_log), "/etc/timtx/timtx-data/admin-audit.log")
        self.assertEqual(child.cluster.listen, "tcp:4002:interface=127.0.0.1")
        self.assertEqual(child.cluster.advertise, "")
        self.assertEqual(child.cluster.seeds, tuple(peers))
        self.assertEqual(child.cluster.secret_file, "/etc/timtx/timtx-data/cluster.secret")
        self.assertEqual(child.cluster.node_id, "")

    def test_childConfigClustered(self):
        """
        With C{[cluster]} set, its secret and seeds stay, a fixed node id
        gets the child's number, and an advertised address moves its port
        as the listen port moved.
        """
        config = hostConfig(
            cluster={
                "listen": "tcp:7946:interface=0.0.0.0",
                "advertise": "10.0.0.1:7946",
                "seeds": ("10.0.0.2:7946",),
                "secret_file": "cluster.secret",
                "node_id": "host1",
            }
        )
        peers = [peerAddress(config, index, "0.0.0.0", 7945 + index) for index in (1, 2)]
        self.assertEqual(peers, ["10.0.0.1:7946", "10.0.0.1:7947"])
        child = childConfig(config, 2, peers)
        self.assertEqual(child.cluster.listen, "tcp:7946:interface=0.0.0.0")
        self.assertEqual(child.cluster.advertise, "10.0.0.1:7947")
        self.assertEqual(child.cluster.seeds, ("10.0.0.1:7946", "10.0.0.1:7947", "10.0.0.2:7946"))
        self.assertEqual(child.cluster.secret_file, "cluster.secret")
        self.assertEqual(child.cluster.node_id, "host1-2")
        self.assertIsNone(clusterSecretPath(config))

    def test_argv(self):
        """
        A child runs C{twist tim} on the same file, logging JSON, with its
        number, its sockets and its siblings; C{--adopt} reads back.
        """
        argv = childArgv("/etc/node.ini", 2, {"client-ws": 3, "cluster": 4}, ["a:1", "b:2"], executable="py")
        self.assertEqual(
            argv,
            [
                "py",
                "-m",
                "twisted",
                "--log-format=json",
                "tim",
                "--config",
                "/etc/node.ini",
                "--process",
                "2",
                "--adopt",
                "client-ws=3,cluster=4",
                "--peers",
                "a:1,b:2",
            ],
        )
        self.assertEqual(parseAdopt(argv[10]), {"client-ws": 3, "cluster": 4})
        self.assertRaises(ValueError, parseAdopt, "client-ws")
        self.assertRaises(ValueError, parseAdopt, "client-ws=x")

    def test_restartDelay(self):
        """
        The wait doubles with each death in a row, up to the most.
        """
        self.assertEqual([restartDelay(n, 0.5, 5) for n in range(1, 7)], [0.5, 1, 2, 4, 5, 5])
        self.assertEqual(restartDelay(10_000, 1, 30), 30)

    def test_secret(self):
        """
        The secret made for a host's children is private, random, and made
        once.
        """
        directory = FilePath(self.mktemp())
        config = replace(Config(base_dir=directory.path))
        ensureClusterSecret(config)
        path = clusterSecretPath(config)
        first = FilePath(path).getContent()
        self.assertGreaterEqual(len(first.strip()), 32)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        ensureClusterSecret(config)
        self.assertEqual(FilePath(path).getContent(), first)


class PreflightTests(SynchronousTestCase):
    def test_embeddedStoreRefused(self):
        """
        Many processes cannot share the embedded SQLite store (it numbers
        inbox entries in memory): refused naming C{[node] processes}.
        """
        checkProcesses(Config(), 1)
        error = self.assertRaises(ConfigError, checkProcesses, Config(), 2)
        self.assertEqual((error.section, error.key), ("node", "processes"))
        self.assertIn("2 processes need a store they all share", str(error))

    def test_unixRefused(self):
        """
        Only TCP and TLS listeners can be handed to children.
        """
        config = hostConfig(client={"tcp_listen": "unix:/tmp/tim.sock"})
        checkProcesses(config, 1)
        error = self.assertRaises(ConfigError, checkProcesses, config, 2)
        self.assertEqual((error.section, error.key), ("client", "tcp_listen"))
        checkProcesses(hostConfig(), 4)

    def test_commandLine(self):
        """
        C{twist tim --processes 2} on the embedded store: one line naming
        the file and key, exit status 64, nothing started.
        """
        ini = FilePath(self.mktemp())
        ini.setContent(b"[node]\ndata_dir = data\n")
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--config", ini.path, "--processes", "2"])
        self.assertEqual(error.code, 64)
        self.assertIn(f"{ini.path}: [node] processes: 2 processes need", stderr.getvalue())
        options = Options()
        options.parseOptions(["--config", ini.path])
        self.assertEqual((options.count, options.index), (1, None))


class _Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class SocketTests(TestCase):
    def test_bindErrors(self):
        """
        A port in use, or an endpoint that is not TCP or TLS, is one clear
        error.
        """
        s = bindListening("tcp:0:interface=127.0.0.1")
        self.addCleanup(s.close)
        port = s.getsockname()[1]
        error = self.assertRaises(CannotBind, bindListening, f"tcp:{port}:interface=127.0.0.1")
        self.assertIn("Address already in use", str(error))
        error = self.assertRaises(CannotBind, bindListening, "unix:/nonexistent/tim.sock")
        self.assertIn("only tcp:, tcp6: and ssl:", str(error))

    @inlineCallbacks
    def test_adopted(self):
        """
        A socket bound from an endpoint string is served by whoever adopts
        it, at the address it was bound to; the port offset applies.
        """
        free = bindListening("tcp:0:interface=127.0.0.1")
        wanted = free.getsockname()[1] + 1
        free.close()
        try:
            s = bindListening(f"tcp:{wanted - 1}:interface=127.0.0.1", offset=1)
        except CannotBind:
            s = bindListening("tcp:0:interface=127.0.0.1")
            wanted = s.getsockname()[1]
        self.addCleanup(s.close)
        self.assertEqual(s.getsockname()[1], wanted)
        endpoint = AdoptedEndpoint(reactor, "tcp:0:interface=127.0.0.1", s.fileno())
        port = yield endpoint.listen(Factory.forProtocol(_Echo))
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, wanted)

        def roundTrip():
            with socket.create_connection(("127.0.0.1", wanted), timeout=5) as c:
                c.sendall(b"ping")
                return c.recv(4)

        from twisted.internet.threads import deferToThread

        echoed = yield deferToThread(roundTrip)
        self.assertEqual(echoed, b"ping")


class RelayTests(SynchronousTestCase):
    def test_relay(self):
        """
        A child's JSON log event is logged again with its namespace
        prefixed by the child's number; other lines are logged as text.
        """
        published = []
        supervisor = Supervisor(hostConfig(), reactor, 2, publish=published.append)
        child = _Child(2, pid=4321)
        event = {
            "log_namespace": "timtx.node",
            "log_level": LogLevel.info,
            "log_format": "timtx node ready",
            "log_time": 1.0,
        }
        supervisor.relay(child, b"\x1e" + eventAsJSON(event).encode() + b"\n")
        [relayed] = published
        self.assertEqual(relayed["log_namespace"], "process-2 timtx.node")
        self.assertEqual((relayed["timtx_process"], relayed["timtx_pid"]), (2, 4321))
        self.assertEqual(relayed["log_level"], LogLevel.info)
        self.assertEqual(json.loads(eventAsJSON(relayed))["log_format"], "timtx node ready")


def _running(pid):
    """
    Whether C{pid} runs (a zombie, ended but not yet reaped by init, does
    not).
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def isMessage(incoming):
    return bool(incoming.timType == TimType.TIMMESSAGE and incoming.body.dataString)


def messagesOf(incoming):
    """
    The messages in a frame: one pushed live, or a batch read from the
    inbox (a message that arrives while a new session reads its inbox may
    come in that batch).
    """
    if incoming.timType == TimType.TIMMESSAGE:
        return [incoming.body]
    if incoming.timType == TimType.TIMOFFLINEMSG:
        return list(incoming.body.messageList or ())
    return []


def textsOf(incoming):
    """
    The texts of the messages in a frame: one pushed live, or a batch read
    from the inbox.
    """
    if incoming.timType == TimType.TIMMESSAGE:
        return [incoming.body.dataString]
    if incoming.timType == TimType.TIMOFFLINEMSG:
        return [m.dataString for m in incoming.body.messageList or ()]
    return []


class ProcessesTests(TestCase):
    """
    C{twist tim} with C{[node] processes = 2}, as an operator runs it.
    """

    timeout = 180

    def output(self):
        return b"".join(self.process.output).decode("utf-8", "replace")

    @inlineCallbacks
    def waitFor(self, pattern, count=1, seconds=60):
        """
        Wait until the host's output matches C{pattern} C{count} times.

        @return: the matches.
        """
        for _ in range(int(seconds / 0.05)):
            found = re.findall(pattern, self.output())
            if len(found) >= count:
                return found
            if self.process.ended.called:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"no {count} x {pattern!r} in:\n{self.output()[-6000:]}")

    @inlineCallbacks
    def landOn(self, url, name, pwd):
        """
        Connect and log in as C{name}, and find which process the shared
        port handed the connection to (the login it logs).

        @return: the client and the process number.
        """
        before = len(re.findall(r"\[process-(\d) timtx\.\S+#info\] login ", self.output()))
        client = yield connect(reactor, url)
        self.clients.append(client)
        try:
            yield client.login(name, pwd)
        except Exception as e:
            self.fail(f"login as {name} failed ({e!r}); the host said:\n{self.output()[-8000:]}")
        [*_, number] = yield self.waitFor(r"\[process-(\d) timtx\.\S+#info\] login ", before + 1)
        return client, int(number)

    @inlineCallbacks
    def startHost(self):
        """
        Start C{twist tim} with two processes on a database of its own and
        wait until both are ready and members of one cluster.

        @return: the parent's process transport.
        """
        dsn = yield postgresqlDatabase(self)
        directory = FilePath(self.mktemp())
        directory.makedirs()
        directory.child("node.ini").setContent(
            (
                "[node]\nprocesses = 2\nrestart_delay = 0.2\nworker_threads = 1\n"
                "[client]\nlisten = tcp:0:interface=127.0.0.1\ntcp_listen = tcp:0:interface=127.0.0.1\n"
                "[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
                f"[store]\nbackend = postgresql\ndsn = {dsn}\npool_size = 2\n"
                "[messages]\nnoauth = true\n"
                "[accounts]\nscrypt_n = 1024\n"
            ).encode()
        )
        self.process = _Collect()
        self.clients = []
        transport = reactor.spawnProcess(
            self.process, sys.executable, twistTim("node.ini"), env=childEnv(), path=directory.path
        )
        self.addCleanup(lambda: self.process.ended.called or transport.signalProcess("KILL"))
        self.addCleanup(self.disconnectAll)
        yield self.waitFor(r"\[process-\d timtx\.\S+#info\] member \S+ joined", 2)
        yield self.waitFor(r"\[process-\d timtx\.\S+#info\] timtx node ready", 2)
        return transport

    def childPids(self):
        return {int(i): int(p) for i, p in re.findall(r"process (\d) started \(pid (\d+)\)", self.output())}

    @inlineCallbacks
    def test_parentKilled(self):
        """
        Children whose parent is killed (SIGKILL: it cannot tell them) see
        their stdin close and stop.
        """
        transport = yield self.startHost()
        pids = self.childPids()
        self.assertEqual(set(pids), {1, 2})
        transport.signalProcess("KILL")
        yield self.process.ended
        for _ in range(400):
            alive = [pid for pid in pids.values() if _running(pid)]
            if not alive:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        else:
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            self.fail(f"processes {alive} outlived their parent by 20 s")

    @inlineCallbacks
    def test_twoProcesses(self):
        """
        Two processes share one client port and form one cluster: clients
        land on both, and a message crosses from one to the other.  A child
        killed with SIGKILL is started again while the port keeps serving;
        SIGTERM stops the parent and every child.
        """
        transport = yield self.startHost()
        [ws] = re.findall(r"client-ws listening on 127\.0\.0\.1:(\d+) \(shared by 2 processes\)", self.output())
        pids = self.childPids()
        self.assertEqual(set(pids), {1, 2})
        url = f"ws://127.0.0.1:{ws}/tim"
        for name in ("alice", "bob"):
            yield register(reactor, f"http://127.0.0.1:{ws}/tim2", name, "pw1")

        # Connect until alice and bob are on different processes.
        alice, aliceOn = yield self.landOn(url, "alice", "pw1")
        for _ in range(60):
            bob, bobOn = yield self.landOn(url, "bob", "pw1")
            if bobOn != aliceOn:
                break
            yield bob.disconnect()
        else:
            self.fail("60 connections in a row went to one process:\n" + self.output()[-6000:])
        alice.sendMessage(bob.uid, "across processes", id=7)
        got = yield bob.next(lambda i: "across processes" in textsOf(i))
        [message] = [m for m in messagesOf(got) if m.dataString == "across processes"]
        echo = yield alice.next(isMessage)
        self.assertEqual(echo.body.mid, message.mid)

        # Kill bob's process: alice's stays, the port serves, and the
        # parent starts a new one.
        os.kill(pids[bobOn], signal.SIGKILL)
        yield self.waitFor(rf"process {bobOn} \(pid {pids[bobOn]}\) ended \(signal 9\)")
        for _ in range(3):
            client = yield connect(reactor, url)
            self.clients.append(client)
            yield client.ping()
        yield alice.ping()
        started = yield self.waitFor(rf"process {bobOn} started \(pid (\d+)\)", 2)
        yield self.waitFor(rf"\[process-{bobOn} timtx\.\S+#info\] timtx node ready", 2)
        self.assertNotEqual(int(started[-1]), pids[bobOn])
        pids[bobOn] = int(started[-1])
        bob, _ = yield self.landOnProcess(url, "bob", "pw1", bobOn)
        alice.sendMessage(bob.uid, "after the restart", id=8)
        # Pushed live, or read from the inbox with the first message (not
        # acked above) when the login drains it.
        got = yield bob.next(lambda i: "after the restart" in textsOf(i))
        self.assertIn("after the restart", textsOf(got))

        yield self.disconnectAll()
        transport.signalProcess(signal.SIGTERM)
        status = yield self.process.ended
        output = self.output()
        self.assertIn(status, [(0, None), (None, signal.SIGTERM)], output[-4000:])
        self.assertIn("every process ended", output)
        self.assertNotIn("Traceback", output)
        for pid in pids.values():
            self.assertFalse(_running(pid), f"process {pid} still runs")

    @inlineCallbacks
    def landOnProcess(self, url, name, pwd, number):
        """
        Connect as C{name} until a connection lands on process C{number}.
        """
        for _ in range(60):
            client, on = yield self.landOn(url, name, pwd)
            if on == number:
                return client, on
            yield client.disconnect()
        self.fail(f"60 connections in a row missed process {number}:\n" + self.output()[-6000:])

    @inlineCallbacks
    def disconnectAll(self):
        clients, self.clients = self.clients, []
        for client in clients:
            if client.connected:
                yield client.disconnect()


class _FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, number):
        self.signals.append(number)


class _FakeReactor(Clock):
    """
    A clock that records the processes it is asked to start.
    """

    running = False

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env, path, childFDs):
        process = _FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, args, childFDs, process))
        return process


class SupervisorTests(TestCase):
    """
    The parent's decisions, on a clock: restarts and their backoff, giving
    up on a refused config, stopping.
    """

    def setUp(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        config = from_sections(
            {
                "node": {"restart_delay": "1", "restart_delay_max": "8", "stop_timeout": "5"},
                "client": {"listen": "tcp:0:interface=127.0.0.1", "tcp_listen": ""},
                "admin": {"listen": ""},
                "store": {"backend": "postgresql"},
            },
            path=directory.child("node.ini").path,
            base_dir=directory.path,
        )
        self.reactor = _FakeReactor()
        self.exits = []
        self.supervisor = Supervisor(config, self.reactor, 2, executable="python", exit=self.exits.append)
        self.supervisor.startService()
        self.addCleanup(self.supervisor._closeSockets)

    def end(self, index, **how):
        protocol, _, _, _ = [s for s in self.reactor.spawned if s[0].child.index == index][-1]
        protocol.processEnded(Failure(ProcessTerminated(**how)))

    def test_started(self):
        """
        Each child gets the shared client socket and its own peer socket as
        descriptors 3 and 4, and every child's peer address.
        """
        self.assertEqual(len(self.reactor.spawned), 2)
        _, args, childFDs, _ = self.reactor.spawned[1]
        self.assertEqual(set(childFDs), {0, 1, 2, 3, 4})
        self.assertEqual(args[args.index("--adopt") + 1], "client-ws=3,cluster=4")
        self.assertEqual(args[args.index("--process") + 1], "2")
        self.assertEqual(args[args.index("--peers") + 1].count("127.0.0.1:"), 2)

    def test_restartBackoff(self):
        """
        A child that dies is started again after restart_delay, doubled for
        each death in a row up to restart_delay_max; one that ran that long
        counts as a first death again.
        """
        waits = []
        for _ in range(5):
            self.end(1, signal=9)
            before = len(self.reactor.spawned)
            [call] = self.reactor.getDelayedCalls()
            waits.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(waits[-1])
            self.assertEqual(len(self.reactor.spawned), before + 1)
        self.assertEqual(waits, [1, 2, 4, 8, 8])
        self.reactor.advance(8)
        self.end(1, exitCode=1)
        [call] = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), 1)

    def test_configRefused(self):
        """
        A child that refuses its config (exit status 64) stops the host with
        status 64: starting it again would not help.
        """
        self.patch(sys, "stderr", io.StringIO())
        self.end(2, exitCode=64)
        self.assertEqual(self.exits, [64])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop(self):
        """
        Stopping sends SIGTERM to every child and fires once all ended; a
        child still running after stop_timeout gets SIGKILL.
        """
        stopped = self.supervisor.stopService()
        processes = [p for _, _, _, p in self.reactor.spawned]
        self.assertEqual([p.signals for p in processes], [[signal.SIGTERM], [signal.SIGTERM]])
        self.end(1, signal=15)
        self.assertNoResult(stopped)
        self.reactor.advance(5)
        self.assertEqual(processes[1].signals, [signal.SIGTERM, signal.SIGKILL])
        self.end(2, signal=9)
        self.successResultOf(stopped)
        self.assertEqual(len(self.reactor.spawned), 2, "nothing restarted")


class ParentPipeTests(TestCase):
    @inlineCallbacks
    def test_parentGone(self):
        """
        The parent's end of the pipe closing (whatever ended the parent)
        tells the child, once.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        gone = []
        called = Deferred()
        pipe = _ParentPipe(reactor, r, lambda: (gone.append(1), called.callback(None)))
        reactor.addReader(pipe)
        self.addCleanup(reactor.removeReader, pipe)
        os.write(w, b"ignored")
        os.close(w)
        yield called
        pipe.connectionLost(None)
        self.assertEqual(gone, [1])

    def test_stopping(self):
        """
        Once the child stops anyway, the pipe closing means nothing.
        """
        gone = []
        pipe = _ParentPipe(Clock(), -1, lambda: gone.append(1))
        pipe.stopping = True
        pipe.connectionLost(None)
        self.assertEqual(gone, [])
