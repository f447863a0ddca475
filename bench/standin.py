"""
A stand-in for groups and virtual rooms, to test the generator's c) and d)
scenarios before the node serves them: C{--standin 1} starts the node with
this protocol as C{client-ws}.

It is a toy, not timtx's design, and never a benchmark of anything:
groups and vrooms live in a dict on the node, nothing is stored, group
pushes are acknowledged and forgotten.  It answers exactly what tim's
documentation says the scenarios will meet: TIMBUSINESS rtype 8 →
C{TimAck{t: 8, n: group}}, rtype 9 → C{TimAck{t: 9, n: group}}; a msType 3
TIMMESSAGE is pushed (ack bit set) to every other member and echoed to the
sender; TIMVROOM rtype 1 → C{TimAck{t: 1, n: vnode}}, rtype 5 →
C{TimAck{t: 5, n: vnode}}; a TIMSTREAM goes to every subscriber as
C{TimStream{id, VNode, fromNode, body, dtype}}.
"""

from __future__ import annotations

import secrets
from typing import Any

from timtx.crypto.ids import new_random_id
from timtx.delivery.inbox import Encoded
from timtx.protocols.constants import Business, ErrorCode, MsType, TimType, VRoomOp
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage, TimReq, TimStream
from timtx.transports.websocket import TimWebSocketServerProtocol


class _State:
    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}
        self.vrooms: dict[str, list[Any]] = {}
        self.mid = 0


class StandInProtocol(TimWebSocketServerProtocol):
    def _state(self) -> _State:
        state = getattr(self.node, "_benchStandIn", None)
        if state is None:
            state = self.node._benchStandIn = _State()  # type: ignore[attr-defined]
        return state

    def handlerFor(self, timType: int) -> Any:
        if self.session is not None:
            handler = {
                TimType.TIMBUSINESS: self._business,
                TimType.TIMMESSAGE: self._message,
                TimType.TIMVROOM: self._vroom,
                TimType.TIMSTREAM: self._stream,
            }.get(timType)
            if handler is not None:
                return handler
        return super().handlerFor(timType)

    def _business(self, frame: Any) -> Any:
        request = self.decodeBody(frame, TimReq)
        session, groups = self.session, self._state().groups
        assert session is not None
        if request.rtype == Business.NEWROOM:
            gid = new_random_id()
            groups[gid] = {session.uid}
            session.sendAck(TimType.TIMBUSINESS, t=Business.NEWROOM, n=gid)
            return None
        if request.rtype == Business.ADDROOM:
            if request.node not in groups:
                raise TimProtocolError(ErrorCode.ERR_NOEXIST, "no such group")
            groups[request.node].add(session.uid)
            session.sendAck(TimType.TIMBUSINESS, t=Business.ADDROOM, n=request.node)
            return None
        return super().handlerFor(TimType.TIMBUSINESS)(frame)  # type: ignore[misc]

    def _message(self, frame: Any) -> Any:
        message = self.decodeBody(frame, TimMessage)
        if message.msType != MsType.SOURCE_ROOM:
            return super().handlerFor(TimType.TIMMESSAGE)(frame)  # type: ignore[misc]
        session, state = self.session, self._state()
        assert session is not None
        members = state.groups.get(message.roomTid.node if message.roomTid else "")
        if members is None or session.uid not in members:
            raise TimProtocolError(ErrorCode.ERR_AUTH, "not a member")
        state.mid += 1
        message.mid, message.fromTid = state.mid, session.tid
        message.timestamp = int(self.node.clock.seconds() * 1e9)
        encoded = Encoded(message)
        sessions = self.node.sessions
        for uid in members:
            for member in sessions.sessionsOf(uid):
                payload = encoded.payload(member.encoding)
                if uid == session.uid:
                    member.sendPayload(TimType.TIMMESSAGE, payload)
                else:
                    member.sendPayload(TimType.TIMMESSAGE, payload, onAck=lambda: None)
        return None

    def _vroom(self, frame: Any) -> None:
        request = self.decodeBody(frame, TimReq)
        session, vrooms = self.session, self._state().vrooms
        assert session is not None
        if request.rtype == VRoomOp.REGISTER:
            vnode = new_random_id()
            vrooms[vnode] = []
            session.sendAck(TimType.TIMVROOM, t=VRoomOp.REGISTER, n=vnode)
        elif request.rtype == VRoomOp.SUB and request.node in vrooms:
            vrooms[request.node].append(session)
            session.sendAck(TimType.TIMVROOM, t=VRoomOp.SUB, n=request.node)
        else:
            raise TimProtocolError(ErrorCode.ERR_NOEXIST, "no such vroom")

    def _stream(self, frame: Any) -> None:
        stream = self.decodeBody(frame, TimStream)
        session = self.session
        assert session is not None
        subscribers = self._state().vrooms.get(stream.VNode or "")
        if subscribers is None:
            raise TimProtocolError(ErrorCode.ERR_NOEXIST, "no such vroom")
        out = TimStream(
            id=secrets.randbits(53), VNode=stream.VNode, fromNode=session.uid, body=stream.body, dtype=stream.dtype
        )
        encoded = Encoded(out)  # type: ignore[arg-type]
        for subscriber in subscribers:
            if not subscriber.closed:
                subscriber.sendPayload(TimType.TIMSTREAM, encoded.payload(subscriber.encoding))
