"""What the run shows outside itself: a few counters the ledger does not keep, and a published snapshot.

The loop owns everything here. Once a second (and at the end) it builds a snapshot, a plain dict of
plain values, and replaces `published` with it in one assignment; the HTTP threads (Prometheus'
/metrics, the dashboard) read only that dict, never the loop's live structures. `turned` is the
last time the loop went round, for /healthz.

Counted here, where the events happen: failed attempts by cause, jobs produced per producing pool,
the totals producers declare (for the ETA), and the latest failures (bounded: RECENT_FAILURES).
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Protocol

from runner import __version__, logs
from runner.config import RunConfig
from runner.coordinator import report
from runner.coordinator.ledger import Job, Ledger
from runner.coordinator.members import Member
from runner.timing import percentile_ms

#: failures kept for the dashboard (older ones are in the log)
RECENT_FAILURES = 50
#: characters of a traceback kept per failure
TRACEBACK_CHARS = 8000
#: a snapshot is published this often while the run goes
PUBLISH_S = 1.0
#: points of the jobs/s history (one a publish)
HISTORY = 60
#: causes of a failed attempt (runner_job_failures_total's `cause` label)
CAUSES = ("error", "crashed", "timed_out", "stalled", "memory")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class RunView(Protocol):
    """What the monitor reads of the run, on the loop's thread only."""

    run_id: str
    run_cfg: RunConfig
    state: str
    started: float
    ledger: Ledger
    supervisor: Any
    hosts: Any
    failure: str | None
    end: dict[str, Any] | None


