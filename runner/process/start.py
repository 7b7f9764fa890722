"""Starting multiprocessing's helpers: cheap to import, so `runner start` can begin before the CLI loads.

The forkserver (the default start method) is a fresh interpreter that imports the process code once;
every process of the run forks from it. Started first thing (runner.cli.main's entry), it does that
import on the other core while the CLI imports its own libraries and checks the config.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: the module a forkserver imports once, so processes forked from it start with their code loaded
PRELOAD = "runner.process.loop"
#: set by the CLI's entry point: `__main__` is then the console script, which no child needs
MAIN_IS_CLI = False


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
    multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
    with sigint_shielded(), main_script_hidden():
        forkserver.ensure_running()


@contextmanager
def main_script_hidden() -> Iterator[None]:
    """Start a forkserver or spawn child without it importing the `runner` console script again.

    multiprocessing hands such children the path of `__main__` to import first. Under the CLI that is the
    console script: the forkserver and every spawned child would import the whole CLI again (pydantic,
    typer, rich: about one interpreter start-up each), for nothing, as the CLI's tasks are named
    "module:function". A runner.api caller's script stays imported: its tasks may live in it."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not MAIN_IS_CLI or main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield  # `python -m runner`: multiprocessing already skips a package's __main__ module
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


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
