# -*- test-case-name: timtx.test.test_histogram -*-
"""
Latency histograms cheap enough for the delivery paths.

A L{Histogram} counts observations in fixed buckets, as a Prometheus
histogram does, so that C{/metrics} can export it unchanged and the
dashboard can read percentiles from it.  It is a list of integers and a
sum: observing costs one bisection and two additions, no lock (everything
that observes runs on the reactor thread) and no allocation, so it may sit
on a path that runs once per message.  Paths that run once per session
per message (group fan-out) count in plain attributes instead, and sample.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

#: Bucket bounds for latencies on one node, in seconds: 25 us to 10 s,
#: about three to a decade (the fan-out of a message to a few sessions
#: takes tens of microseconds; a slow store call, seconds).
LATENCY_BOUNDS: tuple[float, ...] = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """
    Observations counted in buckets with fixed upper bounds, plus one
    bucket for everything above the last bound.

    @ivar bounds: the upper bounds, increasing.
    @ivar counts: observations per bucket (not cumulative); one more entry
        than L{bounds}, the last for values above every bound.
    @ivar sum: the sum of every observation.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS):
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("bounds must increase")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """
        Count one observation.  A value equal to a bound falls in that
        bound's bucket (Prometheus's C{le}).
        """
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """
        The count at or below each bound, then the total: Prometheus's
        C{_bucket} series, the last one being C{le="+Inf"}.
        """
        total = 0
        out = []
        for n in self.counts:
            total += n
            out.append(total)
        return out

    def snapshot(self) -> tuple[list[int], float]:
        """
        A copy of the counts and the sum, to subtract later (L{since}).
        """
        return list(self.counts), self.sum

    def since(self, earlier: tuple[list[int], float]) -> tuple[list[int], float]:
        """
        What was observed after the L{snapshot} C{earlier}: counts per bucket
        and their sum.
        """
        counts, total = earlier
        return [now - then for now, then in zip(self.counts, counts, strict=True)], self.sum - total


def percentile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """
    The C{q} quantile (0 < q <= 1) of observations counted in C{counts}
    (per bucket, not cumulative), interpolated linearly inside its bucket
    as Prometheus's C{histogram_quantile} does; C{None} without
    observations.  A quantile in the overflow bucket is reported as the
    last bound: the histogram knows no more.
    """
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, n in enumerate(counts):
        if n and seen + n >= rank:
            if index >= len(bounds):
                return bounds[-1]
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * (rank - seen) / n
        seen += n
    return bounds[-1]


class StoreStats:
    """
    What a node saw of its store: a latency L{Histogram} per operation,
    outcomes counted, and whether the last call reached the database.
    Fed by L{timtx.persistence.timed.TimedStore}.

    @ivar latency: operation name -> L{Histogram} of seconds.
    @ivar outcomes: C{"ok"}, C{"unavailable"}, C{"conflict"}, C{"error"} -> calls.
    @ivar available: C{False} from a call that could not reach the database
        until one that succeeds.
    """

    def __init__(self) -> None:
        self.latency: dict[str, Histogram] = {}
        self.outcomes: dict[str, int] = {"ok": 0, "unavailable": 0, "conflict": 0, "error": 0}
        self.available = True

    def observe(self, operation: str, seconds: float, outcome: str) -> None:
        histogram = self.latency.get(operation)
        if histogram is None:
            histogram = self.latency[operation] = Histogram()
        histogram.observe(seconds)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome == "ok":
            self.available = True
        elif outcome == "unavailable":
            self.available = False

    def merged(self) -> Histogram:
        """
        Every operation's latencies in one histogram.
        """
        total = Histogram()
        for histogram in self.latency.values():
            total.counts = [a + b for a, b in zip(total.counts, histogram.counts, strict=True)]
            total.sum += histogram.sum
        return total
