"""A summary of a run's log: per pool, worker and host, job time percentiles, throughput and top errors.

It reads the lines once, in order, and keeps bounded state (sketches, capped tables, doubling
buckets), so a log of any size fits in flat memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch

from runner.logs.read import Damage, LogLine, checked, stamp_seconds
from runner.timing import nearest_rank


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
            return nearest_rank(sorted(self.values), q)
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
        elif event == "run.resumed":  # a run.finished before it (a stop) is no longer the run's end
            self.runs.setdefault(str(run), {}).pop("status", None)
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
