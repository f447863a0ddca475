# -*- test-case-name: timtx.test.test_admin -*-
"""
The admin side of a node, on a listener of its own (C{[admin] listen}):

  - C{/}: the dashboard (L{timtx.admin.static}, every file served from the
    package: no CDN, nothing fetched from elsewhere);
  - C{/api/...}: timtx's REST API (L{timtx.admin.api}), its OpenAPI
    document at C{/api/openapi.json};
  - C{/timRegister}, ...: tim 2.0's server API (L{timtx.admin.timapi});
  - C{/metrics}: Prometheus (L{timtx.admin.metrics}).

L{AdminService} is built beside a L{Node} (C{twist tim} does it, see
L{timtx.tap}) and starts and stops with it: its listener is one of the
node's (L{Node.addListener}), the service a child of the node.
"""

from __future__ import annotations

import importlib.resources
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.resource import Resource

from timtx import __version__
from timtx.admin.accounts import Admin, AdminFile, AdminTokens, Grant, LoginThrottle
from timtx.admin.api import restEndpoints
from timtx.admin.audit import AuditLog
from timtx.admin.metrics import Sampler, registryFor
from timtx.admin.operations import Operations
from timtx.admin.timapi import timEndpoints
from timtx.admin.web import ApiError, ApiResource, Authenticator, Call, bearerToken, header, isLoopback, openapi
from timtx.crypto.passwords import PasswordHasher
from timtx.transports.admission import ConnectionGate, withBacklog
from timtx.transports.http import GatedSite

if TYPE_CHECKING:
    from timtx.node import Node

#: The dashboard's files, all in the package.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: Connections the admin listener's kernel queue holds before accept.
ADMIN_BACKLOG = 128
#: No script, style or connection from anywhere but this listener.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def staticFile(name: str) -> bytes:
    return importlib.resources.files("timtx.admin").joinpath("static", name).read_bytes()


