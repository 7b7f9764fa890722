"""Task code shared by every system the benchmark runs, so they all do the same work per job.

The runner imports this module from its run folder (the harness copies it next to each config);
the raw baselines import it from bench/. Producers build the same small dict inline in every system.
"""

from __future__ import annotations

import os
import time


# -- trivial jobs ---------------------------------------------------------------------------------
def produce(ctx, n=1000):
    """Runner producer: `n` small dicts."""
    for i in range(n):
        yield {"i": i, "name": "job", "value": 1.5}


def nothing(ctx, job):
    """Runner consumer that does nothing."""


def nothing_job(job):
    """Baseline consumer that does nothing (same work as `nothing`)."""


# -- CPU-bound jobs -------------------------------------------------------------------------------
def spin(loops):
    """Pure-Python work: `loops` iterations of integer arithmetic (holds the GIL, no I/O)."""
    x = 0
    for i in range(loops):
        x += i * i % 7
    return x


def cpu_produce(ctx, n=100):
    for i in range(n):
        yield {"i": i}


def cpu_consume(ctx, job):
    spin(ctx.params["loops"])


def cpu_job(args):
    """Baseline CPU-bound job: args is (i, loops)."""
    spin(args[1])


# -- latency at a fixed rate ----------------------------------------------------------------------
def pace(n, rate):
    """Yield (i, stamp_ns) on a deadline schedule of `rate` a second; the stamp is taken just before
    the job leaves the producer's code. A late job does not shift the schedule (no drift)."""
    period = 1e9 / rate
    start = time.monotonic_ns()
    for i in range(n):
        due = start + int(i * period)
        now = time.monotonic_ns()
        if due > now:
            time.sleep((due - now) / 1e9)
        yield i, time.monotonic_ns()


def paced_produce(ctx, n=1000, rate=1000, gate=None):
    """Runner producer: `n` jobs at `rate` jobs/s, each stamped with time.monotonic_ns(). With `gate`, first
    one probe job (i = -1), and the paced jobs only once a consumer has run it (it writes the file `gate`):
    the latency of a run whose consumers are there, not of their start (or, over ZeroMQ, of the worker
    host's join, which waits for the run's keys with backoff when the worker starts first)."""
    if gate:
        yield {"i": -1, "t": time.monotonic_ns(), "gate": gate}
        deadline = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.002)
    for i, stamp in pace(n, rate):
        yield {"i": i, "t": stamp}


def stamp_consume(ctx, job):
    """Runner consumer: the produce-to-consume latency in ns (CLOCK_MONOTONIC is system-wide)."""
    if "gate" in job:  # paced_produce's probe: the paced jobs may start
        open(job["gate"], "w").close()
    return {"i": job["i"], "lat_ns": time.monotonic_ns() - job["t"], "host": ctx.host}
