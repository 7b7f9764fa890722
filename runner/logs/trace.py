"""The life of one job from a run's log: produced by, each attempt (worker, host, duration, error), retries, the end."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from runner.logs.contract import DIED
from runner.logs.read import LogLine


@dataclass
class Attempt:
    number: int | None
    worker: str | None
    host: str | None
    pid: int | None
    ended: str
    outcome: str  #: done / failed / crashed
    duration_ms: float | None = None
    error: str | None = None


@dataclass
class Step:
    """One moment in a job's life, ready to print: when, what, and the details."""

    timestamp: str
    what: str
    detail: str
    line: LogLine


@dataclass
class JobTrace:
    job_id: int
    pool: str | None = None
    origin: str | None = None
    queued: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    outcome: str = "unknown"  #: done / dead / unfinished (the run ended first) / unknown
    dropped_steps: int = 0

    @property
    def found(self) -> bool:
        return bool(self.steps)


def _where(worker: Any, host: Any, pid: Any) -> str:
    return f"{worker or '?'} on {host or '?'}" + (f" (pid {pid})" if pid else "")


def trace(lines: Iterable[LogLine], job_id: int, max_steps: int = 10_000) -> JobTrace:
    """The life of one job in order: produced by, each attempt (worker, host, duration, error), retries, the end.

    A worker that dies running the job logs `worker.crashed` (with the child's pid) and the
    coordinator then logs `job.failed` for it; the two become one crashed attempt.
    """
    result = JobTrace(job_id)
    crash: LogLine | None = None
    ended = False

    def step(line: LogLine, what: str, detail: str) -> None:
        if len(result.steps) < max_steps:
            result.steps.append(Step(line.timestamp, what, detail, line))
        else:
            result.dropped_steps += 1

    for line in lines:
        fields, event = line.fields, line.event
        if event == "run.finished":
            ended = True
            continue
        if fields.get("job_id") != job_id:
            continue
        result.pool = result.pool or fields.get("pool")
        result.origin = result.origin or fields.get("origin")
        if event == "job.queued":
            result.queued = result.queued or line.timestamp
            step(line, "queued", f"produced by {fields.get('origin') or '?'} for pool {fields.get('pool')}")
        elif event == "worker.crashed":
            crash = line
            step(line, "crashed", f"{_where(fields.get('worker'), fields.get('host'), fields.get('pid'))}: {fields.get('reason')}")
        elif event in ("job.done", "job.failed"):
            attempt = _attempt(line, crash)
            crash = None if attempt.outcome == "crashed" else crash
            result.attempts.append(attempt)
            took = f" in {attempt.duration_ms:g} ms" if attempt.duration_ms is not None else ""
            what = f"attempt {attempt.number}" if attempt.number is not None else "attempt"
            detail = f"{_where(attempt.worker, attempt.host, attempt.pid)}{took}: {attempt.outcome}"
            step(line, what, detail + (f": {attempt.error}" if attempt.error else ""))
            if attempt.outcome == "done":
                result.outcome = "done"
        elif event == "job.stalled":
            frame = next((f.strip() for f in str(fields.get("stack") or "").splitlines() if f.startswith("  File ")), None)
            step(line, "stalled", f"{_where(fields.get('worker'), fields.get('host'), fields.get('pid'))}: no heartbeat for "
                                  f"{fields.get('silent_s')}s (stall_timeout {fields.get('stall_timeout')}s, {fields.get('action')})"
                                  + (f", at {frame}" if frame else ""))
        elif event == "job.retried":
            delay = fields.get("delay_ms")
            step(line, "retried", f"attempt {fields.get('attempt')} scheduled" + (f" in {delay} ms" if delay is not None else ""))
        elif event == "job.dead":
            result.outcome = "dead"
            step(line, "dead", f"dead-lettered after {fields.get('attempts')} attempt(s): {fields.get('error')}")
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if k not in _CONTEXT and v is not None)
            step(line, event, f"{fields.get('worker') or '?'}: {extra}".rstrip(": "))
    if result.outcome == "unknown" and ended and result.found:
        result.outcome = "unfinished"
    return result


_CONTEXT = frozenset({"timestamp", "level", "event", "run_id", "host", "pid", "role", "pool", "worker", "job_id", "attempt", "traceback"})


def _attempt(line: LogLine, crash: LogLine | None) -> Attempt:
    fields = line.fields
    if line.event == "job.done":
        return Attempt(fields.get("attempt"), fields.get("worker"), fields.get("host"), fields.get("pid"), line.timestamp,
                       "done", fields.get("duration_ms"))
    if fields.get("cause") in DIED:  # written by the coordinator for the dead process, with its details
        return Attempt(fields.get("attempt"), fields.get("worker"), fields.get("host"), fields.get("pid"), line.timestamp,
                       "crashed", fields.get("duration_ms"), fields.get("error"))
    by_coordinator = fields.get("role") == "coordinator" and fields.get("duration_ms") is None
    if by_coordinator and crash is not None and crash.get("worker") == fields.get("worker"):
        return Attempt(fields.get("attempt"), crash.get("worker"), crash.get("host"), crash.get("pid"), line.timestamp,
                       "crashed", None, fields.get("error"))
    pid = None if by_coordinator else fields.get("pid")
    host = None if by_coordinator else fields.get("host")
    return Attempt(fields.get("attempt"), fields.get("worker"), host, pid, line.timestamp, "failed",
                   fields.get("duration_ms"), fields.get("error"))


def job_prefilter(job_id: int) -> Any:
    """Raw-bytes test for `trace`: lines naming the job, and the run's end (so an unfinished job shows as such)."""
    pattern = re.compile(rb'"job_id":\s*%d(?![0-9.])|"event":\s*"run\.finished"' % job_id)
    return pattern.search
