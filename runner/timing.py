"""Job times: a histogram cheap enough to fill once per job, and the one percentile rule.

4 buckets per doubling of (1/8) microseconds, so percentiles are within ~19 %, computed with integer
operations only (time_bucket runs once per job on the consumer's hot path). Percentiles are nearest
rank everywhere: over a histogram (the coordinator's p50/p95/p99) and over exact values (log summaries
and the benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of values already sorted."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def percentile_ms(hist: dict[int, int], q: float) -> float | None:
    """The nearest-rank q-quantile of a histogram, as its bucket's upper edge in ms."""
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(bucket_ms(bucket), 3)
    return round(bucket_ms(max(hist)), 3)
