"""The entry point of every child process, and the module a forkserver preloads (process/start.PRELOAD):
importing it loads the producer and consumer loops once, before any process is forked from the server."""

from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import structlog  # noqa: F401  # every process configures it (runner.logs.configure): loaded once, in the forkserver

from runner.process.base import clip
from runner.process.consumer import ConsumerLoop
from runner.process.producer import ProducerLoop
from runner.wire.messages import (
    FATAL,
)


def process_main(kind: str, spec: dict[str, Any], writer: Connection, inbox: Connection, slot: Any) -> None:
    """Entry point of every child process (a module-level function, so every start method can run it)."""
    loop = (ProducerLoop if kind == "producer" else ConsumerLoop)(spec, writer, inbox, slot)
    try:
        if not loop.setup():
            os._exit(3)  # its FATAL (the import error) is sent; a SystemExit here would replace it
        loop.run()
    except (BrokenPipeError, EOFError):
        os._exit(71)  # the coordinator is gone; nobody to report to
    except BaseException as exc:
        try:
            loop.send([FATAL, clip(f"{type(exc).__name__}: {exc}"), clip(traceback.format_exc())])
        finally:
            os._exit(1)
    # Leave without running the task's atexit handlers (and without multiprocessing joining anything).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
