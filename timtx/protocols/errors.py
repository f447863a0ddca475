# -*- test-case-name: timtx.test.test_codec -*-
"""
The one exception type for anything a peer did wrong.
"""

from __future__ import annotations

from timtx.protocols.constants import ERROR_TEXT, ErrorCode


class TimProtocolError(Exception):
    """
    A peer sent something we will not act on.

    It becomes a tim error ack (C{TimAck{ok: false, error: {code, info}}}) or,
    when C{fatal} is set, a clean close of the connection.  The text is meant
    for the client, so it never carries a traceback or server internals.

    @ivar code: a tim error code, see L{ErrorCode}.
    @ivar text: a short human-readable reason.
    @ivar fatal: whether the connection should be closed after replying.
    @ivar ackFields: more fields for the error ack, such as C{t} holding the
        id of the message refused.
    """

    ackFields: dict[str, object]

    def __init__(self, code: int, text: str | None = None, *, fatal: bool = False):
        if text is None:
            text = ERROR_TEXT.get(ErrorCode(code), "error") if code in ErrorCode._value2member_map_ else "error"
        super().__init__(code, text)
        self.code = code
        self.text = text
        self.fatal = fatal
        self.ackFields = {}

    def __str__(self) -> str:
        return f"{self.code}: {self.text}"


class FrameTooLarge(TimProtocolError):
    """
    A frame announced or reached more bytes than the configured maximum.
    Always fatal: the rest of the stream cannot be trusted.
    """

    def __init__(self, size: int, limit: int):
        super().__init__(ErrorCode.ERR_BIGDATA, f"frame of {size} bytes exceeds the limit of {limit}", fatal=True)
        self.size = size
        self.limit = limit


class BadFrame(TimProtocolError):
    """
    A frame that could not be understood; it counts toward a connection's
    limit of bad frames.
    """

    @classmethod
    def wrap(cls, error: TimProtocolError) -> BadFrame:
        bad = cls(error.code, error.text, fatal=error.fatal)
        bad.ackFields = error.ackFields
        return bad
