"""One local process seen from its parent (the coordinator, or a worker host's agent).

Starting it, its two pipes and its slot, reading it, reaping it the moment it exits, signalling it,
and the one job-timeout check. This side knows processes, not jobs: what a process holds is the
coordinator's ledger's business. It turns the operating system's view (sentinels, exit codes,
signals) into plain facts: frames received, and `Exit(code, signal, reason, cause)`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from runner.process import stacks
from runner.process.loop import process_main
from runner.process.memory import OomKills
from runner.process.slot import SLOT_BATCH, SLOT_INDEX, SLOT_SIZE, SLOT_STARTED, SLOT_TIMED
from runner.process.start import main_script_hidden, sigint_shielded
from runner.wire.pipe import FrameReader, FrameSender


@dataclass
class Exit:
    code: int | None
    signal: str | None
    reason: str
    #: why its job in hand failed, when the process died under it: crashed / timed_out / stalled / memory
    cause: str = "crashed"


@dataclass(eq=False)
class LocalProcess:
    """A process of this machine: its handle, its pipes and its slot."""

    name: str
    pool: str
    role: str
    process: BaseProcess
    reader: FrameReader
    inbox: FrameSender
    slot: Any
    pid: int | None
    run_id: str = ""
    kill_reason: str | None = None  #: set when its parent signalled it with a reason (a kill)
    _seen: tuple[float, float] = (0.0, -1.0)  #: the (batch, index) last seen in the slot (per-batch timing)
    _seen_at: float = 0.0  #: when this parent first saw it there
    kill_cause: str = "crashed"  #: what its job in hand is charged with when that kill ends it
    rss: int | None = None  #: its resident set size at the last sample (bytes)
    stall_mark: float = 0.0  #: when its current stall was last reported (time.monotonic())

    def running_job(self) -> tuple[int, int] | None:
        """(batch id, index) of the job this process is running now, read from its shared slot. Between two
        jobs (index -1, or no start) there is none: a death there is no job's fault."""
        if self.slot[SLOT_STARTED] > 0 and self.slot[SLOT_INDEX] >= 0:
            return int(self.slot[SLOT_BATCH]), int(self.slot[SLOT_INDEX])
        return None

    def job_started_at(self, now: float | None = None) -> float:
        """When the job in hand started (time.monotonic(); 0.0: none).

        Timed one by one, the child wrote it. In per-batch timing (jobs of microseconds, see
        ConsumerLoop.run_batch) the child reads no clock per job: its slot holds the batch's start and
        the job's index. Then the job's start is the first time this parent saw that index, at most one
        check late (SUPERVISE_S in the coordinator, CHECK_EVERY_S on a worker host) and never earlier
        than the true start: job_timeout counts from the job's own start, and may fire that much late."""
        slot = self.slot
        started = float(slot[SLOT_STARTED])
        if started <= 0 or slot[SLOT_TIMED]:
            return started
        key = (slot[SLOT_BATCH], slot[SLOT_INDEX])
        if key != self._seen:
            self._seen, self._seen_at = key, time.monotonic() if now is None else now
        return max(started, self._seen_at)

    def overdue(self, now: float, limit: float | None) -> bool:
        """The job-timeout check: its job in hand has run past `limit` (and it is not being killed already)."""
        if not limit or self.kill_reason:
            return False
        started = self.job_started_at(now)
        # between two jobs of a batch timed as one the slot keeps the batch's start: no job is running then
        return started > 0 and now - started > limit and self.running_job() is not None


def describe_exit(code: int | None, oom: bool = False) -> tuple[str | None, str]:
    """Why a process ended, in words: 'killed by SIGKILL, possibly out of memory', 'exited with code 3'.

    `oom`: the cgroup's OOM-kill count rose meanwhile, so a SIGKILL was the kernel's OOM killer."""
    if code is None:
        return None, "still running"
    if code < 0:
        name = signal.Signals(-code).name
        extra = (": out of memory" if oom else ", possibly out of memory") if name == "SIGKILL" else ""
        return name, f"killed by {name}{extra}"
    return None, f"exited with code {code}"


