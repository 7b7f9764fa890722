"""Answers from a run's log: the life of one job, a summary per pool, worker and host, a timeline.

Each reads the lines once, in order, and keeps bounded state (sketches, capped tables, doubling
buckets), so a log of any size fits in flat memory. Reading, merging and filtering live in
runner/logread.py and are re-exported here: `runner.logview` is the one import the CLI needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from ddsketch import DDSketch

from runner.logs import EVENTS, RESERVED_PREFIXES
from runner.logread import (  # noqa: F401  (re-exported)
    LEVELS,
    Damage,
    LineFilter,
    LogLine,
    LogSourceError,
    RunInfo,
    coordinator_alive,
    elapsed_text,
    find_runs,
    follow_file,
    parse_line,
    parse_when,
    read_file,
    read_lines,
    resolve_sources,
    run_info,
    stamp_seconds,
    take,
)

#: events the runner itself writes (log contract); others in these namespaces are unknown
KNOWN_EVENTS = EVENTS
#: a job.failed `cause` meaning its process died under it (`crash`: written before causes were named)
DIED = frozenset({"crash", "crashed", "timed_out", "stalled", "memory"})
#: fields an analysis needs from an event; a line without them is skipped and counted as damaged
NEEDS = {
    "job.queued": ("job_id",), "job.done": ("job_id",), "job.failed": ("job_id",), "job.retried": ("job_id",),
    "job.dead": ("job_id",), "worker.started": ("worker",), "worker.crashed": ("worker",), "progress": ("done",),
    "run.finished": ("status",),
}


def checked(lines: Iterable[LogLine], damage: Damage) -> Iterator[LogLine]:
    """Lines an analysis can use: runner events it knows, with the fields it needs; user events pass."""
    for line in lines:
        event = line.event
        if event.startswith(RESERVED_PREFIXES) and event not in KNOWN_EVENTS:
            damage.note(line.source, line.number, f"unknown event {event!r}")
            continue
        for key in NEEDS.get(event, ()):
            if line.fields.get(key) is None:
                damage.note(line.source, line.number, f"{event} without {key!r}")
                break
        else:
            yield line


# -- trace ----------------------------------------------------------------------------------
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
    import re

    pattern = re.compile(rb'"job_id":\s*%d(?![0-9.])|"event":\s*"run\.finished"' % job_id)
    return pattern.search


# -- summary --------------------------------------------------------------------------------
class Quantiles:
    """Job times: exact up to `cap` values, then a DDSketch (1% relative error, bounded memory)."""

    def __init__(self, cap: int = 10_000) -> None:
        self.cap = cap
        self.values: list[float] | None = []
        self.sketch: DDSketch | None = None
        self.count = 0

    def add(self, value: float) -> None:
        self.count += 1
        if self.values is not None:
            self.values.append(value)
            if len(self.values) > self.cap:
                self.sketch = DDSketch(relative_accuracy=0.01)
                for kept in self.values:
                    self.sketch.add(kept)
                self.values = None
        else:
            assert self.sketch is not None
            self.sketch.add(value)

    def quantile(self, q: float) -> float | None:
        """Nearest rank while exact; the sketch's estimate after."""
        if not self.count:
            return None
        if self.values is not None:
            ordered = sorted(self.values)
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        assert self.sketch is not None
        value = self.sketch.get_quantile_value(q)
        return None if value is None else round(value, 3)


FIGURES = ("done", "failed", "retried", "dead", "crashes", "restarts")


def _percentiles(times: Quantiles | None, fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    if times is not None and times.count:
        return {**{f"p{q}_ms": times.quantile(q / 100) for q in (50, 95, 99)}, "times_from": "lines"}
    if fallback and any(fallback.get(f"p{q}_ms") is not None for q in (50, 95, 99)):
        return {**{f"p{q}_ms": fallback.get(f"p{q}_ms") for q in (50, 95, 99)}, "times_from": "run.finished"}
    return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "times_from": None}


