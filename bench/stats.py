"""
Latency histograms that merge across processes.

Values are microseconds.  A value lands in bucket C{floor(log(v + 1) /
log(1.01))}, so a percentile read from the merged buckets is within 1% of
the exact one, whatever the range; the maximum is kept exactly.  Buckets
travel between processes as a plain dict, a few hundred entries at most.
"""

from __future__ import annotations

import math
from typing import Any

_STEP = math.log(1.01)


class Histogram:
    __slots__ = ("buckets", "count", "total", "max")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.max = 0

    def add(self, micros: int) -> None:
        if micros < 0:
            micros = 0
        index = int(math.log(micros + 1) / _STEP)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.total += micros
        if micros > self.max:
            self.max = micros

    def merge(self, other: Histogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        """
        The value below which a fraction C{q} of the samples lie, in
        microseconds (0 for an empty histogram).
        """
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                # The middle of the bucket, never above the true maximum.
                low = math.exp(index * _STEP) - 1
                high = math.exp((index + 1) * _STEP) - 1
                return min((low + high) / 2, float(self.max))
        return float(self.max)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def toJSON(self) -> dict[str, Any]:
        return {"buckets": {str(k): v for k, v in self.buckets.items()}, "total": self.total, "max": self.max}

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Histogram:
        self = cls()
        self.buckets = {int(k): v for k, v in data["buckets"].items()}
        self.count = sum(self.buckets.values())
        self.total = data["total"]
        self.max = data["max"]
        return self

    def summary(self) -> dict[str, float]:
        """
        Milliseconds: p50, p99, max, mean; and the sample count.
        """
        return {
            "samples": self.count,
            "p50_ms": round(self.percentile(0.50) / 1000, 3),
            "p99_ms": round(self.percentile(0.99) / 1000, 3),
            "max_ms": round(self.max / 1000, 3),
            "mean_ms": round(self.mean / 1000, 3),
        }


def merged(histograms: list[dict[str, Any]]) -> Histogram:
    result = Histogram()
    for data in histograms:
        result.merge(Histogram.fromJSON(data))
    return result
