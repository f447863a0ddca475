# -*- test-case-name: timtx.test.test_node -*-
"""
Which service handles which frame type.

Services register a route per frame type at construction; a connection
looks up the route of each frame, decodes the body into the route's struct
type and calls the handler with the session and the body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from timtx.interfaces import Route
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
        self._routes[timType] = Route(bodyType, handler)

    def lookup(self, timType: int) -> Route | None:
        return self._routes.get(timType)

    def routes(self) -> dict[int, Route]:
        return dict(self._routes)
