"""The last resort of a stop: a thread that kills our processes and leaves if we are still here at a deadline.

The coordinator and a worker's agent both promise that SIGINT/SIGTERM end them within `shutdown.grace`
+ 5 s whatever their loop does. Their loops stop gracefully by `shutdown.grace`; this covers a loop
that is itself stuck (a bug, a write that never returns): armed at the first signal (or a crash), it
SIGKILLs the processes the owner names and calls os._exit a second before the bound.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

#: the watchdog fires this long after the grace (the promise is grace + 5 s; the rest is margin)
WATCHDOG_EXTRA_S = 4.0
#: how long the watchdog waits for its last message to be written before it exits all the same
SAY_WAIT_S = 0.5


class Watchdog:
    """A daemon thread that ends the process if it is still here at a deadline."""

    def __init__(self, pids: Callable[[], list[int]], say: Callable[[str], None], who: str = "the runner",
                 then: str = "(jobs they held are not in a pending file: see the log for what was done)") -> None:
        self._pids = pids
        self._say = say
        self._who = who  #: who did not stop, and what became of the jobs, in the message it leaves
        self._then = then
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.deadline: float | None = None

    def arm(self, seconds: float, code: int, why: str) -> None:
        """Fire in `seconds` unless disarmed; a second arm keeps the first (earlier) deadline."""
        if self._thread is not None:
            return
        self.deadline = time.monotonic() + seconds
        # started with our signals blocked, so SIGINT/SIGTERM keep reaching the main thread
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._thread = threading.Thread(target=self._run, args=(seconds, code, why), name="watchdog", daemon=True)
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def disarm(self) -> None:
        self._done.set()

    def _run(self, seconds: float, code: int, why: str) -> None:
        if self._done.wait(seconds):
            return
        try:
            pids = self._pids()
        except Exception:  # the main thread changes the table as we read it: kill what the OS says
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        message = f"error: {self._who} did not stop within {seconds:g}s of {why}; its processes were killed {self._then}"
        # best effort: the console may be what is stuck (a terminal paused with Ctrl-S, a pipe nobody reads, its
        # lock held by the stuck thread), and the exit must not wait for it
        sayer = threading.Thread(target=self._say_quietly, args=(message,), name="watchdog-say", daemon=True)
        sayer.start()
        sayer.join(SAY_WAIT_S)
        os._exit(code)

    def _say_quietly(self, message: str) -> None:
        try:
            self._say(message)
        except Exception:
            pass
