# -*- test-case-name: timtx.test.test_wsspeed -*-
"""
Two changes to autobahn that profiles of a loaded node asked for
(docs/benchmarks.md, "What the profiles show").  Both keep autobahn's
behaviour and only change its cost; L{tune} applies them once per process.

  - Unmasking small frames.  For every frame a client sends, autobahn makes
    a C-level (CFFI) XOR masker object; for the short frames of chat that
    costs more than the XOR itself.  Frames up to L{SMALL_FRAME} bytes are
    unmasked with one big-integer XOR instead; larger frames keep
    autobahn's masker.
  - Its per-connection debug line.  Every new connection pretty-prints the
    protocol's 29 settings for a debug log line, whether debug logging is on
    or not; now the text is only made if the line is written.
"""

from __future__ import annotations

import pprint
from typing import Any

from autobahn.websocket import protocol as _protocol

#: Frames up to this many bytes are unmasked in Python.
SMALL_FRAME = 16384

_original = _protocol.create_xor_masker
_tuned = False


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


def create_xor_masker(mask: bytes, length: int | None = None) -> Any:
    if length is not None and length <= SMALL_FRAME:
        return SmallXorMasker(mask)
    return _original(mask, length)


class LazyPformat:
    """
    C{pprint.pformat} of a value, made when the text is asked for.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def tune() -> None:
    """
    Apply both changes to autobahn's WebSocket protocol module (once).
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    _protocol.create_xor_masker = create_xor_masker
    _protocol.pformat = LazyPformat  # type: ignore[assignment]
