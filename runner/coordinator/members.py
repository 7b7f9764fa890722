"""The run's processes as the coordinator sees them: one record per process, local or on a worker host.

`Member` holds what the coordinator decides and counts (what it holds, whether it was told to stop);
`LocalMember` adds the OS handle of a process of this machine, `RemoteMember` the route to a process
on a worker host. Dispatch, supervision and the ledger treat both alike through this one protocol.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from runner.process.handle import LocalProcess


class Restart(NamedTuple):
    """A process to start again once `due`: slot `slot` of `pool` on `host`, its `restart`-th start."""

    due: float
    pool: str
    slot: int
    restart: int
    host: str


@dataclass(eq=False)
class Member:
    """One process of the run."""

    name: str
    pool: str
    role: str
    index: int
    restart: int
    host: str
    pid: int | None = None
    ready: bool = False
    stop_reason: str | None = None  #: set when the coordinator asked it to stop
    stop_killed: bool = False  #: killed because a stop could not wait (its job is pending, not charged)
    fatal: tuple[str, str] | None = None  #: (error, traceback) it sent before dying at start-up
    outstanding: deque[int] = field(default_factory=deque)  #: batch ids it holds, oldest first
    assigned: int = 0  #: jobs given to it, for max_jobs_per_process
    jobs_done: int = 0  #: jobs it finished successfully
    idle_since: float = 0.0
    ended: bool = False  #: producers: its stream ended
    progress: tuple[int, int, Any] | None = None  #: (batch id, index, progress) of its last ctx.heartbeat(**progress)
    rss: int | None = None  #: its RSS at the last sample its worker host sent (remote processes)
    recycled_rss: int | None = None  #: its RSS when it was recycled for going over max_rss
    protocol_error: str | None = None  #: it sent a malformed message: killed (or its host reset), nothing more it sends counts

    remote = False

    @property
    def key(self) -> str:
        """Unique in the run: `eater-2` here, `hostb/eater-2` on a worker host."""
        return self.name

    def running_job(self) -> tuple[int, int] | None:
        """(batch id, index) of the job it is running now, if known."""
        return None

    def job_started_at(self) -> float:
        """When its job in hand started (time.monotonic()), 0.0 if unknown."""
        return 0.0

    def resident(self) -> int | None:
        """Its resident set size at the last sample (bytes), None if not known."""
        return self.rss

    def job_now(self) -> tuple[tuple[int, int], float] | None:
        """((batch id, index), seconds it has run) of the job it runs now, as last known."""
        return None


@dataclass(eq=False)
class LocalMember(Member):
    handle: LocalProcess | None = None

    def running_job(self) -> tuple[int, int] | None:
        return self.handle.running_job() if self.handle is not None else None

    def job_started_at(self) -> float:
        return self.handle.job_started_at() if self.handle is not None else 0.0

    def resident(self) -> int | None:
        return self.handle.rss if self.handle is not None else None

    def job_now(self) -> tuple[tuple[int, int], float] | None:
        running = self.running_job()
        return (running, time.monotonic() - self.job_started_at()) if running else None


@dataclass(eq=False)
class RemoteMember(Member):
    route: Any = None  #: the RemoteHost it runs on (its identity and session numbers)
    remote_running: tuple[int, int] | None = None  #: its job in hand when it ended (from EXITED)
    remote_job: tuple[tuple[int, int], float, float] | None = None  #: (job, seconds run, when heard) from its host's heartbeat

    remote = True

    @property
    def key(self) -> str:
        return f"{self.host}/{self.name}"

    def running_job(self) -> tuple[int, int] | None:
        return self.remote_running

    def job_now(self) -> tuple[tuple[int, int], float] | None:
        if self.remote_job is None:
            return None
        running, seconds, heard = self.remote_job
        return running, seconds + time.monotonic() - heard
