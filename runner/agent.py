"""`runner worker`: a host that joins a coordinator's run and runs processes for it.

The agent is a relay with local supervision: the coordinator decides which processes run here and
what they hold (its ledger is the only one); the agent starts them, passes frames both ways, reaps
them, enforces job_timeout on them, and reports every exit with the job in hand. If the coordinator
goes silent past the heartbeat timeout, the agent kills its processes (their jobs are being re-run
elsewhere), and joins again with backoff until `--give-up` runs out.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from runner import logs
from runner.errors import ExitCode, ProtocolError, UsageError
from runner.pool import LocalProcesses, Proc, warm_up
from runner.task import import_task
from runner.transports import zeromq as wire


#: how long to wait for the coordinator's answer to one HELLO
HANDSHAKE_S = 3.0


class SessionEnded(Exception):
    """The current session with a coordinator is over; `outcome` says how."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(detail)
        self.outcome = outcome  # done | lost | reset | stopped | refused
        self.detail = detail


class Agent:
    def __init__(self, address: str, pools: list[str], processes: int | None, name: str | None, keys: wire.WorkerKeys | None,
                 give_up: float, serve: bool, run: str | None, say: Any, extra_path: list[str]) -> None:
        self.address = address
        self.pools = pools
        self.processes = processes
        self.name = name or logs.HOST
        self.keys = keys
        self.give_up = give_up
        self.serve = serve
        self.run_filter = run
        self.say = say
        self.extra_path = extra_path
        self.stop_signal: int | None = None
        self.joined = False
        # ZeroMQ's threads must not take our signals: they start with SIGINT/SIGTERM blocked (run() unblocks)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self.context = zmq.Context()

    def run(self) -> ExitCode:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            return self._sessions()
        finally:
            self.context.term()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            os._exit(128 + signum)  # second signal: leave now; our processes die with us
        self.stop_signal = signum

    def _sessions(self) -> ExitCode:
        lost_since: float | None = None
        delay = 0.1
        while True:
            try:
                self._session()
            except SessionEnded as end:
                if end.outcome == "done":
                    self.say(f"run over: {end.detail}")
                    if not self.serve:
                        return ExitCode.OK
                    lost_since, delay, self.joined = None, 0.1, False
                    continue
                if end.outcome == "stopped":
                    return ExitCode.SIGINT if self.stop_signal == signal.SIGINT else ExitCode.SIGTERM
                if end.outcome == "refused" and self.serve:
                    # another run, or this one ending: a serving worker waits for a run that takes it
                    self.say(f"the coordinator at {self.address} refused this worker ({end.detail}); waiting for the next run")
                    lost_since = None
                    if self._pause(delay):
                        return ExitCode.SIGINT if self.stop_signal == signal.SIGINT else ExitCode.SIGTERM
                    delay = min(delay * 2, 5.0) * random.uniform(0.8, 1.2)
                    continue
                if end.outcome == "refused":
                    self.say(f"error: the coordinator at {self.address} refused this worker: {end.detail}")
                    return ExitCode.USAGE
                if end.outcome == "usage":
                    self.say(f"error: {end.detail}")
                    return ExitCode.USAGE
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.give_up and (self.joined or not self.serve):  # serving between runs: wait on
                    self.say(f"error: no coordinator at {self.address} for {self.give_up:g}s ({end.detail}); giving up. "
                             "Is it running, and are the address and keys right?")
                    return ExitCode.FAILED
                what = "coordinator lost" if end.outcome in ("lost", "reset") and self.joined else "waiting for the coordinator"
                self.say(f"{what} ({end.detail}); trying again in {delay:.1f}s")
                if self._pause(delay):
                    return ExitCode.SIGINT if self.stop_signal == signal.SIGINT else ExitCode.SIGTERM
                delay = min(delay * 2, 5.0) * random.uniform(0.8, 1.2)
            else:
                lost_since = None

    def _pause(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.stop_signal is None:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.stop_signal is not None

    # -- one session ---------------------------------------------------------------------------
    def _session(self) -> None:
        sock = wire.connect_dealer(self.context, self.address, self.keys)
        try:
            welcome = self._handshake(sock)
            Session(self, sock, welcome).run()
        finally:
            sock.close(0)

    def _handshake(self, sock: zmq.Socket) -> list[Any]:
        """One HELLO per socket (a new socket for every attempt), so a slow answer never makes two sessions."""
        sock.send(wire.header(wire.HELLO, self.name, self.pools, self.processes, os.getpid(), self.run_filter))
        deadline = time.monotonic() + HANDSHAKE_S
        while time.monotonic() < deadline:
            if self.stop_signal is not None:
                raise SessionEnded("stopped")
            if sock.poll(100):
                try:
                    kind, fields, _ = wire.parse(sock.recv_multipart())
                except ProtocolError as exc:  # another release's coordinator (or not a coordinator at all)
                    raise SessionEnded("usage", f"the coordinator at {self.address} answered in a way this worker does not "
                                                f"understand ({exc}); install the same runner version on every host") from exc
                if kind == wire.WELCOME:
                    return fields
                if kind == wire.REFUSE:
                    raise SessionEnded("refused", fields[0])
        raise SessionEnded("lost", "no answer to the handshake (not running yet, a wrong address, or a key the coordinator does not accept)")


class Session:
    """One joined run: relay frames, supervise local processes, exchange heartbeats."""

    def __init__(self, agent: Agent, sock: zmq.Socket, welcome: list[Any]) -> None:
        self.agent = agent
        self.sock = sock
        self.run_id, self.run_name, self.host, specs, beat, start_method = welcome[:6]
        self.specs: dict[str, dict[str, Any]] = specs
        self.interval = float(beat["interval"])
        self.timeout = float(beat["timeout"])
        self.procs = LocalProcesses(start_method, self.host)
        warm_up(start_method)
        self.procs.poller.register(sock, zmq.POLLIN)
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
                import sys

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

    def _step(self) -> None:
        readable, ended, _ = self.procs.wait(0.1)
        for proc in readable:
            self._relay(proc)
        for proc in ended:
            self._relay(proc)
            self._report_exit(proc)
        self._drain()
        now = time.monotonic()
        if now >= self.next_beat:
            self.next_beat = now + self.interval
            self._send(wire.HEARTBEAT)
        if now - self.last_heard > self.timeout:
            raise SessionEnded("lost", f"no heartbeat for {now - self.last_heard:.1f}s")
        if now >= self.next_check:
            self.next_check = now + 0.02
            self._check_job_timeouts(now)
        if self.agent.stop_signal is not None and not self.stopping:
            self.stopping = True
            self.agent.say("stopping: processes finish the job in hand")
            self.procs.signal_all(signal.SIGTERM)
        if self.stopping and not self.procs.procs:
            self._send(wire.BYE, "stopped")
            raise SessionEnded("stopped")

    def _relay(self, proc: Proc) -> None:
        assert proc.reader is not None
        head = self.fwd_headers.get(proc.name)
        if head is None:
            head = self.fwd_headers[proc.name] = wire.header(wire.FWD, proc.name)
        for frame in proc.reader.read():
            try:
                self.sock.send_multipart([head, frame], zmq.NOBLOCK)
            except zmq.Again:
                self._send(wire.FWD, proc.name, frame=frame)  # waits, bounded by the heartbeat timeout

    def _report_exit(self, proc: Proc) -> None:
        running = proc.running_job()
        ended = self.procs.reap(proc)
        self.procs.forget(proc)
        self._send(wire.EXITED, proc.name, ended.code, ended.signal, ended.reason, list(running) if running else None, None)

    def _check_job_timeouts(self, now: float) -> None:
        for proc in list(self.procs.procs.values()):
            limit = self.specs.get(proc.pool, {}).get("job_timeout")
            started = proc.job_started_at()
            if limit and started and now - started > limit and not proc.kill_reason:
                self.procs.signal(proc, signal.SIGKILL, f"a job exceeded job_timeout {limit:g}s")

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
                self.procs.start(name, pool, role, index, spec, restart)
            elif kind == wire.SIGNAL:
                proc = self.procs.procs.get(fields[0])
                if proc is not None:
                    self.procs.signal(proc, fields[1], fields[2] if len(fields) > 2 else None)
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
            assert proc.process is not None
            proc.process.join(5)
            if proc.process.exitcode is None:
                self.procs.signal(proc, signal.SIGKILL)
            self.procs.reap(proc)
            self.procs.forget(proc)
