"""Process supervision: starting every pool's processes, sizing pools, restarting, and settling exits.

A mixin of the Coordinator (it shares the coordinator's state): what a process holds is the ledger's;
here is when processes start and stop, and what their ending means for the jobs they held.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from runner import protocol
from runner.config import Config, ConsumerConfig, RunConfig
from runner.ledger import Job, Ledger
from runner.locks import LockTable
from runner.pool import Exit, LocalProcesses, Proc
from runner.protocol import STOP

#: batches a consumer holds at once: one running, one ready to start
PREFETCH = 2
#: a process on a worker host holds more, to hide the network round trip
PREFETCH_REMOTE = 4
#: job ids listed in one log line, at most
MAX_IDS_LOGGED = 1000


class Supervisor:
    """Process lifecycles for the Coordinator: start, scale, stop, restart, and exits."""

    # state owned by the Coordinator
    config: Config
    run_cfg: RunConfig
    run_id: str
    host: str
    log: Any
    state: str
    procs: LocalProcesses
    remote: Any
    consumers: dict[str, ConsumerConfig]
    ledger: Ledger
    locks: LockTable
    restarts: list[tuple[float, str, int, int, str]]
    worker_stats: dict[str, dict[str, Any]]
    credit: dict[str, int]
    credit_owed: dict[str, int]
    credit_share: dict[str, int]
    crash_streak: dict[str, int]
    producers_open: int

    if TYPE_CHECKING:
        def _fail(self, now: float, reason: str) -> None: ...
        def _job_failed(self, job: Job, error: str, trace: str | None, proc: Proc | None, logged: bool,
                        extra: dict[str, Any] | None = None) -> None: ...
        def _on_end(self, proc: Proc, status: str, jobs: int, error: str | None, trace: str | None) -> None: ...
        def _grant(self, name: str, who: str, request: int) -> None: ...

    def _check_job_timeouts(self, now: float) -> None:
        for proc in list(self.procs.procs.values()):  # worker hosts enforce their own
            cfg = self.consumers.get(proc.pool)
            if cfg is None or cfg.job_timeout is None or proc.kill_reason:
                continue
            started = proc.job_started_at()
            if started and now - started > cfg.job_timeout:
                running = proc.running_job()
                batch = self.ledger.in_flight.get(running[0]) if running else None
                job = f"job {batch.job_id(running[1])}" if batch and running else "a job"
                self.procs.signal(proc, signal.SIGKILL, f"{job} exceeded job_timeout {cfg.job_timeout:g}s")

    def _start_due_restarts(self, now: float) -> None:
        for item in [r for r in self.restarts if r[0] <= now]:
            self.restarts.remove(item)
            _, pool, index, restart, host = item
            self._start_consumer(self.consumers[pool], index, restart, host)

    # -- processes ---------------------------------------------------------------------------
    def _spec(self) -> dict[str, Any]:
        run = self.run_cfg
        return {
            "run_id": self.run_id, "run_name": run.name, "base_dir": self.config.base_dir, "log_level": run.logs.level,
            "jobs_log": run.logs.jobs, "results": bool(run.results), "batch": run.queue.batch, "pools": list(self.consumers),
        }

    def pool_spec(self, pool: str) -> dict[str, Any]:
        """Everything a process of `pool` needs, on this host or another (one source of truth)."""
        cfg = self.run_cfg.pool(pool)
        if pool in self.consumers:
            consumer = self.consumers[pool]
            return {**self._spec(), "task": cfg.task, "params": cfg.params, "emit_to": consumer.to, "job_timeout": consumer.job_timeout}
        return {**self._spec(), "task": cfg.task, "params": cfg.params, "target": self.run_cfg.target_of(cfg)}  # type: ignore[arg-type]

    def _producer_share(self, name: str) -> int:
        run = self.run_cfg
        target = run.target_of(run.pool(name))  # type: ignore[arg-type]
        senders = sum(p.processes for p in run.producers if run.target_of(p) == target)
        return max(1, run.queue.maxsize // senders)

    def _start(self, pool: str, role: str, index: int, restart: int, host: str) -> Proc | None:
        spec = self.pool_spec(pool)
        name = f"{pool}-{index}"
        if role == "producer":
            spec["credit"] = self._producer_share(pool)
        remote = self.remote.by_name(host) if host != self.host and self.remote is not None else None
        if remote is not None:
            proc = self.remote.spawn(remote, name, pool, role, index, restart, spec)
        else:
            try:
                proc = self.procs.start(name, pool, role, index, spec, restart)
            except OSError as exc:  # out of processes or file handles, forkserver gone: the run cannot go on well
                reason = f"cannot start process {name}: {type(exc).__name__}: {exc}"
                self.log.error("pool.failed", pool=pool, reason=reason)
                self._fail(time.monotonic(), reason)
                return None
        proc.idle_since = time.monotonic()
        stats = self.worker_stats.setdefault(proc.key, {"pool": pool, "host": proc.host, "done": 0, "failed": 0, "crashes": 0, "restarts": 0})
        stats["restarts"] += 1 if restart else 0
        if role == "producer":
            self.credit[proc.key] = self.credit_share[proc.key] = spec["credit"]
            self.credit_owed[proc.key] = 0
            self.producers_open += 1
        return proc

    def _start_consumer(self, cfg: ConsumerConfig, index: int, restart: int = 0, host: str | None = None) -> None:
        self._start(cfg.name, "consumer", index, restart, host or self.host)

    def on_host_joined(self, host: Any) -> None:
        """A worker host joined: start its share of every pool it serves."""
        for pool in host.pools:
            configured = self.run_cfg.pool(pool).processes
            role = "consumer" if pool in self.consumers else "producer"
            for index in range(1, host.capacity(configured) + 1):
                self._start(pool, role, index, 0, host.name)

    def all_procs(self) -> list[Proc]:
        procs = list(self.procs.procs.values())
        if self.remote is not None:
            procs += self.remote.procs()
        return procs

    def _find(self, key: str) -> Proc | None:
        if "/" not in key:
            return self.procs.procs.get(key)
        host_name, _, name = key.partition("/")
        host = self.remote.by_name(host_name) if self.remote is not None else None
        return host.procs.get(name) if host is not None else None

    def _send(self, proc: Proc, message: list[Any]) -> None:
        frame = protocol.pack(message)
        if proc.remote:
            self.remote.send(proc, frame)
        else:
            self.procs.send(proc, frame)

    def _signal(self, proc: Proc, signum: int, reason: str | None = None) -> None:
        if proc.remote:
            self.remote.signal(proc, signum, reason)
        else:
            self.procs.signal(proc, signum, reason)

    def _kill_all(self, reason: str) -> None:
        """SIGKILL every process because the stop cannot wait: what they held is pending, not charged."""
        for proc in self.all_procs():
            proc.stop_killed = True
            self._signal(proc, signal.SIGKILL, reason)

    def _signal_all(self, signum: int, reason: str | None = None) -> None:
        for proc in self.all_procs():
            self._signal(proc, signum, reason)

    def _stop(self, proc: Proc, reason: str) -> None:
        if proc.stop_reason is None:
            proc.stop_reason = reason
            self._send(proc, [STOP, reason])

    def _pool_procs(self, pool: str) -> list[Proc]:
        return [p for p in self.all_procs() if p.pool == pool and p.stop_reason is None]

    def _groups(self, cfg: ConsumerConfig) -> list[tuple[str, int]]:
        """(host, most processes) for each host serving a consumer pool: this one, then worker hosts."""
        groups = [(self.host, cfg.processes)]
        if self.remote is not None:
            groups += [(h.name, h.capacity(cfg.processes)) for h in self.remote.hosts.values() if cfg.name in h.pools]
        return groups

    def _manage_pools(self, now: float) -> None:
        """Idle processes retire above min_processes; a backed-up queue brings processes back."""
        work_may_come = self.producers_open > 0 or not self.ledger.settled()
        for name, cfg in self.consumers.items():
            for proc in self._pool_procs(name):
                if cfg.max_jobs_per_process and proc.assigned >= cfg.max_jobs_per_process and not proc.outstanding:
                    self._stop(proc, "recycled")  # its slot gets a fresh process when it has exited
            for host, most in self._groups(cfg):
                alive = [p for p in self._pool_procs(name) if p.host == host]
                least = min(cfg.min_processes, most)
                if cfg.idle_timeout is not None:
                    idle = [p for p in alive if p.ready and not p.outstanding and now - p.idle_since > cfg.idle_timeout]
                    for proc in idle[: max(0, len(alive) - least)]:
                        self._stop(proc, "idle")
                    alive = [p for p in alive if p.stop_reason is None]
                starting = sum(1 for r in self.restarts if r[1] == name and r[4] == host)
                want = 0
                if work_may_come and len(alive) + starting < least:
                    want = least - len(alive) - starting
                busy = all(len(p.outstanding) >= PREFETCH or not p.ready for p in alive)
                if self.ledger.queued(name) and busy and len(alive) + starting < most:
                    want = max(want, 1)
                if not want:
                    continue
                used = {p.index for p in self.all_procs() if p.pool == name and p.host == host}
                used |= {r[2] for r in self.restarts if r[1] == name and r[4] == host}
                for index in [i for i in range(1, most + 1) if i not in used][:want]:
                    self._start_consumer(cfg, index, 0, host)

    def _on_local_exit(self, proc: Proc) -> None:
        ended = self.procs.reap(proc)
        self.procs.forget(proc)
        self.on_exit(proc, ended)

    def on_exit(self, proc: Proc, ended: Exit, host_gone: bool = False) -> None:
        """A process ended (or its host was lost): settle what it held, log why, restart if needed."""
        running = None if host_gone else proc.running_job()
        pid = proc.pid
        now = time.monotonic()
        job_started = proc.job_started_at()
        held, handed = self.locks.drop(proc.key)
        for name in held:
            self.log.warning("lock.broken", name=name, holder=proc.key)
        for name, who, request in handed:
            self._grant(name, who, request)
        charged: Job | None = None
        requeue: list[Job] = []
        for batch_id in proc.outstanding:
            batch = self.ledger.in_flight.get(batch_id)
            if batch is None:
                continue
            for job in self.ledger.release(batch):
                if running and running[0] == batch_id and job.id == batch.job_id(running[1]):
                    charged = job
                else:
                    requeue.append(job)
        # ended by the stop, not by itself: SIGKILLed after the grace / a second signal, or our SIGTERM hit it while it started
        killed_by_stop = self.state == "stopping" and proc.stop_killed
        stopped_starting = self.state == "stopping" and ended.signal == "SIGTERM" and not proc.ready and not proc.fatal
        if charged is not None and killed_by_stop:
            requeue.append(charged)  # not its job's fault: pending, no attempt charged
            charged = None
        if requeue:
            self.ledger.regroup(requeue, front=True)
        fields = {"pool": proc.pool, "worker": proc.name, "role": proc.role, "host": proc.host, "pid": pid}
        if proc.role == "producer" and not proc.ended:
            status = "stopped" if killed_by_stop or stopped_starting else "failed"
            self._on_end(proc, status, 0, f"producer process {ended.reason}", proc.fatal[1] if proc.fatal else None)
        clean = (ended.code == 0 or stopped_starting) and charged is None and not proc.fatal
        if clean:
            reason = proc.stop_reason or ("done" if proc.role == "producer" else "stopped")
            self.log.info("worker.exited", **fields, code=ended.code, reason=reason, jobs=proc.done, requeued=len(requeue),
                          requeued_ids=[job.id for job in requeue[:MAX_IDS_LOGGED]] or None)
            if reason == "recycled" and self.state == "running":
                self._start_consumer(self.consumers[proc.pool], proc.index, proc.restart + 1, proc.host)
            return
        self.worker_stats[proc.key]["crashes"] += 1
        self.log.error("worker.crashed", **fields, code=ended.code, signal=ended.signal, reason=ended.reason,
                       job_id=charged.id if charged else None, requeued=len(requeue),
                       requeued_ids=[job.id for job in requeue[:MAX_IDS_LOGGED]] or None,
                       traceback=proc.fatal[1] if proc.fatal else None)
        if charged is not None:
            duration = round((now - job_started) * 1000, 3) if job_started else None
            self._job_failed(charged, f"worker {proc.name} {ended.reason}", None, proc, logged=False,
                             extra={"pid": pid, "role": proc.role, "duration_ms": duration, "cause": "crash"})
        if proc.role != "consumer" or self.state != "running" or host_gone:
            return
        cfg = self.consumers[proc.pool]
        if proc.done == 0 and charged is None:
            self.crash_streak[proc.pool] += 1
        if self.crash_streak[proc.pool] >= cfg.restart_limit:
            reason = f"pool {proc.pool!r}: {self.crash_streak[proc.pool]} processes in a row died before finishing a job (last: {ended.reason})"
            self.log.error("pool.failed", pool=proc.pool, reason=reason)
            self._fail(now, reason)
            return
        delay = min(0.05 * 2 ** self.crash_streak[proc.pool], 5.0) if self.crash_streak[proc.pool] else 0.0
        self.restarts.append((now + delay, proc.pool, proc.index, proc.restart + 1, proc.host))
