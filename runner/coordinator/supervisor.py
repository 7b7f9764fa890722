"""Process supervision: starting every pool's processes, sizing pools, restarting, and settling exits.

The Supervisor owns the run's process records (local ones here, remote ones through Hosts), the
restart schedule and the crash budget. What a process holds is the ledger's: when a process ends,
the Supervisor takes its unfinished jobs back from the ledger, charges the job in hand if the
process died of it, and asks the run (RunHooks) to retry or dead-letter that job.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any, Protocol

from runner.backoff import backoff
from runner.config import Config, ConsumerConfig
from runner.coordinator.flow import PREFETCH, Flow
from runner.coordinator.health import Health
from runner.coordinator.ledger import Job, Ledger
from runner.coordinator.locks import LockTable
from runner.coordinator.members import LocalMember, Member, Restart
from runner.process.handle import Exit, LocalProcess, LocalProcesses
from runner.wire import messages
from runner.wire.messages import GRANT, STOP

if TYPE_CHECKING:
    from runner.coordinator.hosts import Hosts, RemoteHost

#: job ids listed in one log line, at most
MAX_IDS_LOGGED = 1000
#: restart delays after crashes in a row: 0.05 s doubling to 5 s, with jitter
RESTART_BASE_S, RESTART_CAP_S = 0.05, 5.0


class RunHooks(Protocol):
    """What the Supervisor asks of the run it serves."""

    state: str

    def fail(self, now: float, reason: str) -> None: ...

    def job_failed(self, job: Job, error: str, trace: str | None, member: Member | None, logged: bool,
                   extra: dict[str, Any] | None = None) -> None: ...

    def producer_position(self, key: str, position: int) -> None: ...

    def producer_ended(self, key: str, status: str) -> None: ...


class Supervisor:
    def __init__(self, config: Config, run_id: str, host: str, log: Any, ledger: Ledger, flow: Flow, locks: LockTable,
                 run: RunHooks) -> None:
        self.config = config
        self.run_cfg = config.run
        self.run_id = run_id
        self.host = host
        self.log = log
        self.ledger = ledger
        self.flow = flow
        self.locks = locks
        self.run = run
        self.consumers = {c.name: c for c in config.run.consumers}
        self.procs = LocalProcesses(config.run.start_method, host)
        self.local: dict[str, LocalMember] = {}
        self.hosts: Hosts | None = None  #: worker hosts, when the run is bound to an address
        self.restarts: list[Restart] = []
        self.crash_streak = {pool: 0 for pool in self.consumers}
        self.worker_stats: dict[str, dict[str, Any]] = {}
        self.producer_failed = False
        #: a resumed run: producer key -> yields journaled, and the producers that had ended (never started again)
        self.resume_positions: dict[str, int] = {}
        self.resume_ended: set[str] = set()
        self.health = Health(self)  #: stalls, memory limits, stacks

    # -- what each process runs ------------------------------------------------------------
    def pool_spec(self, pool: str) -> dict[str, Any]:
        """Everything a process of `pool` needs, on this host or another (one source of truth)."""
        run = self.run_cfg
        cfg = run.pool(pool)
        spec = {"run_id": self.run_id, "run_name": run.name, "base_dir": self.config.base_dir, "log_level": run.logs.level,
                "jobs_log": run.logs.jobs, "results": bool(run.results), "batch": run.queue.batch, "pools": list(self.consumers),
                "task": cfg.task, "params": cfg.params}
        if pool in self.consumers:
            consumer = self.consumers[pool]
            return {**spec, "emit_to": consumer.to, "job_timeout": consumer.job_timeout, "stall_timeout": consumer.stall_timeout,
                    "stall_action": consumer.stall_action, "memory_limit": consumer.memory_limit, "max_rss": consumer.max_rss}
        return {**spec, "target": run.target_of(cfg)}  # type: ignore[arg-type]

    # -- starting --------------------------------------------------------------------------
    def start_all(self) -> None:
        """Every pool's processes start together; none waits for another to finish."""
        for producer in self.run_cfg.producers:
            for index in range(1, producer.processes + 1):
                self.start(producer.name, "producer", index, 0, self.host)
        for consumer in self.run_cfg.consumers:
            for index in range(1, consumer.processes + 1):
                self.start(consumer.name, "consumer", index, 0, self.host)

    def start(self, pool: str, role: str, index: int, restart: int, host: str) -> Member | None:
        spec = self.pool_spec(pool)
        name = f"{pool}-{index}"
        remote = self.hosts.by_name(host) if host != self.host and self.hosts is not None else None
        if role == "producer":
            key = name if remote is None else f"{host}/{name}"
            if key in self.resume_ended or "*" in self.resume_ended:
                return None  # a resumed run: this producer had finished its stream
            spec["credit"] = self.flow.producer_share(pool)
            position = self.resume_positions.get(key, 0)
            if self.run_cfg.pool(pool).resume == "offset":  # type: ignore[union-attr]
                spec["resume_offset"] = position
            else:
                spec["skip"] = position
            self.run.producer_position(key, position)
        member: Member
        if remote is not None:
            assert self.hosts is not None
            member = self.hosts.spawn(remote, name, pool, role, index, restart, spec)
        else:
            try:
                handle = self.procs.start(name, pool, role, index, spec)
            except OSError as exc:  # out of processes or file handles, forkserver gone: the run cannot go on well
                reason = f"cannot start process {name}: {type(exc).__name__}: {exc}"
                self.log.error("pool.failed", pool=pool, reason=reason)
                self.run.fail(time.monotonic(), reason)
                return None
            member = self.local[name] = LocalMember(name, pool, role, index, restart, self.host, pid=handle.pid, handle=handle)
        member.idle_since = time.monotonic()
        stats = self.worker_stats.setdefault(member.key, {"pool": pool, "host": member.host, "done": 0, "failed": 0, "crashes": 0, "restarts": 0})
        stats["restarts"] += 1 if restart else 0
        if role == "producer":
            self.flow.producer_started(member.key, spec["credit"])
        return member

    def on_host_joined(self, host: RemoteHost) -> None:
        """A worker host joined: start its share of every pool it serves."""
        for pool in host.pools:
            configured = self.run_cfg.pool(pool).processes
            role = "consumer" if pool in self.consumers else "producer"
            for index in range(1, host.capacity(configured) + 1):
                self.start(pool, role, index, 0, host.name)

    def on_host_gone(self, name: str) -> None:
        """Restarts still due for a lost host's processes die with it: started later they would run
        here, or twice on the host when it joins again under the same name."""
        self.restarts = [r for r in self.restarts if r.host != name]

    # -- finding and talking to processes ---------------------------------------------------
    def members(self) -> list[Member]:
        members: list[Member] = list(self.local.values())
        if self.hosts is not None:
            members += self.hosts.members()
        return members

    def member_of(self, handle: LocalProcess) -> LocalMember:
        return self.local[handle.name]

    def find(self, key: str) -> Member | None:
        if "/" not in key:
            return self.local.get(key)
        host_name, _, name = key.partition("/")
        host = self.hosts.by_name(host_name) if self.hosts is not None else None
        return host.procs.get(name) if host is not None else None

    def pool_members(self, pool: str) -> list[Member]:
        """The processes of `pool` not told to stop."""
        return [p for p in self.members() if p.pool == pool and p.stop_reason is None]

    def send(self, member: Member, message: list[Any]) -> None:
        frame = messages.pack(message)
        if isinstance(member, LocalMember):
            assert member.handle is not None
            self.procs.send(member.handle, frame)
        elif self.hosts is not None:
            self.hosts.send(member, frame)

    def grant(self, name: str, who: str, request: int) -> None:
        member = self.find(who)
        if member is not None:
            self.send(member, [GRANT, name, request])

    def signal(self, member: Member, signum: int, reason: str | None = None) -> None:
        if isinstance(member, LocalMember):
            assert member.handle is not None
            self.procs.signal(member.handle, signum, reason)
        elif self.hosts is not None:
            self.hosts.signal(member, signum, reason)

    def signal_all(self, signum: int) -> None:
        for member in self.members():
            self.signal(member, signum)

    def kill_all(self, reason: str) -> None:
        """SIGKILL every process because the stop cannot wait: what they held is pending, not charged."""
        for member in self.members():
            member.stop_killed = True
            self.signal(member, signal.SIGKILL, reason)

    def stop(self, member: Member, reason: str) -> None:
        """STOP queues behind the jobs already sent: the process finishes them, then exits."""
        if member.stop_reason is None:
            member.stop_reason = reason
            self.send(member, [STOP, reason])

    def stop_all(self, reason: str) -> None:
        for member in self.members():
            self.stop(member, reason)

    # -- timers ----------------------------------------------------------------------------
    def check_job_timeouts(self, now: float) -> None:
        """Local processes only: worker hosts enforce their own."""
        def job_of(handle: LocalProcess) -> str:
            running = handle.running_job()
            batch = self.ledger.in_flight.get(running[0]) if running else None
            return f"job {batch.job_id(running[1])}" if batch and running else "a job"

        self.procs.kill_overdue(now, lambda pool: c.job_timeout if (c := self.consumers.get(pool)) else None, job_of)

    def check_health(self, now: float) -> None:
        """Stalls (job.stalled, with stacks), memory limits and max_rss recycling (health.py)."""
        self.health.tick(now)

    def start_due_restarts(self, now: float) -> None:
        for item in [r for r in self.restarts if r.due <= now]:
            self.restarts.remove(item)
            self.start(item.pool, "consumer", item.slot, item.restart, item.host)

    def manage_pools(self, now: float) -> None:
        """Idle processes retire above min_processes; a backed-up queue brings processes back.

        Each pool's processes are grouped by host once a tick: with many worker hosts, a walk over every
        process for every host (O(hosts x processes), 50 times a second) was the coordinator's main cost."""
        work_may_come = self.flow.producers_open > 0 or not self.ledger.settled()
        members = self.members()
        for name, cfg in self.consumers.items():
            by_host: dict[str, list[Member]] = {}
            for member in members:
                if member.pool != name:
                    continue
                by_host.setdefault(member.host, []).append(member)
                if member.stop_reason is None and cfg.max_jobs_per_process and member.assigned >= cfg.max_jobs_per_process \
                        and not member.outstanding:
                    self.stop(member, "recycled")  # its slot gets a fresh process when it has exited
            restarts: dict[str, list[Restart]] = {}
            for item in self.restarts:
                if item.pool == name:
                    restarts.setdefault(item.host, []).append(item)
            for host, most in self._groups(cfg):
                self._size_group(cfg, host, most, now, work_may_come, by_host.get(host, []), restarts.get(host, []))

    def _groups(self, cfg: ConsumerConfig) -> list[tuple[str, int]]:
        """(host, most processes) for each host serving a consumer pool: this one, then worker hosts."""
        groups = [(self.host, cfg.processes)]
        if self.hosts is not None:
            groups += [(h.name, h.capacity(cfg.processes)) for h in self.hosts.hosts.values() if cfg.name in h.pools]
        return groups

    def _size_group(self, cfg: ConsumerConfig, host: str, most: int, now: float, work_may_come: bool, group: list[Member],
                    restarts: list[Restart]) -> None:
        """One host's processes of a pool (`group`, stopping ones too; `restarts`, those due to start there)."""
        name = cfg.name
        alive = [p for p in group if p.stop_reason is None]
        least = min(cfg.min_processes, most)
        if cfg.idle_timeout is not None:
            idle = [p for p in alive if p.ready and not p.outstanding and now - p.idle_since > cfg.idle_timeout]
            for member in idle[: max(0, len(alive) - least)]:
                self.stop(member, "idle")
            alive = [p for p in alive if p.stop_reason is None]
        starting = len(restarts)
        want = 0
        if work_may_come and len(alive) + starting < least:
            want = least - len(alive) - starting
        if len(alive) + starting < most and self.ledger.queued(name) and all(len(p.outstanding) >= PREFETCH or not p.ready for p in alive):
            want = max(want, 1)
        if not want:
            return
        used = {p.index for p in group} | {r.slot for r in restarts}
        for index in [i for i in range(1, most + 1) if i not in used][:want]:
            self.start(name, "consumer", index, 0, host)

    # -- endings ---------------------------------------------------------------------------
    def on_producer_end(self, member: Member, status: str, jobs: int, error: str | None, trace: str | None) -> None:
        if member.ended:
            return
        member.ended = True
        self.flow.producer_ended(member.key)
        self.run.producer_ended(member.key, status)
        if status == "failed":
            self.producer_failed = True
            self.log.error("producer.failed", pool=member.pool, worker=member.name, error=error, traceback=trace, jobs=jobs)
        self.log.info("producer.finished", pool=member.pool, worker=member.name, jobs=jobs, status=status)

    def on_local_exit(self, handle: LocalProcess) -> None:
        member = self.local.pop(handle.name)
        ended = self.procs.reap(handle)
        if member.fatal and not handle.kill_reason:
            ended.reason = member.fatal[0]
        self.on_exit(member, ended)

    def _take_back(self, member: Member, running: tuple[int, int] | None) -> tuple[Job | None, list[Job]]:
        """The jobs an ended process held: (the job in hand, the rest)."""
        charged: Job | None = None
        requeue: list[Job] = []
        for batch_id in member.outstanding:
            batch = self.ledger.in_flight.get(batch_id)
            if batch is None:
                continue
            # the index comes from the process's slot or a host's EXITED: one outside the batch charges no job
            in_hand = batch.job_id(running[1]) if running and running[0] == batch_id and 0 <= running[1] < batch.n else None
            for job in self.ledger.release(batch):
                if job.id == in_hand:
                    charged = job
                else:
                    requeue.append(job)
        return charged, requeue

    def on_exit(self, member: Member, ended: Exit, host_gone: bool = False) -> None:
        """A process ended (or its host was lost): settle what it held, log why, restart if needed."""
        running = None if host_gone else member.running_job()
        now = time.monotonic()
        job_started = member.job_started_at()
        self.flow.forget(member.key)
        held, handed = self.locks.drop(member.key)
        for name in held:
            self.log.warning("lock.broken", name=name, holder=member.key)
        for name, who, request in handed:
            self.grant(name, who, request)
        charged, requeue = self._take_back(member, running)
        stopping = self.run.state == "stopping"
        # ended by the stop, not by itself: SIGKILLed after the grace / a second signal, or our SIGTERM hit it while it started
        killed_by_stop = stopping and member.stop_killed
        stopped_starting = stopping and ended.signal == "SIGTERM" and not member.ready and not member.fatal
        if charged is not None and killed_by_stop:
            requeue.append(charged)  # not its job's fault: pending, no attempt charged
            charged = None
        if requeue:
            self.ledger.regroup(requeue, front=True)
        fields = {"pool": member.pool, "worker": member.name, "role": member.role, "host": member.host, "pid": member.pid}
        requeued = {"requeued": len(requeue), "requeued_ids": [job.id for job in requeue[:MAX_IDS_LOGGED]] or None}
        if member.role == "producer" and not member.ended:
            # its END may not have been read (after a crash frames are not): exit 0 during a stop is a stop
            status = "stopped" if killed_by_stop or stopped_starting or (stopping and ended.code == 0) else "failed"
            self.on_producer_end(member, status, 0, f"producer process {ended.reason}", member.fatal[1] if member.fatal else None)
        if (ended.code == 0 or stopped_starting) and charged is None and not member.fatal:
            reason = member.stop_reason or ("done" if member.role == "producer" else "stopped")
            memory = {"rss": member.recycled_rss, "max_rss": self.consumers[member.pool].max_rss} if reason == "memory" else {}
            self.log.info("worker.exited", **fields, code=ended.code, reason=reason, jobs=member.jobs_done, **requeued, **memory)
            if reason in ("recycled", "memory") and self.run.state == "running":
                self.start(member.pool, "consumer", member.index, member.restart + 1, member.host)
            return
        self.worker_stats[member.key]["crashes"] += 1
        self.log.error("worker.crashed", **fields, code=ended.code, signal=ended.signal, reason=ended.reason, cause=ended.cause,
                       job_id=charged.id if charged else None, **requeued, traceback=member.fatal[1] if member.fatal else None)
        if charged is not None:
            duration = round((now - job_started) * 1000, 3) if job_started else None
            self.run.job_failed(charged, f"worker {member.name} {ended.reason}", None, member, logged=False,
                                extra={"pid": member.pid, "role": member.role, "duration_ms": duration, "cause": ended.cause})
        if member.role == "consumer" and self.run.state == "running" and not host_gone:
            self._restart_after_crash(member, charged is not None, ended, now)

    def _restart_after_crash(self, member: Member, charged: bool, ended: Exit, now: float) -> None:
        """Restart its slot after a backoff; crashes in a row before any job finished fail the pool."""
        cfg = self.consumers[member.pool]
        if member.jobs_done == 0 and not charged:
            self.crash_streak[member.pool] += 1
        streak = self.crash_streak[member.pool]
        if streak >= cfg.restart_limit:
            reason = f"pool {member.pool!r}: {streak} processes in a row died before finishing a job (last: {ended.reason})"
            self.log.error("pool.failed", pool=member.pool, reason=reason)
            self.run.fail(now, reason)
            return
        delay = backoff(RESTART_BASE_S, streak + 1, RESTART_CAP_S, jitter=True) if streak else 0.0
        self.restarts.append(Restart(now + delay, member.pool, member.index, member.restart + 1, member.host))
