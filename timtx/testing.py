# -*- test-case-name: timtx.test.test_login -*-
"""
Helpers for tests of timtx and of projects built on it: a node on loopback
ports chosen by the OS, clients logged in to it, and an in-memory
L{IClientNode} to test a protocol subclass on a
L{twisted.internet.testing.StringTransport} with a fake clock.

    node = yield startNode(self, reactor, tempDir)
    alice = yield loggedInClient(reactor, node, "alice")

    node = MemoryClientNode()
    protocol = node.connect(MyProtocol, StringTransport())
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from timtx.client import connect, register
from timtx.config import Config, replace
from timtx.crypto.ids import NodeKeys
from timtx.delivery.sessions import AckIds, Session
from timtx.interfaces import IClientNode, IFrameSink, Route
from timtx.node import Node
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimAuth

#: Cheap password hashing for tests; never use such a cost in production.
TEST_SCRYPT_N = 16

_names = itertools.count(1)


def sourceRoot() -> Any:
    """
    The source checkout holding C{docs/} and C{examples/}, as a
    L{FilePath}, or C{None} when the tests run from an installed copy
    without one.  The working directory is tried first: C{.ci/run} runs
    the installed package's tests from the checkout, where C{__file__}
    is in site-packages.
    """
    import os

    from twisted.python.filepath import FilePath

    for start in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
        path = FilePath(start)
        for candidate in [path, *path.parents()]:
            if candidate.child("setup.cfg").exists() and candidate.child("timtx").isdir():
                return candidate
    return None


def requireOrSkip(reason: str) -> None:
    """
    Skip the running test for C{reason}, except under CI (C{TIMTX_CI} set),
    where what the test needs must be there: the test fails instead.
    """
    import os

    from twisted.trial.unittest import FailTest, SkipTest

    if os.environ.get("TIMTX_CI"):
        raise FailTest(f"required under CI: {reason}")
    raise SkipTest(reason)


def testConfig(dataDir: str, backend: str = "memory", **sections: Any) -> Config:
    """
    A config for a node on 127.0.0.1 with OS-chosen ports, cheap password
    hashing, no rate limits, no per-address socket cap (every test client
    comes from 127.0.0.1) and the given store; C{sections} override keys as
    in L{timtx.config.replace}.
    """
    config = Config(base_dir=dataDir)
    config = replace(
        config,
        node={"data_dir": dataDir},
        client={
            "listen": "tcp:0:interface=127.0.0.1",
            "tcp_listen": "tcp:0:interface=127.0.0.1",
            "request_rate": 0.0,
            "max_connections_per_ip": 0,
        },
        accounts={"scrypt_n": TEST_SCRYPT_N, "scrypt_r": 1, "http_rate": 0.0},
        store={"backend": backend},
    )
    return replace(config, **sections) if sections else config


@inlineCallbacks
def startNode(testCase: Any, reactor: Any, config: Config, **kwargs: Any) -> Any:
    """
    Start a L{Node}, stop it when C{testCase} ends, and wait until it
    listens.
    """
    kwargs.setdefault("keys", NodeKeys(b"k" * 32))
    node = Node(config, reactor, **kwargs)
    node.startService()
    testCase.addCleanup(node.stopService)
    yield node.ready
    return node


def selfSignedCertificate(directory: str, hostname: str = "localhost") -> tuple[str, str]:
    """
    Write a self-signed certificate and key for C{hostname} into
    C{directory}.

    @return: the paths of the certificate and the key (PEM).
    """
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    certPath = os.path.join(directory, "cert.pem")
    keyPath = os.path.join(directory, "key.pem")
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return certPath, keyPath


def wsURL(node: Node) -> str:
    address = node.listeningAddress("client-ws")
    return f"ws://{address.host}:{address.port}/tim"


def httpURL(node: Node) -> str:
    address = node.listeningAddress("client-ws")
    return f"http://{address.host}:{address.port}/tim2"


def tcpURL(node: Node) -> str:
    address = node.listeningAddress("client-tcp")
    return f"tcp://{address.host}:{address.port}"


def uniqueName(prefix: str = "user") -> str:
    return f"{prefix}{next(_names)}"


@inlineCallbacks
def loggedInClient(
    reactor: Any,
    node: Node,
    name: str | None = None,
    *,
    password: str = "secret",
    domain: str | None = None,
    encoding: Encoding = Encoding.COMPACT,
    transport: str = "ws",
    registerFirst: bool = True,
    testCase: Any = None,
    autoAck: bool = True,
    **loginArgs: Any,
) -> Any:
    """
    Register C{name} (unless C{registerFirst} is false), connect over
    C{transport} (C{"ws"} or C{"tcp"}) and log in.  With C{testCase}, the
    client is disconnected when the test ends.  The name is kept as
    C{client.loginName}.
    """
    name = name or uniqueName()
    if registerFirst:
        yield register(reactor, httpURL(node), name, password, domain)
    url = wsURL(node) if transport == "ws" else tcpURL(node)
    client = yield connect(reactor, url, encoding, autoAck=autoAck)
    client.loginName = name
    if testCase is not None:
        testCase.addCleanup(lambda: client.disconnect() if client._transport else None)
    yield client.login(name, password, domain, **loginArgs)
    return client


@implementer(IClientNode)
class MemoryClientNode:
    """
    An L{IClientNode} in memory, for testing client protocols without a
    node, sockets or real time: any name logs in with the password
    C{"secret"} and gets the uid C{"u-<name>"}; frame types are handled by
    what L{route} registers.

    @ivar clock: a L{Clock}; advance it to fire timeouts.
    @ivar connections: connections the node counts.
    @ivar sessions: sessions that started and have not ended.
    @ivar ready: sessions that got their TIMAUTH ack, in order.
    """

    def __init__(self, config: Config | None = None, **sections: Any):
        self.config = replace(config or Config(), **sections) if sections else config or Config()
        self.clock = Clock()
        self.reactor = MemoryReactorClock()
        self.connections: set[IFrameSink] = set()
        self.sessions: list[Session] = []
        self.ready: list[Session] = []
        self.routes: dict[int, Route] = {}
        self._ackIds = AckIds()

    def connect(self, protocolClass: Any, transport: Any) -> Any:
        """
        A new C{protocolClass} serving this node over C{transport} (a
        L{twisted.internet.testing.StringTransport}), connected.
        """
        protocol = protocolClass()
        protocol.node = self
        protocol.makeConnection(transport)
        return protocol

    def route(self, timType: int, bodyType: Any, handler: Any) -> None:
        self.routes[timType] = Route(bodyType, handler)

    # IClientNode

    def connectionOpened(self, connection: IFrameSink) -> bool:
        self.connections.add(connection)
        return True

    def connectionClosed(self, connection: IFrameSink) -> None:
        self.connections.discard(connection)

    def login(self, sink: IFrameSink, auth: TimAuth, encoding: Encoding) -> Deferred[Any]:
        if not auth.name or auth.pwd != "secret":
            return fail(TimProtocolError(ErrorCode.ERR_NOPASS, "wrong name or password"))
        session = Session(
            sink, f"u-{auth.name}", "", auth.resource, auth.termtyp or 0, encoding, self.clock.seconds(), self._ackIds
        )
        self.sessions.append(session)
        return succeed(session)

    def sessionReady(self, session: Any) -> None:
        self.ready.append(session)

    def sessionEnded(self, session: Any) -> None:
        if session in self.sessions:
            self.sessions.remove(session)

    def routeFor(self, timType: int) -> Route | None:
        return self.routes.get(timType)

    def register(self, auth: TimAuth) -> Deferred[str]:
        return succeed(f"u-{auth.name}")

    def issueToken(self, auth: TimAuth, peer: str) -> Deferred[int]:
        return succeed(1)


def _openDescriptors() -> int:
    """
    The file descriptors this process holds now (0 where /proc is not).
    """
    import os

    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def fitDescriptors(wanted: int, perUnit: int, spare: int = 256) -> int:
    """
    How many of C{wanted} units that each hold C{perUnit} file descriptors
    this process can open besides those it holds already: the soft limit
    is raised toward the hard one if
    needed (and put back at exit of the process, as it is per process).
    When fewer fit, a warning says how many, so that a test that scales
    down says so.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted * perUnit + spare + _openDescriptors()
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fits = max(1, min(wanted, (soft - spare - _openDescriptors()) // perUnit))
    if fits < wanted:
        warnings.warn(
            f"only {fits} of {wanted} fit under the descriptor limit ({soft}); running with {fits}",
            stacklevel=2,
        )
    return fits
