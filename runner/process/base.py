"""What a producer's and a consumer's process share: start-up, the pipe, the inbox, locks and logging.

A process owns one pipe to the coordinator (FrameWriter) and one inbox pipe from it (FrameReceiver). It never decides its
own lifecycle: the coordinator tells it to stop (idle, recycled, done) with a STOP message, so the
coordinator's ledger always knows which jobs a process holds. SIGTERM means "finish the job in hand,
report, exit"; SIGINT is ignored (the terminal's Ctrl-C is the coordinator's to handle).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from runner import logs
from runner.logs import loggable
from runner.process import stacks
from runner.process.context import Context, import_task
from runner.wire import messages as protocol
from runner.wire.messages import (
    FATAL,
    GRANT,
    LOCK,
    LOG,
    MAX_FRAME,
    MAX_SIZE,
    READY,
    TOTAL,
)
from runner.wire.pipe import FrameReceiver, FrameWriter

#: a long batch reports its progress at least this often, so a crash re-runs little
REPORT_EVERY_S = 0.05
#: a producer's buffered jobs are sent at the latest after this long
FLUSH_AFTER_S = 0.002
#: a generator step slower than this probably blocks again: send what we have first
SLOW_STEP_S = 0.0001
#: how often a blocked wait looks at the stop flag
POLL_S = 0.5
#: jobs faster than this on average are timed per batch, not one by one
FAST_JOB_S = 0.00005
#: the most a frame's payloads, results or emits may hold: the frame limit less room for the envelope
#: and the relay header a worker host adds; a single payload or result above it fails with a size error
FRAME_BUDGET = MAX_FRAME - 64 * 1024
#: longest error text or traceback a message carries: the coordinator checks each kind's size on arrival
#: (runner.wire.messages.MAX_SIZE), and an exception's message may be huge; the rest is cut
MAX_ERROR = 64 * 1024


def clip(text: str, limit: int = MAX_ERROR) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters cut)"


#: ctx.heartbeat(**progress) sends its progress to the coordinator at most this often
PROGRESS_EVERY_S = 1.0


def _die_with_parent() -> None:
    """No orphans: exit when the coordinator (or the worker agent) dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us with our parent
    except (OSError, AttributeError):
        pass
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ProcessLoop:
    """What producers and consumers share: setup, the pipe, the inbox, locks and logging."""

    def __init__(self, spec: dict[str, Any], writer: Connection, inbox: Connection, slot: Any) -> None:
        self.spec = spec
        self.out = FrameWriter(writer)
        self.inbox = FrameReceiver(inbox)
        self.slot = slot
        self.stopping = False
        self.stash: deque[list[Any]] = deque()
        self._lock_requests = 0
        self.log: Any = None
        self.ctx = Context(self, spec)
        self.task: Any = None

    def send(self, message: list[Any]) -> None:
        self.out.send(protocol.pack(message))

    def _log_sink(self, line: dict[str, Any]) -> None:
        """A log call never fails the work: what msgpack cannot hold travels as its repr."""
        try:
            frame = protocol.pack([LOG, line])
        except Exception:
            frame = protocol.pack([LOG, loggable(line)])
        if len(frame) > MAX_SIZE[LOG] or len(line) > 1000:  # the line's own fields are dropped, never the work
            short = {key: line.get(key) for key in logs.CONTEXT_KEYS}
            frame = protocol.pack([LOG, {**loggable(short), "error": f"log line of {len(frame)} bytes and {len(line)} fields is over "
                                         f"the limit of a log message ({MAX_SIZE[LOG] >> 20} MiB, 1000 fields): its fields were dropped"}])
        self.out.send(frame)

    def setup(self) -> bool:
        """Name the process, install signals, configure logs, import the task; False if it cannot run."""
        try:
            import setproctitle

            setproctitle.setproctitle(f"runner: {self.spec['worker']} [{self.spec['run_name']}]")
        except ImportError:
            pass
        signal.set_wakeup_fd(-1)  # a forked child must not wake the coordinator's loop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while we started (handle.py); ignored now
        signal.signal(signal.SIGTERM, self._on_term)
        _die_with_parent()
        spec = self.spec
        try:
            stacks.install(spec["run_id"])  # before READY: its parent only signals a ready process
        except OSError:
            pass  # no stack file (a full or read-only temp folder): stalls are reported without a stack
        self.log = logs.configure(
            spec["log_level"], self._log_sink, run_id=spec["run_id"], host=spec["host"], role=spec["role"], pool=spec["pool"], worker=spec["worker"]
        )
        for extra in reversed(spec.get("paths") or []):  # a worker host's --path (its own, never the coordinator's)
            if extra not in sys.path:
                sys.path.insert(0, extra)
        try:
            self.task = import_task(spec["task"], spec.get("base_dir"))
        except Exception as exc:
            self.send([FATAL, clip(str(exc)), clip(traceback.format_exc())])
            return False
        self.send([READY, os.getpid()])
        return True

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def next_message(self, timeout: float) -> list[Any] | None:
        if self.stash:
            return self.stash.popleft()
        frame = self.inbox.get(timeout)
        return None if frame is None else protocol.unpack(frame)

    def acquire(self, name: str) -> None:
        self._lock_requests += 1
        request = self._lock_requests
        self.send([LOCK, "acquire", name, request])
        while True:
            frame = self.inbox.get(None)
            assert frame is not None  # no timeout: a frame or EOFError
            message = protocol.unpack(frame)
            if message[0] == GRANT and message[2] == request:
                return
            self.stash.append(message)

    def release(self, name: str) -> None:
        self.send([LOCK, "release", name, 0])

    def emit(self, payload: Any, to: str | None) -> None:
        raise RuntimeError("ctx.emit is for consumer tasks; a producer yields its jobs")

    def heartbeat(self, progress: dict[str, Any]) -> None:
        """A producer is never stalled (stall_timeout is a consumer pool's): nothing to note."""

    def total(self, n: int) -> None:
        if self.spec["role"] != "producer":
            raise RuntimeError("ctx.total is for producer tasks: it declares how many jobs the producer will yield")
        self.send([TOTAL, n])


