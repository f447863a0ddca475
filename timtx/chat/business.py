# -*- test-case-name: timtx.test.test_roster -*-
"""
TIMBUSINESS: one frame type, many operations, chosen by C{TimReq.rtype}.
Services register the rtypes they handle; unknown ones get 4104, as in tim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimReq

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session

BusinessHandler = Callable[["Session", TimReq], Any]

#: timtx's own rtypes, above tim's 1..21.
UNBLOCKROSTER = 101


class BusinessRouter:
    def __init__(self) -> None:
        self._handlers: dict[int, BusinessHandler] = {}

    def register(self, rtype: int, handler: BusinessHandler) -> None:
        self._handlers[rtype] = handler

    def __call__(self, session: Session, request: TimReq) -> Any:
        handler = self._handlers.get(request.rtype) if request.rtype is not None else None
        if handler is None:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"unknown business rtype {request.rtype}")
        return handler(session, request)


def requireNode(request: TimReq, field: str = "node") -> str:
    """
    The non-empty string in C{request.<field>}.

    @raise TimProtocolError: C{ERR_PARAMS} if it is missing.
    """
    value = getattr(request, field)
    if not value:
        raise TimProtocolError(ErrorCode.ERR_PARAMS, f"TimReq.{field} is required")
    return str(value)
