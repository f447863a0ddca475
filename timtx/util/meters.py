# -*- test-case-name: timtx.test.test_vrooms -*-
"""
Recent rates for statistics: events per second over the last few seconds.

A L{RateMeter} keeps one counter per second of its window in a ring and
forgets seconds as they fall out of it.  Marking costs one clock read and
an addition, so it can sit on a path that runs for every stream frame; no
timer runs in the background.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class RateMeter:
    """
    Counts amounts (frames, bytes) and reports their rate per second over
    the last C{window} whole seconds of the clock, the current one included.

    @ivar total: everything ever marked.
    """

    __slots__ = ("window", "total", "_clock", "_amounts", "_seconds")

    def __init__(self, clock: IReactorTime, window: int = 10):
        self.window = window
        self.total = 0
        self._clock = clock
        self._amounts = [0] * window
        self._seconds = [-1] * window

    def mark(self, amount: int = 1) -> None:
        second = int(self._clock.seconds())
        slot = second % self.window
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._amounts[slot] = 0
        self._amounts[slot] += amount
        self.total += amount

    def rate(self) -> float:
        """
        The amount marked in the last L{window} seconds, per second.
        """
        now = int(self._clock.seconds())
        oldest = now - self.window
        recent = sum(a for a, s in zip(self._amounts, self._seconds, strict=True) if oldest < s <= now)
        return recent / self.window
