# -*- test-case-name: timtx.test.test_node -*-
"""
Which service handles which frame type.

Services register a route per frame type at construction; a connection
looks up the route of each frame, decodes the body into the route's struct
type and calls the handler with the session and the body.

A handler that fails because the store cannot be reached is answered with
tim's C{ERR_DATABASE} and a text that says "try again", whatever the frame
type: an outage is not an internal error, and the client stays connected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from timtx.chat.messagerules import refusal
from timtx.interfaces import Route
from timtx.persistence.errors import StoreUnavailable
from timtx.protocols.structs import TimStruct

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session

Handler = Callable[["Session", Any], Any]


class Dispatcher:
    def __init__(self) -> None:
        self._routes: dict[int, Route] = {}

    def route(self, timType: int, bodyType: type[TimStruct] | None, handler: Handler) -> None:
        """
        Send frames of C{timType} to C{handler}.  A later call for the same
        type replaces the earlier route, so a downstream service can take
        over a frame type.
        """
        self._routes[timType] = Route(bodyType, _outagesAnswered(handler))

    def lookup(self, timType: int) -> Route | None:
        return self._routes.get(timType)

    def routes(self) -> dict[int, Route]:
        return dict(self._routes)


def _outagesAnswered(handler: Handler) -> Handler:
    """
    C{handler}, with a store outage turned into a retryable error ack.
    """

    def handle(session: Session, body: Any) -> Any:
        try:
            result = handler(session, body)
        except StoreUnavailable:
            raise refusal(Failure()) from None
        # (None first: isinstance against Deferred, an ABC, costs a call.)
        if result is not None and isinstance(result, Deferred):
            result.addErrback(_unavailable)
        return result

    handle.__wrapped__ = handler  # type: ignore[attr-defined]
    return handle


def _unavailable(failure: Failure) -> Failure:
    if failure.check(StoreUnavailable):
        return Failure(refusal(failure))
    return failure
