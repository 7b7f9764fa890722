"""Stalls and memory of this machine's processes, watched by their parent (the coordinator, or a worker host's agent).

Every SAMPLE_S it reads each process's RSS from /proc and SIGKILLs one above its pool's
`memory_limit` (its job is charged with cause `memory`). At every call it looks for a job that has
run `stall_timeout` without a `ctx.heartbeat()`: it takes that process's stack (stacks.py) and hands
a `Stall` to its owner, once per stall period; with `stall_action: kill` it then SIGKILLs the process
(cause `stalled`) if it is still on that same job. What a job is, the owner knows: this side reports
(batch id, index) as the slot says.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.process.handle import LocalProcess, LocalProcesses
from runner.process.memory import SAMPLE_S, format_bytes, rss_bytes
from runner.process.slot import SLOT_BEAT
from runner.process.stacks import Stacks


@dataclass
class Stall:
    """A job that ran `stall_timeout` without a heartbeat, with the stack its process had then."""

    worker: str
    pool: str
    pid: int | None
    running: tuple[int, int]  #: (batch id, index) from the slot
    running_s: float  #: since the job started
    silent_s: float  #: since its last heartbeat (or its start)
    stall_timeout: float
    action: str  #: warn / kill
    stack: str


class Watch:
    def __init__(self, procs: LocalProcesses, run_id: str, limits_of: Callable[[str], dict[str, Any] | None],
                 on_stall: Callable[[Stall], None]) -> None:
        self.procs = procs
        self.stacks = Stacks(run_id)
        self.limits_of = limits_of  #: a pool's stall_timeout, stall_action, memory_limit (None: not a consumer pool)
        self.on_stall = on_stall
        self.next_sample = 0.0

    def tick(self, now: float) -> None:
        if now >= self.next_sample:
            self.next_sample = now + SAMPLE_S
            self._sample_memory()
        for proc in list(self.procs.procs.values()):
            limits = self.limits_of(proc.pool)
            if limits and limits.get("stall_timeout"):
                self._check_stall(proc, limits, now)
        if self.stacks.busy:
            self.stacks.poll(now)

    def _sample_memory(self) -> None:
        self.procs.oom.sample()
        for proc in list(self.procs.procs.values()):
            proc.rss = rss = rss_bytes(proc.pid)
            limits = self.limits_of(proc.pool)
            limit = limits.get("memory_limit") if limits else None
            if limit and rss is not None and rss > limit and not proc.kill_reason:
                reason = f"killed: RSS {format_bytes(rss)} over memory_limit {format_bytes(limit)}"
                self.procs.signal(proc, signal.SIGKILL, reason, "memory")

    def _check_stall(self, proc: LocalProcess, limits: dict[str, Any], now: float) -> None:
        started = proc.job_started_at()
        if started <= 0 or proc.kill_reason:
            return
        timeout = float(limits["stall_timeout"])
        beat = float(proc.slot[SLOT_BEAT])
        if now - max(started, beat, proc.stall_mark) <= timeout:
            return
        running = proc.running_job()
        if running is None:  # between two jobs of a batch timed as one (index -1): no job is stalled
            return
        proc.stall_mark = now  # once per stall period: the next report comes stall_timeout later
        silent = now - max(started, beat)
        action = str(limits.get("stall_action") or "warn")

        def stalled(stack: str) -> None:
            self.on_stall(Stall(proc.name, proc.pool, proc.pid, running, now - started, silent, timeout, action, stack))
            same_job = proc.running_job() == running and proc.job_started_at() == started
            if action == "kill" and same_job and proc.name in self.procs.procs:
                reason = f"killed: stalled, no heartbeat for {silent:.1f}s (stall_timeout {timeout:g}s)"
                self.procs.signal(proc, signal.SIGKILL, reason, "stalled")

        self.stacks.take(proc.pid or 0, now, stalled)

    def busy_stacks(self, now: float, then: Callable[[dict[str, dict[str, Any]]], None]) -> None:
        """Every busy process's job (batch id, index), how long it has run, its RSS and its stack, to `then`
        once all are read (at once when none is busy)."""
        busy = [p for p in self.procs.procs.values() if p.running_job() is not None and p.pid]
        found: dict[str, dict[str, Any]] = {}
        if not busy:
            then(found)
            return
        for proc in busy:
            running, started = proc.running_job(), proc.job_started_at(now)
            entry = {"pid": proc.pid, "pool": proc.pool, "running": list(running) if running else None,
                     "running_s": max(0.0, round(now - started, 3)), "rss": proc.rss}  # never negative: STACK_DUMPS is checked

            def taken(stack: str, name: str = proc.name, entry: dict[str, Any] = entry) -> None:
                found[name] = {**entry, "stack": stack}
                if len(found) == len(busy):
                    then(found)

            assert proc.pid is not None
            self.stacks.take(proc.pid, now, taken)
