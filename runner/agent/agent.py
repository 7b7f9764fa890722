"""`runner worker`: a host that joins a coordinator's run and runs processes for it.

The agent is a relay with local supervision: the coordinator decides which processes run here and
what they hold (its ledger is the only one); the agent starts them, passes frames both ways, reaps
them, enforces job_timeout on them, and reports every exit with the job in hand. If the coordinator
goes silent past the heartbeat timeout, the agent kills its processes (their jobs are being re-run
elsewhere), and joins again with backoff until `--give-up` runs out.

A stop is bounded whatever the processes or the coordinator do: the first SIGINT/SIGTERM gives the
processes the run's `shutdown.grace` to finish the job in hand; the session then SIGKILLs the rest and
leaves (their jobs go back to the coordinator's queue uncharged), and a watchdog thread, in case the
loop itself is stuck, kills them and exits 128 + signal at grace + 4 s. A signal that came while the
command started (runner/early.py) stops the agent before it joins anything.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import time
import traceback
from typing import Any

import zmq

from runner import early, logs
from runner.agent.session import GOODBYE_S, HANDSHAKE_S, Session, SessionEnded
from runner.backoff import backoff
from runner.errors import ExitCode, ProtocolError, RunnerError
from runner.process.watchdog import WATCHDOG_EXTRA_S, Watchdog
from runner.sdnotify import Notifier
from runner.wire import host_messages as hm
from runner.wire import zeromq as wire

#: reconnect delays: 0.1 s doubling to 5 s, with jitter
RECONNECT_BASE_S, RECONNECT_CAP_S = 0.1, 5.0
#: the grace before a run's WELCOME says its shutdown.grace (the config's default)
DEFAULT_GRACE_S = 10.0


class Agent:
    def __init__(self, address: str, pools: list[str], processes: int | None, name: str | None, keys: wire.WorkerKeys | None,
                 give_up: float, serve: bool, run: str | None, say: Any, extra_path: list[str], discover: bool = False) -> None:
        self.address = address
        self.pools = pools
        self.processes = processes
        # the default name is the host name, made to fit the names a coordinator accepts
        self.name = name or re.sub(r"[^A-Za-z0-9._-]", "-", logs.HOST)[:64] or "worker"
        self.keys = keys
        self.discover = discover  #: no --keys on loopback: use the keys of this user's run at the address
        self.joined_at: float | None = None
        self.give_up = give_up
        self.serve = serve
        self.run_filter = run
        self.say = say
        self.extra_path = extra_path
        self.stop_signal: int | None = None
        self.grace = DEFAULT_GRACE_S  #: the joined run's shutdown.grace (a session sets it from WELCOME)
        self.watchdog = Watchdog(self._child_pids, self.say, who="this worker",
                                 then="and the coordinator runs their jobs again")
        self.stop_deadline: float | None = None  #: when a stop must have let go of every process (signal + grace)
        self.session: Session | None = None
        self.joined = False
        self.notifier = Notifier()  #: systemd Type=notify: READY=1 once started, WATCHDOG=1 while a loop turns
        # ZeroMQ's threads must not take our signals: they start with SIGINT/SIGTERM blocked (run() unblocks)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self.context = zmq.Context()

    def run(self) -> ExitCode:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        held = early.received()  # one came while the command started: stop before joining anything
        if held is not None:
            self._on_signal(held, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        self.notifier.ready(f"joining {self.address}")
        try:
            return self._sessions()
        except RunnerError as exc:  # the user's input (an address that cannot be connected to): one line
            self.say(f"error: {exc}")
            return exc.exit_code
        except Exception as exc:  # the agent itself failed: its session killed its processes; say so and leave
            self.say(f"error: this worker failed ({type(exc).__name__}: {exc}); its processes were stopped and "
                     f"the coordinator runs their jobs again elsewhere. Traceback:\n{traceback.format_exc()}")
            return ExitCode.CRASHED
        finally:
            self.notifier.stopping()
            self.notifier.close()
            for child in multiprocessing.active_children():  # nothing may reach interpreter exit alive (it would join it)
                child.kill()
                child.join(2)
            self.context.term()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            os._exit(128 + signum)  # second signal: leave now; our processes die with us
        self.stop_signal = signum
        self.stop_deadline = time.monotonic() + self.grace
        self.watchdog.arm(self.grace + WATCHDOG_EXTRA_S, 128 + signum, signal.Signals(signum).name)

    def _child_pids(self) -> list[int]:
        """Our processes, for the watchdog: the session's table, and what multiprocessing knows (the main
        thread may change the table as we read it)."""
        session, pids = self.session, []
        try:
            pids += [proc.pid for proc in list(session.procs.procs.values()) if proc.pid] if session else []
        except Exception:
            pass
        return pids + [child.pid for child in multiprocessing.active_children() if child.pid]

    def _stopped(self) -> ExitCode:
        return ExitCode.SIGINT if self.stop_signal == signal.SIGINT else ExitCode.SIGTERM

    def _sessions(self) -> ExitCode:
        lost_since: float | None = None
        attempt = 1
        while True:
            if self.stop_signal is not None:  # between sessions (or before the first): nothing to wait for
                return self._stopped()
            delay = backoff(RECONNECT_BASE_S, attempt, RECONNECT_CAP_S, jitter=True)
            try:
                self._session()
            except SessionEnded as end:
                if self.joined_at is not None:  # a session that had joined: lost from now, not from an earlier loss
                    lost_since, attempt, self.joined_at = None, 1, None
                    delay = backoff(RECONNECT_BASE_S, attempt, RECONNECT_CAP_S, jitter=True)
                if end.outcome == "done":
                    self.say(f"run over: {end.detail}")
                    if self.stop_signal is not None:  # told to stop, and the run ended meanwhile: still a stop
                        return self._stopped()
                    if not self.serve:
                        return ExitCode.OK
                    lost_since, attempt, self.joined = None, 1, False
                    continue
                if end.outcome == "stopped":
                    return self._stopped()
                if end.outcome == "refused" and self.serve:
                    # another run, or this one ending: a serving worker waits for a run that takes it
                    self.say(f"the coordinator at {self.address} refused this worker ({end.detail}); waiting for the next run")
                    lost_since = None
                    if self._pause(delay):
                        return self._stopped()
                    attempt += 1
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
                    return self._stopped()
                attempt += 1
            else:
                lost_since = None

    def _pause(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.stop_signal is None:
            self.notifier.watchdog()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.stop_signal is not None

    # -- one session ---------------------------------------------------------------------------
    def _session(self) -> None:
        keys = self.keys
        if self.discover:
            keys = wire.find_run_keys(self.address, self.run_filter)
            if keys is None:
                raise SessionEnded("lost", f"no run of yours listens at {self.address} (a run's keys are in {wire.control_dir()}); "
                                           "pass --keys DIR, or --insecure for a run started with --insecure")
        sock = wire.connect_dealer(self.context, self.address, keys)
        linger_ms = 0
        try:
            welcome = self._handshake(sock)
            self.joined_at = time.monotonic()
            self.session = Session(self, sock, welcome)
            self.session.run()
        except SessionEnded as end:
            if self.session is not None and end.outcome != "lost":
                # our last reports and the BYE may still be in ZeroMQ's queue: a socket closed without linger drops
                # them, and the coordinator would count this host lost, not left. Bounded: nobody may be listening.
                linger_ms = int(GOODBYE_S * 1000)
            raise
        finally:
            self.session = None
            sock.close(linger_ms)

    def _handshake(self, sock: zmq.Socket) -> hm.Welcome:
        """One HELLO per socket (a new socket for every attempt), so a slow answer never makes two sessions."""
        sock.send(wire.header(wire.HELLO, 0, self.name, self.pools, self.processes, os.getpid(), self.run_filter))
        deadline = time.monotonic() + HANDSHAKE_S
        while time.monotonic() < deadline:
            if self.stop_signal is not None:
                raise SessionEnded("stopped")
            self.notifier.watchdog()
            if sock.poll(100):
                try:
                    answer = wire.parse(sock.recv_multipart())
                except wire.WrongVersion as exc:  # another release's coordinator
                    raise SessionEnded("usage", f"the coordinator at {self.address} answered in a way this worker does not "
                                                f"understand ({exc}); install the same runner version on every host") from exc
                except ProtocolError as exc:  # damaged on the way, or not a coordinator at all: try again
                    raise SessionEnded("lost", f"a malformed answer to the handshake ({exc})") from exc
                if isinstance(answer.message, hm.Welcome):
                    return answer.message
                if isinstance(answer.message, hm.Refuse):
                    raise SessionEnded("refused", answer.message.reason)
        raise SessionEnded("lost", "no answer to the handshake (not running yet, a wrong address, or a key the coordinator does not accept)")
