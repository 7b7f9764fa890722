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
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from runner.errors import ProtocolError, UsageError
from runner.process.context import import_task
from runner.process.handle import LocalProcess, LocalProcesses, warm_up
from runner.process.watch import Stall, Watch
from runner.sdnotify import Notifier
from runner.wire import zeromq as wire



class AgentView(Protocol):
    """What a session reads of (and tells) the agent that runs it."""

    address: str
    extra_path: list[str]
    stop_signal: int | None
    joined: bool
    say: Callable[[str], None]
    notifier: Notifier

#: how long to wait for the coordinator's answer to one HELLO
HANDSHAKE_S = 3.0
#: how often the job-timeout check runs
CHECK_EVERY_S = 0.02


class SessionEnded(Exception):
    """The current session with a coordinator is over; `outcome` says how."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(detail)
        self.outcome = outcome  # done | lost | reset | stopped | refused | usage
        self.detail = detail


class Session:
    """One joined run: relay frames, supervise local processes, exchange heartbeats."""

    def __init__(self, agent: AgentView, sock: zmq.Socket, welcome: list[Any]) -> None:
        self.agent = agent
        self.sock = sock
        self.run_id, self.run_name, self.host, specs, beat, start_method = welcome[:6]
        self.specs: dict[str, dict[str, Any]] = specs
        self.interval = float(beat["interval"])
        self.timeout = float(beat["timeout"])
        self.procs = LocalProcesses(start_method, self.host)
        warm_up(start_method)
        self.procs.poller.register(sock, zmq.POLLIN)
        self.watch = Watch(self.procs, self.run_id, self.specs.get, self._stalled)
        self.last_heard = time.monotonic()
        self.next_beat = 0.0
        self.fwd_headers: dict[str, bytes] = {}  #: FWD header per process, encoded once
        self.next_check = 0.0
        self.stopping = False
        agent.joined = True
        agent.say(f"joined run {self.run_id} at {agent.address} as host {self.host}")
        self._check_imports()

    def _check_imports(self) -> None:
        for pool, spec in self.specs.items():
            base = spec.get("base_dir")
            local_base = base if base and Path(base).is_dir() else os.getcwd()
            spec["base_dir"] = local_base
            for extra in self.agent.extra_path:
                if extra not in sys.path:
                    sys.path.insert(0, extra)
            try:
                import_task(spec["task"], local_base)
            except UsageError as exc:
                self._send(wire.BYE, f"cannot import the task of pool {pool}: {exc}")
                raise SessionEnded("usage", f"{exc} (on host {self.host}; install the task code here or pass --path)") from exc

    def _send(self, kind: int, *fields: Any, frame: bytes | None = None) -> None:
        """Send, waiting (at most the heartbeat timeout) while ZeroMQ's queue to the coordinator is full."""
        parts = [wire.header(kind, *fields)]
        if frame is not None:
            parts.append(frame)
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            if not self.sock.poll(int(self.timeout * 1000), zmq.POLLOUT):
                raise SessionEnded("lost", "the coordinator has not taken messages for the heartbeat timeout") from None
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
        if self.stopping and not self.procs.procs:
            self._send(wire.BYE, "stopped")
            raise SessionEnded("stopped")

    def _relay(self, proc: LocalProcess) -> None:
        head = self.fwd_headers.get(proc.name)
        if head is None:
            head = self.fwd_headers[proc.name] = wire.header(wire.FWD, proc.name)
        for frame in proc.reader.read():
            try:
                self.sock.send_multipart([head, frame], zmq.NOBLOCK)
            except zmq.Again:
                self._send(wire.FWD, proc.name, frame=frame)  # waits, bounded by the heartbeat timeout

    def _report_exit(self, proc: LocalProcess) -> None:
        running = proc.running_job()
        ended = self.procs.reap(proc)
        self._send(wire.EXITED, proc.name, ended.code, ended.signal, ended.reason, list(running) if running else None, None,
                   ended.cause)

    def _stalled(self, stall: Stall) -> None:
        self._send(wire.STALLED, stall.worker, list(stall.running), round(stall.running_s, 3), round(stall.silent_s, 3),
                   stall.stall_timeout, stall.action, stall.stack)

    def _answer_stacks(self, request: int) -> Callable[[dict[str, Any]], None]:
        return lambda found: self._send(wire.STACK_DUMPS, request, found)

    def _procs_report(self, now: float) -> dict[str, dict[str, Any]]:
        """What a heartbeat tells of each process: RSS (for max_rss and status) and its job in hand."""
        report = {}
        for proc in self.procs.procs.values():
            running = proc.running_job()
            report[proc.name] = {"rss": proc.rss, "running": list(running) if running else None,
                                 "running_s": round(now - proc.job_started_at(), 3) if running else None}
        return report

    def _drain(self) -> None:
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, fields, frame = wire.parse(parts)
            except ProtocolError as exc:
                self.agent.say(f"warning: dropped a bad message from the coordinator: {exc}")
                continue
            self.last_heard = time.monotonic()
            if kind == wire.TO:
                proc = self.procs.procs.get(fields[0])
                if proc is not None and frame is not None:
                    self.procs.send(proc, frame)
            elif kind == wire.SPAWN:
                name, pool, role, index, restart, spec = fields[:6]
                spec = {**self.specs.get(pool, {}), **spec, "base_dir": self.specs.get(pool, {}).get("base_dir", spec.get("base_dir"))}
                self.procs.start(name, pool, role, index, spec)
            elif kind == wire.SIGNAL:
                proc = self.procs.procs.get(fields[0])
                if proc is not None:
                    self.procs.signal(proc, fields[1], fields[2] if len(fields) > 2 else None)
            elif kind == wire.STACKS:
                self.watch.busy_stacks(time.monotonic(), self._answer_stacks(fields[0]))
            elif kind == wire.BYE:
                self._send(wire.BYE, "bye")
                raise SessionEnded("done", f"{self.run_id}: {fields[0] if fields else 'over'}")
            elif kind == wire.RESET:
                raise SessionEnded("reset", f"the coordinator reset the session: {fields[0] if fields else ''}")

    def _kill_all(self, outcome: str) -> None:
        """Leave nothing behind: our processes' jobs belong to the coordinator's ledger, not to us."""
        signum = signal.SIGTERM if outcome == "done" else signal.SIGKILL
        self.procs.signal_all(signum)
        for proc in list(self.procs.procs.values()):
            proc.process.join(5)
            if proc.process.exitcode is None:
                self.procs.signal(proc, signal.SIGKILL)
            try:
                self.procs.reap(proc)
            except Exception:  # keep reaping the others: none may reach interpreter exit alive
                proc.process.kill()
                proc.process.join(2)
