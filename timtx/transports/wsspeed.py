# -*- test-case-name: timtx.test.test_wsspeed -*-
"""
Speed-ups of autobahn's WebSocket server protocol that profiles of a
loaded node asked for (docs/benchmarks.md, "What the profiles show"), for
timtx's own protocol classes only.

All are subclass overrides and protocol options: no name inside autobahn
is changed, so every other autobahn protocol in the process (timtx's own
client, a downstream project's WAMP code) behaves as autobahn ships it.

  - Unmasking small frames.  For every frame a client sends, autobahn makes
    a C-level (CFFI) XOR masker object; for the short frames of chat that
    costs more than the XOR itself.  L{FastUnmasking} turns autobahn's own
    unmasking off (the C{applyMask} protocol option) and unmasks each frame
    itself as it begins (L{FastUnmasking.onFrameBegin}, the documented
    streaming hook): frames up to L{SMALL_FRAME} bytes with one big-integer
    XOR, larger ones with autobahn's masker.
  - The per-connection debug line.  On every new connection autobahn copies
    its 29 settings from the factory and pretty-prints them for a debug log
    line, whether debug logging is on or not.  L{QuietSettings} copies the
    settings itself and leaves autobahn's list of them (C{CONFIG_ATTRS})
    empty for its classes, so nothing is formatted.
  - The per-read debug line.  autobahn's Twisted adapter styles three
    arguments of a debug line (with click, for a terminal) on every read,
    logged or not: 4.5% of a node's time in a 1:1 run across nodes.
    L{QuietReads} hands the bytes to autobahn's framework-independent
    reader, as the adapter does, without the line.  (Sending has the same
    line; timtx sends through prepared frames, which
    L{timtx.transports.websocket} writes without it.)

C{timtx.test.test_wsspeed} checks the autobahn behaviour they rely on, so
that an autobahn release that changes it fails the suite rather than
corrupting frames.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket import xormasker  # create_xor_masker: not in its __all__
from autobahn.websocket.protocol import WebSocketServerProtocol

#: Frames up to this many bytes are unmasked in Python.
SMALL_FRAME = 16384


class SmallXorMasker:
    """
    autobahn's masker interface (C{process}, C{pointer}, C{reset}) for one
    frame, by big-integer XOR.
    """

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes):
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self) -> int:
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        n = len(data)
        if not n:
            return b""
        shift = self._ptr & 3
        mask = self._mask[shift:] + self._mask[:shift]
        key = (mask * (n // 4 + 1))[:n]
        self._ptr += n
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def maskerFor(mask: bytes, length: int) -> Any:
    """
    The masker for a frame of C{length} bytes: L{SmallXorMasker} for small
    frames, autobahn's own for larger ones.
    """
    if length <= SMALL_FRAME:
        return SmallXorMasker(mask)
    return xormasker.create_xor_masker(mask, length)  # type: ignore[attr-defined]


class FastUnmasking:
    """
    Mix into an autobahn WebSocket protocol (before it in the bases) whose
    factory sets C{applyMask=False}: unmasks each client frame as it
    begins.
    """

    current_frame: Any
    current_frame_masker: Any

    def onFrameBegin(self) -> None:
        frame = self.current_frame
        if frame.mask is not None and frame.length > 0:
            self.current_frame_masker = maskerFor(frame.mask, frame.length)
        super().onFrameBegin()  # type: ignore[misc]


class QuietSettings:
    """
    Mix into an autobahn WebSocket server protocol (before it in the
    bases): copies the factory's settings without formatting them for a
    debug line.  Settings already set on the protocol (a subclass's class
    attribute, or one set before the connection opens) win, as in
    autobahn.
    """

    #: Empty for autobahn's own copying loop, which formats what it copies.
    CONFIG_ATTRS: tuple[str, ...] = ()
    #: What autobahn would copy.
    SETTINGS: tuple[str, ...] = tuple(WebSocketServerProtocol.CONFIG_ATTRS)

    factory: Any

    def connectionMade(self) -> None:
        for name in self.SETTINGS:
            if not hasattr(self, name):
                setattr(self, name, getattr(self.factory, name))
        super().connectionMade()  # type: ignore[misc]


class QuietReads:
    """
    Mix into an autobahn Twisted WebSocket protocol (before it in the
    bases): reads without formatting autobahn's per-read debug line.
    """

    def dataReceived(self, data: bytes) -> None:
        # What autobahn's WebSocketAdapterProtocol.dataReceived does after
        # its debug line.
        self._dataReceived(data)  # type: ignore[attr-defined]
