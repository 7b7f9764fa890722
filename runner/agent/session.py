"""One session of a worker host with a coordinator: relay frames, supervise local processes, heartbeats.

The agent is a relay with local supervision: the coordinator decides which processes run here and
what they hold (its ledger is the only one); the session starts them, passes frames both ways, reaps
them, enforces job_timeout, stall_timeout and memory_limit on them (process/watch.py), and reports
every exit with the job in hand, every stall with its stack, and its processes' RSS with each heartbeat.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import zmq

from runner.errors import ProtocolError, UsageError
from runner.process.context import import_task
from runner.process.handle import LocalProcess, LocalProcesses
from runner.process.start import warm_up
from runner.process.watch import Stall, Watch
from runner.sdnotify import Notifier
from runner.wire import host_messages as hm
from runner.wire import messages
from runner.wire import zeromq as wire


class AgentView(Protocol):
    """What a session reads of (and tells) the agent that runs it."""

    address: str
    extra_path: list[str]
    stop_signal: int | None
    grace: float
    stop_deadline: float | None
    joined: bool
    say: Callable[[str], None]
    notifier: Notifier

#: how long to wait for the coordinator's answer to one HELLO
HANDSHAKE_S = 3.0
#: how often the job-timeout check runs
CHECK_EVERY_S = 0.02
#: after a stop's grace, how long the goodbye to the coordinator may wait for room in ZeroMQ's queue
GOODBYE_S = 1.0
#: at the end of a session, how long its processes have, all together, to leave after SIGTERM before SIGKILL
STOP_WAIT_S = 5.0


class SessionEnded(Exception):
    """The current session with a coordinator is over; `outcome` says how."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(detail)
        self.outcome = outcome  # done | lost | reset | stopped | refused | usage
        self.detail = detail


