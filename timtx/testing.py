# -*- test-case-name: timtx.test.test_login -*-
"""
Helpers for tests of timtx and of projects built on it: a node on loopback
ports chosen by the OS, and clients logged in to it.

    node = yield startNode(self, reactor, tempDir)
    alice = yield loggedInClient(reactor, node, "alice")
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import inlineCallbacks

from timtx.client import connect, register
from timtx.config import Config, replace
from timtx.crypto.ids import NodeKeys
from timtx.node import Node
from timtx.protocols.codec import Encoding

#: Cheap password hashing for tests; never use such a cost in production.
TEST_SCRYPT_N = 16

_names = itertools.count(1)


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
    hashing, no rate limits and the given store; C{sections} override keys
    as in L{timtx.config.replace}.
    """
    config = Config(base_dir=dataDir)
    config = replace(
        config,
        node={"data_dir": dataDir},
        client={
            "listen": "tcp:0:interface=127.0.0.1",
            "tcp_listen": "tcp:0:interface=127.0.0.1",
            "request_rate": 0.0,
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
