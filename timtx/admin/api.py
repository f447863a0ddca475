# -*- test-case-name: timtx.test.test_admin -*-
"""
timtx's REST API under C{/api/}: admin logins, users and their sessions,
blocks, system messages and broadcasts, groups, virtual rooms, and the
node's own state (cluster, store, keys, the dashboard's numbers).

Each endpoint is declared once (L{timtx.admin.web.Endpoint}) with the
schemas of its request and answer; C{/api/openapi.json} is made from the
same table.  Examples are in C{docs/admin.md}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from timtx import __version__
from timtx.admin.accounts import (
    ADMIN,
    MAX_PASSWORD,
    MIN_PASSWORD,
    ROLES,
    Admin,
    AdminAccountError,
    checkName,
    checkPassword,
    checkRole,
    describe,
)
from timtx.admin.operations import roomStats
from timtx.admin.status import clusterStatus, keyStatus, nodeIdOf, storeStatus
from timtx.admin.web import PUBLIC, ApiError, Call, Endpoint, badRequest, bearerToken, notFound
from timtx.chat.bans import MAX_BLOCK_SECONDS
from timtx.protocols.constants import Business, TimType, VRoomOp
from timtx.protocols.structs import TimMessage, TimReq

if TYPE_CHECKING:
    from timtx.admin.context import AdminContext

# Schemas used by many endpoints.

ID = {"type": "string", "minLength": 1, "maxLength": 128}
NAME = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"}
TIME = {"type": "number"}
OPTIONAL_TIME = {"type": "number", "nullable": True}
EXTEND = {"type": "object", "maxProperties": 64, "additionalProperties": {"type": "string", "maxLength": 65536}}
OK = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
PAGE = {
    "offset": {"type": "integer", "minimum": 0, "maximum": 1 << 31, "default": 0},
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
}
SESSION = {
    "type": "object",
    "properties": {
        "uid": {"type": "string"},
        "domain": {"type": "string", "nullable": True},
        "resource": {"type": "string", "nullable": True},
        "termtyp": {"type": "integer"},
        "transport": {"type": "string", "nullable": True},
        "encoding": {"type": "string"},
        "generation": {"type": "string"},
        "address": {"type": "string", "nullable": True},
        "since": TIME,
        "seconds": TIME,
        "unacknowledged": {"type": "integer"},
        "congested": {"type": "boolean"},
    },
}
ADMIN_ACCOUNT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "role": {"type": "string", "enum": list(ROLES)}, "created": TIME},
}
MESSAGE_BODY = {
    "type": "object",
    "required": ["text"],
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": 1 << 20},
        "udtype": {"type": "integer", "minimum": -(1 << 15), "maximum": (1 << 15) - 1},
        "extend": EXTEND,
    },
}
ROOM = {
    "type": "object",
    "properties": {
        "vnode": {"type": "string"},
        "founder": {"type": "string"},
        "private": {"type": "boolean"},
        "subscribers": {"type": "integer"},
        "framesPerSecond": {"type": "number"},
        "dropped": {"type": "integer"},
    },
}


def messageFrom(body: dict[str, Any]) -> TimMessage:
    return TimMessage(dataString=body["text"], udtype=body.get("udtype"), extend=body.get("extend") or None)


def restEndpoints(admin: AdminContext) -> list[Endpoint]:
    """
    Every endpoint under C{/api/}, served by C{admin}.
    """
    node = admin.node
    ops = admin.operations

    # Logging in.

    @inlineCallbacks
    def login(call: Call) -> Any:
        name, password = call.body["name"], call.body["password"]
        call.target = name
        account = yield admin.verify(call, name, password)
        if account is None:
            raise ApiError(401, "unauthorized", "wrong name or password")
        token, grant = admin.tokens.issue(account)
        call.grant = grant
        return {"token": token, "expires": grant.expires, "name": grant.name, "role": grant.role}

    def logout(call: Call) -> Any:
        admin.tokens.revoke(bearerToken(call.request) or "")
        return {"ok": True}

    def me(call: Call) -> Any:
        assert call.grant is not None
        return {"name": call.grant.name, "role": call.grant.role, "expires": call.grant.expires}

    def listAdmins(call: Call) -> Any:
        return {"admins": [describe(a) for a in sorted(admin.accounts.admins().values(), key=lambda a: a.name)]}

    @inlineCallbacks
    def createAdmin(call: Call) -> Any:
        body = call.body
        try:
            name, role = checkName(body["name"]), checkRole(body.get("role", ADMIN))
            password = checkPassword(body["password"])
        except AdminAccountError as e:
            raise badRequest(str(e)) from None
        if admin.accounts.get(name) is not None:
            raise ApiError(409, "exists", f"an admin named {name!r} exists")
        passwordHash = yield node.runInThread(admin.hasher.hash, password)
        account = Admin(name, role, passwordHash, node.clock.seconds())
        try:
            admin.accounts.add(account)
        except AdminAccountError as e:
            raise ApiError(409, "exists", str(e)) from None
        call.audit["newRole"] = role
        return describe(account)

    def deleteAdmin(call: Call) -> Any:
        name = call.params["name"]
        if not admin.accounts.remove(name):
            raise notFound(f"no admin {name!r}")
        admin.tokens.revokeAll(name)
        return {"ok": True}

    def audit(call: Call) -> Any:
        return {"entries": admin.audit.tail(call.query["limit"])}

    # The node.

    def nodeInfo(call: Call) -> Any:
        now = node.clock.seconds()
        listeners = {}
        for name in ("client-ws", "client-tcp", "admin"):
            listener = node.listener(name)
            if listener is not None and listener.port is not None:
                host = listener.port.getHost()
                listeners[name] = f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"
        return {
            "id": nodeIdOf(node),
            "version": __version__,
            "startedAt": node.startedAt,
            "uptime": now - node.startedAt if node.startedAt is not None else None,
            "store": node.store.name,
            "listeners": listeners,
            "sessions": len(node.sessions),
            "connections": len(node.connections),
        }

    def dashboard(call: Call) -> Any:
        recent = admin.sampler.recent(call.query["window"])
        cluster = clusterStatus(node)
        store = storeStatus(node)
        return {
            "node": nodeInfo(call),
            "cluster": {k: cluster[k] for k in ("clustered", "self", "size", "live", "members")},
            "store": {k: store[k] for k in ("backend", "open", "available")},
            "vrooms": [roomStats(s) for s in node.vrooms.allStats()[:10]],
            "accountsBlocked": len(node.bans.blocked()),
            **recent,
        }

    # Users.

    @inlineCallbacks
    def createUser(call: Call) -> Any:
        body = call.body
        call.target = body["name"]
        uid = yield ops.register(body["name"], body["password"], body.get("domain"))
        call.target = uid
        return {"uid": uid}

    def getUser(call: Call) -> Any:
        return ops.user(call.params["uid"])

    @inlineCallbacks
    def userSessions(call: Call) -> Any:
        user = yield ops.user(call.params["uid"])
        return {"sessions": user["sessions"]}

    def kick(call: Call) -> Any:
        kicked = ops.kick(call.params["uid"])
        call.audit["sessions"] = kicked
        return {"kicked": kicked}

    def block(call: Call) -> Any:
        uid = call.params["uid"]
        seconds = call.body["seconds"]
        until = ops.block(uid, seconds)
        call.audit["seconds"] = seconds
        return {"uid": uid, "until": until}

    def unblock(call: Call) -> Any:
        return {"ok": ops.unblock(call.params["uid"])}

    def blocks(call: Call) -> Any:
        return {"blocks": [{"uid": uid, "until": until} for uid, until in sorted(node.bans.blocked().items())]}

    @inlineCallbacks
    def token(call: Call) -> Any:
        value = yield ops.token(call.params["uid"])
        return {"token": value, "expires": node.clock.seconds() + node.config.accounts.token_ttl}

    @inlineCallbacks
    def password(call: Call) -> Any:
        yield ops.account(call.params["uid"])
        yield ops.resetPassword(call.params["uid"], call.body["password"])
        return {"ok": True}

    @inlineCallbacks
    def messageUser(call: Call) -> Any:
        sent = yield ops.sendSystemMessage([call.params["uid"]], messageFrom(call.body))
        return {"sent": sent}

    @inlineCallbacks
    def userGroups(call: Call) -> Any:
        uid = call.params["uid"]
        yield ops.account(uid)
        gids = yield node.directory.groupsOf(uid)
        return {"groups": sorted(gids)}

    def sessions(call: Call) -> Any:
        return ops.sessions(call.query["offset"], call.query["limit"])

    @inlineCallbacks
    def broadcast(call: Call) -> Any:
        message = messageFrom(call.body)
        users = call.body.get("users")
        if users is None:
            sent = yield ops.broadcast(message)
        else:
            sent = yield ops.sendSystemMessage(users, message)
        call.audit["accounts"] = sent
        return {"sent": sent}

    # Groups and virtual rooms.

    def getGroup(call: Call) -> Any:
        return ops.group(call.params["gid"], call.query["limit"])

    @inlineCallbacks
    def createGroup(call: Call) -> Any:
        body = call.body
        gid = yield ops.createGroup(body["founder"], body["topic"], bool(body.get("private")))
        call.target = gid
        return {"gid": gid}

    @inlineCallbacks
    def dissolveGroup(call: Call) -> Any:
        gid = call.params["gid"]
        state = yield node.directory.get(gid)
        if state is None or not state.alive:
            raise notFound(f"no group {gid}")
        yield ops.actAs(state.group.founder, TimType.TIMBUSINESS, TimReq(rtype=Business.CANCELROOM, node=gid))
        return {"ok": True}

    def listVRooms(call: Call) -> Any:
        return {"rooms": [roomStats(s) for s in node.vrooms.allStats()]}

    def getVRoom(call: Call) -> Any:
        return ops.vroom(call.params["vnode"])

    @inlineCallbacks
    def createVRoom(call: Call) -> Any:
        vnode = yield ops.createVRoom(call.body["founder"], bool(call.body.get("private")))
        call.target = vnode
        return {"vnode": vnode}

    @inlineCallbacks
    def removeVRoom(call: Call) -> Any:
        vnode = call.params["vnode"]
        room = node.vrooms.registry.get(vnode)
        if room is None:
            raise notFound(f"no virtual room {vnode}")
        yield ops.actAs(room.founder, TimType.TIMVROOM, TimReq(rtype=VRoomOp.REMOVE, node=vnode))
        return {"ok": True}

    def openapiDocument(call: Call) -> Any:
        return admin.openapi()

    def health(call: Call) -> Any:
        return {"ok": node.running and node.startedAt is not None, "version": __version__}

    uid = {"uid": ID}
    E = Endpoint
    return [
        E("GET", "/api/openapi.json", "openapi", "This document.", openapiDocument, "meta", access=PUBLIC),
        E(
            "GET",
            "/api/health",
            "health",
            "Whether the node runs (for load balancers and the command line); needs no login.",
            health,
            "meta",
            access=PUBLIC,
            response={"type": "object", "properties": {"ok": {"type": "boolean"}, "version": {"type": "string"}}},
        ),
        E(
            "POST",
            "/api/login",
            "login",
            "Log in: a token for the Authorization header (Bearer).",
            login,
            "admins",
            access=PUBLIC,
            audited=True,
            body={
                "type": "object",
                "required": ["name", "password"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 64},
                    "password": {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD},
                },
            },
            response={
                "type": "object",
                "required": ["token", "expires", "name", "role"],
                "properties": {
                    "token": {"type": "string"},
                    "expires": TIME,
                    "name": {"type": "string"},
                    "role": {"type": "string"},
                },
            },
            description="Rate-limited per address ([admin] login_rate). Refused logins are audited.",
        ),
        E("POST", "/api/logout", "logout", "End this token.", logout, "admins", audited=True, response=OK),
        E("GET", "/api/me", "me", "Who this token belongs to.", me, "admins"),
        E(
            "GET",
            "/api/admins",
            "listAdmins",
            "Admin accounts (never their hashes).",
            listAdmins,
            "admins",
            response={"type": "object", "properties": {"admins": {"type": "array", "items": ADMIN_ACCOUNT}}},
        ),
        E(
            "POST",
            "/api/admins",
            "createAdmin",
            "Create an admin account.",
            createAdmin,
            "admins",
            write=True,
            target="name",
            body={
                "type": "object",
                "required": ["name", "password"],
                "additionalProperties": False,
                "properties": {
                    "name": NAME,
                    "password": {"type": "string", "minLength": MIN_PASSWORD, "maxLength": MAX_PASSWORD},
                    "role": {"type": "string", "enum": list(ROLES)},
                },
            },
            response=ADMIN_ACCOUNT,
        ),
        E(
            "DELETE",
            "/api/admins/{name}",
            "deleteAdmin",
            "Remove an admin account and end its tokens.",
            deleteAdmin,
            "admins",
            write=True,
            target="name",
            params={"name": NAME},
            response=OK,
        ),
        E(
            "GET",
            "/api/audit",
            "audit",
            "The last lines of the audit log.",
            audit,
            "admins",
            query={"limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
            response={"type": "object", "properties": {"entries": {"type": "array", "items": {"type": "object"}}}},
        ),
        E("GET", "/api/node", "node", "This node: id, version, uptime, listeners, counts.", nodeInfo, "node"),
        E(
            "GET",
            "/api/dashboard",
            "dashboard",
            "What the dashboard shows: rates, latency percentiles, gauges and their history.",
            dashboard,
            "node",
            query={"window": {"type": "integer", "minimum": 1, "maximum": 120, "default": 10}},
        ),
        E(
            "GET",
            "/api/cluster",
            "cluster",
            "The cluster as this node sees it: members and their health, owners, links and paths.",
            lambda call: clusterStatus(node),
            "node",
        ),
        E(
            "GET",
            "/api/store",
            "store",
            "The store: backend, open and reachable, operations, latency, shards and expansion.",
            lambda call: storeStatus(node),
            "node",
        ),
        E(
            "GET",
            "/api/keys",
            "keys",
            "The stanza keys and the progress of a rotation.",
            lambda call: keyStatus(node),
            "node",
        ),
        E(
            "GET",
            "/api/sessions",
            "sessions",
            "Sessions on this node, a page at a time.",
            sessions,
            "users",
            query=PAGE,
            response={
                "type": "object",
                "properties": {
                    "total": {"type": "integer"},
                    "offset": {"type": "integer"},
                    "sessions": {"type": "array", "items": SESSION},
                },
            },
        ),
        E(
            "POST",
            "/api/users",
            "createUser",
            "Register an account (as /tim2 TIMREGISTER).",
            createUser,
            "users",
            write=True,
            body={
                "type": "object",
                "required": ["name", "password"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 1024},
                    "password": {"type": "string", "minLength": 1, "maxLength": 4096},
                    "domain": {"type": "string", "maxLength": 1024},
                },
            },
            response={"type": "object", "properties": {"uid": {"type": "string"}}},
        ),
        E(
            "GET",
            "/api/users/{uid}",
            "getUser",
            "An account: when created, online, its sessions here, a block, how many groups.",
            getUser,
            "users",
            target="uid",
            params=uid,
        ),
        E(
            "GET",
            "/api/users/{uid}/sessions",
            "userSessions",
            "The account's sessions on this node.",
            userSessions,
            "users",
            target="uid",
            params=uid,
            response={"type": "object", "properties": {"sessions": {"type": "array", "items": SESSION}}},
        ),
        E(
            "POST",
            "/api/users/{uid}/kick",
            "kickUser",
            "Log out every session of the account on this node (TIMLOGOUT, then close).",
            kick,
            "users",
            write=True,
            target="uid",
            params=uid,
            response={"type": "object", "properties": {"kicked": {"type": "integer"}}},
        ),
        E(
            "POST",
            "/api/users/{uid}/block",
            "blockUser",
            "Block the account from logging in for some seconds, and log it out.",
            block,
            "users",
            write=True,
            target="uid",
            params=uid,
            body={
                "type": "object",
                "required": ["seconds"],
                "additionalProperties": False,
                "properties": {"seconds": {"type": "number", "minimum": 1, "maximum": MAX_BLOCK_SECONDS}},
            },
            response={"type": "object", "properties": {"uid": {"type": "string"}, "until": TIME}},
        ),
        E(
            "DELETE",
            "/api/users/{uid}/block",
            "unblockUser",
            "Lift a block; ok is false if there was none.",
            unblock,
            "users",
            write=True,
            target="uid",
            params=uid,
            response=OK,
        ),
        E(
            "GET",
            "/api/blocks",
            "listBlocks",
            "Blocked accounts and when each block ends.",
            blocks,
            "users",
            response={
                "type": "object",
                "properties": {
                    "blocks": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"uid": {"type": "string"}, "until": TIME}},
                    }
                },
            },
        ),
        E(
            "POST",
            "/api/users/{uid}/token",
            "userToken",
            "A one-time login token for the account, without its password (tim's /timToken).",
            token,
            "users",
            write=True,
            target="uid",
            params=uid,
            response={"type": "object", "properties": {"token": {"type": "integer"}, "expires": TIME}},
        ),
        E(
            "POST",
            "/api/users/{uid}/password",
            "resetPassword",
            "Set the account's password without the old one.",
            password,
            "users",
            write=True,
            target="uid",
            params=uid,
            body={
                "type": "object",
                "required": ["password"],
                "additionalProperties": False,
                "properties": {"password": {"type": "string", "minLength": 1, "maxLength": 4096}},
            },
            response=OK,
        ),
        E(
            "POST",
            "/api/users/{uid}/messages",
            "messageUser",
            "Send the account a system message (msType 1, odType 1), delivered at least once.",
            messageUser,
            "messages",
            write=True,
            target="uid",
            params=uid,
            body=MESSAGE_BODY,
            response={"type": "object", "properties": {"sent": {"type": "integer"}}},
        ),
        E(
            "GET",
            "/api/users/{uid}/groups",
            "userGroups",
            "The groups the account is a member of.",
            userGroups,
            "groups",
            target="uid",
            params=uid,
            response={"type": "object", "properties": {"groups": {"type": "array", "items": {"type": "string"}}}},
        ),
        E(
            "POST",
            "/api/broadcast",
            "broadcast",
            "A system message to every account online on this node, or to the accounts listed.",
            broadcast,
            "messages",
            write=True,
            body={
                **MESSAGE_BODY,
                "properties": {
                    **MESSAGE_BODY["properties"],  # type: ignore[dict-item]
                    "users": {"type": "array", "items": ID, "maxItems": 100000},
                },
            },
            response={"type": "object", "properties": {"sent": {"type": "integer"}}},
        ),
        E(
            "GET",
            "/api/groups/{gid}",
            "getGroup",
            "A group: founder, type, topic, managers and members.",
            getGroup,
            "groups",
            target="gid",
            params={"gid": ID},
            query={"limit": {"type": "integer", "minimum": 0, "maximum": 100000, "default": 1000}},
        ),
        E(
            "POST",
            "/api/groups",
            "createGroup",
            "Create a group with the account as its founder.",
            createGroup,
            "groups",
            write=True,
            target="founder",
            body={
                "type": "object",
                "required": ["founder", "topic"],
                "additionalProperties": False,
                "properties": {
                    "founder": ID,
                    "topic": {"type": "string", "minLength": 1, "maxLength": 1024},
                    "private": {"type": "boolean"},
                },
            },
            response={"type": "object", "properties": {"gid": {"type": "string"}}},
        ),
        E(
            "DELETE",
            "/api/groups/{gid}",
            "dissolveGroup",
            "Dissolve a group as its founder would; members are told.",
            dissolveGroup,
            "groups",
            write=True,
            target="gid",
            params={"gid": ID},
            response=OK,
        ),
        E(
            "GET",
            "/api/vrooms",
            "listVRooms",
            "Virtual rooms on this node with their statistics, busiest first.",
            listVRooms,
            "vrooms",
            response={"type": "object", "properties": {"rooms": {"type": "array", "items": ROOM}}},
        ),
        E(
            "GET",
            "/api/vrooms/{vnode}",
            "getVRoom",
            "One virtual room's statistics.",
            getVRoom,
            "vrooms",
            target="vnode",
            params={"vnode": ID},
            response=ROOM,
        ),
        E(
            "POST",
            "/api/vrooms",
            "createVRoom",
            "Register a virtual room with the account as its founder.",
            createVRoom,
            "vrooms",
            write=True,
            target="founder",
            body={
                "type": "object",
                "required": ["founder"],
                "additionalProperties": False,
                "properties": {"founder": ID, "private": {"type": "boolean"}},
            },
            response={"type": "object", "properties": {"vnode": {"type": "string"}}},
        ),
        E(
            "DELETE",
            "/api/vrooms/{vnode}",
            "removeVRoom",
            "Remove a virtual room; its subscribers are told.",
            removeVRoom,
            "vrooms",
            write=True,
            target="vnode",
            params={"vnode": ID},
            response=OK,
        ),
    ]
