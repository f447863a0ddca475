"""
Helpers for tests of the admin side: a node with its admin listener on a
port the OS chooses, two admin accounts (C{root}, role admin; C{watcher},
role observer), and an HTTP client for the API.
"""

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from timtx.admin.accounts import ADMIN, OBSERVER, Admin, AdminFile
from timtx.admin.service import AdminService
from timtx.crypto.ids import NodeKeys
from timtx.crypto.passwords import PasswordHasher
from timtx.node import Node
from timtx.test.base import NodeTestCase
from timtx.testing import testConfig
from timtx.util.bodies import BytesProducer

ROOT_PASSWORD = "root-password-1"
WATCHER_PASSWORD = "watcher-password-1"


class _Body(Protocol):
    def __init__(self, done):
        self.done = done
        self.chunks = []

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason=None):
        self.done.callback(b"".join(self.chunks))


class Answer:
    """
    An HTTP answer: C{code}, C{headers}, C{body} (bytes), C{json}.
    """

    def __init__(self, code, headers, body):
        self.code = code
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return values[0].decode("latin-1") if values else None

    def __repr__(self):
        return f"<Answer {self.code} {self.body[:200]!r}>"


def addAdmins(config):
    """
    Write C{root} (admin) and C{watcher} (observer) to C{config}'s admins
    file.
    """
    accounts = config.accounts
    hasher = PasswordHasher(accounts.scrypt_n, accounts.scrypt_r, accounts.scrypt_p)
    admins = AdminFile(config.data_path(config.admin.admins_file))
    admins.add(Admin("root", ADMIN, hasher.hash(ROOT_PASSWORD), 0))
    admins.add(Admin("watcher", OBSERVER, hasher.hash(WATCHER_PASSWORD), 0))


class AdminTestCase(NodeTestCase):
    """
    A node with its admin side per test: C{self.node}, C{self.admin},
    tokens C{self.root} and C{self.watcher}.
    """

    adminSections: dict = {}

    @inlineCallbacks
    def setUp(self):
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.node, self.admin = yield self.adminNode(**self.adminSections)
        self.root = yield self.loginAs("root", ROOT_PASSWORD)
        self.watcher = yield self.loginAs("watcher", WATCHER_PASSWORD)

    @inlineCallbacks
    def adminNode(self, **sections):
        merged = {name: dict(values) for name, values in self.sections.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        merged.setdefault("admin", {}).setdefault("listen", "tcp:0:interface=127.0.0.1")
        config = testConfig(self.mktemp(), backend=self.backend, **merged)
        addAdmins(config)
        node = Node(config, reactor, keys=NodeKeys(b"k" * 32))
        admin = AdminService(node)
        node.startService()
        self.addCleanup(node.stopService)
        yield node.ready
        return node, admin

    @property
    def base(self):
        address = self.node.listeningAddress("admin")
        return f"http://{address.host}:{address.port}"

    @inlineCallbacks
    def http(self, method, path, body=None, token=None, headers=None, raw=None):
        """
        One request to the admin listener: C{body} as JSON, or C{raw}
        bytes; C{token} as a bearer token.
        """
        h = Headers()
        if token is not None:
            h.addRawHeader(b"authorization", b"Bearer " + token.encode())
        for name, value in (headers or {}).items():
            h.addRawHeader(name.encode(), value.encode())
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
            if not h.hasHeader(b"content-type"):
                h.addRawHeader(b"content-type", b"application/json")
        producer = BytesProducer(raw) if raw is not None else None
        response = yield self.agent.request(method.encode(), (self.base + path).encode(), h, producer)
        done = Deferred()
        response.deliverBody(_Body(done))
        data = yield done
        return Answer(response.code, response.headers, data)

    @inlineCallbacks
    def loginAs(self, name, password):
        answer = yield self.http("POST", "/api/login", {"name": name, "password": password})
        self.assertEqual(answer.code, 200, answer)
        return answer.json["token"]
