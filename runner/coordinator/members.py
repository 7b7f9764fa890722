"""The run's processes as the coordinator sees them: one record per process, local or on a worker host.

`Member` holds what the coordinator decides and counts (what it holds, whether it was told to stop);
`LocalMember` adds the OS handle of a process of this machine, `RemoteMember` the route to a process
on a worker host. Dispatch, supervision and the ledger treat both alike through this one protocol.
"""

from __future__ import annotations

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


@dataclass(eq=False)
class LocalMember(Member):
    handle: LocalProcess | None = None

    def running_job(self) -> tuple[int, int] | None:
        return self.handle.running_job() if self.handle is not None else None

    def job_started_at(self) -> float:
        return self.handle.job_started_at() if self.handle is not None else 0.0


@dataclass(eq=False)
class RemoteMember(Member):
    route: Any = None  #: the RemoteHost it runs on (its identity and session numbers)
    remote_running: tuple[int, int] | None = None  #: its job in hand when it ended (from EXITED)

    remote = True

    @property
    def key(self) -> str:
        return f"{self.host}/{self.name}"

    def running_job(self) -> tuple[int, int] | None:
        return self.remote_running
