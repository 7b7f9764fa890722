"""The coordinator: one process that owns the run's ledger, its processes, its files and its log.

It composes the parts, each owning its state: the Ledger (where every job is), Flow (credit, batch
sizing, fair dispatch), the Supervisor (processes: start, scale, restart, exits), Hosts (worker hosts
over ZeroMQ), the ControlSocket (status, stop) and RunFiles (results, dead, pending). Here is the loop,
the run's state machine, signals, the messages of processes, and the end of the run.

Shutdown order (signals only set flags; the loop acts):
  1st SIGINT/SIGTERM: stop dispatching; producers stop at their next job; consumers finish the job in
     hand and exit; after `shutdown.grace` whatever remains is SIGKILLed. Unfinished jobs go to
     <run_id>.pending.jsonl. Exit 130 / 143.
  2nd signal: SIGKILL everything now; pending is still written.
End of run: every producer ended and every job settled -> consumers get STOP(done) at once.

Fail-safe: any unexpected exception in the loop (a bug, a full disk) is a crash, never a hang:
`run.crashed` with the traceback; every process, local and remote, gets the graceful stop, bounded
by `shutdown.grace`, then SIGKILL (remote ones not confirmed by then are dropped); every unsettled
job goes to the pending file; `run.finished` says `crashed`; exit 3, even during a signal's stop.
A Watchdog (process/watchdog.py) bounds a stop or a crash at grace + 5 s even if this loop is stuck.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import zmq

from runner import console, logs
from runner.backoff import backoff
from runner.config import Config
from runner.coordinator import report
from runner.coordinator.control import ControlSocket
from runner.coordinator.durable import RunJournal, open_journal, restore
from runner.coordinator.failsafe import kill_children
from runner.coordinator.files import RunFiles, writable
from runner.coordinator.flow import Flow
from runner.coordinator.hosts import Hosts, RemoteHost
from runner.coordinator.journal import JournalError
from runner.coordinator.ledger import Job, Ledger
from runner.coordinator.locks import LockTable
from runner.coordinator.members import Member
from runner.coordinator.monitor import Monitor
from runner.coordinator.resume import JournalState
from runner.coordinator.supervisor import Supervisor
from runner.display import Display
from runner.errors import ExitCode, ProtocolError, UsageError
from runner.process.handle import Exit
from runner.process.start import warm_up
from runner.process.watchdog import WATCHDOG_EXTRA_S, Watchdog
from runner.sdnotify import Notifier
from runner.timing import bucket_ms
from runner.wire import host_messages as hm
from runner.wire import messages
from runner.wire import zeromq as wire
from runner.wire.messages import GRANT

#: supervision tick when nothing happens (job timeouts, idle processes, retries)
TICK_S = 0.1
#: per-process checks (job timeouts, idle, scaling, heartbeats) run at most this often
SUPERVISE_S = 0.02
#: job retries wait retry_backoff, doubling, at most this long
RETRY_CAP_S = 60.0
#: after a crash's SIGKILL, how long remote processes have to confirm before they are dropped
REMOTE_KILL_WAIT_S = 2.0


def _say_stderr(message: str) -> None:
    """A last message for the person at the console; a closed console is no error."""
    with console.guard(sys.stderr):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def make_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(2)}"


class Coordinator:
    def __init__(self, config: Config, display: Display, bind: str | None = None, keys: wire.CoordinatorKeys | None = None,
                 resume: JournalState | None = None, rerun: dict[int, int] | None = None, run_keys: bool = False) -> None:
        """resume: a journal read back (`runner resume`); rerun: with it, dead job id -> attempts made (`runner retry`);
        run_keys: no --keys and no --insecure, so the run keeps its own CURVE keys (a resumed run, the same ones)."""
        self.config = config
        run = self.run_cfg = config.run
        self.resume = resume
        self.rerun = rerun
        self.run_id = resume.run_id if resume is not None else make_run_id(run.name)
        log_dir = Path(run.logs.dir)
        self.log_path = log_dir / f"{self.run_id}.jsonl"
        self.display = display
        writable(log_dir, self.log_path, run.results_path(self.run_id), lambda: self.control_address)  # exit 2 before anything starts
        journal = open_journal(config, self.run_id, resume)  # first: its lock says no other coordinator has this run
        self.files = RunFiles(log_dir, self.run_id, run.results_path(self.run_id),
                              truncate=(resume.results_offset, resume.dead_offset or 0) if resume is not None and resume.journaled else None)
        self.durable = RunJournal(journal, self.files)
        self.end: dict[str, Any] | None = None  #: run.finished's fields, once the run is over
        self.notifier = Notifier()  #: systemd Type=notify: READY=1, WATCHDOG=1 while the loop turns
        serve = bool(run.metrics.listen or run.dashboard.listen)
        self.monitor = Monitor(self.run_id, run, str(self.log_path), enabled=serve)  #: metrics and dashboard snapshots
        self.web = None
        if serve:  # bound now, so a taken port is a usage error before anything starts
            from runner.coordinator.web import Web

            self.web = Web(run, self.monitor, self.log_path)
        self.runlog = logs.RunLog(self.log_path, run.logs.level, display.console, display.tty)
        self.log = logs.configure(run.logs.level, self.runlog.write, run_id=self.run_id, role="coordinator", pool=None, worker="coordinator")
        self.host = logs.HOST
        self.bind = bind or run.transport.bind
        self.keys = keys
        #: no --keys and no --insecure: the run's own CURVE keys, in the user's private control folder
        self.run_keys = False
        if run_keys and self.bind:
            self.keys, self.run_keys = wire.make_run_keys(self.run_id, self.bind), True
        self.consumers = {c.name: c for c in run.consumers}
        self.ledger = Ledger(list(self.consumers))
        self.locks = LockTable()
        self.supervisor: Supervisor
        self.flow = Flow(run, self.ledger, self.log, lambda member, message: self.supervisor.send(member, message),
                         lambda key: self.supervisor.find(key))
        self.supervisor = Supervisor(config, self.run_id, self.host, self.log, self.ledger, self.flow, self.locks, self)
        self.context: zmq.Context | None = None
        self.hosts: Hosts | None = None  #: worker hosts, with --bind
        self.control: ControlSocket | None = None
        self.state = "running"  # running -> draining (done) | stopping (signal, failure) -> over
        self.signals: deque[int] = deque()
        self.stop_signal: int | None = None
        self.failure: str | None = None
        self.crash: str | None = None  #: the error that crashed the loop (exit 3)
        self.watchdog = Watchdog(self._child_pids, _say_stderr)
        self.deadline: float | None = None
        self.started = time.monotonic()
        self.next_progress = 0.0
        self._next_supervise = 0.0
        self._last_done = 0
        self._wake_r, self._wake_w = os.pipe()
        self.attempt_base: dict[int, int] = {}  #: `runner retry`: attempts a rerun job made before
        self._dead_before = 0  #: `runner retry`: jobs dead before it (the exit code judges the rerun only)

    @property
    def control_address(self) -> str:
        return wire.control_address(self.run_id)

    # -- life of the run --------------------------------------------------------------------
    def run(self) -> ExitCode:
        run = self.run_cfg
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        warm_up(run.start_method)
        pools = {p.name: {"role": "producer", "processes": p.processes, "task": p.task} for p in run.producers}
        pools.update({c.name: {"role": "consumer", "processes": c.processes, "task": c.task} for c in run.consumers})
        # Helper threads (ZeroMQ's, the live display's) start with SIGINT/SIGTERM blocked (as the CLI left
        # them), so the signals always reach this thread; then unblock: one that came meanwhile is handled now.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._open_sockets()
        except (zmq.ZMQError, OSError) as exc:
            self._safely(self._close_sockets)
            self.runlog.close()
            raise UsageError(f"cannot open the run's sockets (control socket {self.control_address}"
                             f"{', bind ' + self.bind if self.bind else ''}): {exc}") from exc
        if self.web is not None:
            self.monitor.turn(self, time.monotonic())  # a first snapshot: a scrape never finds none
            self.web.start()
        self.display.start(self.snapshot())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        started = {"name": run.name, "config": self.config.path, "start_method": run.start_method, "pools": pools,
                   "log_file": str(self.log_path), "results": self.files.results_path and str(self.files.results_path),
                   "coordinator_pid": os.getpid(), "bind": self.bind, "control": self.control_address,
                   "security": self._security(), "protocol": wire.PROTOCOL_VERSION}
        try:
            if self.resume is not None:
                self._restore(self.resume, started)
            else:
                self.log.info("run.started", **started, journal=str(self.durable.journal.path) if self.durable.journal else None)
            self.durable.start(os.getpid())
            self.supervisor.start_all()
            self.notifier.ready(f"run {self.run_id}")
            while self.state != "over":
                self._step()
        except BaseException as exc:  # the fail-safe: whatever it is, stop cleanly and say so
            self._crashed(exc)
        finally:
            self._safely(self.display.stop)
            signal.set_wakeup_fd(-1)
            self._safely(self._close_sockets)
        try:
            code = self._finish()
        except BaseException as exc:  # the end itself failed: still exit 3, never a traceback
            _say_stderr(f"error: the runner failed while ending run {self.run_id}: {type(exc).__name__}: {exc}")
            code = ExitCode.CRASHED
        finally:
            kill_children(self._child_pids())
        self._safely(self._after_run)
        self.watchdog.disarm()
        return code

    def _after_run(self) -> None:
        """The final snapshot; serve it `metrics.linger` seconds (a signal ends that early); close the HTTP side."""
        self.notifier.stopping()
        self.monitor.turn(self, time.monotonic(), over=True)
        if self.web is not None:
            try:
                self.web.linger_for(lambda: bool(self.signals))
            finally:
                self.web.close()
        self.notifier.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Only queue it for the loop, and arm the watchdog: whatever the loop does, the process ends in time."""
        self.signals.append(signum)
        self.watchdog.arm(self.run_cfg.shutdown.grace + WATCHDOG_EXTRA_S, ExitCode.CRASHED, signal.Signals(signum).name)

    def _child_pids(self) -> list[int]:
        return [proc.pid for proc in list(self.supervisor.procs.procs.values()) if proc.pid]

    def _safely(self, action: Any, *args: Any) -> Any:
        """Run one step of a crash's cleanup; a failure in it is noted on stderr, never raised."""
        try:
            return action(*args)
        except Exception as exc:
            _say_stderr(f"warning: while stopping after a failure: {getattr(action, '__name__', action)}: {type(exc).__name__}: {exc}")
            return None

    # -- the fail-safe -----------------------------------------------------------------------
    def _crashed(self, exc: BaseException) -> None:
        """The loop failed: log it, stop every process within shutdown.grace, then SIGKILL what is left."""
        grace = self.run_cfg.shutdown.grace
        self.crash = f"{type(exc).__name__}: {exc}"
        self.watchdog.arm(grace + WATCHDOG_EXTRA_S, ExitCode.CRASHED, "a crash")
        trace = "".join(traceback.format_exception(exc))
        self._safely(lambda: self.log.critical("run.crashed", error=self.crash, traceback=trace, grace_s=grace))
        self.state = "stopping"
        supervisor = self.supervisor
        self._safely(supervisor.restarts.clear)
        self._safely(supervisor.stop_all, "crashed")
        self._safely(supervisor.signal_all, signal.SIGTERM)
        self._wind_down(time.monotonic() + grace)

    def _wind_down(self, deadline: float) -> None:
        """Wait for the processes to end (reports are no longer read: what they held is pending), until
        `deadline`; then SIGKILL, and give up on remote processes that have not confirmed."""
        supervisor = self.supervisor
        killed = False
        while self._safely(supervisor.members):
            now = time.monotonic()
            if now > deadline:
                if killed:
                    break  # remote processes not confirmed: dropped; their jobs are unsettled, so pending
                killed = True
                deadline = now + REMOTE_KILL_WAIT_S
                self._safely(supervisor.kill_all, f"killed: the runner crashed {self.run_cfg.shutdown.grace:g}s ago")
            readable, ended, _ = self._safely(supervisor.procs.wait, TICK_S) or ([], [], set())
            for handle in readable:
                for _frame in handle.reader.read():
                    pass  # keep its pipe flowing, so it never blocks on a full pipe instead of exiting
            for handle in ended:
                self._safely(supervisor.on_local_exit, handle)
            if self.hosts is not None:
                self._safely(self.hosts.drain)
            self._safely(self._handle_signals, now)

    def _restore(self, state: JournalState, started: dict[str, Any]) -> None:
        """A resumed run (or a retry): the journal's unsettled jobs queued again, the producers that had not
        ended told where to start, the counts so far restored; then `run.resumed`."""
        pools = {job_id: pool for job_id, (pool, _) in state.dead.items()}
        summary = restore(state, self.ledger, self.supervisor, self.run_cfg, self.rerun)
        self.attempt_base = dict(state.rerun_base)
        self.monitor.restore(state.counters, state.histograms, self.ledger)
        if self.rerun is not None:
            rerun = self.rerun
            self._dead_before = sum(s.dead for s in self.ledger.stats.values())
            self.durable.rerun(sorted(rerun.items()))
            # the RERUN on disk before the dead file loses those lines (under the run's lock, the journal's): a crash
            # in between leaves lines the journal no longer counts as dead, which the resume below drops
            self.durable.commit_synced()
            self.files.rewrite_dead(lambda line: line.get("job_id") not in rerun)
        elif state.rerun_base and state.journaled:  # resuming a retry: keep only the lines of jobs still dead
            still_dead = state.dead
            self.files.rewrite_dead(lambda line: line.get("job_id") in still_dead)
        self.files.pending_path.unlink(missing_ok=True)  # stale: the journal is the truth now
        self.log.info("run.resumed", **started, **summary)
        if self.rerun is not None:
            for job_id, previous in sorted(self.rerun.items()):
                self.log.info("job.rerun", pool=pools.get(job_id), job_id=job_id, previous_attempts=previous)

    def _open_sockets(self) -> None:
        """The control socket (status, stop) and, with --bind, the socket worker hosts join."""
        poller = self.supervisor.procs.poller
        self.context = zmq.Context()
        self.control = ControlSocket(self.context, self.run_id, self.control_reply, self.log, self.status_with_stacks)
        poller.register(self.control.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self.bind:
            self.hosts = self.supervisor.hosts = Hosts(self, self.log, self.context, self.bind, self.keys)
            poller.register(self.hosts.sock, zmq.POLLIN)

    def _security(self) -> str | None:
        """How worker hosts are let in (run.started's `security`): none without --bind."""
        if not self.bind:
            return None
        return "run keys" if self.run_keys else "keys" if self.keys is not None else "insecure"

    def _close_sockets(self) -> None:
        if self.hosts is not None:
            self.hosts.close("run over")
        if self.control is not None:
            self.control.close()
        if self.context is not None:
            self.context.term()

    def control_reply(self, kind: int) -> dict[str, Any]:
        """A control request's answer (local socket or the bound one): `runner status`, `runner stop`."""
        if kind == wire.STATUS:
            return self.status()
        if kind == wire.STOP_RUN:
            self.signals.append(signal.SIGTERM)  # the same graceful stop as SIGTERM
            return {"ok": True, "run_id": self.run_id}
        return {"error": f"unknown request {kind}"}

    def status_with_stacks(self, answer: Any) -> None:
        """`runner status --stacks`: the status once every busy process's stack is in (answered later)."""
        self.supervisor.health.stacks(lambda stacks: answer({**self.status(), "stacks": stacks}))

    def _step(self) -> None:
        """One iteration: wait for a frame, an exit, a signal or the next timer; then act."""
        supervisor = self.supervisor
        readable, ended, other = supervisor.procs.wait(self._timeout())
        for handle in readable:
            self._read(supervisor.member_of(handle))
        for handle in ended:
            self._read(supervisor.member_of(handle))  # whatever it wrote before it died counts
            supervisor.on_local_exit(handle)
        if self.hosts is not None:
            self.hosts.drain()
        if self.control is not None and self.control.sock in other:
            self.control.serve()
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
        now = time.monotonic()
        retry = self.ledger.next_retry_at()
        if retry is not None:
            timeout = min(timeout, max(0.0, retry - now))
        return self.durable.timeout(now, timeout)

    def _handle_signals(self, now: float) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if self.crash is not None:
                self.stop_signal = self.stop_signal or signum
                self.supervisor.kill_all("killed: a signal while the runner stopped after a crash")
            elif self.state in ("running", "draining") and self.stop_signal is None:
                self.stop_signal = signum
                self._begin_stop(now, f"{signal.Signals(signum).name} received")
            else:
                self.log.warning("run.stopping", signal=signal.Signals(signum).name, reason="second signal: stopping now")
                self.supervisor.kill_all("killed: stop requested twice")

    def _begin_stop(self, now: float, reason: str) -> None:
        """Graceful stop: no new work; producers stop; consumers finish the job in hand."""
        grace = self.run_cfg.shutdown.grace
        self.log.warning("run.stopping", signal=signal.Signals(self.stop_signal).name if self.stop_signal else None, reason=reason, grace_s=grace)
        self.state = "stopping"
        self.deadline = now + grace
        self.supervisor.restarts.clear()
        self.supervisor.stop_all("stopped")
        self.supervisor.signal_all(signal.SIGTERM)

    def fail(self, now: float, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        if self.state in ("running", "draining"):
            self._begin_stop(now, reason)

    # -- timers ------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        supervisor = self.supervisor
        due = self.ledger.due_retries(now)
        if due:
            self.ledger.regroup(due, front=True)
        supervise = now >= self._next_supervise
        if supervise:  # the per-process checks, at most every SUPERVISE_S however busy the loop is
            self._next_supervise = now + SUPERVISE_S
            supervisor.check_job_timeouts(now)
            supervisor.check_health(now)
            if self.hosts is not None:
                self.hosts.tick(now)
        if self.state == "running":
            if supervise:
                supervisor.start_due_restarts(now)
            self.flow.dispatch(self.consumers, supervisor.pool_members)
            if supervise:
                supervisor.manage_pools(now)
            if self.flow.producers_open == 0 and self.ledger.settled() and not supervisor.restarts:
                self.state = "draining"
                self.deadline = now + self.run_cfg.shutdown.grace
                supervisor.stop_all("done")
        if self.state in ("stopping", "draining") and self.deadline is not None and now > self.deadline:
            supervisor.kill_all(f"killed: still running {self.run_cfg.shutdown.grace:g}s after the stop")
            self.deadline = None
        if not supervisor.members() and self.state in ("stopping", "draining"):
            self.state = "over"
        if now >= self.next_progress:
            self.next_progress = now + self.run_cfg.logs.progress_interval
            self._log_progress(now)
        if self.display.due(now):
            self.display.update(self.snapshot())
        self.durable.tick(now, self._counts, self._histograms)
        self.monitor.turn(self, now)
        self.notifier.watchdog(now)

    # -- frames ------------------------------------------------------------------------------
    def _read(self, member: Member) -> None:
        handle = getattr(member, "handle", None)
        if handle is not None:
            for frame in handle.reader.read():
                self.on_frame(member, frame)

    def on_frame(self, member: Member, frame: bytes) -> None:
        """One frame from a process, local or relayed by its worker host: checked by kind, then acted on
        (after a crash: none is read).

        A frame that fails its check is `protocol.error`, and its sender is not trusted again: a local process
        is SIGKILLed (its exit requeues what it held), a worker host is reset (the same, on its host)."""
        if self.crash is not None or member.protocol_error:
            return  # crashed, or it is already being killed or reset: nothing more it sends counts
        try:
            self._on_message(member, messages.decode_from_process(frame))
        except ProtocolError as exc:
            self._bad_peer(member, str(exc))

    def _bad_peer(self, member: Member, error: str) -> None:
        member.protocol_error = error
        self.log.error("protocol.error", peer=member.key, error=error)
        reason = f"sent a malformed message ({error[:200]})"
        if member.remote:
            if self.hosts is not None:
                self.hosts.reset_host(member.host, f"its process {member.name} {reason}")
        else:
            self.supervisor.signal(member, signal.SIGKILL, f"killed: {reason}")

    def _on_message(self, member: Member, message: messages.FromProcess) -> None:
        if isinstance(message, messages.Report):
            self._on_report(member, message)
        elif isinstance(message, messages.Log):
            self.runlog.write(message.line)
        elif isinstance(message, messages.NewBatch):
            self._on_batch(member, message.pool, message.n, message.blob)
        elif isinstance(message, messages.Ready):
            if member.remote and message.pid is not None:
                member.pid = message.pid
            member.ready = True
            member.idle_since = time.monotonic()
            self.log.info("worker.started", pool=member.pool, worker=member.name, role=member.role, pid=member.pid,
                          restart=member.restart, host=member.host)
        elif isinstance(message, messages.Lock):
            self._on_lock(member, message.op, message.name, message.request)
        elif isinstance(message, messages.End):
            if member.role != "producer":
                raise ProtocolError("END from a consumer")
            self.supervisor.on_producer_end(member, message.status, message.jobs, message.error, message.traceback)
        elif isinstance(message, messages.Invalid):
            if member.role != "producer":
                raise ProtocolError("INVALID from a consumer")
            pool = self.run_cfg.target_of(self.run_cfg.pool(member.pool))  # type: ignore[arg-type]
            job = Job(self.ledger.new_job_id(), pool, 0, message.payload_repr, member.key)
            self.durable.invalid(pool, job.id, member.key)
            self.monitor.produced(member.pool, 1)
            self.log.warning("job.failed", pool=pool, job_id=job.id, attempt=0, error=message.error, origin=member.key, cause="error")
            self._dead_letter(job, message.error, None, attempts=0)
        elif isinstance(message, messages.Fatal):
            member.fatal = (message.error, message.traceback)
        elif isinstance(message, messages.Progress):
            if member.role != "consumer":
                raise ProtocolError("PROGRESS from a producer (ctx.heartbeat is a consumer job's)")
            member.progress = (message.batch_id, message.index, message.progress)
        elif isinstance(message, messages.Total):
            if member.role != "producer":
                raise ProtocolError("TOTAL from a consumer (ctx.total is a producer's)")
            self.monitor.total(member, message.n)

    def _on_batch(self, member: Member, pool: str, n: int, blob: bytes) -> None:
        if member.role != "producer":
            raise ProtocolError("BATCH from a consumer (consumers emit through their reports)")
        if pool not in self.consumers:
            raise ProtocolError(f"batch for unknown pool {pool!r}")
        batch = self.ledger.add(pool, n, blob, member.key, credit_to=member.key)
        self.durable.jobs(batch, member.key)
        self.monitor.produced(member.pool, n)
        self.flow.on_batch(member.key, pool, n)
        if self.run_cfg.logs.jobs == "all":
            for i in range(n):
                self.log.info("job.queued", pool=pool, job_id=batch.first_id + i, origin=member.key)

    def _on_report(self, member: Member, report: messages.Report) -> None:
        batch_id, done, results, failures, emits, hist = report.batch_id, report.done, report.results, report.failures, report.emits, report.hist
        batch = self.ledger.in_flight.get(batch_id)
        if batch is None or batch.owner != member.key:
            self.log.warning("report.stale", peer=member.name, batch=batch_id)
            return
        if not batch.done <= done <= batch.n or any(not batch.done <= f[0] < done for f in failures) \
                or (results and any(not batch.done <= r[0] < done for r in results)):
            raise ProtocolError(f"report for batch {batch_id} out of range (done {done} of {batch.n})")
        if any(pool not in self.consumers for pool, _, _ in emits):
            raise ProtocolError(f"report for batch {batch_id} emits to an unknown pool")
        self._check_report_covers(batch_id, batch.done, done, results, failures)
        if results:  # written before the ledger counts them: a write that fails (full disk) leaves them unsettled
            self.files.write_results(batch.pool, ((batch.job_id(i), r) for i, r in results))
        newly = self.ledger.settle(batch, done)
        self.durable.done(batch, newly, {f[0] for f in failures} if failures else set())
        stats = self.ledger.stats[batch.pool]
        for index, error, trace, _ms in failures:
            job = Job(batch.job_id(index), batch.pool, batch.attempt(index), batch.payload(index), batch.origin)
            self.job_failed(job, error, trace, member, logged=True)
        ok = len(newly) - len(failures)
        stats.done += ok
        member.jobs_done += ok
        worker = self.supervisor.worker_stats[member.key]
        worker["done"] += ok
        worker["failed"] += len(failures)
        if ok:
            self.supervisor.crash_streak[batch.pool] = 0
        for pool, n, blob in emits:
            self.flow.emits_to[batch.pool].add(pool)
            emitted = self.ledger.add(pool, n, blob, member.key)
            self.durable.jobs(emitted, None)
            self.monitor.produced(batch.pool, n)
            if self.run_cfg.logs.jobs == "all":
                for i in range(n):
                    self.log.info("job.queued", pool=pool, job_id=emitted.first_id + i, origin=member.key)
        if hist:
            self._merge_hist(batch.pool, hist)
        if done >= batch.n and batch_id in member.outstanding:
            member.outstanding.remove(batch_id)
            if not member.outstanding:
                member.idle_since = time.monotonic()

    def _check_report_covers(self, batch_id: int, start: int, done: int, results: list[Any] | None, failures: list[Any]) -> None:
        """Each job of a report once: a result or a failure, never both, never twice (a job counted twice, or
        done without its result line, would break the exactly-once promise). With a results file, every
        job of [start, done) is there; without, the failures are distinct."""
        if results is not None or self.files.wants_results:
            indexes = [r[0] for r in results or ()]  # in index order as a consumer sends them
            if failures:
                indexes = sorted(indexes + [f[0] for f in failures])
            if indexes != list(range(start, done)):
                raise ProtocolError(f"report for batch {batch_id} does not give each of jobs {start}..{done - 1} "
                                    "exactly one result or failure")
        elif len(failures) > 1 and len({f[0] for f in failures}) != len(failures):
            raise ProtocolError(f"report for batch {batch_id} gives a job two failures")

    def _merge_hist(self, pool: str, hist: dict[int, int]) -> None:
        total = self.ledger.stats[pool].hist
        count = seconds = 0.0
        for bucket, n in hist.items():
            total[bucket] = total.get(bucket, 0) + n
            count += n
            seconds += n * bucket_ms(bucket) / 1000
        self.flow.job_time(pool, seconds / count)

    def job_failed(self, job: Job, error: str, trace: str | None, member: Member | None, logged: bool,
                   extra: dict[str, Any] | None = None) -> None:
        """A failed attempt: retried after retry_backoff (doubling) while attempts remain, else dead."""
        cfg = self.consumers[job.pool]
        stats = self.ledger.stats[job.pool]
        stats.failed += 1
        self.monitor.failed(job, error, trace, member, extra)
        quiet = self.run_cfg.logs.jobs == "none"
        if not logged and not quiet:
            self.log.warning("job.failed", pool=job.pool, worker=member.name if member else None, host=member.host if member else None,
                             job_id=job.id, attempt=job.attempt, error=error, origin=job.origin, **(extra or {}))
        if job.attempt - self.attempt_base.get(job.id, 0) <= cfg.retries:
            delay = backoff(cfg.retry_backoff, job.attempt - self.attempt_base.get(job.id, 0), RETRY_CAP_S)
            job.attempt += 1
            self.durable.attempt(job.id, job.attempt)
            stats.retried += 1
            self.ledger.schedule_retry(job, time.monotonic() + delay)
            if not quiet:
                self.log.info("job.retried", pool=job.pool, job_id=job.id, attempt=job.attempt, delay_ms=round(delay * 1000))
        else:
            self._dead_letter(job, error, trace, attempts=job.attempt)

    def _dead_letter(self, job: Job, error: str, trace: str | None, attempts: int) -> None:
        # the line first: a journaled DEAD whose line a failed write lost would never run again on resume
        self.files.write_dead({"job_id": job.id, "pool": job.pool, "payload": job.payload, "error": error,
                               "traceback": trace, "attempts": attempts, "origin": job.origin})
        self.ledger.stats[job.pool].dead += 1
        self.durable.dead(job.pool, job.id, attempts)
        self.log.error("job.dead", pool=job.pool, job_id=job.id, attempts=attempts, error=error, origin=job.origin)

    def _on_lock(self, member: Member, op: str, name: str, request: int) -> None:
        if op == "acquire":
            if self.locks.acquire(name, member.key, request):
                self.supervisor.send(member, [GRANT, name, request])
        else:
            handed = self.locks.release(name, member.key)
            if handed:
                self.supervisor.grant(name, *handed)

    # -- what Hosts tell the run (HostEvents) -----------------------------------------------
    def pool_spec(self, pool: str) -> dict[str, Any]:
        return self.supervisor.pool_spec(pool)

    def on_exit(self, member: Member, ended: Exit, host_gone: bool = False) -> None:
        self.supervisor.on_exit(member, ended, host_gone)

    def producer_position(self, key: str, position: int) -> None:
        self.durable.positions[key] = position

    def producer_ended(self, key: str, status: str) -> None:
        self.durable.producer_ended(key, status)

    def on_host_joined(self, host: RemoteHost) -> None:
        self.supervisor.on_host_joined(host)

    def on_host_gone(self, name: str) -> None:
        self.supervisor.on_host_gone(name)

    def on_stalled(self, member: Member, stall: hm.Stalled) -> None:
        self.supervisor.health.on_remote_stall(member, stall)

    def on_stack_dumps(self, host: str, request: int, dumps: dict[str, hm.StackDump]) -> None:
        self.supervisor.health.on_stack_dumps(host, request, dumps)

    def on_heartbeat(self, host: RemoteHost, procs: dict[str, hm.ProcInfo]) -> None:
        self.supervisor.health.on_host_heartbeat(host.procs, procs)

    # -- reporting ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """What the live display shows."""
        now = time.monotonic()
        return {"name": self.run_cfg.name, "counts": report.counts(self.ledger), "elapsed_s": now - self.started,
                "full": [pool for pool, at in self.flow.last_full.items() if now - at < 5.0]}

    def _counts(self) -> dict[str, Any]:
        return self.monitor.counters(self.ledger, self.supervisor.worker_stats)

    def _histograms(self) -> dict[str, Any]:
        return self.monitor.histograms(self.ledger)

    def _log_progress(self, now: float) -> None:
        counts = report.counts(self.ledger)
        rate = (counts["done"] - self._last_done) / self.run_cfg.logs.progress_interval
        self._last_done = counts["done"]
        self.log.info("progress", **{k: counts[k] for k in ("produced", "done", "failed", "dead", "queued", "in_flight")},
                      rate=round(rate, 1), elapsed_s=round(now - self.started, 3))

    def status(self) -> dict[str, Any]:
        """What `runner status` shows: hosts, pools, processes, queues, counts, rate."""
        return report.status(self.run_id, self.run_cfg.name, self.state, self.started, self.display.rate, self.host,
                             self.ledger, self.supervisor.members(), self.hosts.hosts.values() if self.hosts else [])

    def _close_journal(self, status: str) -> None:
        """The journal's last commit. If it broke during the run, the crash said so already; if only this
        last commit fails, the run's results and log are complete: say what a resume would do."""
        try:
            self.durable.counters(self._counts(), self._histograms)
            self.durable.finish(status)
        except JournalError as exc:
            if self.crash is None:
                _say_stderr(f"warning: run {self.run_id} ended {status}, but its journal's last commit failed ({exc}); its results "
                            "and log are complete (a resume would only run again the jobs the journal lacks)")

    def _finish(self) -> ExitCode:
        pending = self.ledger.unsettled()
        pending_written = bool(pending)
        try:
            self.files.write_pending([{"job_id": job.id, "pool": job.pool, "payload": job.payload, "attempts": job.attempt - 1}
                                      for job in pending])
        except OSError as exc:  # a full disk: say what is lost, and where it should have gone
            pending_written = False
            self.crash = self.crash or f"cannot write the pending file {self.files.pending_path}: {exc.strerror or exc}"
            self._safely(self.files.pending_path.unlink, True)  # a torn pending file would pass for a whole one
            again = (f"`runner resume {self.run_id}` runs them again from the journal once there is room" if self.durable.on
                     else "their ids are in the log's worker and job events")
            _say_stderr(f"error: {len(pending)} unfinished job(s) could not be written to {self.files.pending_path}: "
                        f"{exc.strerror or exc}; {again}")
        counts = report.counts(self.ledger)
        if self.crash is not None:
            status, code = "crashed", ExitCode.CRASHED
        elif self.stop_signal is not None and self.failure is None:
            status, code = "stopped", ExitCode.SIGINT if self.stop_signal == signal.SIGINT else ExitCode.SIGTERM
        elif self.failure or self.supervisor.producer_failed or counts["dead"] > self._dead_before:
            status, code = "failed", ExitCode.FAILED
        else:
            status, code = "finished", ExitCode.OK
        pools = report.pool_summary(self.ledger, time.monotonic() - self.started)
        end = {"status": status, "exit_code": int(code), "duration_s": round(time.monotonic() - self.started, 3),
               **{k: counts[k] for k in ("produced", "done", "failed", "retried", "dead")}, "pending": len(pending),
               "error": self.crash or self.failure, "pending_file": str(self.files.pending_path) if pending_written else None,
               "dead_file": str(self.files.dead_path) if counts["dead"] else None}
        self.end = {**end, "pools": pools}
        level = "error" if status in ("failed", "crashed") else "info"
        if self.run_keys and (status in ("finished", "failed") or not self.durable.on):
            # a run that can be resumed (stopped, crashed; or killed, never here) keeps them: `runner resume`
            # runs under the same run id, so the same keys, and workers that found them join it again
            self._safely(wire.remove_run_keys, self.run_id)
        self._safely(self._close_journal, status)  # before run.finished: a reader that sees the line finds the run's lock released
        self._safely(lambda: getattr(self.log, level)("run.finished", **end, pools=pools, workers=self.supervisor.worker_stats))
        self._safely(self.files.close)
        self._safely(self.runlog.close)
        self.display.summary({**end, "run_id": self.run_id, "pools": pools, "log_file": str(self.log_path)})
        return code