class Session:
    """One joined run: relay frames, supervise local processes, exchange heartbeats."""

    def __init__(self, agent: AgentView, sock: zmq.Socket, welcome: hm.Welcome) -> None:
        self.agent = agent
        self.sock = sock
        self.run_id, self.run_name, self.host = welcome.run_id, welcome.run_name, welcome.host
        self.specs: dict[str, dict[str, Any]] = {pool: self._local_spec(spec) for pool, spec in welcome.specs.items()}
        self.interval = welcome.heartbeat.interval
        self.timeout = welcome.heartbeat.timeout
        agent.grace = welcome.grace  # a stop signalled from now on gives the processes the run's own grace
        self.procs = LocalProcesses(welcome.start_method, self.host)
        warm_up(welcome.start_method)
        self.procs.poller.register(sock, zmq.POLLIN)
        self.watch = Watch(self.procs, self.run_id, self.specs.get, self._stalled)
        self.last_heard = time.monotonic()
        self.next_beat = 0.0
        self.sent = 0  #: the last session number sent to the coordinator (HELLO was 0)
        self.heard = 0  #: the last session number heard from it (WELCOME was 0)
        self.next_check = 0.0
        self.stopping = False
        agent.joined = True
        agent.say(f"joined run {self.run_id} at {agent.address} as host {self.host}")
        self._check_imports()

    def _local_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A spec as this host runs it: task code is found on our own path (the folder we run in and --path),
        never on a folder the coordinator names: a path it sends is not put on sys.path."""
        return {**spec, "base_dir": os.getcwd(), "paths": list(self.agent.extra_path)}

    def _check_imports(self) -> None:
        for extra in self.agent.extra_path:
            if extra not in sys.path:
                sys.path.insert(0, extra)
        for pool, spec in self.specs.items():
            try:
                import_task(spec["task"], spec["base_dir"])
            except UsageError as exc:
                self._send(wire.BYE, f"cannot import the task of pool {pool}: {exc}")
                raise SessionEnded("usage", f"{exc} (on host {self.host}; install the task code here, run in its folder, or pass --path)") from exc
            except Exception as exc:  # a task reference that is not even a string: the coordinator's spec is broken
                raise SessionEnded("reset", f"a malformed pool spec for {pool}: {exc!r}") from exc

    def _send(self, kind: int, *fields: Any, frame: bytes | None = None) -> None:
        """Send, waiting (at most the heartbeat timeout) while ZeroMQ's queue to the coordinator is full."""
        self.sent += 1
        parts = [wire.header(kind, self.sent, *fields)]
        if frame is not None:
            parts.append(frame)
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            wait = self.timeout
            if self.agent.stop_deadline is not None:  # stopping: the wait ends with the stop's bound
                wait = max(0.0, min(wait, self.agent.stop_deadline + GOODBYE_S - time.monotonic()))
            if not self.sock.poll(int(wait * 1000), zmq.POLLOUT):
                raise SessionEnded("lost", f"the coordinator has not taken messages for {wait:g}s") from None
            self.sock.send_multipart(parts)

    def run(self) -> None:
        try:
            while True:
                self._step()
        except SessionEnded as end:
            self._kill_all(end.outcome)
            raise
        except BaseException:  # a failure of the agent itself: its processes never outlive it (the jobs are the coordinator's)
            self._kill_all("crashed")
            raise

    def _step(self) -> None:
        readable, ended, _ = self.procs.wait(0.1)
        for proc in readable:
            self._relay(proc)
        for proc in ended:
            self._relay(proc)
            self._report_exit(proc)
        self._drain()
        now = time.monotonic()
        self.agent.notifier.watchdog(now)
        if now >= self.next_beat:
            self.next_beat = now + self.interval
            self._send(wire.HEARTBEAT, self._procs_report(now))
        if now - self.last_heard > self.timeout:
            raise SessionEnded("lost", f"no heartbeat for {now - self.last_heard:.1f}s")
        if now >= self.next_check:
            self.next_check = now + CHECK_EVERY_S
            self.procs.kill_overdue(now, lambda pool: self.specs.get(pool, {}).get("job_timeout"), lambda proc: "a job")
            self.watch.tick(now)
        if self.agent.stop_signal is not None and not self.stopping:
            self.stopping = True
            self.agent.say("stopping: processes finish the job in hand")
            self.procs.signal_all(signal.SIGTERM)
        if self.stopping and self.procs.procs and now >= (self.agent.stop_deadline or now):
            self._kill_overdue_stop()
        if self.stopping and not self.procs.procs:
            self._send(wire.BYE, "stopped")
            raise SessionEnded("stopped")

    def _kill_overdue_stop(self) -> None:
        """The grace is over and processes still run (a task that ignores SIGTERM, or is stuck): SIGKILL them and
        leave. Their exits are not reported: the coordinator takes our BYE as the host leaving, and puts every job
        they held back in its queue uncharged (not the jobs' fault), to run elsewhere."""
        left = list(self.procs.procs.values())
        self.procs.signal_all(signal.SIGKILL, "killed: still running at the end of shutdown.grace")
        for proc in left:
            proc.process.join(5)
            self._relay(proc)  # what it finished before the kill still counts
            self.procs.reap(proc)
        names = ", ".join(proc.name for proc in left)
        self.agent.say(f"stopping: {names} still running after shutdown.grace ({self.agent.grace:g}s); killed, "
                       "the coordinator runs their jobs again")
        self._send(wire.BYE, f"stopped: {len(left)} process(es) killed after shutdown.grace")
        raise SessionEnded("stopped")

    def _relay(self, proc: LocalProcess) -> None:
        for frame in proc.reader.read():
            self._send(wire.FWD, proc.name, frame=frame)  # waits, bounded by the heartbeat timeout

    def _report_exit(self, proc: LocalProcess) -> None:
        running = proc.running_job()
        ended = self.procs.reap(proc)
        self._send(wire.EXITED, proc.name, ended.code, ended.signal, ended.reason, list(running) if running else None, None,
                   ended.cause)

    def _stalled(self, stall: Stall) -> None:
        self._send(wire.STALLED, stall.worker, list(stall.running), max(0.0, round(stall.running_s, 3)), max(0.0, round(stall.silent_s, 3)),
                   stall.stall_timeout, stall.action, stall.stack)

    def _answer_stacks(self, request: int) -> Callable[[dict[str, Any]], None]:
        return lambda found: self._send(wire.STACK_DUMPS, request, found)

    def _procs_report(self, now: float) -> dict[str, dict[str, Any]]:
        """What a heartbeat tells of each process: RSS (for max_rss and status) and its job in hand."""
        report = {}
        for proc in self.procs.procs.values():
            running = proc.running_job()
            report[proc.name] = {"rss": proc.rss, "running": list(running) if running else None,
                                 "running_s": max(0.0, round(now - proc.job_started_at(now), 3)) if running else None}
        return report

    def _drain(self) -> None:
        """Every message waiting from the coordinator, checked by kind; a bad one or a gap resets the session."""
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                envelope = wire.parse(parts)
            except ProtocolError as exc:
                self._broken(f"a malformed message from the coordinator: {exc}")
            if envelope.kind == wire.RESET:
                raise SessionEnded("reset", f"the coordinator reset the session: {envelope.message.reason}")  # type: ignore[attr-defined]
            if envelope.kind not in wire.SESSION_KINDS:
                self._broken(f"an unexpected message kind {envelope.kind} from the coordinator")
            if envelope.seq != self.heard + 1:
                self._broken(f"message {envelope.seq} from the coordinator after {self.heard}: lost, repeated or reordered")
            self.heard = envelope.seq
            self.last_heard = time.monotonic()
            if envelope.frame is not None:
                try:  # what goes into a process's inbox is checked here, before a process can choke on it
                    messages.decode_to_process(envelope.frame)
                except ProtocolError as exc:
                    self._broken(f"a malformed message for a process from the coordinator: {exc}")
            self._on_message(envelope.message, envelope.frame)

    def _broken(self, why: str) -> NoReturn:
        """This session cannot be trusted any more: say so, tell the coordinator, and join again."""
        self.agent.say(f"warning: {why}; joining again")
        try:
            self._send(wire.BYE, f"reset: {why[:200]}")
        except SessionEnded:
            pass
        raise SessionEnded("reset", why)

    def _on_message(self, message: hm.HostMessage, frame: bytes | None) -> None:
        if isinstance(message, hm.To):
            proc = self.procs.procs.get(message.worker)
            if proc is not None and frame is not None:
                self.procs.send(proc, frame)
        elif isinstance(message, hm.Spawn):
            if self.agent.stop_signal is not None:
                # leaving: no new process. The coordinator restarts the ones our stop ended, and one started now
                # would take jobs and keep this host in the run; what it would have held goes back with our BYE
                return
            spec = self._local_spec({**self.specs.get(message.pool, {}), **message.spec})
            self.procs.start(message.worker, message.pool, message.role, message.index, spec)
        elif isinstance(message, hm.Signal):
            proc = self.procs.procs.get(message.worker)
            if proc is not None:
                self.procs.signal(proc, message.signum, message.reason)
        elif isinstance(message, hm.Stacks):
            self.watch.busy_stacks(time.monotonic(), self._answer_stacks(message.request))
        elif isinstance(message, hm.Bye):
            self._send(wire.BYE, "bye")
            raise SessionEnded("done", f"{self.run_id}: {message.reason or 'over'}")

    def _kill_all(self, outcome: str) -> None:
        """Leave nothing behind: our processes' jobs belong to the coordinator's ledger, not to us."""
        signum = signal.SIGTERM if outcome == "done" else signal.SIGKILL
        self.procs.signal_all(signum)
        deadline = time.monotonic() + STOP_WAIT_S  # one wait for all of them, not STOP_WAIT_S each in turn
        for proc in list(self.procs.procs.values()):
            proc.process.join(max(0.0, deadline - time.monotonic()))
            if proc.process.exitcode is None:
                self.procs.signal(proc, signal.SIGKILL)
        for proc in list(self.procs.procs.values()):
            try:
                self.procs.reap(proc)
            except Exception:  # keep reaping the others: none may reach interpreter exit alive
                proc.process.kill()
                proc.process.join(2)
