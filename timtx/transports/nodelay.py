"""
Small writes leave at once: Nagle's algorithm off on a TCP transport.

A node writes what one reactor turn produced in one C{send}, so the
segments are already as large as the traffic makes them; Nagle's algorithm
would only hold a small push or answer back until the previous one is
acknowledged, and against a peer's delayed acknowledgement that costs up to
40 ms on a request/answer exchange between nodes.  autobahn turns it off
for WebSocket connections (its C{tcpNoDelay} option, on by default); this
does the same for the raw-TCP client transport and for links between nodes.
"""

from __future__ import annotations

from typing import Any


def sendSmallWritesAtOnce(transport: Any) -> bool:
    """
    Set C{TCP_NODELAY} on C{transport} if it is, or wraps, a TCP
    connection (a TLS wrapper forwards the call to the socket's transport).

    @return: whether it was set; C{False} for a transport with no socket
        (a relayed link, a test's string transport).
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is None:
        return False
    try:
        setNoDelay(True)
    except OSError:
        # The socket closed before the connection was handed over: there is
        # nothing left to tune.
        return False
    return True
