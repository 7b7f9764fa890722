"""runner.timing: nearest-rank percentiles, exact (lists) and from the job-time histogram."""

from __future__ import annotations

import math

from runner.timing import bucket_ms, nearest_rank, percentile_ms, time_bucket


def test_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert nearest_rank(values, 0.5) == 50.0
    assert nearest_rank(values, 0.95) == 95.0
    assert nearest_rank(values, 0.99) == 99.0
    assert nearest_rank(values, 1.0) == 100.0
    assert nearest_rank(values, 0.0) == 1.0
    assert nearest_rank([7.0], 0.5) == 7.0
    assert nearest_rank([1.0, 2.0, 3.0], 0.5) == 2.0  # rank ceil(1.5) = 2
    assert math.isnan(nearest_rank([], 0.5))


def test_histogram_percentile_is_the_nearest_rank_bucket() -> None:
    times = [0.0001 * (i % 37 + 1) for i in range(1000)]
    hist: dict[int, int] = {}
    for seconds in times:
        bucket = time_bucket(seconds)
        hist[bucket] = hist.get(bucket, 0) + 1
    edges = sorted(bucket_ms(time_bucket(s)) for s in times)
    for q in (0.5, 0.95, 0.99):
        assert percentile_ms(hist, q) == round(nearest_rank(edges, q), 3)
    assert percentile_ms({}, 0.5) is None


def test_buckets_are_within_a_fifth() -> None:
    for seconds in (1e-6, 3.3e-5, 0.0004, 0.012, 0.5, 7.0, 130.0):
        upper = bucket_ms(time_bucket(seconds)) / 1000
        assert seconds <= upper <= seconds * 1.26
