# -*- test-case-name: timtx.test.test_admin -*-
"""
tim 2.0's server API (its admin HTTP endpoints), with tim's request and
answer shapes, so that a tool written for tim's admin API works here.

Every endpoint is a POST taking a JSON body (or a form whose fields hold
JSON, as tim accepts) and answering HTTP 200 with a JSON C{TimAck}:
C{{"ok": true, ...}}, or C{{"ok": false, "error": {"code", "info"}}} with
tim's error codes.  C{/timBlockList} and C{/timOnline} answer tim's map and
list instead.

What differs from tim, on purpose:
  - authentication: tim's C{username} and C{password} headers are checked
    against the scrypt hashes of the admins file (or a bearer token is
    used); a wrong or missing login is HTTP 401 with a JSON error, where
    tim answers 405 with no body;
  - roles: an observer may call C{/timBlockList} and C{/timOnline} only
    (tim lets its "observed" accounts do everything);
  - C{/timBlockUser} blocks are kept on disk and refuse logins with error
    4110; C{/timMessage} checks every account exists before sending
    (tim's rule) and sends to at most C{[admin] max_targets};
  - C{/timNewRoom} creates the group in the founder's own domain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from timtx.admin.web import TIM, ApiError, Call, Endpoint
from timtx.protocols.constants import ErrorCode, GroupType, NodeInfo, TimType, VRoomOp
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimAck, TimError, TimMessage, TimNodes, TimRoomBean, TimStruct, TimUserBean

if TYPE_CHECKING:
    from timtx.admin.context import AdminContext

ANY_OBJECT = {"type": "object"}
ACK = {
    "type": "object",
    "required": ["ok"],
    "properties": {
        "ok": {"type": "boolean"},
        "timType": {"type": "integer"},
        "n": {"type": "string"},
        "t": {"type": "integer"},
        "error": {"type": "object", "properties": {"code": {"type": "integer"}, "info": {"type": "string"}}},
    },
}


def ack(**fields: Any) -> dict[str, Any]:
    return TimAck(ok=True, **fields).to_json_dict()


def failed(code: int, info: str, **fields: Any) -> dict[str, Any]:
    return TimAck(ok=False, error=TimError(code=code, info=info), **fields).to_json_dict()


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    return value if isinstance(value, str) and value.strip() else None


def _struct(cls: type[TimStruct], value: Any) -> Any:
    if value is None:
        return None
    return cls.from_json_dict(value)


def timEndpoints(admin: AdminContext) -> list[Endpoint]:
    node = admin.node
    ops = admin.operations

    def answering(work: Any, **failFields: Any) -> Any:
        """
        Run C{work(call)} and turn tim errors and API errors into a failed
        TimAck, as tim answers.
        """

        @inlineCallbacks
        def handler(call: Call) -> Any:
            try:
                result = yield work(call)
            except TimProtocolError as e:
                return failed(e.code, e.text, **failFields)
            except ApiError as e:
                code = e.extra.get("timCode") or {404: ErrorCode.ERR_ACCOUNT, 409: ErrorCode.ERR_HASEXIST}.get(
                    e.status, ErrorCode.ERR_PARAMS
                )
                return failed(code, e.message, **failFields)
            return result

        return handler

    def params(info: str = "missing or malformed fields") -> TimProtocolError:
        return TimProtocolError(ErrorCode.ERR_PARAMS, info)

    @inlineCallbacks
    def register(call: Call) -> Any:
        username, password = _text(call.body, "username"), call.body.get("password")
        if username is None or not isinstance(password, str) or not password:
            raise params("username and password are required")
        call.target = username
        uid = yield ops.register(username, password, _text(call.body, "domain"))
        call.target = uid
        return ack(n=uid)

    @inlineCallbacks
    def token(call: Call) -> Any:
        uid = _text(call.body, "name")
        if uid is None:
            raise params("name (the account id) is required")
        call.target = uid
        value = yield ops.token(uid)
        return ack(timType=TimType.TIMTOKEN, t=value, n=str(value))

    @inlineCallbacks
    def message(call: Call) -> Any:
        nodes = _struct(TimNodes, call.body.get("nodes"))
        template = _struct(TimMessage, call.body.get("message"))
        if nodes is None or template is None or not nodes.nodelist:
            raise params("nodes.nodelist and message are required")
        sent = yield ops.sendSystemMessage(nodes.nodelist, template)
        call.audit["accounts"] = sent
        return ack()

    @inlineCallbacks
    def modifyUserInfo(call: Call) -> Any:
        uid = _text(call.body, "node")
        bean = _struct(TimUserBean, call.body.get("userbean"))
        if uid is None or bean is None:
            raise params("node and userbean are required")
        call.target = uid
        yield ops.actAs(uid, TimType.TIMNODES, TimNodes(ntype=NodeInfo.MODIFYUSER, usermap={uid: bean}))
        return ack()

    @inlineCallbacks
    def resetAuth(call: Call) -> Any:
        name, password = _text(call.body, "loginname"), call.body.get("pwd")
        if name is None or not isinstance(password, str) or not password:
            raise params("loginname and pwd are required")
        uid = node.keys.accountId(name, _text(call.body, "domain"))
        call.target = uid
        yield ops.resetPassword(uid, password)
        return ack(n=name)

    def blockUser(call: Call) -> Any:
        uid = _text(call.body, "account")
        seconds = call.body.get("time")
        if uid is None or not isinstance(seconds, int) or isinstance(seconds, bool):
            raise params("account and time are required")
        call.target = uid
        call.audit["seconds"] = seconds
        if seconds < 0:
            ops.unblock(uid)
        elif seconds > 0:
            ops.block(uid, seconds)
        return ack(n=uid)

    def blockList(call: Call) -> Any:
        return {uid: int(until) for uid, until in node.bans.blocked().items()}

    def online(call: Call) -> Any:
        return [session.tid.to_json_dict() for session in node.sessions]

    @inlineCallbacks
    def newRoom(call: Call) -> Any:
        founder, topic = _text(call.body, "node"), _text(call.body, "topic")
        if founder is None or topic is None:
            raise params("node (the founder) and topic are required")
        call.target = founder
        gid = yield ops.createGroup(founder, topic, call.body.get("gtype") == GroupType.PRIVATE)
        return ack(n=gid)

    @inlineCallbacks
    def modifyRoomInfo(call: Call) -> Any:
        uid, gid = _text(call.body, "unode"), _text(call.body, "gnode")
        bean = _struct(TimRoomBean, call.body.get("roombean"))
        if uid is None or gid is None or bean is None:
            raise params("unode, gnode and roombean are required")
        call.target = gid
        yield ops.actAs(uid, TimType.TIMNODES, TimNodes(ntype=NodeInfo.MODIFYROOM, roommap={gid: bean}))
        return ack()

    @inlineCallbacks
    def vroom(call: Call) -> Any:
        founder, rtype = _text(call.body, "node"), call.body.get("rtype")
        if founder is None or rtype != VRoomOp.REGISTER:
            # tim's handler does rtype 1 only; the REST API removes rooms.
            raise params("node and rtype 1 are required")
        call.target = founder
        vnode = yield ops.createVRoom(founder, False)
        return ack(n=vnode)

    def E(
        path: str,
        name: str,
        summary: str,
        work: Any,
        write: bool = True,
        form: tuple[str, ...] = (),
        response: Any = ACK,
    ) -> Endpoint:
        handler = answering(work) if write else work
        return Endpoint(
            "POST",
            path,
            name,
            summary,
            handler,
            "tim",
            write=write,
            access=TIM,
            body=ANY_OBJECT,
            response=response,
            form=form,
            description="tim 2.0's server API: always HTTP 200 with a TimAck once logged in.",
        )

    return [
        E("/timRegister", "timRegister", "Register {username, password, domain}; n is the account id.", register),
        E("/timToken", "timToken", "A one-time login token for the account {name, domain}; t is the token.", token),
        E(
            "/timMessage",
            "timMessage",
            "A system message to each account of nodes.nodelist.",
            message,
            form=("nodes", "message"),
        ),
        E(
            "/timModifyUserInfo",
            "timModifyUserInfo",
            "Merge userbean into the profile of node.",
            modifyUserInfo,
            form=("userbean",),
        ),
        E("/timResetAuth", "timResetAuth", "Set the password of {loginname, domain} to pwd.", resetAuth),
        E(
            "/timBlockUser",
            "timBlockUser",
            "Block account for time seconds (negative: unblock) and log it out.",
            blockUser,
        ),
        E(
            "/timBlockList",
            "timBlockList",
            "Blocked accounts: account id -> Unix time the block ends.",
            blockList,
            write=False,
            response={"type": "object", "additionalProperties": {"type": "integer"}},
        ),
        E(
            "/timOnline",
            "timOnline",
            "The Tid of every session on this node.",
            online,
            write=False,
            response={"type": "array", "items": {"type": "object"}},
        ),
        E("/timNewRoom", "timNewRoom", "Create a group {node: founder, topic, gtype}; n is the group id.", newRoom),
        E(
            "/timModifyRoomInfo",
            "timModifyRoomInfo",
            "Merge roombean into group gnode as unode (its founder or a manager).",
            modifyRoomInfo,
            form=("roombean",),
        ),
        E("/timVroom", "timVroom", "Register a virtual room {node: founder, rtype: 1}; n is the room.", vroom),
    ]