def failure_cause(error: str, extra: dict[str, Any] | None) -> str:
    """error / crashed / timed_out / stalled / memory, from how the attempt failed."""
    cause = (extra or {}).get("cause")
    if cause is None:
        return "error"  # the task raised
    if cause in ("stalled", "memory", "timed_out"):
        return str(cause)
    if "exceeded job_timeout" in error:  # the kill reason the job-timeout check gives (process/handle.py)
        return "timed_out"
    return "crashed"


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of a local process, from /proc (None when it is gone or not ours to read)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class Monitor:
    def __init__(self, run_id: str, run_cfg: RunConfig, log_path: str, enabled: bool) -> None:
        self.run_id = run_id
        self.run_cfg = run_cfg
        self.log_path = log_path
        self.enabled = enabled  #: publish snapshots (only when metrics or the dashboard are served)
        self.failures: dict[tuple[str, str], int] = {}
        self.produced_by: dict[str, int] = {}
        self.restarts_before: dict[str, int] = {}  #: a resumed run: restarts per pool under earlier coordinators
        self.declared: dict[str, tuple[str, int]] = {}  #: producer process -> (pool, total it declared)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self.history: deque[tuple[float, dict[str, int]]] = deque(maxlen=HISTORY)
        self.hosts_seen: set[str] = set()
        self.turned = time.monotonic()  #: the loop's last turn (/healthz)
        self.next_publish = 0.0
        self.published: dict[str, Any] | None = None  #: replaced whole, never changed in place
        self.started_at = logs.iso_now()

    # -- events (called by the loop where they happen) ----------------------------------------
    def failed(self, job: Job, error: str, trace: str | None, member: Member | None, extra: dict[str, Any] | None) -> None:
        cause = failure_cause(error, extra)
        key = (job.pool, cause)
        self.failures[key] = self.failures.get(key, 0) + 1
        if self.enabled:
            self.recent.append({"time": logs.iso_now(), "pool": job.pool, "job_id": job.id, "attempt": job.attempt, "cause": cause,
                                "worker": member.key if member else None, "error": error,
                                "traceback": trace[-TRACEBACK_CHARS:] if trace else None})

    def produced(self, pool: str, n: int) -> None:
        self.produced_by[pool] = self.produced_by.get(pool, 0) + n

    def total(self, member: Member, n: Any) -> None:
        """A producer process declared how many jobs it will yield (`ctx.total(n)`)."""
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            self.declared[member.key] = (member.pool, n)

    # -- across a resume ---------------------------------------------------------------------
    def counters(self, ledger: Ledger, worker_stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The metric counters that only memory holds, for the journal (done and dead it has already)."""
        return {"stats": {pool: [s.failed, s.retried] for pool, s in ledger.stats.items()},
                "failures": sorted([pool, cause, n] for (pool, cause), n in self.failures.items()),
                "produced": dict(self.produced_by), "restarts": self._restarts(worker_stats)}

    @staticmethod
    def histograms(ledger: Ledger) -> dict[str, list[list[int]]]:
        """The job-time histograms (runner_job_duration_seconds), for the journal: {pool: [[bucket, n], ...]}."""
        return {pool: sorted([bucket, n] for bucket, n in s.hist.items()) for pool, s in ledger.stats.items()}

    def restore(self, counters: dict[str, Any], histograms: dict[str, Any], ledger: Ledger) -> None:
        """A resumed run's counters go on from the journal's last COUNTERS and HISTOGRAMS records (none:
        from zero). One this version cannot read is skipped: counters never make a resume fail."""
        try:
            for pool, (failed, retried) in counters.get("stats", {}).items():
                if pool in ledger.stats:
                    ledger.stats[pool].failed, ledger.stats[pool].retried = int(failed), int(retried)
            self.failures.update({(str(pool), str(cause)): int(n) for pool, cause, n in counters.get("failures", [])})
            self.produced_by.update({str(pool): int(n) for pool, n in counters.get("produced", {}).items()})
            self.restarts_before = {str(pool): int(n) for pool, n in counters.get("restarts", {}).items()}
        except (TypeError, ValueError, AttributeError):
            pass
        try:
            for pool, hist in histograms.items():
                if pool in ledger.stats:
                    ledger.stats[pool].hist = {int(bucket): int(n) for bucket, n in hist}
        except (TypeError, ValueError, AttributeError):
            pass

    def _restarts(self, worker_stats: dict[str, dict[str, Any]]) -> dict[str, int]:
        restarts = dict(self.restarts_before)
        for stats in worker_stats.values():
            restarts[stats["pool"]] = restarts.get(stats["pool"], 0) + stats["restarts"]
        return restarts

    # -- the snapshot ------------------------------------------------------------------------
    def turn(self, run: RunView, now: float, over: bool = False) -> None:
        """Every loop turn: note it; publish a new snapshot when one is due."""
        self.turned = now
        if self.enabled and (over or now >= self.next_publish):
            self.next_publish = now + PUBLISH_S
            self.published = self.snapshot(run, now, over)

    def expected_total(self) -> int | None:
        """Jobs the producers will yield in all, when every producer pool declared it (config `total:` or ctx.total)."""
        total = 0
        for producer in self.run_cfg.producers:
            if producer.total is not None:
                total += producer.total
                continue
            declared = [n for pool, n in self.declared.values() if pool == producer.name]
            if not declared:
                return None
            total += sum(declared)
        return total

    def _eta(self, ledger: Ledger, now: float) -> tuple[int | None, float | None]:
        total = self.expected_total()
        if total is None:
            return None, None
        targets = {self.run_cfg.target_of(p) for p in self.run_cfg.producers}
        settled = sum(ledger.stats[p].done + ledger.stats[p].dead for p in targets)
        if settled >= total:
            return total, 0.0
        if len(self.history) < 2:
            return total, None
        (t0, first), (t1, last) = self.history[max(0, len(self.history) - 11)], self.history[-1]
        rate = sum(last.get(p, 0) - first.get(p, 0) for p in targets) / max(t1 - t0, 1e-9)
        return total, ((total - settled) / rate if rate > 0 else None)

    def snapshot(self, run: RunView, now: float, over: bool) -> dict[str, Any]:
        ledger = run.ledger
        done_by = {pool: s.done for pool, s in ledger.stats.items()}
        self.history.append((now, done_by))
        total, eta = self._eta(ledger, now)
        in_flight: dict[str, int] = {}
        for batch in ledger.in_flight.values():
            in_flight[batch.pool] = in_flight.get(batch.pool, 0) + batch.n - batch.done
        members = run.supervisor.members()
        restarts = self._restarts(run.supervisor.worker_stats)
        pools: dict[str, Any] = {}
        for producer in self.run_cfg.producers:
            pools[producer.name] = {"role": "producer", "produced": self.produced_by.get(producer.name, 0),
                                    "restarts": restarts.get(producer.name, 0)}
        for pool, s in ledger.stats.items():
            pools[pool] = {"role": "consumer", "done": s.done, "failed": s.failed, "retried": s.retried, "dead": s.dead,
                           "queued": ledger.queued(pool), "in_flight": in_flight.get(pool, 0),
                           "produced": self.produced_by.get(pool, 0), "restarts": restarts.get(pool, 0),
                           "failures": {c: self.failures.get((pool, c), 0) for c in CAUSES},
                           "p50_ms": percentile_ms(s.hist, 0.5), "p95_ms": percentile_ms(s.hist, 0.95),
                           "hist": dict(s.hist), "rates": self._rates(pool)}
        end = run.end or {}
        return {"run": {"run_id": run.run_id, "name": self.run_cfg.name, "version": __version__, "state": run.state,
                        "status": end.get("status", "running"), "exit_code": end.get("exit_code"), "over": over, "error": run.failure, "started_at": self.started_at, "elapsed_s": round(now - run.started, 3),
                        "total": total, "eta_s": None if eta is None else round(eta, 1), "log_file": self.log_path,
                        "coordinator_pid": os.getpid(), "coordinator_rss": rss_bytes(os.getpid())},
                "counts": report.counts(ledger), "pools": pools, "hosts": self._hosts(run),
                "processes": [self._process(m, ledger, now) for m in members],
                "failures": list(self.recent)}

    def _rates(self, pool: str) -> list[float]:
        """Jobs/s of `pool` between consecutive snapshots, oldest first (the sparkline)."""
        points = list(self.history)
        return [round((b[1].get(pool, 0) - a[1].get(pool, 0)) / max(b[0] - a[0], 1e-9), 1) for a, b in zip(points, points[1:], strict=False)]

    def _hosts(self, run: RunView) -> dict[str, str]:
        """Every host seen in the run: up, leaving, or gone (lost or left, not back)."""
        states = {logs.HOST: "up"}
        if run.hosts is not None:
            for host in run.hosts.hosts.values():
                states[host.name] = "leaving" if host.leaving else "up"
        self.hosts_seen |= set(states)
        return {name: states.get(name, "gone") for name in sorted(self.hosts_seen)}

    @staticmethod
    def _process(member: Member, ledger: Ledger, now: float) -> dict[str, Any]:
        job_id = job_s = None
        running = member.running_job() if not member.remote else None
        if running is not None:
            batch = ledger.in_flight.get(running[0])
            if batch is not None and running[1] < batch.n:
                job_id = batch.job_id(running[1])
                started = member.job_started_at()
                job_s = round(now - started, 3) if started else None
        if member.stop_reason is not None:
            state = "stopping"
        elif not member.ready:
            state = "starting"
        elif member.outstanding or (member.role == "producer" and not member.ended):
            state = "busy"
        else:
            state = "idle"
        return {"worker": member.key, "pool": member.pool, "role": member.role, "host": member.host, "pid": member.pid,
                "state": state, "job_id": job_id, "job_s": job_s, "rss": None if member.remote else rss_bytes(member.pid),
                "restarts": member.restart, "jobs": member.jobs_done}
