"""`runner.run(config)`: a run from Python, in the calling process, as `runner start` does it.

    import runner

    def bake(ctx, buns=10):
        yield from ({"bun": n} for n in range(buns))

    def eat(ctx, job):
        return job["bun"]

    if __name__ == "__main__":      # needed under spawn and forkserver: children import this file
        result = runner.run({"name": "bakery", "producers": [{"name": "baker", "task": bake}],
                             "consumers": [{"name": "eater", "task": eat, "processes": 3}]})
        print(result.status, result.counts["done"])

The config is a path, a dict or a config model, plus `--set`-style overrides. A config or usage error
raises from the runner's error tree (UsageError, ConfigError, TaskImportError) with the CLI's message;
a run that fails returns its result with the exit code. It must run in the main thread (where signal
handlers live); on return the caller's SIGINT/SIGTERM handlers, signal mask, wakeup fd and structlog
configuration are as they were.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import UsageError


@dataclass(frozen=True)
class RunResult:
    """How a run ended: the fields of its `run.finished` line, and where its files are."""

    run_id: str
    status: str  #: finished / failed / stopped
    exit_code: int  #: as `runner start` would exit: 0, 1, 130, 143
    counts: dict[str, int]  #: produced, done, failed, retried, dead, pending
    log: Path  #: the run's JSON-lines log
    results: Path | None  #: the results file, if the config has one
    dead: Path | None  #: the dead-letter file, if a job went there
    pending: Path | None = None  #: the pending file, if the run was stopped with jobs unfinished
    error: str | None = None  #: why a failed run failed
    pools: dict[str, Any] = field(default_factory=dict)  #: per pool: done, failed, retried, dead, p50_ms, ...

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def task_ref(task: Any) -> Any:
    """`module:function` for a module-level function (the form processes import); anything else is left as is."""
    if not callable(task) or isinstance(task, str):
        return task
    module, qualname = getattr(task, "__module__", None), getattr(task, "__qualname__", "")
    if not module or "." in qualname or "<" in qualname or sys.modules.get(module) is None \
            or getattr(sys.modules[module], qualname, None) is not task:
        raise UsageError(f"task {task!r}: a task passed as a function must be defined at the top level of a module "
                         "(processes import it by name), not a lambda, a method or a function inside another one")
    return f"{module}:{qualname}"


def _load(config: Any, overrides: list[str] | None) -> Any:
    from runner.config import Config, RunConfig, config_from_data, load_config

    if isinstance(config, (str, os.PathLike)):
        return load_config(Path(config), overrides)
    if isinstance(config, Config):
        data, source, base_dir = config.run.model_dump(), config.path, config.base_dir
    elif isinstance(config, RunConfig):
        data, source, base_dir = config.model_dump(), "<config>", os.getcwd()
    elif isinstance(config, dict):
        data, source, base_dir = copy.deepcopy(config), "<dict>", os.getcwd()
    else:
        raise UsageError(f"runner.run: config must be a path, a dict or a runner.config.Config, not {type(config).__name__}")
    for key in ("producers", "consumers"):
        pools = data.get(key)
        if isinstance(pools, list):
            for pool in pools:
                if isinstance(pool, dict) and "task" in pool:
                    pool["task"] = task_ref(pool["task"])
    return config_from_data(data, overrides, source, base_dir)


def run(config: Any, overrides: list[str] | None = None, *, bind: str | None = None, keys: str | Path | None = None,
        metrics: str | None = None, dashboard: str | None = None, quiet: bool = False) -> RunResult:
    """Run a config to the end in this process, as `runner start` does; see the module's docstring."""
    if threading.current_thread() is not threading.main_thread():
        raise UsageError("runner.run must be called from the main thread: the run's signal handlers (Ctrl-C, SIGTERM) "
                         "can only be installed there")
    import structlog

    from runner.config import with_listen
    from runner.process.context import import_task

    cfg = with_listen(_load(config, list(overrides or [])), metrics, dashboard)
    for pool in cfg.run.all_pools():
        import_task(pool.task, cfg.base_dir)
    address = bind or cfg.run.transport.bind
    idle = [c.name for c in cfg.run.consumers if c.processes == 0]
    if idle and not address:
        raise UsageError(f"consumer pool {', '.join(idle)} has processes: 0 here and no worker host can join "
                         "(no bind / transport.bind): its jobs would never run")
    saved_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    saved_wakeup = signal.set_wakeup_fd(-1)
    saved_structlog = structlog.get_config() if structlog.is_configured() else None
    coordinator = None
    try:
        coordinator = _coordinator(cfg, address, keys, quiet)
        code = coordinator.run()
    finally:
        if coordinator is not None:
            if coordinator.web is not None:
                coordinator.web.close()
            for fd in (coordinator._wake_r, coordinator._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        signal.set_wakeup_fd(saved_wakeup)
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        if saved_structlog is not None:
            structlog.configure(**saved_structlog)
        else:
            structlog.reset_defaults()
    end = coordinator.end or {}
    counts = {k: end.get(k, 0) for k in ("produced", "done", "failed", "retried", "dead", "pending")}
    return RunResult(coordinator.run_id, end.get("status", "failed"), int(code), counts, coordinator.log_path,
                     Path(cfg.run.results) if cfg.run.results else None,
                     Path(end["dead_file"]) if end.get("dead_file") else None,
                     Path(end["pending_file"]) if end.get("pending_file") else None,
                     end.get("error"), end.get("pools", {}))


def _coordinator(cfg: Any, address: str | None, keys: str | Path | None, quiet: bool) -> Any:
    from rich.console import Console

    from runner.coordinator.run import Coordinator
    from runner.display import Display
    from runner.wire import zeromq as wire

    coordinator_keys = wire.CoordinatorKeys(Path(keys)) if keys else None
    if address:
        wire.require_security(address, coordinator_keys, False, "keys", lambda m: print(m, file=sys.stderr))
    no_color = bool(os.environ.get("NO_COLOR")) or None
    if quiet:  # a "terminal" nobody reads: the log's lines go to the file only
        console = out = Console(file=open(os.devnull, "w"), no_color=True)
        tty = True
    else:
        console, out = Console(stderr=True, no_color=no_color, highlight=False), Console(no_color=no_color, highlight=False)
        tty = sys.stderr.isatty()
    # a loopback bind without keys gets the run's own keys, as `runner start` does (loopback is not a trust boundary)
    coordinator = Coordinator(cfg, Display(console, out, tty), address, coordinator_keys, run_keys=bool(address) and not keys)
    if not quiet:
        urls = [("metrics", coordinator.web.metrics_url), ("dashboard", coordinator.web.dashboard_url)] if coordinator.web else []
        for what, url in [("run", coordinator.run_id), ("log", str(coordinator.log_path)), *urls]:
            if url:
                print(f"{what}: {url}", file=sys.stderr)
    return coordinator
