# -*- test-case-name: timtx.test.test_admin -*-
"""
The admin API's plumbing on twisted.web: endpoints declared once, with the
JSON schemas of what they take and return, from which come both the
checks every request goes through and the OpenAPI document.

Every request passes the same gate, in this order:

  1. the route: an unknown path is 404, a known path with another method
     405;
  2. authentication: a bearer token (C{Authorization: Bearer ...}) or, on
     tim's endpoints, tim's C{username} and C{password} headers; without
     one, 401 and nothing else happens;
  3. the role: an endpoint that changes anything (L{Endpoint.write})
     refuses an observer with 403, before its body is looked at;
  4. the body: at most C{[admin] max_body_bytes} (413, before it is
     buffered: L{timtx.transports.http.BoundedRequest}), JSON that decodes
     (400) and matches the endpoint's schema (400, naming the field);
  5. the handler, whose errors are L{ApiError}s with their status, or a
     500 with a generic message (the traceback goes to the node's log,
     never to the client).

Writes, refusals and failed logins are written to the audit log.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping
from urllib.parse import parse_qsl, unquote

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

if TYPE_CHECKING:
    from timtx.admin.accounts import Grant


class ApiError(Exception):
    """
    A request failed in a way the client should know: C{status} is the
    HTTP status, C{code} a short machine-readable word, the message says
    why for a person.
    """

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def badRequest(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def notFound(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


# JSON schemas: a small checker for the subset the endpoints use, so that
# what is checked and what the OpenAPI document says are the same thing.


def _typeOk(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "null":
        return value is None
    return True


def validate(value: Any, schema: Mapping[str, Any], where: str = "body") -> None:
    """
    Check C{value} against C{schema} (types, C{required}, C{properties},
    C{additionalProperties}, lengths, bounds, C{enum}, C{pattern},
    C{items}).

    @raise ApiError: 400 naming the first field at fault.
    """
    kinds = schema.get("type")
    if kinds is not None:
        allowed = [kinds] if isinstance(kinds, str) else list(kinds)
        if schema.get("nullable") and value is None:
            return
        if not any(_typeOk(value, k) for k in allowed):
            raise badRequest(f"{where}: expected {' or '.join(allowed)}")
    if "enum" in schema and value not in schema["enum"]:
        raise badRequest(f"{where}: expected one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise badRequest(f"{where}: at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise badRequest(f"{where}: at most {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise badRequest(f"{where}: does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise badRequest(f"{where}: at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise badRequest(f"{where}: at most {schema['maximum']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise badRequest(f"{where}: at most {schema['maxItems']} items")
        if len(value) < schema.get("minItems", 0):
            raise badRequest(f"{where}: at least {schema['minItems']} items")
        items = schema.get("items")
        if items is not None:
            for index, item in enumerate(value):
                validate(item, items, f"{where}[{index}]")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                raise badRequest(f"{where}.{name} is required")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            raise badRequest(f"{where}: at most {schema['maxProperties']} entries")
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], f"{where}.{name}")
            elif extra is False:
                raise badRequest(f"{where}.{name} is not a known field")
            elif isinstance(extra, dict):
                validate(item, extra, f"{where}.{name}")


# Endpoints.


@dataclass
class Call:
    """
    One request as a handler sees it.

    @ivar grant: who made it (C{None} on an endpoint that needs no login).
    @ivar params: the path's parameters, decoded.
    @ivar query: the query's parameters, checked against the endpoint's.
    @ivar body: the decoded JSON body (or form, on tim's endpoints).
    @ivar audit: fields a handler adds to the audit line (never secrets).
    """

    request: Any
    grant: Grant | None
    params: dict[str, str]
    query: dict[str, Any]
    body: Any
    address: str
    target: str | None = None
    audit: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Call], "Awaitable[Any] | Any"]

#: Who may call an endpoint.
PUBLIC = "public"  # no login
LOGIN = "login"  # a bearer token
TIM = "tim"  # a bearer token, or tim's username and password headers


@dataclass(frozen=True)
class Endpoint:
    """
    One operation of the API.

    @ivar name: the operation's id (OpenAPI C{operationId}) and the action
        of its audit lines.
    @ivar write: whether it changes anything: admins only, and audited.
    @ivar body: the JSON schema of the request body, or C{None} for none.
    @ivar response: the JSON schema of a 200 answer.
    @ivar query: parameter name -> schema (strings in the URL, converted to
        integers where the schema says so).
    @ivar target: the path parameter (or body field) naming what it acts
        on, for the audit log.
    @ivar form: for tim's endpoints: form fields whose values are JSON.
    """

    method: str
    path: str
    name: str
    summary: str
    handler: Handler
    tag: str
    write: bool = False
    access: str = LOGIN
    body: Mapping[str, Any] | None = None
    response: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    target: str | None = None
    description: str = ""
    form: tuple[str, ...] = ()
    audited: bool | None = None

    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        return re.compile(f"^{regex}$")

    @property
    def isAudited(self) -> bool:
        return self.write if self.audited is None else self.audited


def header(request: Any, name: bytes) -> str | None:
    """
    A request header as text (HTTP headers are Latin-1), or C{None}.
    """
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def bearerToken(request: Any) -> str | None:
    """
    The token of an C{Authorization: Bearer} header, C{""} for another
    scheme, C{None} without the header.
    """
    value = header(request, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def isLoopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Authenticator:
    """
    What the router needs to know who a request is from; see
    L{timtx.admin.service.AdminService}.
    """

    def fromToken(self, token: str) -> Grant | None:
        raise NotImplementedError

    def fromPassword(self, request: Any, name: str, password: str) -> Deferred[Grant | None]:
        raise NotImplementedError

    def record(self, action: str, call: Call | None, outcome: str, **fields: Any) -> None:
        raise NotImplementedError


def _jsonBytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")


class ApiResource(Resource):
    """
    Serves a table of L{Endpoint}s.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, endpoints: list[Endpoint], auth: Authenticator):
        super().__init__()
        self.endpoints = endpoints
        self.auth = auth
        self._routes = [(endpoint.pattern(), endpoint) for endpoint in endpoints]

    def render(self, request: Any) -> Any:
        d = ensureDeferred(self._serve(request))
        d.addErrback(self._crashed, request)
        return server.NOT_DONE_YET

    def _match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]]:
        allowed = []
        for pattern, endpoint in self._routes:
            found = pattern.match(path)
            if found is None:
                continue
            if endpoint.method == method:
                try:
                    params = {k: unquote(v, errors="strict") for k, v in found.groupdict().items()}
                except UnicodeDecodeError:
                    raise badRequest("the path is not UTF-8") from None
                for name, value in params.items():
                    validate(value, endpoint.params.get(name, {"type": "string"}), name)
                return endpoint, params
            allowed.append(endpoint.method)
        if allowed:
            raise ApiError(405, "method_not_allowed", f"use {', '.join(sorted(set(allowed)))}")
        raise notFound("no such endpoint")

    async def _serve(self, request: Any) -> None:
        request.setHeader(b"cache-control", b"no-store")
        call: Call | None = None
        endpoint: Endpoint | None = None
        try:
            try:
                path = request.path.decode("ascii")
                method = request.method.decode("ascii")
            except UnicodeDecodeError:
                raise badRequest("the request line is not ASCII") from None
            endpoint, params = self._match(method, path)
            address = request.getClientAddress()
            call = Call(request, None, params, {}, None, getattr(address, "host", "") or "")
            call.target = params.get(endpoint.target) if endpoint.target else None
            call.grant = await self._authenticate(endpoint, call)
            if endpoint.write and (call.grant is None or not call.grant.mayWrite):
                raise ApiError(403, "forbidden", "this account may only read (role observer)")
            call.query = self._query(endpoint, request)
            call.body = self._body(endpoint, request)
            if endpoint.target and call.target is None and isinstance(call.body, dict):
                value = call.body.get(endpoint.target)
                call.target = value if isinstance(value, str) else None
            result = endpoint.handler(call)
            if isinstance(result, Deferred) or hasattr(result, "__await__"):
                result = await result
        except ApiError as e:
            self._fail(request, endpoint, call, e)
            return
        if endpoint.isAudited:
            self.auth.record(endpoint.name, call, "ok", **call.audit)
        self._send(request, 200, result)

    async def _authenticate(self, endpoint: Endpoint, call: Call) -> Grant | None:
        if endpoint.access == PUBLIC:
            return None
        request = call.request
        token = bearerToken(request)
        if token is not None:
            grant = self.auth.fromToken(token) if token else None
            if grant is not None:
                return grant
            raise ApiError(401, "unauthorized", "log in again: the token is unknown or expired")
        if endpoint.access == TIM:
            name = header(request, b"username")
            password = header(request, b"password")
            if name and password is not None:
                grant = await self.auth.fromPassword(request, name, password)
                if grant is not None:
                    return grant
                raise ApiError(401, "unauthorized", "wrong name or password")
        raise ApiError(401, "unauthorized", "log in first (Authorization: Bearer <token>)")

    def _query(self, endpoint: Endpoint, request: Any) -> dict[str, Any]:
        query: dict[str, Any] = {}
        raw = request.uri.partition(b"?")[2]
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise badRequest("the query is not UTF-8") from None
        for name, text in pairs:
            schema = endpoint.query.get(name)
            if schema is None:
                continue
            value: Any = text
            if schema.get("type") == "integer":
                try:
                    value = int(text)
                except ValueError:
                    raise badRequest(f"{name}: expected an integer") from None
            validate(value, schema, name)
            query[name] = value
        for name, schema in endpoint.query.items():
            if name not in query and "default" in schema:
                query[name] = schema["default"]
        return query

    def _body(self, endpoint: Endpoint, request: Any) -> Any:
        raw = request.content.read() if request.content is not None else b""
        if endpoint.body is None:
            return None
        contentType = (header(request, b"content-type") or "").split(";")[0].strip().lower()
        if endpoint.form and contentType == "application/x-www-form-urlencoded":
            body: Any = self._form(endpoint, raw)
        else:
            if not raw.strip():
                raw = b"{}"
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise badRequest(f"the body is not JSON ({e})") from None
        validate(body, endpoint.body)
        return body

    def _form(self, endpoint: Endpoint, raw: bytes) -> dict[str, Any]:
        """
        tim's form encoding: fields are strings, some of them JSON.
        """
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise badRequest("the form is not UTF-8") from None
        body: dict[str, Any] = {}
        properties = (endpoint.body or {}).get("properties", {})
        for name, text in pairs:
            if name in endpoint.form:
                try:
                    body[name] = json.loads(text)
                except ValueError:
                    raise badRequest(f"{name}: not JSON") from None
            elif properties.get(name, {}).get("type") == "integer":
                try:
                    body[name] = int(text)
                except ValueError:
                    raise badRequest(f"{name}: expected an integer") from None
            else:
                body[name] = text
        return body

    def _fail(self, request: Any, endpoint: Endpoint | None, call: Call | None, error: ApiError) -> None:
        if endpoint is not None and (endpoint.isAudited or error.status in (401, 403)):
            outcome = {401: "unauthorized", 403: "forbidden"}.get(error.status, error.code)
            self.auth.record(endpoint.name, call, outcome, **(call.audit if call is not None else {}))
        body = {"error": {"code": error.code, "message": error.message, **error.extra}}
        if error.status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="timtx admin"')
        self._send(request, error.status, body)

    def _send(self, request: Any, status: int, body: Any) -> None:
        if request._disconnected or request.finished:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.write(_jsonBytes(body))
        request.finish()

    def _crashed(self, failure: Failure, request: Any) -> None:
        self.log.failure("admin request {method} {path} failed", failure, method=request.method, path=request.path)
        self._send(request, 500, {"error": {"code": "internal", "message": "internal error; see the node's log"}})


