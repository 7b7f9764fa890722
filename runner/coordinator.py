"""The coordinator: one process that owns the run's ledger, its processes, its files and its log.

Shutdown order (signals only set flags; the loop acts):
  1st SIGINT/SIGTERM: stop dispatching; producers stop at their next job; consumers finish the job in
     hand and exit; after `shutdown.grace` whatever remains is SIGKILLed. Unfinished jobs go to
     <run_id>.pending.jsonl. Exit 130 / 143.
  2nd signal: SIGKILL everything now; pending is still written.
End of run: every producer ended and every job settled -> consumers get STOP(done) at once.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import zmq

from runner import logs, protocol
from runner.config import Config
from runner.errors import ExitCode, ProtocolError
from runner.ledger import Batch, Job, Ledger
from runner.locks import LockTable
from runner.pool import LocalProcesses, Proc, warm_up
from runner.supervisor import PREFETCH, PREFETCH_REMOTE, Supervisor
from runner.progress import Progress
from runner.transports import zeromq as wire
from runner.protocol import BATCH, CREDIT, END, FATAL, GRANT, INVALID, LOCK, LOG, READY, REPORT

#: a batch should take about this long, so slow jobs spread over every process
TARGET_BATCH_S = 0.02
#: supervision tick when nothing happens (job timeouts, idle processes, retries)
TICK_S = 0.1
#: per-process checks (job timeouts, idle, scaling, heartbeats) run at most this often
SUPERVISE_S = 0.02


def make_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(2)}"


class Coordinator(Supervisor):
    def __init__(self, config: Config, progress: Progress, bind: str | None = None, keys: wire.CoordinatorKeys | None = None) -> None:
        self.config = config
        run = self.run_cfg = config.run
        self.run_id = make_run_id(run.name)
        log_dir = Path(run.logs.dir)
        self.log_path = log_dir / f"{self.run_id}.jsonl"
        self.dead_path = log_dir / f"{self.run_id}.dead.jsonl"
        self.pending_path = log_dir / f"{self.run_id}.pending.jsonl"
        self.progress = progress
        self.runlog = logs.RunLog(self.log_path, run.logs.level, progress.console, progress.tty)
        self.log = logs.configure(run.logs.level, self.runlog.write, run_id=self.run_id, role="coordinator", pool=None, worker="coordinator")
        self.results: IO[str] | None = None
        if run.results:
            Path(run.results).parent.mkdir(parents=True, exist_ok=True)
            self.results = open(run.results, "a", encoding="utf-8")
        self._dead: IO[str] | None = None
        self.host = logs.HOST
        self.procs = LocalProcesses(run.start_method, self.host)
        self.bind = bind or run.transport.bind
        self.keys = keys
        self.context: zmq.Context | None = None
        self.remote: Any = None  #: RemoteHosts when --bind is given
        self.control: zmq.Socket | None = None
        self.control_address = wire.control_address(self.run_id)
        self.consumers = {c.name: c for c in run.consumers}
        self.ledger = Ledger(list(self.consumers))
        self.locks = LockTable()
        self.state = "running"  # running -> draining (done) | stopping (signal, failure) -> over
        self.signals: deque[int] = deque()
        self.stop_signal: int | None = None
        self.failure: str | None = None
        self.deadline: float | None = None
        self.started = time.monotonic()
        self.producers_open = 0
        self.producer_failed = False
        self.credit: dict[str, int] = {}  #: jobs each live producer may still send (as we count it)
        self.credit_owed: dict[str, int] = {}  #: credit returned but not yet sent
        self.credit_share: dict[str, int] = {}
        self.crash_streak = {pool: 0 for pool in self.consumers}
        self.restarts: list[tuple[float, str, int, int, str]] = []  #: (due, pool, index, restart, host)
        self.worker_stats: dict[str, dict[str, Any]] = {}
        self.emits_to: dict[str, set[str]] = {pool: set() for pool in self.consumers}
        self.mean_job_s: dict[str, float] = {}
        self.last_full: dict[str, float] = {}
        self.next_progress = 0.0
        self._next_supervise = 0.0
        self._last_done = 0
        self._wake_r, self._wake_w = os.pipe()
        self._served: dict[str, int] = {}  #: process key -> when it last got a batch (a counter), for fair dispatch
        self._served_count = 0

    # -- life of the run --------------------------------------------------------------------
    def run(self) -> ExitCode:
        run = self.run_cfg
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda s, f: self.signals.append(s))
        warm_up(run.start_method)
        pools = {p.name: {"role": "producer", "processes": p.processes, "task": p.task} for p in run.producers}
        pools.update({c.name: {"role": "consumer", "processes": c.processes, "task": c.task} for c in run.consumers})
        # Helper threads (ZeroMQ's, the live display's) start with SIGINT/SIGTERM blocked (as the CLI left
        # them), so the signals always reach this thread; then unblock: one that came meanwhile is handled now.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self._open_sockets()
        self.progress.start(self)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        self.log.info("run.started", name=run.name, config=self.config.path, start_method=run.start_method, pools=pools,
                      log_file=str(self.log_path), results=run.results, coordinator_pid=os.getpid(),
                      bind=self.bind, control=self.control_address)
        try:
            # every pool's processes start together; none waits for another to finish
            for producer in run.producers:
                for index in range(1, producer.processes + 1):
                    self._start(producer.name, "producer", index, 0, self.host)
            for consumer in run.consumers:
                for index in range(1, consumer.processes + 1):
                    self._start_consumer(consumer, index)
            while self.state != "over":
                self._step()
        finally:
            self.progress.stop()
            signal.set_wakeup_fd(-1)
            self._close_sockets()
        return self._finish()

    def _open_sockets(self) -> None:
        """The control socket (status, stop) and, with --bind, the socket worker hosts join."""
        from runner.remote import RemoteHosts

        self.context = zmq.Context()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(self.control_address)
        self.procs.poller.register(self.control, zmq.POLLIN)
        self.procs.poller.register(self._wake_r, zmq.POLLIN)
        if self.bind:
            self.remote = RemoteHosts(self, self.context, self.bind, self.keys)
            self.procs.poller.register(self.remote.sock, zmq.POLLIN)

    def _close_sockets(self) -> None:
        if self.remote is not None:
            self.remote.close("run over")
        if self.control is not None:
            self.control.close(0)
            path = self.control_address.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)
        if self.context is not None:
            self.context.term()

    def _serve_control(self) -> None:
        assert self.control is not None
        while True:
            try:
                identity, *parts = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, _, _ = wire.parse(parts)
            except ProtocolError as exc:
                self.log.error("protocol.error", peer="control", error=str(exc))
                continue
            self.control.send_multipart([identity, wire.header(wire.REPLY, self.control_reply(kind))])

    def control_reply(self, kind: int) -> dict[str, Any]:
        """A control request's answer (local socket or the bound one): `runner status`, `runner stop`."""
        if kind == wire.STATUS:
            return self.status()
        if kind == wire.STOP_RUN:
            self.signals.append(signal.SIGTERM)  # the same graceful stop as SIGTERM
            return {"ok": True, "run_id": self.run_id}
        return {"error": f"unknown request {kind}"}

    def _step(self) -> None:
        """One iteration: wait for a frame, an exit, a signal or the next timer; then act."""
        readable, ended, other = self.procs.wait(self._timeout())
        for proc in readable:
            self._read(proc)
        for proc in ended:
            self._read(proc)  # whatever it wrote before it died counts
            self._on_local_exit(proc)
        if self.remote is not None:
            self.remote.drain()
        if self.control in other:
            self._serve_control()
        if self._wake_r in other:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
        now = time.monotonic()
        self._handle_signals(now)
        self._tick(now)

    def _timeout(self) -> float:
        timeout = TICK_S
        retry = self.ledger.next_retry_at()
        if retry is not None:
            timeout = min(timeout, max(0.0, retry - time.monotonic()))
        return timeout

    def _handle_signals(self, now: float) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if self.state in ("running", "draining") and self.stop_signal is None:
                self.stop_signal = signum
                self._begin_stop(now, f"{signal.Signals(signum).name} received")
            else:
                self.log.warning("run.stopping", signal=signal.Signals(signum).name, reason="second signal: stopping now")
                self._kill_all("killed: stop requested twice")

    def _begin_stop(self, now: float, reason: str) -> None:
        """Graceful stop: no new work; producers stop; consumers finish the job in hand."""
        grace = self.run_cfg.shutdown.grace
        self.log.warning("run.stopping", signal=signal.Signals(self.stop_signal).name if self.stop_signal else None, reason=reason, grace_s=grace)
        self.state = "stopping"
        self.deadline = now + grace
        self.restarts.clear()
        for proc in self.all_procs():
            self._stop(proc, "stopped")
        self._signal_all(signal.SIGTERM)

    def _fail(self, now: float, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        if self.state in ("running", "draining"):
            self._begin_stop(now, reason)

    # -- timers ------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        due = self.ledger.due_retries(now)
        if due:
            self.ledger.regroup(due, front=True)
        supervise = now >= self._next_supervise
        if supervise:  # the per-process checks, at most every SUPERVISE_S however busy the loop is
            self._next_supervise = now + SUPERVISE_S
            self._check_job_timeouts(now)
            if self.remote is not None:
                self.remote.tick(now)
        if self.state == "running":
            if supervise:
                self._start_due_restarts(now)
            self._dispatch(now)
            if supervise:
                self._manage_pools(now)
            if self.producers_open == 0 and self.ledger.settled() and not self.restarts:
                self.state = "draining"
                self.deadline = now + self.run_cfg.shutdown.grace
                for proc in self.all_procs():
                    self._stop(proc, "done")
        if self.state in ("stopping", "draining") and self.deadline is not None and now > self.deadline:
            self._kill_all(f"killed: still running {self.run_cfg.shutdown.grace:g}s after the stop")
            self.deadline = None
        if not self.all_procs() and self.state in ("stopping", "draining"):
            self.state = "over"
        if now >= self.next_progress:
            self.next_progress = now + self.run_cfg.logs.progress_interval
            self._log_progress(now)
        self.progress.update(self)

    # -- dispatch ----------------------------------------------------------------------------
    def _batch_size(self, pool: str) -> int:
        mean = self.mean_job_s.get(pool)
        most = self.run_cfg.queue.batch
        if mean is None:
            return 1  # until a job's time is known: one job each, so the first process (or host) cannot hoard them
        return max(1, min(most, int(TARGET_BATCH_S / mean) if mean > 0 else most))

    def _dispatch(self, now: float) -> None:
        maxsize = self.run_cfg.queue.maxsize
        for pool, cfg in self.consumers.items():
            if not self.ledger.pending[pool]:
                continue
            if any(self.ledger.queued(down) >= maxsize for down in self.emits_to[pool]):
                continue  # backpressure on a stage whose downstream queue is full
            size = self._batch_size(pool)
            limit = cfg.max_jobs_per_process
            procs = [p for p in self._pool_procs(pool) if p.ready]
            while self.ledger.pending[pool]:
                # one batch at a time to the least loaded process, the longest unserved first: local and
                # remote processes share the queue fairly even when jobs trickle in one by one
                room = [p for p in procs if len(p.outstanding) < (PREFETCH_REMOTE if p.remote else PREFETCH)
                        and not (limit and p.assigned >= limit)]
                if not room:
                    break
                proc = min(room, key=lambda p: (len(p.outstanding), self._served.get(p.key, 0)))
                most = min(size, limit - proc.assigned) if limit else size
                batch = self.ledger.take(pool, most, proc.key)
                assert batch is not None
                self._served_count += 1
                self._served[proc.key] = self._served_count
                self._hand_over(proc, batch)

    def _hand_over(self, proc: Proc, batch: Batch) -> None:
        proc.outstanding.append(batch.id)
        proc.assigned += batch.n
        self._send(proc, batch.message())
        if self.run_cfg.logs.jobs == "all":
            self.log.info("batch.sent", pool=batch.pool, worker=proc.name, host=proc.host,
                          job_ids=[batch.job_id(i) for i in range(batch.n)], attempts=batch.attempts)
        producer = batch.credit_to
        if producer and producer in self.credit:
            self._return_credit(producer, batch.n)
        batch.credit_to = None

    def _return_credit(self, producer: str, n: int) -> None:
        """Jobs left the queue: the producer may send as many more. Sent in bulk, not per batch,
        unless the producer is running low (then at once, so it never waits on us)."""
        self.credit[producer] += n
        owed = self.credit_owed.get(producer, 0) + n
        share = self.credit_share.get(producer, 1)
        if owed * 4 >= share or self.credit[producer] - owed < share // 4 or owed >= self.run_cfg.queue.batch * 8:
            target = self._find(producer)
            if target is not None:
                self._send(target, [CREDIT, owed])
            owed = 0
        self.credit_owed[producer] = owed

    # -- frames ------------------------------------------------------------------------------
    def _read(self, proc: Proc) -> None:
        assert proc.reader is not None
        for frame in proc.reader.read():
            self.on_frame(proc, frame)

    def on_frame(self, proc: Proc, frame: bytes) -> None:
        """One frame from a process, local or relayed by its worker host."""
        try:
            self._on_message(proc, protocol.unpack(frame))
        except ProtocolError as exc:
            self.log.error("protocol.error", peer=proc.key, error=str(exc))
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            self.log.error("protocol.error", peer=proc.key, error=f"malformed message: {exc!r}")

    def _on_message(self, proc: Proc, message: list[Any]) -> None:
        kind = message[0]
        if kind == REPORT:
            self._on_report(proc, *message[1:])
        elif kind == LOG:
            self.runlog.write(message[1])
        elif kind == BATCH:
            self._on_batch(proc, message[1], message[2], message[3])
        elif kind == READY:
            if proc.remote and len(message) > 1:
                proc.pid = message[1]
            proc.ready = True
            proc.idle_since = time.monotonic()
            self.log.info("worker.started", pool=proc.pool, worker=proc.name, role=proc.role, pid=proc.pid, restart=proc.restart, host=proc.host)
        elif kind == LOCK:
            self._on_lock(proc, message[1], message[2], message[3])
        elif kind == END:
            self._on_end(proc, *message[1:])
        elif kind == INVALID:
            pool = self.run_cfg.target_of(self.run_cfg.pool(proc.pool))  # type: ignore[arg-type]
            job = Job(self.ledger.new_job_id(), pool, 0, message[2], proc.key)
            self.log.warning("job.failed", pool=pool, job_id=job.id, attempt=0, error=message[1], origin=proc.key)
            self._dead_letter(job, message[1], None, attempts=0)
        elif kind == FATAL:
            proc.fatal = (message[1], message[2])

    def _on_batch(self, proc: Proc, pool: str, n: int, blob: bytes) -> None:
        if pool not in self.consumers:
            self.log.error("protocol.error", peer=proc.name, error=f"batch for unknown pool {pool!r}")
            return
        batch = self.ledger.add(pool, n, blob, proc.key, credit_to=proc.key)
        if proc.key in self.credit:
            self.credit[proc.key] -= n
            if self.credit[proc.key] - self.credit_owed.get(proc.key, 0) <= 0:  # what the producer itself has left
                self._queue_full(pool)
        if self.run_cfg.logs.jobs == "all":
            for i in range(n):
                self.log.info("job.queued", pool=pool, job_id=batch.first_id + i, origin=proc.key)

    def _queue_full(self, pool: str) -> None:
        now = time.monotonic()
        if now - self.last_full.get(pool, -10.0) >= 5.0:
            self.last_full[pool] = now
            self.log.warning("queue.full", pool=pool, depth=self.ledger.queued(pool), maxsize=self.run_cfg.queue.maxsize)

    def _on_end(self, proc: Proc, status: str, jobs: int, error: str | None, trace: str | None) -> None:
        if proc.ended:
            return
        proc.ended = True
        self.producers_open -= 1
        self.credit.pop(proc.key, None)
        if status == "failed":
            self.producer_failed = True
            self.log.error("producer.failed", pool=proc.pool, worker=proc.name, error=error, traceback=trace, jobs=jobs)
        self.log.info("producer.finished", pool=proc.pool, worker=proc.name, jobs=jobs, status=status)

    def _on_report(self, proc: Proc, batch_id: int, done: int, results: Any, failures: list[Any], emits: list[Any], hist: dict[int, int]) -> None:
        batch = self.ledger.in_flight.get(batch_id)
        if batch is None or batch.owner != proc.key:
            self.log.warning("report.stale", peer=proc.name, batch=batch_id)
            return
        if not batch.done <= done <= batch.n or any(not batch.done <= f[0] < done for f in failures):
            raise ProtocolError(f"report for batch {batch_id} out of range (done {done} of {batch.n})")
        newly = self.ledger.progress(batch, done)
        stats = self.ledger.stats[batch.pool]
        for index, error, trace, _ms in failures:
            job = Job(batch.job_id(index), batch.pool, batch.attempt(index), batch.payload(index), batch.origin)
            self._job_failed(job, error, trace, proc, logged=True)
        ok = len(newly) - len(failures)
        stats.done += ok
        proc.done += ok
        self.worker_stats[proc.key]["done"] += ok
        self.worker_stats[proc.key]["failed"] += len(failures)
        if ok:
            self.crash_streak[batch.pool] = 0
        if results and self.results is not None:
            self.results.write("".join(logs.dumps({"job_id": batch.job_id(i), "pool": batch.pool, "result": r}) + "\n" for i, r in results))
        for pool, n, blob in emits:
            if pool in self.consumers:
                self.emits_to[batch.pool].add(pool)
                emitted = self.ledger.add(pool, n, blob, proc.key)
                if self.run_cfg.logs.jobs == "all":
                    for i in range(n):
                        self.log.info("job.queued", pool=pool, job_id=emitted.first_id + i, origin=proc.key)
        if hist:
            self._merge_hist(batch.pool, hist)
        if done >= batch.n and batch_id in proc.outstanding:
            proc.outstanding.remove(batch_id)
            if not proc.outstanding:
                proc.idle_since = time.monotonic()

    def _merge_hist(self, pool: str, hist: dict[int, int]) -> None:
        total = self.ledger.stats[pool].hist
        count = seconds = 0.0
        for bucket, n in hist.items():
            total[bucket] = total.get(bucket, 0) + n
            count += n
            seconds += n * protocol.bucket_ms(bucket) / 1000
        mean = seconds / count
        old = self.mean_job_s.get(pool)
        self.mean_job_s[pool] = mean if old is None else 0.7 * old + 0.3 * mean

    def _job_failed(self, job: Job, error: str, trace: str | None, proc: Proc | None, logged: bool, extra: dict[str, Any] | None = None) -> None:
        cfg = self.consumers[job.pool]
        stats = self.ledger.stats[job.pool]
        stats.failed += 1
        quiet = self.run_cfg.logs.jobs == "none"
        if not logged and not quiet:
            self.log.warning("job.failed", pool=job.pool, worker=proc.name if proc else None, host=proc.host if proc else None,
                             job_id=job.id, attempt=job.attempt, error=error, origin=job.origin, **(extra or {}))
        if job.attempt <= cfg.retries:
            delay = min(cfg.retry_backoff * 2 ** (job.attempt - 1), 60.0)
            job.attempt += 1
            stats.retried += 1
            self.ledger.schedule_retry(job, time.monotonic() + delay)
            if not quiet:
                self.log.info("job.retried", pool=job.pool, job_id=job.id, attempt=job.attempt, delay_ms=round(delay * 1000))
        else:
            self._dead_letter(job, error, trace, attempts=job.attempt)

    def _dead_letter(self, job: Job, error: str, trace: str | None, attempts: int) -> None:
        self.ledger.stats[job.pool].dead += 1
        if self._dead is None:
            self._dead = open(self.dead_path, "a", encoding="utf-8")
        self._dead.write(logs.dumps({"job_id": job.id, "pool": job.pool, "payload": job.payload, "error": error,
                                     "traceback": trace, "attempts": attempts, "origin": job.origin}) + "\n")
        self._dead.flush()
        self.log.error("job.dead", pool=job.pool, job_id=job.id, attempts=attempts, error=error, origin=job.origin)

    def _on_lock(self, proc: Proc, op: str, name: str, request: int) -> None:
        if op == "acquire":
            if self.locks.acquire(name, proc.key, request):
                self._send(proc, [GRANT, name, request])
        else:
            handed = self.locks.release(name, proc.key)
            if handed:
                self._grant(name, *handed)

    def _grant(self, name: str, who: str, request: int) -> None:
        proc = self._find(who)
        if proc is not None:
            self._send(proc, [GRANT, name, request])

    # -- exits -------------------------------------------------------------------------------
    # -- reporting ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        stats = self.ledger.stats.values()
        return {
            "produced": self.ledger.produced, "done": sum(s.done for s in stats), "failed": sum(s.failed for s in stats),
            "retried": sum(s.retried for s in stats), "dead": sum(s.dead for s in stats),
            "queued": self.ledger.queued(), "in_flight": self.ledger.in_flight_jobs,
        }

    def _log_progress(self, now: float) -> None:
        if self.results is not None:
            self.results.flush()  # a live run's results can be read as it goes, a tick behind at most
        counts = self.counts()
        elapsed = now - self.started
        rate = (counts["done"] - self._last_done) / self.run_cfg.logs.progress_interval
        self._last_done = counts["done"]
        self.log.info("progress", **{k: counts[k] for k in ("produced", "done", "failed", "dead", "queued", "in_flight")},
                      rate=round(rate, 1), elapsed_s=round(elapsed, 3))

    def status(self) -> dict[str, Any]:
        """What `runner status` shows: hosts, pools, processes, queues, counts, rate."""
        now = time.monotonic()
        procs = self.all_procs()
        hosts: dict[str, Any] = {self.host: {"address": "local", "processes": 0}}
        if self.remote is not None:
            for host in self.remote.hosts.values():
                hosts[host.name] = {"address": "remote", "processes": 0, "pid": host.pid, "last_seen_s": round(now - host.last_seen, 3)}
        pools: dict[str, Any] = {}
        for proc in procs:
            hosts.setdefault(proc.host, {"processes": 0})["processes"] += 1
            entry = pools.setdefault(proc.pool, {"role": proc.role, "processes": 0, "ready": 0, "in_flight_batches": 0})
            entry["processes"] += 1
            entry["ready"] += int(proc.ready)
            entry["in_flight_batches"] += len(proc.outstanding)
        for name, stats in self.ledger.stats.items():
            pools.setdefault(name, {"role": "consumer", "processes": 0}).update(
                queued=self.ledger.queued(name), done=stats.done, failed=stats.failed, dead=stats.dead, retried=stats.retried)
        return {"run_id": self.run_id, "name": self.run_cfg.name, "state": self.state, "pid": os.getpid(),
                "elapsed_s": round(now - self.started, 3), "rate": self.progress.rate, "counts": self.counts(),
                "hosts": hosts, "pools": pools, "processes": [
                    {"worker": p.name, "host": p.host, "pool": p.pool, "pid": p.pid, "ready": p.ready, "batches": len(p.outstanding)} for p in procs]}

    def pool_summary(self) -> dict[str, dict[str, Any]]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            pool: {"done": s.done, "failed": s.failed, "retried": s.retried, "dead": s.dead,
                   "p50_ms": protocol.percentile_ms(s.hist, 0.5), "p95_ms": protocol.percentile_ms(s.hist, 0.95),
                   "p99_ms": protocol.percentile_ms(s.hist, 0.99), "jobs_per_s": round(s.done / elapsed, 1)}
            for pool, s in self.ledger.stats.items()
        }

    def _finish(self) -> ExitCode:
        pending = self.ledger.unsettled()
        if pending:
            with open(self.pending_path, "w", encoding="utf-8") as out:
                for job in pending:
                    out.write(logs.dumps({"job_id": job.id, "pool": job.pool, "payload": job.payload, "attempts": job.attempt - 1}) + "\n")
        counts = self.counts()
        if self.stop_signal is not None and self.failure is None:
            status, code = "stopped", ExitCode.SIGINT if self.stop_signal == signal.SIGINT else ExitCode.SIGTERM
        elif self.failure or self.producer_failed or counts["dead"]:
            status, code = "failed", ExitCode.FAILED
        else:
            status, code = "finished", ExitCode.OK
        level = "error" if status == "failed" else "info"
        getattr(self.log, level)("run.finished", status=status, exit_code=int(code), duration_s=round(time.monotonic() - self.started, 3),
                                 **{k: counts[k] for k in ("produced", "done", "failed", "retried", "dead")}, pending=len(pending),
                                 error=self.failure, pending_file=str(self.pending_path) if pending else None,
                                 dead_file=str(self.dead_path) if counts["dead"] else None,
                                 pools=self.pool_summary(), workers=self.worker_stats)
        for handle in (self.results, self._dead):
            if handle is not None:
                handle.close()
        self.runlog.close()
        self.progress.summary(self, status, code, len(pending))
        return code