class Throughput:
    """Jobs done over time, in at most 2*slots buckets whose width doubles as the run grows."""

    def __init__(self, slots: int = 30, width_s: float = 0.1) -> None:
        self.slots = slots
        self.width_s = width_s
        self.origin: float | None = None
        self.end = 0.0
        self.counts: list[int] = []

    def add(self, seconds: float, jobs: int) -> None:
        if self.origin is None:
            self.origin = seconds
        offset = max(0.0, seconds - self.origin)
        self.end = max(self.end, offset)
        index = int(offset / self.width_s)
        while index >= 2 * self.slots:
            self.counts = [sum(self.counts[i:i + 2]) for i in range(0, len(self.counts), 2)]
            self.width_s *= 2
            index = int(offset / self.width_s)
        if len(self.counts) <= index:
            self.counts.extend([0] * (index + 1 - len(self.counts)))
        self.counts[index] += max(0, jobs)

    def rates(self) -> list[float]:
        return [count / self.width_s for count in self.counts]


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A unicode block chart: one character per value, ' ' for zero."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    return "".join(" " if v <= 0 else SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))] for v in values)


@dataclass
class ErrorGroup:
    message: str
    count: int = 0
    first: str = ""
    last: str = ""
    examples: list[int] = field(default_factory=list)


class ErrorTable:
    """Errors grouped by message (first line, 200 chars); at most `cap` groups, the rest counted as other."""

    def __init__(self, cap: int = 1000) -> None:
        self.cap = cap
        self.groups: dict[str, ErrorGroup] = {}
        self.other = 0

    def add(self, message: Any, timestamp: str, job_id: Any) -> None:
        text = str(message).strip()
        key = text.splitlines()[0][:200] if text else "(no message)"
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= self.cap:
                self.other += 1
                return
            group = self.groups[key] = ErrorGroup(key, first=timestamp, last=timestamp)
        group.count += 1
        group.first = min(group.first, timestamp)
        group.last = max(group.last, timestamp)
        if isinstance(job_id, int) and job_id not in group.examples and len(group.examples) < 3:
            group.examples.append(job_id)

    def top(self, n: int = 10) -> list[ErrorGroup]:
        return sorted(self.groups.values(), key=lambda g: (-g.count, g.first))[:n]