class StaticResource(Resource):
    """
    The dashboard's files, read from the package once.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files = {name: (staticFile(name), kind.encode("ascii")) for name, kind in STATIC_FILES.items()}

    def render_GET(self, request: Any) -> bytes:
        name = request.path.decode("ascii", "replace").rsplit("/", 1)[-1] or "index.html"
        found = self.files.get(name)
        _secure(request)
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        body, kind = found
        request.setHeader(b"content-type", kind)
        request.setHeader(b"cache-control", b"no-cache")
        return body


def _secure(request: Any) -> None:
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")


class MetricsResource(Resource):
    """
    C{/metrics}, in the text format Prometheus asks for (or OpenMetrics).
    """

    isLeaf = True

    def __init__(self, admin: AdminService):
        super().__init__()
        self.admin = admin

    def render_GET(self, request: Any) -> bytes:
        admin = self.admin
        policy = admin.config.metrics_auth
        host = getattr(request.getClientAddress(), "host", "")
        if policy == "always" or (policy == "remote" and not isLoopback(host)):
            token = bearerToken(request)
            if not token or admin.tokens.check(token) is None:
                request.setResponseCode(401)
                request.setHeader(b"www-authenticate", b'Bearer realm="timtx metrics"')
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"log in first: Authorization: Bearer <token from POST /api/login>\n"
        encoder, contentType = choose_encoder(header(request, b"accept") or "")
        request.setHeader(b"content-type", contentType.encode("ascii"))
        body: bytes = encoder(admin.registry)
        return body


class AdminService(Service, Authenticator):
    """
    The admin side of C{node}.

    @ivar accounts: the admins file.
    @ivar tokens: login tokens.
    @ivar audit: the audit log.
    @ivar operations: what the API does to the node.
    @ivar sampler: the once-a-second numbers of the dashboard.
    @ivar registry: the Prometheus registry of this node.
    """

    log = Logger()

    def __init__(self, node: Node):
        self.setName("admin-service")
        self.node = node
        self.config = config = node.config.admin
        clock = node.clock
        self.accounts = AdminFile(node.config.data_path(config.admins_file))
        self.tokens = AdminTokens(clock, config.token_ttl, config.max_tokens)
        self.audit = AuditLog(node.config.data_path(config.audit_log), clock)
        accounts = node.config.accounts
        self.hasher = PasswordHasher(accounts.scrypt_n, accounts.scrypt_r, accounts.scrypt_p)
        self._logins = LoginThrottle(config.login_rate, config.login_burst, clock)
        self.operations = Operations(node)
        self.sampler = Sampler(node, clock)
        self.registry = registryFor(node, self.sampler, self)
        self.endpoints = restEndpoints(self) + timEndpoints(self)
        self._openapi: dict[str, Any] | None = None
        api = ApiResource(self.endpoints, self)
        root = _Root(api, StaticResource(), MetricsResource(self))
        #: At most max_connections sockets, bounded bodies, a deadline per
        #: request, no access log (actions are in the audit log).
        self.site = GatedSite(
            root,
            reactor=node.reactor,
            clock=clock,
            gate=ConnectionGate(config.max_connections, 0, 0),
            maxBodyBytes=config.max_body_bytes,
            requestTimeout=config.request_timeout,
        )
        self.listener = node.addListener(withBacklog(config.listen, ADMIN_BACKLOG), self.site, "admin")
        self.setServiceParent(node)

    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = openapi(self.endpoints, __version__)
        return self._openapi

    # Service.

    def startService(self) -> None:
        super().startService()
        self.audit.open()
        self.sampler.start()

    def stopService(self) -> Any:
        self.sampler.stop()
        self.audit.close()
        return super().stopService()

    # Authenticator.

    def fromToken(self, token: str) -> Grant | None:
        return self.tokens.check(token)

    @inlineCallbacks
    def verify(self, call: Call, name: str, password: str) -> Any:
        """
        The admin account C{name} if C{password} is its password, else
        C{None}; failed logins are limited per address (429).  Unknown names
        cost the same hashing time as known ones.
        """
        if not self._logins.begin(call.address):
            raise ApiError(429, "too_many_logins", "too many failed logins from this address; wait a little")
        account: Admin | None = self.accounts.get(name)
        if account is None:
            yield self.node.runInThread(self.hasher.burn, password)
            return None
        ok = yield self.node.runInThread(self.hasher.verify, password, account.passwordHash)
        if not ok:
            return None
        self._logins.succeeded(call.address)
        return account

    @inlineCallbacks
    def fromPassword(self, request: Any, name: str, password: str) -> Any:
        address = getattr(request.getClientAddress(), "host", "") or ""
        call = Call(request, None, {}, {}, None, address)
        account = yield self.verify(call, name, password)
        if account is None:
            return None
        return Grant(account.name, account.role)

    def record(self, action: str, call: Call | None, outcome: str, **fields: Any) -> None:
        grant = call.grant if call is not None else None
        self.audit.record(
            action,
            admin=grant.name if grant is not None else None,
            role=grant.role if grant is not None else None,
            address=call.address if call is not None else None,
            target=call.target if call is not None else None,
            outcome=outcome,
            **fields,
        )


class _Root(Resource):
    """
    C{/}: the dashboard's files, C{/api/...} and tim's endpoints to the
    API, C{/metrics}.
    """

    def __init__(self, api: ApiResource, static: StaticResource, metrics: MetricsResource):
        super().__init__()
        self.api = api
        self.static = static
        self.metrics = metrics

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        if path == b"metrics" and len(request.postpath) == 0:
            return self.metrics
        if path in (b"", b"static") or path in (b"index.html",):
            return self.static
        return self.api


def startAdmin(node: Node) -> AdminService | None:
    """
    The admin side of C{node} if C{[admin] listen} is set.
    """
    if not node.config.admin.listen:
        return None
    return AdminService(node)
