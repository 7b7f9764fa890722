"""Python stacks of running processes, taken from outside: for `job.stalled` and `runner status --stacks`.

Each process registers `faulthandler` on a reserved signal, STACK_SIGNAL, at start: the kernel runs
faulthandler's C handler whatever the process is doing, so the stack comes even while the task is
blocked in C (select, a lock, a C extension that holds no GIL). The handler writes every thread's
stack to the process's own file (O_APPEND), which its parent truncates before signalling and reads
back once the text has stopped growing: faulthandler writes a dump in one go from the handler, but
in many small writes, so "non-empty and the same size twice, READ_SETTLE_S apart" is the end of it.
User code must not use STACK_SIGNAL (README, "Stuck jobs").
"""

from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

#: the reserved signal: faulthandler dumps every thread's Python stack on it (a real-time signal,
#: queued and used by no common library; Celery's dumps use SIGUSR1, its debugger SIGUSR2)
STACK_SIGNAL = signal.SIGRTMIN + 6
STACK_SIGNAL_NAME = "SIGRTMIN+6"
#: how long a dump may take before what was written is taken as it is
STACK_DEADLINE_S = 2.0
#: the dump is complete when the file has kept its size this long
READ_SETTLE_S = 0.02
#: most characters of a stack kept (faulthandler stops at 100 frames a thread and 100 threads)
MAX_STACK_CHARS = 64_000

_held: list[IO[bytes]] = []  #: the open stack file of this process (faulthandler needs it open)


def stack_dir(run_id: str) -> Path:
    """Where a run's processes on this host keep their stack files: the user's private runner folder."""
    return Path(tempfile.gettempdir()) / f"runner-{os.getuid()}" / f"{run_id}.stacks"


def stack_path(run_id: str, pid: int) -> Path:
    return stack_dir(run_id) / f"{pid}.txt"


def install(run_id: str) -> None:
    """In the child, at start: dump every thread's stack to its file on STACK_SIGNAL."""
    folder = stack_dir(run_id)
    folder.parent.mkdir(mode=0o700, exist_ok=True)  # the user's private folder (as the control socket's)
    for attempt in range(3):
        folder.mkdir(mode=0o700, exist_ok=True)
        try:
            out = open(stack_path(run_id, os.getpid()), "ab", buffering=0)  # O_APPEND: writes go to the end after a truncate
            break
        except FileNotFoundError:  # the parent removed the emptied folder (remove) as another process ended: again
            if attempt == 2:
                raise
    _held[:] = [out]
    faulthandler.register(STACK_SIGNAL, file=out, all_threads=True, chain=False)


def remove(run_id: str, pid: int | None) -> None:
    """The parent's cleanup when a process is reaped (and of the folder when it is empty)."""
    if pid is None:
        return
    try:
        stack_path(run_id, pid).unlink()
        stack_dir(run_id).rmdir()
    except OSError:
        pass


def tidy(text: str) -> str:
    """The dump as people read it: the task's thread first (the main thread, dumped last), ours left out."""
    blocks = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    kept = [_below_task(b) for b in blocks if not _ours(b)]
    kept.reverse()
    return "\n\n".join(kept)[:MAX_STACK_CHARS]


def _below_task(block: str) -> str:
    """A thread's frames down to the runner's process_main: what called it (multiprocessing, and with
    fork the coordinator's own frames the child inherited) says nothing about the task."""
    lines = block.splitlines()
    for n, line in enumerate(lines):
        if line.endswith(" in process_main") and "runner/process/loop.py" in line:
            return "\n".join(lines[: n + 1])
    return block


def _ours(block: str) -> bool:
    """The runner's own parent-watch thread (process/base.py `watch`): noise in a task's stack."""
    return any(line.endswith(" in watch") and "runner/process/base.py" in line for line in block.splitlines())


class Capture:
    """One stack being taken from one process; `poll` returns the text once it is complete."""

    def __init__(self, run_id: str, pid: int, now: float) -> None:
        self.path = stack_path(run_id, pid)
        self.deadline = now + STACK_DEADLINE_S
        self.size = -1
        self.changed = now
        try:
            os.truncate(self.path, 0)
            os.kill(pid, STACK_SIGNAL)
            self.failed: str | None = None
        except OSError as exc:
            self.failed = f"(no stack: {exc.strerror})"

    def poll(self, now: float) -> str | None:
        if self.failed:
            return self.failed
        try:
            size = self.path.stat().st_size
        except OSError:
            return "(no stack: the process is gone)"
        if size != self.size:
            self.size, self.changed = size, now
        if size > 0 and now - self.changed >= READ_SETTLE_S or now > self.deadline:
            if size == 0:
                return f"(no stack: the process did not answer {STACK_SIGNAL_NAME} within {STACK_DEADLINE_S:g}s)"
            return tidy(self.path.read_bytes().decode("utf-8", "replace"))
        return None


class Stacks:
    """The stacks being taken from this machine's processes: one capture per process at a time, shared
    by everyone who asked for it (a stall warning and a `runner status --stacks` at the same moment)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.captures: dict[int, tuple[Capture, list[Callable[[str], Any]]]] = {}

    def take(self, pid: int, now: float, then: Callable[[str], Any]) -> None:
        """Signal the process (unless a capture is under way) and call `then(stack)` when it is read."""
        if pid in self.captures:
            self.captures[pid][1].append(then)
        else:
            self.captures[pid] = (Capture(self.run_id, pid, now), [then])

    @property
    def busy(self) -> bool:
        return bool(self.captures)

    def poll(self, now: float) -> None:
        for pid, (capture, waiting) in list(self.captures.items()):
            text = capture.poll(now)
            if text is None:
                continue
            del self.captures[pid]
            for then in waiting:
                then(text)