class Summary:
    """Per pool, worker and host: done, failed, retried, dead, crashes, restarts and job time percentiles.

    Counts of a run that logged `run.finished` are the ledger's figures from that line (a job
    re-run after its worker crashed is logged done twice, but settled once); a run without it
    (running, crashed) is counted from its lines. Job times always come from job.done/job.failed
    lines, and from run.finished only when the run logged none (`logs.jobs: failures`).
    """

    def __init__(self, failed_by_cap: int = 100_000) -> None:
        self.counts: dict[tuple[str, Any, str], dict[str, int]] = {}  #: (pool|worker, run, name) -> figures
        self.times: dict[tuple[str, str], Quantiles] = {}  #: (pool|worker|host, name) -> job times
        self.worker_home: dict[str, tuple[Any, Any]] = {}  #: worker -> (pool, host)
        self.errors = ErrorTable()
        self.done_rate = Throughput()
        self.progress_rate = Throughput()
        self.progress_done: dict[Any, int] = {}
        self.runs: dict[str, dict[str, Any]] = {}  #: run_id -> name, started, status, duration_s
        self.finished: dict[Any, dict[str, Any]] = {}  #: run_id -> run.finished's pools and workers
        self.failed_by: dict[tuple[Any, int], str] = {}  #: the worker a job last failed on, bounded
        self.failed_by_cap = failed_by_cap
        self.lines = 0
        self.first: str | None = None
        self.last: str | None = None

    def _bump(self, kind: str, run: Any, name: Any, key: str) -> None:
        figures = self.counts.setdefault((kind, run, str(name)), dict.fromkeys(FIGURES, 0))
        figures[key] += 1

    def _time(self, kind: str, name: Any, value: float) -> None:
        times = self.times.get((kind, str(name)))
        if times is None:
            times = self.times[(kind, str(name))] = Quantiles()
        times.add(value)

    def add_all(self, lines: Iterable[LogLine]) -> Summary:
        for line in lines:
            self.add(line)
        return self

    def add(self, line: LogLine) -> None:
        fields, event = line.fields, line.event
        self.lines += 1
        self.first = self.first or line.timestamp
        self.last = line.timestamp if self.last is None else max(self.last, line.timestamp)
        run = fields.get("run_id")
        if event == "job.done" or event == "job.failed":
            self._job_ended(line, run)
        elif event == "job.retried" or event == "job.dead":
            key = "retried" if event == "job.retried" else "dead"
            self._bump("pool", run, fields.get("pool"), key)
            worker = self.failed_by.pop((run, fields["job_id"]), None)
            if worker is not None:
                self._bump("worker", run, worker, key)
        elif event == "worker.started":
            self._home(fields)
            if (fields.get("restart") or 0) > 0:
                self._bump("worker", run, fields["worker"], "restarts")
                self._bump("pool", run, fields.get("pool"), "restarts")
        elif event == "worker.crashed":
            self._home(fields)
            self._bump("worker", run, fields["worker"], "crashes")
            self._bump("pool", run, fields.get("pool"), "crashes")
            if fields.get("job_id") is None:
                self.errors.add(f"worker crashed: {fields.get('reason')}", line.timestamp, None)
        elif event == "producer.failed" or event == "pool.failed":
            self.errors.add(fields.get("error") or fields.get("reason"), line.timestamp, None)
        elif event == "progress":
            done = int(fields["done"])
            self.progress_rate.add(stamp_seconds(line.timestamp), done - self.progress_done.get(run, 0))
            self.progress_done[run] = done
        elif event == "run.started":
            self.runs.setdefault(str(run), {}).update(name=fields.get("name"), started=line.timestamp, host=fields.get("host"))
        elif event == "run.finished":
            self.runs.setdefault(str(run), {}).update(status=fields.get("status"), duration_s=fields.get("duration_s"))
            self.finished[run] = {"pools": fields.get("pools") or {}, "workers": fields.get("workers") or {}}

    def _home(self, fields: dict[str, Any]) -> None:
        if fields.get("worker") not in self.worker_home:
            self.worker_home[str(fields["worker"])] = (fields.get("pool"), fields.get("host"))

    def _job_ended(self, line: LogLine, run: Any) -> None:
        fields = line.fields
        key = "done" if line.event == "job.done" else "failed"
        worker = str(fields.get("worker"))
        if fields.get("role") == "coordinator":  # after a crash: the host is the dead worker's, not the coordinator's
            host = self.worker_home.get(worker, (None, None))[1]
        else:
            host = fields.get("host")
            if worker not in self.worker_home:
                self.worker_home[worker] = (fields.get("pool"), host)
        self._bump("pool", run, fields.get("pool"), key)
        self._bump("worker", run, worker, key)
        duration = fields.get("duration_ms")
        if isinstance(duration, (int, float)):
            self._time("pool", fields.get("pool"), duration)
            self._time("worker", worker, duration)
            if host is not None:
                self._time("host", host, duration)
        if key == "failed":
            self.errors.add(fields.get("error"), line.timestamp, fields.get("job_id"))
            if worker != "coordinator":
                if len(self.failed_by) >= self.failed_by_cap:
                    self.failed_by.pop(next(iter(self.failed_by)))
                self.failed_by[(run, fields["job_id"])] = worker
        else:
            self.done_rate.add(stamp_seconds(line.timestamp), 1)

    def _totals(self, kind: str) -> dict[str, dict[str, int]]:
        """Figures per name over all runs: each from run.finished where that line has it, else from the lines."""
        totals: dict[str, dict[str, int]] = {}
        for (counted_kind, run, name), figures in self.counts.items():
            if counted_kind != kind:
                continue
            finished = self.finished.get(run, {}).get("pools" if kind == "pool" else "workers", {}).get(name, {})
            total = totals.setdefault(name, dict.fromkeys(FIGURES, 0))
            for key in FIGURES:
                total[key] += int(finished[key] or 0) if key in finished else figures[key]
        for run, finished in self.finished.items():
            for name, figures in finished["pools" if kind == "pool" else "workers"].items():
                if kind == "worker" and name not in self.worker_home:
                    self.worker_home[str(name)] = (figures.get("pool"), figures.get("host"))
                if (kind, run, str(name)) in self.counts:
                    continue
                total = totals.setdefault(str(name), dict.fromkeys(FIGURES, 0))
                for key in FIGURES:
                    total[key] += int(figures.get(key) or 0)
        return totals

    def result(self, top_errors: int = 10) -> dict[str, Any]:
        """The summary as plain data (what `runner logs summary --json` prints)."""
        fallback = next(iter(self.finished.values()))["pools"] if len(self.finished) == 1 else {}
        pools = {name: {**figures, **_percentiles(self.times.get(("pool", name)), fallback.get(name))}
                 for name, figures in sorted(self._totals("pool").items()) if name != "None"}
        workers: dict[str, dict[str, Any]] = {}
        hosts: dict[str, dict[str, Any]] = {}
        for name, figures in sorted(self._totals("worker").items()):
            if name in ("None", "coordinator"):
                continue
            pool, host = self.worker_home.get(name, (None, None))
            workers[name] = {"pool": pool, "host": host, **figures, **_percentiles(self.times.get(("worker", name)))}
            total = hosts.setdefault(str(host), dict.fromkeys(FIGURES, 0))
            for key in FIGURES:
                total[key] += figures[key]
        for name, total in hosts.items():
            total.update(_percentiles(self.times.get(("host", name))))
        rate = self.done_rate if self.done_rate.counts else self.progress_rate
        return {
            "runs": self.runs,
            "lines": self.lines,
            "first": self.first,
            "last": self.last,
            "counts_from": "run.finished" if self.finished and all(r in self.finished for r in self.runs) else "lines",
            "pools": pools,
            "workers": workers,
            "hosts": dict(sorted(hosts.items())),
            "throughput": {"from": "job.done" if rate is self.done_rate else "progress", "bucket_s": rate.width_s,
                           "span_s": round(rate.end, 3), "jobs_per_s": [round(r, 2) for r in rate.rates()]},
            "errors": [{"message": g.message, "count": g.count, "first": g.first, "last": g.last, "examples": g.examples}
                       for g in self.errors.top(top_errors)],
            "other_errors": self.errors.other,
        }


