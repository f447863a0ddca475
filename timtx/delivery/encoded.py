# -*- test-case-name: timtx.test.test_groups -*-
"""
A message encoded at most once per encoding, however many sessions get it.
"""

from __future__ import annotations

from typing import Any

from timtx.protocols import codec
from timtx.protocols.codec import Encoding


class Encoded:
    """
    A struct and its encodings, made on first use.

    @ivar message: the struct.
    """

    __slots__ = ("message", "_compact", "_json", "_kind")

    def __init__(self, message: Any, compact: bytes | None = None):
        """
        @param compact: C{message} already encoded in Thrift compact (tim
            2.0 layout), if the caller has it.
        """
        self.message = message
        self._compact = compact
        self._json: bytes | None = None
        self._kind: type | None = None

    @classmethod
    def prepared(cls, compact: bytes, json: bytes) -> Encoded:
        """
        A message that arrives already encoded both ways (from another node
        of the cluster), so that it is never decoded here.
        """
        encoded = cls(None)
        encoded._compact = compact
        encoded._json = json
        return encoded

    @classmethod
    def fromCompact(cls, kind: type, compact: bytes) -> Encoded:
        """
        A message of struct C{kind} that arrives in Thrift compact only
        (from another node of the cluster): decoded, to be encoded in JSON,
        only if a JSON session is sent it.
        """
        encoded = cls(None, compact)
        encoded._kind = kind
        return encoded

    def payload(self, encoding: Encoding) -> bytes:
        if encoding is Encoding.JSON:
            if self._json is None:
                if self.message is None and self._kind is not None and self._compact is not None:
                    self.message = codec.decode_compact(self._kind, self._compact)
                self._json = codec.encode_json(self.message)
            return self._json
        if self._compact is None:
            self._compact = codec.encode_compact(self.message)
        return self._compact
