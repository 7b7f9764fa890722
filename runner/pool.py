"""Local processes: start them together, read their pipes, reap them the moment they exit, stop them.

The supervisor knows processes, not jobs: what a process holds is the coordinator's ledger's
business. It turns the operating system's view (sentinels, exit codes, signals) into plain facts the
coordinator acts on: frames received, and `Exit(code, signal, reason)`.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from runner.transports.local import FrameReader, FrameSender
from runner.worker import SLOT_BATCH, SLOT_INDEX, SLOT_STARTED, process_main


@dataclass
class Exit:
    code: int | None
    signal: str | None
    reason: str


@dataclass(eq=False)
class Proc:
    """One process, local or on a worker host, and what the coordinator knows of it."""

    name: str
    pool: str
    role: str
    index: int
    restart: int
    host: str
    started_at: float
    remote: bool = False
    process: BaseProcess | None = None  #: local processes only: the handle, pipe, inbox and slot
    reader: FrameReader | None = None
    inbox: Any = None
    slot: Any = None
    pid: int | None = None
    remote_running: tuple[int, int] | None = None  #: a remote process's job in hand when it ended
    route: Any = None  #: a remote process's (host identity, TO header), encoded once
    ready: bool = False
    stop_reason: str | None = None  #: set when the coordinator asked it to stop
    kill_reason: str | None = None  #: set when the coordinator killed it
    stop_killed: bool = False  #: killed because a stop could not wait (its job is pending, not charged)
    fatal: tuple[str, str] | None = None
    outstanding: deque[int] = field(default_factory=deque)  #: batch ids it holds, oldest first
    assigned: int = 0  #: jobs given to it, for max_jobs_per_process
    done: int = 0
    idle_since: float = 0.0
    ended: bool = False  #: producers: its stream ended

    @property
    def key(self) -> str:
        """Unique in the run: `eater-2` here, `hostb/eater-2` on a worker host."""
        return f"{self.host}/{self.name}" if self.remote else self.name

    def running_job(self) -> tuple[int, int] | None:
        """(batch id, index) of the job this process is running now, read from its shared slot."""
        if self.slot is None:
            return self.remote_running
        if self.slot[SLOT_STARTED] > 0:
            return int(self.slot[SLOT_BATCH]), int(self.slot[SLOT_INDEX])
        return None

    def job_started_at(self) -> float:
        return float(self.slot[SLOT_STARTED]) if self.slot is not None else 0.0


def warm_up(start_method: str) -> None:
    """Start multiprocessing's helpers (resource tracker, forkserver) before any process, with our
    signal handlers already in place. Processes forked from the forkserver start without imports.
    A Ctrl-C to the process group must not kill the server as it starts (it ignores it once running)."""
    if start_method == "fork":
        return
    from multiprocessing import forkserver, resource_tracker

    # multiprocessing starts its resource tracker on the first spawn or forkserver process and, doing so,
    # UNBLOCKS SIGINT and SIGTERM in the calling thread: start it here and put our signal mask back.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if start_method != "forkserver":
        return
    multiprocessing.get_context("forkserver").set_forkserver_preload(["runner.worker"])
    with sigint_shielded():
        forkserver.ensure_running()


@contextmanager
def sigint_shielded() -> Iterator[None]:
    """Start a child that must not die of a Ctrl-C sent to the whole process group while it starts.

    SIGINT is ignored while the child is made: an ignored signal stays ignored across fork and exec
    (a blocked one does not survive spawn's exec), and the child ignores it for good once it runs.
    It is blocked as well, so a Ctrl-C meant for us in that moment waits, pending, for our handler
    (one already pending would be discarded by SIG_IGN: it is noted and raised again afterwards)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    pending = signal.SIGINT in signal.sigpending()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            os.kill(os.getpid(), signal.SIGINT)  # blocked still: it waits for the handler, as it did
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def describe_exit(code: int | None) -> tuple[str | None, str]:
    """Why a process ended, in words: 'killed by SIGKILL, possibly out of memory', 'exited with code 3'."""
    if code is None:
        return None, "still running"
    if code < 0:
        name = signal.Signals(-code).name
        extra = ", possibly out of memory" if name == "SIGKILL" else ""
        return name, f"killed by {name}{extra}"
    return None, f"exited with code {code}"


class LocalProcesses:
    """Starts, watches and stops the processes of this machine."""

    def __init__(self, start_method: str, host: str) -> None:
        self.mp: Any = multiprocessing.get_context(start_method)  # a context of the chosen start method
        self.start_method = start_method
        self.host = host
        self.procs: dict[str, Proc] = {}
        self._by_fd: dict[int, Proc] = {}
        self._by_sentinel: dict[int, Proc] = {}
        self._by_outbox: dict[int, Proc] = {}  #: inboxes with frames waiting for the pipe (watched for POLLOUT)
        self.poller = zmq.Poller()  #: pipes, sentinels and any socket or fd the owner registers

    def start(self, name: str, pool: str, role: str, index: int, spec: dict[str, Any], restart: int = 0) -> Proc:
        reader, writer = self.mp.Pipe(duplex=False)
        inbox, inbox_writer = self.mp.Pipe(duplex=False)
        slot = self.mp.RawArray("d", 4)
        spec = {**spec, "worker": name, "index": index, "role": role, "pool": pool, "host": self.host}
        process = self.mp.Process(target=process_main, args=(role, spec, writer, inbox, slot), name=name, daemon=False)
        with sigint_shielded():  # Ctrl-C goes to the whole process group
            process.start()
        writer.close()  # only the child writes: its death is the pipe's end
        inbox.close()  # only the child reads its inbox
        proc = Proc(name, pool, role, index, restart, self.host, time.monotonic(), process=process,
                    reader=FrameReader(reader), inbox=FrameSender(inbox_writer), slot=slot, pid=process.pid)
        self._by_outbox[proc.inbox.fd] = proc
        self.procs[name] = proc
        self._by_fd[proc.reader.fd] = proc  # type: ignore[union-attr]
        self._by_sentinel[process.sentinel] = proc
        self.poller.register(proc.reader.fd, zmq.POLLIN)  # type: ignore[union-attr]
        self.poller.register(process.sentinel, zmq.POLLIN)
        return proc

    def wait(self, timeout: float) -> tuple[list[Proc], list[Proc], set[Any]]:
        """Block until a pipe has data, a process ended or a registered socket/fd is ready.

        Returns (readable processes, ended processes, other ready sockets and fds).
        """
        ready = self.poller.poll(int(timeout * 1000))
        readable, ended, other = [], [], set()
        for handle, events in ready:
            if handle in self._by_fd and events & zmq.POLLIN:
                readable.append(self._by_fd[handle])
            elif handle in self._by_sentinel:
                ended.append(self._by_sentinel[handle])
            elif handle in self._by_outbox and events & zmq.POLLOUT:
                self._flush(self._by_outbox[handle])
            else:
                other.add(handle)
        return readable, ended, other

    def reap(self, proc: Proc) -> Exit:
        """Collect an ended process (no zombie stays behind) and say why it ended."""
        assert proc.process is not None
        proc.process.join()
        code = proc.process.exitcode
        sig, reason = describe_exit(code)
        if proc.kill_reason:
            reason = proc.kill_reason
        elif proc.fatal:
            reason = proc.fatal[0]
        assert proc.process is not None and proc.reader is not None
        self._by_fd.pop(proc.reader.fd, None)
        self._by_sentinel.pop(proc.process.sentinel, None)
        self.poller.unregister(proc.reader.fd)
        self.poller.unregister(proc.process.sentinel)
        self.procs.pop(proc.name, None)
        proc.process.close()
        self._by_outbox.pop(proc.inbox.fd, None)
        if proc.inbox.outbox:
            self.poller.unregister(proc.inbox.fd)
        proc.inbox.close()
        return Exit(code, sig, reason)

    def forget(self, proc: Proc) -> None:
        if proc.reader is not None:
            proc.reader.close()

    def send(self, proc: Proc, frame: bytes) -> None:
        waiting = bool(proc.inbox.outbox)
        if proc.inbox.send(frame) and not waiting:
            self.poller.register(proc.inbox.fd, zmq.POLLOUT)

    def _flush(self, proc: Proc) -> None:
        if not proc.inbox.flush():
            self.poller.unregister(proc.inbox.fd)

    def signal(self, proc: Proc, signum: int, reason: str | None = None) -> None:
        if reason and not proc.kill_reason:
            proc.kill_reason = reason
        try:
            if proc.pid:
                os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    def signal_all(self, signum: int, reason: str | None = None) -> None:
        for proc in list(self.procs.values()):
            self.signal(proc, signum, reason)
