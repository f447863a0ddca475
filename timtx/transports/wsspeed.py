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
    line; L{timtx.transports.websocket} frames what it sends itself.)
  - The per-frame machinery.  For a whole small binary frame, the frame
    every tim client sends, autobahn runs eight hooks, a frame header
    object, a masker and an unobserved event.  L{QuietReads} reads such
    frames itself and hands everything else to autobahn's reader.

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


#: The first byte of a final, uncompressed binary frame (FIN, RSV 0, opcode 2).
_FINAL_BINARY = 0x82
_OPEN = WebSocketServerProtocol.STATE_OPEN
_ZERO_MASK = b"\0\0\0\0"


def unmask(mask: bytes, data: bytes) -> bytes:
    """
    C{data} unmasked with C{mask} from the frame's first byte.
    """
    if mask == _ZERO_MASK:
        return data
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class QuietReads:
    """
    Mix into an autobahn Twisted WebSocket server protocol (before it in
    the bases): reads without formatting autobahn's per-read debug line,
    and hands the common frame to C{onMessage} itself.

    The common frame is a whole client message in one final binary frame
    of at most L{SMALL_FRAME} bytes, masked, within the size limits, on an
    open connection with nothing buffered or half-read.  For it, autobahn
    runs eight hooks, builds a frame header and a masker, copies its
    buffer, and fires a C{message} event no one observes: a fifth of the
    reactor thread in a 1:1 profile (docs/benchmarks.md).  This does what
    they do for such a frame (the traffic counts, the unmasking, the call
    of C{onMessage}) and nothing else.  Everything else — control frames,
    text (whose UTF-8 autobahn checks), fragments, a frame split across
    reads, one over a limit, anything malformed, a closing connection,
    compression, frame logging, timings, observers — goes to autobahn's
    own reader from the first byte it does not take, so its checks and
    errors are unchanged.
    """

    def dataReceived(self, data: bytes) -> None:
        # What autobahn's WebSocketAdapterProtocol.dataReceived does after
        # its debug line is self._dataReceived(data); whole binary frames
        # are taken first.
        if (
            self.state == _OPEN  # type: ignore[attr-defined]
            and not self.data  # type: ignore[attr-defined]
            and self.current_frame is None  # type: ignore[attr-defined]
            and not self.inside_message  # type: ignore[attr-defined]
            and self._perMessageCompress is None  # type: ignore[attr-defined]
            and self._listeners is None  # type: ignore[attr-defined]
            and not self.failedByMe  # type: ignore[attr-defined]
            and not self.logFrames  # type: ignore[attr-defined]
            and not self.logOctets  # type: ignore[attr-defined]
            and not self.trackedTimings  # type: ignore[attr-defined]
            and self.autoPingTimeoutCall is None  # type: ignore[attr-defined]
        ):
            # Counted as autobahn's _dataReceived counts a read while open.
            self.trafficStats.incomingOctetsWireLevel += len(data)  # type: ignore[attr-defined]
            taken = self._takeFrames(data)
            if taken < len(data):
                # The rest, from the first frame not taken, as autobahn's
                # _dataReceived goes on after counting.
                self.data += data[taken:] if taken else data  # type: ignore[attr-defined]
                self.consumeData()  # type: ignore[attr-defined]
            return
        self._dataReceived(data)  # type: ignore[attr-defined]

    def _takeFrames(self, data: bytes) -> int:
        """
        Hand the whole common frames at the start of C{data} to
        C{onMessage}; return how many bytes they took.
        """
        end = len(data)
        offset = 0
        stats = self.trafficStats  # type: ignore[attr-defined]
        maxFrame = self.maxFramePayloadSize  # type: ignore[attr-defined]
        maxMessage = self.maxMessagePayloadSize  # type: ignore[attr-defined]
        while end - offset >= 6 and data[offset] == _FINAL_BINARY:
            second = data[offset + 1]
            if not second & 0x80:
                break  # unmasked: autobahn refuses it
            length = second & 0x7F
            start = offset + 6
            if length == 126:
                start += 2
                if end < start:
                    break
                length = int.from_bytes(data[offset + 2 : offset + 4], "big")
                if length < 126:
                    break  # not the shortest encoding: autobahn refuses it
            elif length == 127:
                break
            stop = start + length
            if stop > end or length > SMALL_FRAME or 0 < maxFrame < length or 0 < maxMessage < length:
                break
            payload = unmask(data[start - 4 : start], data[start:stop])
            offset = stop
            # autobahn's counts of a frame read while open.
            stats.incomingOctetsWebSocketLevel += length
            stats.incomingOctetsAppLevel += length
            stats.incomingWebSocketFrames += 1
            stats.incomingWebSocketMessages += 1
            self.onMessage(payload, True)  # type: ignore[attr-defined]
            if self.state != _OPEN or self.failedByMe:  # type: ignore[attr-defined]
                break
        return offset
