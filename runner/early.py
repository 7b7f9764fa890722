"""Signals that arrive while a command starts: recorded, then acted on, never a traceback.

Starting `runner` imports typer, pydantic, pyzmq and more: seconds on a slow host, during which
Python's own dispositions apply (SIGTERM kills the process outright, SIGINT raises KeyboardInterrupt
wherever an import happens to be, and pydantic even re-wraps it as a SchemaError). Supervisors send
SIGTERM whenever they like, often right after a start. So the entry point (runner/__main__.py) calls
`hold()` before those imports: a signal is only recorded. Then each command takes over: `runner worker`
hands it to its agent, which stops at once (exit 128 + signal); every other command calls `release()`,
which puts Python's dispositions back and leaves quietly with 128 + signal if one came meanwhile.
"""

from __future__ import annotations

import signal
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_held = False


def _record(signum: int, frame: Any) -> None:
    _received.append(signum)


def hold() -> None:
    """Record SIGINT and SIGTERM instead of dying of them (a signal the caller ignores stays ignored)."""
    global _held
    for signum in _SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _record)
    _held = True


def received() -> int | None:
    """The first signal recorded since `hold()`, if any."""
    return _received[0] if _received else None


def release() -> None:
    """Python's dispositions again; exit 128 + signal (quietly) if one came while held."""
    global _held
    if not _held:
        return
    _held = False
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is _record:
            signal.signal(signum, default)
    if _received:
        raise SystemExit(128 + _received[0])
