"""The last lines of defence: nothing outlives the coordinator, and a stop always ends in time.

Two rules the coordinator cannot break whatever goes wrong in its loop:
- no child reaches interpreter exit alive (multiprocessing joins non-daemon children at exit, and a
  child waits for a STOP that never comes: that is a hang for ever), see `kill_children`;
- SIGINT and SIGTERM end the process within `shutdown.grace` + 5 s, whatever state it is in. The
  loop's graceful stop SIGKILLs at `shutdown.grace`; if the loop itself is stuck (a bug, a write
  that never returns), the Watchdog, armed at the first signal and at a crash, SIGKILLs the children
  and leaves with os._exit(3) a second before the bound.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

#: the watchdog fires this long after the grace (the promise is grace + 5 s; the rest is margin)
WATCHDOG_EXTRA_S = 4.0
#: how long a SIGKILLed child may take to be reaped
REAP_S = 2.0


def kill_children(pids: list[int] | None = None) -> None:
    """SIGKILL and reap every multiprocessing child still alive (and `pids`), so exit never waits on one."""
    for pid in pids or []:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for child in multiprocessing.active_children():
        try:
            child.kill()
            child.join(REAP_S)
        except (OSError, ValueError, AssertionError):  # closed, or not ours to join
            pass


class Watchdog:
    """A daemon thread that ends the process if it is still here at a deadline."""

    def __init__(self, pids: Callable[[], list[int]], say: Callable[[str], None]) -> None:
        self._pids = pids
        self._say = say
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
        try:
            self._say(f"error: the runner did not stop within {seconds:g}s of {why}; its processes were killed "
                      "(jobs they held are not in a pending file: see the log for what was done)")
        except Exception:
            pass
        os._exit(code)
