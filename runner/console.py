"""Losing the console never stops a run: output to a closed stdout or stderr just ends.

`runner start ... | head -3`, or `| less` quit early, closes the pipe the console writes to. Python
ignores SIGPIPE, so the next write raises BrokenPipeError (or another OSError) in whoever writes: the
coordinator's loop, the live display, the final summary. Every console writer goes through `guard`:
on such an error the stream's file descriptor is pointed at /dev/null, so this write and every later
one (including Python's own flush at exit, which would otherwise exit 120) succeed silently, while the
run's log file, results and exit code are untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console


def lose(stream: IO[Any]) -> None:
    """Send `stream`'s file descriptor to /dev/null for the rest of the process's life."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


@contextmanager
def guard(stream: IO[Any]) -> Iterator[None]:
    """Run a console write; if the console is gone, drop it and carry on."""
    try:
        yield
    except OSError:
        lose(stream)
    except ValueError:
        if not getattr(stream, "closed", False):
            raise
        # "I/O operation on closed file": someone closed the stream object; nothing to write to


class QuietConsole(Console):
    """A rich Console that goes quiet when its pipe closes: rich's own default raises SystemExit(1)
    (after pointing *stdout* at /dev/null, whichever stream it wrote to), which would end the run."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        lose(self.file)
