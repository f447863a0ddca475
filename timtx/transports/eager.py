# -*- test-case-name: timtx.test.test_eager -*-
"""
Fan-out writes leave in the call that makes them when nothing waits before
them.

Twisted's TCP transport buffers every write and has the reactor watch the
socket for writability; the next poll sends it.  For one frame to one
connection that is two C{epoll_ctl} calls and a dispatch through the
reactor besides the C{send}: pushing a group message to 10,000 members
cost more in that than in the sends (bench group, 10,000 members, one
process: node CPU per delivery 51-53 µs buffered, 32-41 µs sent at once).
A fan-out writes one frame per session and message, so sending it at once
loses no coalescing.  1:1 traffic writes several small frames to a
connection in one turn and is cheaper buffered, one C{send} for all of
them (measured: 96-99 µs per message buffered, 116-119 µs sent at once),
so only the fan-out path (L{IFrameSink.writePrepared}) uses this.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def writeNow(transport: Any, data: bytes) -> None:
    """
    Send C{data} on C{transport} now if it is a plain TCP connection with
    nothing buffered; buffer what the socket does not take, and anything
    on any other transport, as C{write} does.
    """
    if _idle(transport):
        sent = transport.writeSomeData(data)
        # An exception instance means the connection is lost: buffered
        # below, the transport's own next write attempt reports it.
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


#: Twisted's TCP connections, accepted and dialled.
_TCP = (tcp.Server, tcp.Client)


def _idle(transport: Any) -> bool:
    """
    Whether C{transport} is one of Twisted's TCP connections, open, not
    closing, not under TLS, and has nothing waiting to be written, so a
    C{send} now keeps the order of what was written.  Its buffer's
    attributes are internal: if a Twisted release renames them, this says
    no and writes are buffered as before (C{test_eager} then fails).
    """
    return bool(
        type(transport) in _TCP
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        and not getattr(transport, "_writeDisconnected", True)
        and getattr(transport, "_tempDataLen", 1) == 0
        and not transport.dataBuffer
    )