def summarize(lines: Iterable[LogLine], damage: Damage) -> dict[str, Any]:
    return Summary().add_all(checked(lines, damage)).result()


# -- timeline -------------------------------------------------------------------------------
def _us(stamp: str) -> int:
    return round(stamp_seconds(stamp) * 1_000_000)


class Timeline:
    """Writes a Chrome trace-event JSON file while reading: one process per host, one track per OS process.

    Each job attempt with a duration (job.done / job.failed from the worker) is a complete event
    ("ph": "X") ending at its line's timestamp; crashes and run events are instants; `progress`
    feeds counters. Opens in Perfetto (ui.perfetto.dev) and chrome://tracing.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hosts: dict[str, int] = {}
        self.tracks: dict[tuple[int, int], int] = {}  #: (host, pid) -> end of the last slice, µs
        self.count = 0
        self.runs: set[str] = set()
        self.out.write(b'{"traceEvents":[\n')

    def _emit(self, event: dict[str, Any]) -> None:
        if self.count:
            self.out.write(b",\n")
        self.out.write(orjson.dumps(event))
        self.count += 1

    def _track(self, fields: dict[str, Any], pid: Any = None, name: str | None = None) -> tuple[int, int]:
        host = str(fields.get("host"))
        if host not in self.hosts:
            self.hosts[host] = len(self.hosts) + 1
            self._emit({"name": "process_name", "ph": "M", "pid": self.hosts[host], "args": {"name": f"host {host}"}})
        tid = int(pid if pid is not None else fields.get("pid") or 0)
        key = (self.hosts[host], tid)
        if key not in self.tracks:
            self.tracks[key] = 0
            label = name or f"{fields.get('worker')} (pid {tid})"
            self._emit({"name": "thread_name", "ph": "M", "pid": key[0], "tid": tid, "args": {"name": label}})
        return key

    def add(self, line: LogLine) -> None:
        fields, event = line.fields, line.event
        if fields.get("run_id"):
            self.runs.add(str(fields["run_id"]))
        if event == "worker.started":
            restart = fields.get("restart") or 0
            self._track(fields, name=f"{fields.get('worker')} (pid {fields.get('pid')}" + (f", restart {restart})" if restart else ")"))
        elif event in ("job.done", "job.failed") and fields.get("role") != "coordinator" and isinstance(fields.get("duration_ms"), (int, float)):
            key = self._track(fields)
            end = _us(line.timestamp)
            start = max(end - round(fields["duration_ms"] * 1000), self.tracks[key])
            self.tracks[key] = max(self.tracks[key], end)
            failed = event == "job.failed"
            outcome = ("crashed" if fields.get("cause") in DIED else "failed") if failed else "done"
            args = {"job_id": fields.get("job_id"), "attempt": fields.get("attempt"), "pool": fields.get("pool"),
                    "duration_ms": fields["duration_ms"], "outcome": outcome}
            if failed:
                args["error"] = fields.get("error")
            self._emit({"name": f"job {fields.get('job_id')}" + (" failed" if failed else ""), "cat": str(fields.get("pool")),
                        "ph": "X", "ts": start, "dur": max(0, end - start), "pid": key[0], "tid": key[1], "args": args,
                        **({"cname": "terrible"} if failed else {})})
        elif event == "worker.crashed":
            key = self._track(fields)
            self._emit({"name": "worker.crashed", "cat": str(fields.get("pool")), "ph": "i", "s": "t", "ts": _us(line.timestamp),
                        "pid": key[0], "tid": key[1], "args": {k: fields.get(k) for k in ("worker", "reason", "job_id", "code", "signal")}})
        elif event == "progress":
            key = self._track(fields, name="coordinator")
            self._emit({"name": "jobs", "ph": "C", "ts": _us(line.timestamp), "pid": key[0],
                        "args": {k: fields.get(k) or 0 for k in ("done", "queued", "in_flight", "failed", "dead")}})
        elif event.startswith("run.") or event in ("pool.failed", "producer.failed", "host.lost"):
            key = self._track(fields, name="coordinator" if fields.get("role") == "coordinator" else None)
            args = {k: v for k, v in fields.items() if k in ("status", "reason", "signal", "error", "name", "pool")}
            self._emit({"name": event, "ph": "i", "s": "p", "ts": _us(line.timestamp), "pid": key[0], "tid": key[1], "args": args})

    def close(self) -> int:
        other = {"runs": sorted(self.runs), "generator": "runner logs timeline"}
        self.out.write(b'\n],"displayTimeUnit":"ms","otherData":' + orjson.dumps(other) + b"}\n")
        return self.count


def write_timeline(lines: Iterable[LogLine], out: IO[bytes], damage: Damage) -> int:
    """Stream `lines` into `out` as trace-event JSON; returns the number of events written."""
    timeline = Timeline(out)
    for line in checked(lines, damage):
        timeline.add(line)
    return timeline.close()