class LocalProcesses:
    """Starts, watches and stops the processes of this machine; one poller for their pipes and exits."""

    def __init__(self, start_method: str, host: str) -> None:
        self.mp: Any = multiprocessing.get_context(start_method)  # a context of the chosen start method
        self.start_method = start_method
        self.host = host
        self.procs: dict[str, LocalProcess] = {}
        self._by_fd: dict[int, LocalProcess] = {}
        self._by_sentinel: dict[int, LocalProcess] = {}
        self._by_outbox: dict[int, LocalProcess] = {}  #: inboxes with frames waiting for the pipe (watched for POLLOUT)
        self.poller = zmq.Poller()  #: pipes, sentinels and any socket or fd the owner registers
        self.oom = OomKills()

    def start(self, name: str, pool: str, role: str, index: int, spec: dict[str, Any]) -> LocalProcess:
        reader, writer = self.mp.Pipe(duplex=False)
        inbox, inbox_writer = self.mp.Pipe(duplex=False)
        slot = self.mp.RawArray("d", SLOT_SIZE)
        spec = {**spec, "worker": name, "index": index, "role": role, "pool": pool, "host": self.host}
        process = self.mp.Process(target=process_main, args=(role, spec, writer, inbox, slot), name=name, daemon=False)
        with sigint_shielded(), main_script_hidden():  # Ctrl-C goes to the whole process group
            process.start()
        writer.close()  # only the child writes: its death is the pipe's end
        inbox.close()  # only the child reads its inbox
        proc = LocalProcess(name, pool, role, process, FrameReader(reader), FrameSender(inbox_writer), slot, process.pid,
                            spec["run_id"])
        self.procs[name] = proc
        self._by_outbox[proc.inbox.fd] = proc
        self._by_fd[proc.reader.fd] = proc
        self._by_sentinel[process.sentinel] = proc
        self.poller.register(proc.reader.fd, zmq.POLLIN)
        self.poller.register(process.sentinel, zmq.POLLIN)
        return proc

    def wait(self, timeout: float) -> tuple[list[LocalProcess], list[LocalProcess], set[Any]]:
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

    def reap(self, proc: LocalProcess) -> Exit:
        """Collect an ended process (no zombie stays behind), close its pipes, and say why it ended."""
        proc.process.join()
        code = proc.process.exitcode
        oom = code == -signal.SIGKILL and not proc.kill_reason and self.oom.rose()
        sig, reason = describe_exit(code, oom)
        cause = "memory" if oom else "crashed"
        if proc.kill_reason:
            reason, cause = proc.kill_reason, proc.kill_cause
        stacks.remove(proc.run_id, proc.pid)
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
        proc.reader.close()
        return Exit(code, sig, reason, cause)

    def send(self, proc: LocalProcess, frame: bytes) -> None:
        waiting = bool(proc.inbox.outbox)
        if proc.inbox.send(frame) and not waiting:
            self.poller.register(proc.inbox.fd, zmq.POLLOUT)

    def _flush(self, proc: LocalProcess) -> None:
        if not proc.inbox.flush():
            self.poller.unregister(proc.inbox.fd)

    def signal(self, proc: LocalProcess, signum: int, reason: str | None = None, cause: str = "crashed") -> None:
        """Signal a process; a `reason` (the first one given) becomes its exit's reason, `cause` its job's."""
        if reason and not proc.kill_reason:
            proc.kill_reason, proc.kill_cause = reason, cause
        try:
            if proc.pid:
                os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    def signal_all(self, signum: int, reason: str | None = None) -> None:
        for proc in list(self.procs.values()):
            self.signal(proc, signum, reason)

    def kill_overdue(self, now: float, limit_of: Callable[[str], float | None], job_of: Callable[[LocalProcess], str]) -> None:
        """SIGKILL every process whose job in hand passed its pool's job_timeout (`job_of` names the job)."""
        for proc in list(self.procs.values()):
            limit = limit_of(proc.pool)
            if proc.overdue(now, limit):
                self.signal(proc, signal.SIGKILL, f"{job_of(proc)} exceeded job_timeout {limit:g}s", "timed_out")
