"""Prometheus metrics from the coordinator's published snapshot: one custom collector, no multiprocess mode.

The coordinator sees every event of the run, so it can serve every metric itself; the collector
reads `Monitor.published` (a plain dict the loop replaces once a second) at each scrape, never the
loop's structures. Labels take bounded values only: pool, host, state, outcome, cause (no job ids,
no pids). Counters are cumulative over the run.

Job durations come from the job-time histogram the consumers already fill (runner/timing.py: 4
buckets per doubling); each of its buckets is counted under the first Prometheus bucket whose bound
is at or above its upper edge, and `_sum` adds each bucket's midpoint, so both are within that
histogram's ~19 % resolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from runner import logs
from runner.coordinator.monitor import CAUSES, Monitor
from runner.timing import bucket_ms

#: states a process is counted under (runner_processes' `state`)
PROCESS_STATES = ("starting", "idle", "busy", "stopping")
HOST_STATES = ("up", "leaving", "gone")


def bucket_lower_ms(bucket: int) -> float:
    """The lower edge of a runner.timing bucket, in milliseconds."""
    if bucket < 4:
        return bucket / 8e3
    bits, sub = divmod(bucket, 4)
    return ((4 + sub) << (bits - 3)) / 8e3


def histogram(hist: dict[int, int], bounds: list[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (seconds) and the sum, from a runner.timing histogram."""
    counts = [0] * (len(bounds) + 1)
    total_s = 0.0
    for bucket, n in hist.items():
        upper_s = bucket_ms(bucket) / 1000
        total_s += n * (bucket_lower_ms(bucket) + bucket_ms(bucket)) / 2000
        index = next((i for i, bound in enumerate(bounds) if upper_s <= bound), len(bounds))
        counts[index] += n
    cumulative, running = [], 0
    for bound, n in zip([*(floatToGoString(b) for b in bounds), "+Inf"], counts, strict=True):
        running += n
        cumulative.append((bound, float(running)))
    return cumulative, total_s


class SnapshotCollector:
    def __init__(self, monitor: Monitor, buckets: list[float]) -> None:
        self.monitor = monitor
        self.buckets = buckets

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the snapshot may not exist yet

    def collect(self) -> Iterator[Metric]:
        snap = self.monitor.published
        if snap is None:
            return
        run, pools = snap["run"], snap["pools"]
        consumers = {p: info for p, info in pools.items() if info["role"] == "consumer"}
        info = GaugeMetricFamily("runner_run_info", "The run: id, name and the runner's version (always 1).",
                                 labels=["run_id", "name", "version"])
        info.add_metric([run["run_id"], run["name"], run["version"]], 1)
        yield info
        yield from self._jobs(consumers)
        yield from self._flow(pools, consumers)
        yield from self._processes(snap)

    def _jobs(self, consumers: dict[str, Any]) -> Iterator[Metric]:
        jobs = CounterMetricFamily("runner_jobs_total", "Jobs settled, by final outcome: done or dead (each job once).",
                                   labels=["pool", "outcome"])
        failures = CounterMetricFamily("runner_job_failures_total", "Failed attempts, by cause (one per failed attempt).",
                                       labels=["pool", "cause"])
        retries = CounterMetricFamily("runner_job_retries_total", "Attempts scheduled again after a failure.", labels=["pool"])
        durations = HistogramMetricFamily("runner_job_duration_seconds", "How long job attempts ran, from the consumers' job-time histogram.",
                                          labels=["pool"])
        for pool, info in consumers.items():
            jobs.add_metric([pool, "done"], info["done"])
            jobs.add_metric([pool, "dead"], info["dead"])
            for cause in CAUSES:
                failures.add_metric([pool, cause], info["failures"].get(cause, 0))
            retries.add_metric([pool], info["retried"])
            buckets, total_s = histogram(info["hist"], self.buckets)
            durations.add_metric([pool], buckets, total_s)
        yield from (jobs, failures, retries, durations)

    def _flow(self, pools: dict[str, Any], consumers: dict[str, Any]) -> Iterator[Metric]:
        depth = GaugeMetricFamily("runner_queue_depth", "Jobs waiting in the pool's queue.", labels=["pool"])
        in_flight = GaugeMetricFamily("runner_jobs_in_flight", "Jobs handed to the pool's processes, not yet settled.", labels=["pool"])
        for pool, info in consumers.items():
            depth.add_metric([pool], info["queued"])
            in_flight.add_metric([pool], info["in_flight"])
        produced = CounterMetricFamily("runner_jobs_produced_total", "Jobs produced, by the pool that yielded or emitted them.",
                                       labels=["pool"])
        restarts = CounterMetricFamily("runner_restarts_total", "Processes started again (after a crash, or recycled).", labels=["pool"])
        for pool, info in pools.items():
            produced.add_metric([pool], info["produced"])
            restarts.add_metric([pool], info["restarts"])
        yield from (depth, in_flight, produced, restarts)

    def _processes(self, snap: dict[str, Any]) -> Iterator[Metric]:
        counted: dict[tuple[str, str, str], int] = {}
        for proc in snap["processes"]:
            key = (proc["pool"], proc["host"], proc["state"])
            counted[key] = counted.get(key, 0) + 1
        processes = GaugeMetricFamily("runner_processes", "Processes of the run, by pool, host and state.",
                                      labels=["pool", "host", "state"])
        pools_hosts = {(p, h) for p, h, _ in counted} | {(pool, logs.HOST) for pool in snap["pools"]}
        for pool, host in sorted(pools_hosts):
            for state in PROCESS_STATES:
                processes.add_metric([pool, host, state], counted.get((pool, host, state), 0))
        yield processes
        hosts = GaugeMetricFamily("runner_hosts", "Hosts of the run by state: up, leaving, gone (lost or left).", labels=["state"])
        for state in HOST_STATES:
            hosts.add_metric([state], sum(1 for s in snap["hosts"].values() if s == state))
        yield hosts

