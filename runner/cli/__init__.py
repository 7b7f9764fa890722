"""The `runner` command line: main.py (start, check, worker, status, stop, keys) and logs.py (runs, logs).

`runner.cli.main` runs the command line: the console script enters through runner/__main__.py, which holds
signals during these imports first; then, for `runner start`, `resume` and `retry`, the forkserver starts before the CLI loads
(early.py). `runner.cli.app` is the typer application, loaded on first use."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["app", "main"]


def main() -> None:
    """The command line: the forkserver first (when the run will use it), then the CLI."""
    from runner.cli.early import forkserver_first
    from runner.process import start

    start.MAIN_IS_CLI = True

    if sys.argv[1:2] in (["start"], ["resume"], ["retry"]):
        # as `start` itself does, from here on: a Ctrl-C (the whole group's, the forkserver's too) or a
        # SIGTERM before the coordinator's handlers exist waits for them, never a KeyboardInterrupt traceback
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    forkserver_first(sys.argv[1:])
    from runner.cli.main import main as run_cli

    try:
        run_cli()
    finally:
        # The command is over (its files closed, its processes gone, its sockets closed): the interpreter's
        # exit would still walk the whole heap (typer, pydantic, rich) collecting cycles, 0.3-0.6 s of every
        # command here. Frozen objects are left to the OS; atexit handlers and stdio flushing run as usual.
        import gc

        gc.freeze()


def __getattr__(name: str) -> Any:
    if name == "app":
        from runner.cli.main import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
