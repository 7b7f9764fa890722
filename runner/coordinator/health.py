"""Stuck jobs and memory, as the coordinator sees them: `job.stalled` lines, `max_rss` recycling,
and the stacks `runner status --stacks` shows.

Local processes are watched here (process/watch.py: RSS samples, memory_limit kills, stall checks
with their stacks); a worker host's agent watches its own and sends what it found: STALLED for a
stall, its processes' RSS and jobs with every heartbeat, STACK_DUMPS when asked for stacks. This
side turns (batch id, index) into job ids with the ledger and decides recycling, for both alike.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from runner.config import ConsumerConfig
from runner.coordinator.ledger import Ledger
from runner.coordinator.members import LocalMember, Member, RemoteMember
from runner.process.handle import LocalProcesses
from runner.process.watch import Stall, Watch
from runner.wire import host_messages as hm

if TYPE_CHECKING:
    from runner.coordinator.hosts import Hosts


class Supervised(Protocol):
    """What Health reads of the Supervisor and asks of it (a protocol: the Supervisor owns a Health)."""

    log: Any
    ledger: Ledger
    run_id: str
    run: Any  #: the run's hooks: its `state`
    consumers: dict[str, ConsumerConfig]
    procs: LocalProcesses
    local: dict[str, LocalMember]
    hosts: Hosts | None

    def members(self) -> list[Member]: ...

    def find(self, key: str) -> Member | None: ...

    def stop(self, member: Member, reason: str) -> None: ...

    def signal(self, member: Member, signum: int, reason: str | None = None) -> None: ...

#: how long `runner status --stacks` waits for worker hosts' stacks before answering without them
STACKS_WAIT_S = 3.0


class StackRound:
    """One `runner status --stacks` request: this host's stacks and each asked worker host's."""

    def __init__(self, answer: Callable[[list[dict[str, Any]]], None], hosts: set[str], deadline: float) -> None:
        self.answer = answer
        self.hosts = hosts  #: worker hosts still to answer (by name)
        self.local: dict[str, dict[str, Any]] | None = None
        self.remote: dict[str, Mapping[str, Mapping[str, Any]]] = {}
        self.deadline = deadline


class Health:
    def __init__(self, supervisor: Supervised) -> None:
        self.supervisor = supervisor
        self.log = supervisor.log
        self.ledger = supervisor.ledger
        self.limits = {c.name: {"stall_timeout": c.stall_timeout, "stall_action": c.stall_action, "memory_limit": c.memory_limit}
                       for c in supervisor.consumers.values()}
        self.watch = Watch(supervisor.procs, supervisor.run_id, self.limits.get, self._local_stall)
        self.rounds: dict[int, StackRound] = {}
        self._ids = itertools.count(1)

    def tick(self, now: float) -> None:
        self.watch.tick(now)
        if self.supervisor.run.state == "running":
            self._recycle_over_rss()
        for request, round_ in list(self.rounds.items()):
            if round_.local is not None and (not round_.hosts or now > round_.deadline):
                del self.rounds[request]
                round_.answer(self._stack_entries(round_))

    # -- stalls ------------------------------------------------------------------------------
    def _local_stall(self, stall: Stall) -> None:
        member = self.supervisor.local.get(stall.worker)
        if member is not None:
            self.log_stall(member, stall.running, stall.running_s, stall.silent_s, stall.stall_timeout, stall.action, stall.stack)

    def on_remote_stall(self, member: Member, stall: hm.Stalled) -> None:
        """A worker host's STALLED (checked on arrival)."""
        self.log_stall(member, stall.running, stall.running_s, stall.silent_s, stall.stall_timeout, stall.action, stall.stack)

    def _job_of(self, member: Member, running: tuple[int, int] | list[int] | None) -> tuple[int | None, int | None]:
        """(job id, attempt) of (batch id, index) if that batch is still the member's."""
        batch = self.ledger.in_flight.get(running[0]) if running else None
        if batch is None or running is None or batch.owner != member.key or not 0 <= running[1] < batch.n:
            return None, None
        return batch.job_id(running[1]), batch.attempt(running[1])

    def _progress(self, member: Member, running: tuple[int, int] | list[int] | None) -> Any:
        if member.progress is None or running is None or tuple(member.progress[:2]) != tuple(running):
            return None
        return member.progress[2]

    def log_stall(self, member: Member, running: tuple[int, int], running_s: float, silent_s: float, timeout: float,
                  action: str, stack: str) -> None:
        job_id, attempt = self._job_of(member, running)
        self.log.warning("job.stalled", pool=member.pool, worker=member.name, host=member.host, pid=member.pid, job_id=job_id,
                         attempt=attempt, running_s=round(running_s, 3), silent_s=round(silent_s, 3), stall_timeout=timeout,
                         action=action, progress=self._progress(member, running), stack=stack)

    # -- memory ------------------------------------------------------------------------------
    def _recycle_over_rss(self) -> None:
        """A process above its pool's max_rss finishes the job in hand (SIGTERM) and is replaced."""
        supervisor = self.supervisor
        if not any(c.max_rss for c in supervisor.consumers.values()):
            return  # nothing to check: no walk over every process (of every worker host) 50 times a second
        for member in supervisor.members():
            cfg = supervisor.consumers.get(member.pool)
            rss = member.resident()
            if cfg is None or not cfg.max_rss or rss is None or rss <= cfg.max_rss:
                continue
            if member.ready and member.stop_reason is None:
                member.recycled_rss = rss
                supervisor.stop(member, "memory")
                supervisor.signal(member, signal.SIGTERM)  # the job in hand ends first; the rest of its batch goes back

    def on_host_heartbeat(self, members: dict[str, RemoteMember], procs: dict[str, hm.ProcInfo]) -> None:
        """A worker host's heartbeat (checked on arrival): {worker: {rss, running, running_s}} for its processes."""
        now = time.monotonic()
        for name, info in procs.items():
            member = members.get(name)
            if member is None:
                continue
            member.rss = info.get("rss")
            job = info.get("running")
            member.remote_job = (job, float(info.get("running_s") or 0.0), now) if job else None

    # -- runner status --stacks ----------------------------------------------------------------
    def stacks(self, answer: Callable[[list[dict[str, Any]]], None]) -> None:
        """Ask every busy local process and every worker host for stacks; `answer` gets them all (or, after
        STACKS_WAIT_S, those that came)."""
        now = time.monotonic()
        request = next(self._ids)
        hosts = self.supervisor.hosts
        asked = {h.name for h in hosts.hosts.values() if h.procs} if hosts is not None else set()
        round_ = self.rounds[request] = StackRound(answer, asked, now + STACKS_WAIT_S)
        if hosts is not None:
            for name in asked:
                hosts.ask_stacks(name, request)

        def local(found: dict[str, dict[str, Any]]) -> None:
            round_.local = found

        self.watch.busy_stacks(now, local)

    def on_stack_dumps(self, host: str, request: int, dumps: dict[str, hm.StackDump]) -> None:
        round_ = self.rounds.get(request)
        if round_ is not None and host in round_.hosts:
            round_.hosts.discard(host)
            round_.remote[host] = dumps

    def _stack_entries(self, round_: StackRound) -> list[dict[str, Any]]:
        supervisor = self.supervisor
        found: list[tuple[Member | None, Mapping[str, Any]]] = [(supervisor.local.get(name), dump)
                                                             for name, dump in (round_.local or {}).items()]
        for host, dumps in round_.remote.items():
            found += [(supervisor.find(f"{host}/{name}"), dump) for name, dump in dumps.items() if isinstance(dump, dict)]
        entries = []
        for member, dump in found:
            if member is None:
                continue
            running = dump.get("running")
            job_id, attempt = self._job_of(member, running)
            entries.append({"worker": member.name, "host": member.host, "pool": member.pool, "pid": dump.get("pid"),
                            "job_id": job_id, "attempt": attempt, "running_s": dump.get("running_s"), "rss": dump.get("rss"),
                            "progress": self._progress(member, running), "stack": dump.get("stack")})
        for host in sorted(round_.hosts):
            entries.append({"worker": None, "host": host, "stack": f"(no answer from worker host {host} within {STACKS_WAIT_S:g}s)"})
        return entries
