"""The guarantees at full speed: batching on (256 jobs a batch), processes and hosts dying mid-batch.

No job of a half-done batch may be lost, and none may appear twice in the results.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import log_events, run_config, wait_for
from test_multihost import address, cleanup, config, coordinator, exactly_once, finish, joined, worker  # noqa: F401 (cleanup: fixture)

pytestmark = pytest.mark.timeout(120)

CRASHY = """
import os, signal

def produce(ctx, n):
    for i in range(n):
        yield {"i": i}

def consume(ctx, job):
    if job["i"] in ctx.params["die_at"] and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # in the middle of a batch of trivial jobs
    return job["i"]
"""


def test_sigkill_mid_batch_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    n, die_at = 30_000, [5_001, 12_345, 20_002]
    cfg = {
        "name": "chaos",
        "queue": {"maxsize": 10_000, "batch": 256},
        "producers": [{"name": "prod", "task": "tasks:produce", "params": {"n": n}}],
        "consumers": [{"name": "work", "task": "tasks:consume", "processes": 2, "retries": 1, "retry_backoff": "10ms",
                       "params": {"die_at": die_at}}],
        "results": "results.jsonl",
        "logs": {"dir": "logs"},
        "start_method": "fork",
    }
    run = run_config(tmp_path, cfg, tasks=CRASHY, timeout=100)
    assert run.process.returncode == 0, run.stderr[-3000:]
    results = run.results()
    ids = [r["job_id"] for r in results]
    assert len(ids) == len(set(ids)) == n
    assert sorted(r["result"] for r in results) == list(range(n))
    crashed = run.events("worker.crashed")
    assert len(crashed) == len(die_at)
    assert all(e["job_id"] is not None and "SIGKILL" in e["reason"] for e in crashed)
    # the batches were big: each death left other jobs of its batch to put back
    assert sum(e["requeued"] for e in crashed) >= len(die_at)
    finished = run.events("run.finished")[0]
    assert (finished["done"], finished["dead"], finished["retried"]) == (n, 0, len(die_at))


def test_host_lost_mid_batch_loses_and_duplicates_nothing(tmp_path: Path, cleanup: list) -> None:
    n, bind = 20_000, address()
    cfg = config(n=n, work=0.0002, local=0)
    cfg["queue"] = {"maxsize": 5_000, "batch": 256}
    run = coordinator(tmp_path, cleanup, cfg, "--bind", bind)
    victim = worker(tmp_path, cleanup, bind, "hostb", "--processes", "2")
    survivor = worker(tmp_path, cleanup, bind, "hostc", "--processes", "2")
    joined(tmp_path, "hostb", "hostc")
    wait_for(lambda: any(e["done"] >= 2_000 for e in log_events(tmp_path, "progress")), timeout=60, what="2,000 jobs done")
    victim.kill_group(signal.SIGKILL)
    wait_for(lambda: log_events(tmp_path, "host.lost", host="hostb"), what="host.lost hostb")
    finish(run, survivor, timeout=90)
    exactly_once(run, n)
    put_back = [e for e in run.events("worker.crashed") if e["host"] == "hostb"]
    assert put_back and sum(e["requeued"] for e in put_back) > 0
