# -*- test-case-name: timtx.test.test_extending -*-
"""
Protocol classes by name.

A node asks the registry for the class to serve each kind of connection:
C{client-ws} (WebSocket at C{/tim}), C{client-tcp} (raw TCP) and C{peer}
(other nodes of the cluster).  A downstream project registers a subclass under the
same name, in code (L{ProtocolRegistry.register}) or in C{node.ini}::

    [protocols]
    client-ws = myapp.protocols:MyWebSocketProtocol
"""

from __future__ import annotations

from typing import Any

from timtx.config import resolveProtocolPath

__all__ = ["ProtocolRegistry", "defaultRegistry", "resolveProtocolPath"]


class ProtocolRegistry:
    def __init__(self, protocols: dict[str, type] | None = None):
        self._protocols: dict[str, type] = dict(protocols or {})

    def register(self, name: str, protocol: type) -> None:
        """
        Serve connections of kind C{name} with C{protocol}; it replaces what
        was registered before.
        """
        self._protocols[name] = protocol

    def lookup(self, name: str) -> Any:
        """
        @raise KeyError: if nothing is registered under C{name}.
        """
        return self._protocols[name]

    def names(self) -> list[str]:
        return sorted(self._protocols)

    def copy(self) -> ProtocolRegistry:
        return ProtocolRegistry(self._protocols)


def defaultRegistry() -> ProtocolRegistry:
    """
    A registry holding timtx's own protocols.
    """
    from timtx.transports.peer import PeerProtocol
    from timtx.transports.tcp import TimTcpServerProtocol
    from timtx.transports.websocket import TimWebSocketServerProtocol

    return ProtocolRegistry(
        {"client-ws": TimWebSocketServerProtocol, "client-tcp": TimTcpServerProtocol, "peer": PeerProtocol}
    )
