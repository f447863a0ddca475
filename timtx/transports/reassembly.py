# -*- test-case-name: timtx.test.test_bigdata -*-
"""
Big payloads (frame types 95-97) arriving on one connection: reassembly
of a payload spread over several messages, and the deadline by which it
must be whole.  The layout is in L{timtx.protocols.bigframes}; where a whole
payload goes is L{timtx.chat.bigpayloads}'s business.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from timtx.protocols.bigframes import BigDataAssembler, isBigDataFrame
from timtx.protocols.errors import TimProtocolError


class BigDataReceiver:
    """
    The big payload arriving on one connection: its reassembly, and the
    deadline by which it must be whole.

    @param maxBytes: the largest whole payload (C{[vrooms] bigdata_max_bytes}).
    @param timeout: seconds a payload has to arrive whole.
    @param timedOut: called with the payload's frame type when the deadline
        passes; the payload is already forgotten.
    """

    def __init__(self, maxBytes: int, timeout: float, clock: IReactorTime, timedOut: Callable[[int], object]):
        self._assembler = BigDataAssembler(maxBytes)
        self._timeout = timeout
        self._clock = clock
        self._timedOut = timedOut
        self._timer: IDelayedCall | None = None

    @property
    def timType(self) -> int:
        """
        The frame type of the payload begun last.
        """
        return self._assembler.timType

    @property
    def pending(self) -> bool:
        """
        Whether a big payload is being reassembled: the next message
        continues it, whatever its first byte.
        """
        return bool(self._assembler.pending)

    def claims(self, data: bytes) -> bool:
        """
        Whether C{data} starts or continues a big payload.
        """
        return self._assembler.pending or isBigDataFrame(data)

    def feed(self, data: bytes) -> bytes | None:
        """
        @return: the whole frame, without its length field, once complete.
        @raise TimProtocolError: see L{BigDataAssembler.feed}.
        """
        try:
            frame = self._assembler.feed(data)
        except TimProtocolError:
            self.cancel()
            raise
        if not self._assembler.pending:
            self.cancel()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._expired)
        return frame

    def _expired(self) -> None:
        self._timer = None
        self._assembler.reset()
        self._timedOut(self._assembler.timType)

    def close(self) -> None:
        """
        The connection closed: forget the payload and the callback, so that
        nothing of the connection is kept alive through this receiver.
        """
        self.cancel()
        self._timedOut = _ignore

    def cancel(self) -> None:
        """
        Forget any pending payload and its deadline.
        """
        self._assembler.reset()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _ignore(timType: int) -> None:
    pass
