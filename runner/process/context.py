"""The user's side: importing `module:function` tasks and the `ctx` every task receives.

`Context` asks its process for locks, emits and its logger through `TaskServices`, a narrow protocol:
it never reaches into the process loop."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from runner.errors import TaskImportError


class TaskServices(Protocol):
    """What a task's `ctx` needs from the process it runs in."""

    log: Any

    def acquire(self, name: str) -> None: ...

    def release(self, name: str) -> None: ...

    def emit(self, payload: Any, to: str | None) -> None: ...

    def heartbeat(self, progress: dict[str, Any]) -> None: ...
    def total(self, n: int) -> None: ...


def import_task(ref: str, base_dir: str | None = None) -> Callable[..., Any]:
    """The function behind `module:function`; the config's folder is searched first."""
    if base_dir and base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    module_name, _, function_name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f" (looked in {base_dir} and the Python path)" if base_dir else ""
        raise TaskImportError(f"task {ref!r}: no module named {exc.name!r}{where}") from exc
    except Exception as exc:
        raise TaskImportError(f"task {ref!r}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TaskImportError(f"task {ref!r}: module {module_name!r} has no function {function_name!r}")
    return function


class Context:
    """What a task gets as `ctx`: who and where it runs, its job, a logger, locks and emit.

    The job fields (job_id, attempt) change with every job; the rest is fixed for the process.
    """

    def __init__(self, services: TaskServices, spec: dict[str, Any]) -> None:
        self._services = services
        self.run_id: str = spec["run_id"]
        self.pool: str = spec["pool"]
        self.worker: str = spec["worker"]
        self.index: int = spec["index"]
        self.host: str = spec["host"]
        self.params: dict[str, Any] = spec.get("params", {})
        self.job_id: int | None = None
        self.attempt: int | None = None
        self.origin: str | None = None  #: the process that produced or emitted the job
        #: a resumed run's producer with `resume: offset`: the yields of this process already journaled (start there)
        self.resume_offset: int = spec.get("resume_offset", 0)
        self._job_log: Any = None

    @property
    def log(self) -> Any:
        """A structlog logger bound to run, pool, worker and (inside a job) job_id and attempt."""
        if self.job_id is None:
            return self._services.log
        if self._job_log is None:
            self._job_log = self._services.log.bind(job_id=self.job_id, attempt=self.attempt, origin=self.origin)
        return self._job_log

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A named lock shared by every process of the run, on every host.

        Served by the coordinator: if the holder dies, the lock is released (logged as lock.broken)
        instead of blocking everyone for ever, as a multiprocessing.Lock would.
        """
        self._services.acquire(name)
        try:
            yield
        finally:
            self._services.release(name)

    def emit(self, payload: Any, to: str | None = None) -> None:
        """Send a new job to consumer pool `to` (stage chaining); delivered only if this job succeeds."""
        self._services.emit(payload, to)

    def heartbeat(self, **progress: Any) -> None:
        """Say the job is alive (it resets the pool's `stall_timeout` clock), optionally with its progress
        (`ctx.heartbeat(rows=1200, of=5000)`), shown by `runner status`. Cheap: call it as often as you like;
        the progress reaches the coordinator at most once a second."""
        self._services.heartbeat(progress)

    def total(self, n: int) -> None:
        """A producer declares how many jobs this process will yield in all, so the dashboard can show an ETA."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ctx.total needs a whole number of jobs, not {n!r}")
        self._services.total(n)
