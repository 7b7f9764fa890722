"""The last lines of defence: nothing outlives the coordinator, and a stop always ends in time.

Two rules the coordinator cannot break whatever goes wrong in its loop:
- no child reaches interpreter exit alive (multiprocessing joins non-daemon children at exit, and a
  child waits for a STOP that never comes: that is a hang for ever), see `kill_children`;
- SIGINT and SIGTERM end the process within `shutdown.grace` + 5 s, whatever state it is in. The
  loop's graceful stop SIGKILLs at `shutdown.grace`; if the loop itself is stuck (a bug, a write
  that never returns), the Watchdog (runner/process/watchdog.py, shared with the worker agent), armed
  at the first signal and at a crash, SIGKILLs the children and leaves with os._exit(3) a second
  before the bound.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

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
