"""Figures of a run, from the ledger and the process records: counts, per-pool summaries, status."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from runner.coordinator.ledger import Ledger
from runner.coordinator.members import Member
from runner.timing import percentile_ms


def counts(ledger: Ledger) -> dict[str, int]:
    stats = ledger.stats.values()
    return {
        "produced": ledger.produced, "done": sum(s.done for s in stats), "failed": sum(s.failed for s in stats),
        "retried": sum(s.retried for s in stats), "dead": sum(s.dead for s in stats),
        "queued": ledger.queued(), "in_flight": ledger.in_flight_jobs,
    }


def pool_summary(ledger: Ledger, elapsed: float) -> dict[str, dict[str, Any]]:
    elapsed = max(elapsed, 1e-9)
    return {
        pool: {"done": s.done, "failed": s.failed, "retried": s.retried, "dead": s.dead,
               "p50_ms": percentile_ms(s.hist, 0.5), "p95_ms": percentile_ms(s.hist, 0.95),
               "p99_ms": percentile_ms(s.hist, 0.99), "jobs_per_s": round(s.done / elapsed, 1)}
        for pool, s in ledger.stats.items()
    }


def status(run_id: str, name: str, state: str, started: float, rate: float, local_host: str, ledger: Ledger,
           members: list[Member], hosts: Iterable[Any]) -> dict[str, Any]:
    """What `runner status` shows: hosts, pools, processes, queues, counts, rate."""
    now = time.monotonic()
    host_info: dict[str, Any] = {local_host: {"address": "local", "processes": 0}}
    for host in hosts:
        host_info[host.name] = {"address": "remote", "processes": 0, "pid": host.pid, "last_seen_s": round(now - host.last_seen, 3)}
    pools: dict[str, Any] = {}
    for member in members:
        host_info.setdefault(member.host, {"processes": 0})["processes"] += 1
        entry = pools.setdefault(member.pool, {"role": member.role, "processes": 0, "ready": 0, "in_flight_batches": 0})
        entry["processes"] += 1
        entry["ready"] += int(member.ready)
        entry["in_flight_batches"] += len(member.outstanding)
    for pool, stats in ledger.stats.items():
        pools.setdefault(pool, {"role": "consumer", "processes": 0}).update(
            queued=ledger.queued(pool), done=stats.done, failed=stats.failed, dead=stats.dead, retried=stats.retried)
    return {"run_id": run_id, "name": name, "state": state, "pid": os.getpid(), "elapsed_s": round(now - started, 3),
            "rate": rate, "counts": counts(ledger), "hosts": host_info, "pools": pools, "processes": [
                {"worker": p.name, "host": p.host, "pool": p.pool, "pid": p.pid, "ready": p.ready, "batches": len(p.outstanding),
                 "rss": p.resident(), **job_now(ledger, p)}
                for p in members]}


def job_now(ledger: Ledger, member: Member) -> dict[str, Any]:
    """The job a process runs now (as last known), how long it has run, and its last ctx.heartbeat progress."""
    known = member.job_now()
    batch = ledger.in_flight.get(known[0][0]) if known else None
    if known is None or batch is None or batch.owner != member.key or not 0 <= known[0][1] < batch.n:
        return {"job_id": None, "running_s": None, "progress": None}
    (batch_id, index), seconds = known
    progress = member.progress[2] if member.progress and tuple(member.progress[:2]) == (batch_id, index) else None
    return {"job_id": batch.job_id(index), "running_s": round(seconds, 3), "progress": progress}