def openapi(endpoints: list[Endpoint], version: str) -> dict[str, Any]:
    """
    The OpenAPI 3.0 document of C{endpoints}.
    """
    paths: dict[str, dict[str, Any]] = {}
    errorSchema = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    }
    for endpoint in endpoints:
        operation: dict[str, Any] = {
            "operationId": endpoint.name,
            "summary": endpoint.summary,
            "tags": [endpoint.tag],
            "responses": {
                "200": {"description": "done", "content": {"application/json": {"schema": dict(endpoint.response)}}},
                "400": {"$ref": "#/components/responses/BadRequest"},
            },
        }
        if endpoint.description:
            operation["description"] = endpoint.description
        parameters = []
        for name in re.findall(r"{(\w+)}", endpoint.path):
            schema = dict(endpoint.params.get(name, {"type": "string"}))
            parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
        for name, query in endpoint.query.items():
            parameters.append({"name": name, "in": "query", "required": False, "schema": dict(query)})
        if parameters:
            operation["parameters"] = parameters
        if endpoint.body is not None:
            content: Any = {"application/json": {"schema": dict(endpoint.body)}}
            operation["requestBody"] = {"required": True, "content": content}
            operation["responses"]["413"] = {"$ref": "#/components/responses/TooLarge"}
        if endpoint.access == PUBLIC:
            operation["security"] = []
        else:
            operation["security"] = [{"bearer": []}] + (
                [{"timUser": [], "timPassword": []}] if endpoint.access == TIM else []
            )
            operation["responses"]["401"] = {"$ref": "#/components/responses/Unauthorized"}
            if endpoint.write:
                operation["responses"]["403"] = {"$ref": "#/components/responses/Forbidden"}
        if endpoint.params:
            operation["responses"]["404"] = {"$ref": "#/components/responses/NotFound"}
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation

    def response(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": errorSchema}}}

    return {
        "openapi": "3.0.3",
        "info": {
            "title": "timtx admin API",
            "version": version,
            "description": "Operating a timtx node: see docs/admin.md. Endpoints that change anything need the "
            "admin role; observers read.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A token from POST /api/login."},
                "timUser": {"type": "apiKey", "in": "header", "name": "username", "description": "tim's header."},
                "timPassword": {"type": "apiKey", "in": "header", "name": "password", "description": "tim's header."},
            },
            "responses": {
                "BadRequest": response("malformed JSON, or a field out of bounds"),
                "Unauthorized": response("no login, or a login that is wrong or expired"),
                "Forbidden": response("the role observer may only read"),
                "NotFound": response("no such thing"),
                "TooLarge": response("the body is over [admin] max_body_bytes"),
            },
        },
    }
