"""Job times: the per-job histogram processes report, and the one nearest-rank percentile.

Consumers count each job's time into a histogram bucket (`time_bucket`, once per job, integer
operations only) and report the histogram; the coordinator reads percentiles off it
(`percentile_ms`). Exact lists of times (`runner logs summary` while it keeps them, the
benchmarks) use `nearest_rank`. Both answer the nearest rank: the value at rank ceil(q * n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Job-time histogram: 4 buckets per doubling of (1/8) microseconds, so percentiles are within ~19 %,
# computed with integer operations only (this runs once per job).
_SUB = 4


def time_bucket(seconds: float) -> int:
    ticks = int(seconds * 8e6)
    bits = ticks.bit_length()
    if bits <= 2:
        return ticks
    return bits * _SUB + ((ticks >> (bits - 3)) & 3)


def bucket_ms(bucket: int) -> float:
    """The upper edge of a bucket, in milliseconds."""
    if bucket < 4:
        return (bucket + 1) / 8e3
    bits, sub = divmod(bucket, _SUB)
    return ((4 + sub + 1) << (bits - 3)) / 8e3


def _rank(q: float, count: int) -> int:
    """The 1-based nearest rank of quantile q (0..1) among `count` values (0 for q = 0)."""
    return math.ceil(q * count)


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The q quantile (0..1) of an ascending list by nearest rank; nan for an empty list."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, min(len(sorted_values) - 1, _rank(q, len(sorted_values)) - 1))]


def percentile_ms(hist: dict[int, int], q: float) -> float | None:
    """The q quantile (0..1) of a job-time histogram by nearest rank: its bucket's upper edge, in ms."""
    total = sum(hist.values())
    if not total:
        return None
    rank = _rank(q, total)
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(bucket_ms(bucket), 3)
    return round(bucket_ms(max(hist)), 3)
