"""The `runner` command line: parse, load, delegate. Supervision lives in coordinator.py.

User mistakes (config, flags, task imports) print one paragraph and exit 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from runner import __version__
from runner.config import Config, load_config
from runner.errors import ExitCode, RunnerError
from runner.task import import_task

app = typer.Typer(
    name="runner",
    help="A producer-consumer job runner that loses no job: local process pools, remote workers over ZeroMQ, structured logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

ConfigOption = typer.Option(..., "--config", "-c", help="The run's YAML config.", exists=False, dir_okay=False)
SetOption = typer.Option(None, "--set", help="Override a config key: consumers.eater.processes=8 (repeatable).")


def _stderr() -> Console:
    return Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False)


def _fail(exc: BaseException) -> None:
    console = _stderr()
    if _state["debug"]:
        console.print(traceback.format_exc(), markup=False)
    message = str(exc)
    console.print(f"error: {message}", markup=False, soft_wrap=True)
    code = exc.exit_code if isinstance(exc, RunnerError) else ExitCode.FAILED
    raise typer.Exit(int(code))


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    if version:
        typer.echo(f"runner {__version__}")
        raise typer.Exit(0)


def _import_tasks(config: Config) -> list[str]:
    """Import every task once, so a missing module fails fast with exit 2, before any process starts."""
    refs = []
    for pool in [*config.run.producers, *config.run.consumers]:
        import_task(pool.task, config.base_dir)
        refs.append(pool.task)
    return refs


@app.command()
def start(
    config: Path = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Run a config to the end: producers, consumers, retries, logs. Exit 0 all done, 1 failures, 2 usage, 130/143 stopped."""
    from runner.coordinator import Coordinator
    from runner.progress import Progress

    try:
        cfg = load_config(config, set_)
        _import_tasks(cfg)
        tty = sys.stderr.isatty()
        progress = Progress(_stderr(), Console(no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False), tty)
        coordinator = Coordinator(cfg, progress)
    except RunnerError as exc:
        _fail(exc)
        return
    typer.echo(f"run: {coordinator.run_id}")
    typer.echo(f"log: {coordinator.log_path}")
    sys.stdout.flush()
    code = coordinator.run()
    raise typer.Exit(int(code))


@app.command()
def check(config: Path = ConfigOption, set_: Optional[list[str]] = SetOption) -> None:
    """Validate a config, import every task and print the plan. Exit 2 on any problem."""
    try:
        cfg = load_config(config, set_)
        _import_tasks(cfg)
    except RunnerError as exc:
        _fail(exc)
        return
    run = cfg.run
    out = Console(highlight=False)
    out.print(f"config {cfg.path}: ok ({run.name}, start method {run.start_method})")
    out.print(f"queue: at most {run.queue.maxsize} jobs waiting per consumer pool, batches of up to {run.queue.batch}")
    for p in run.producers:
        out.print(f"producer {p.name}: {p.task} x{p.processes} -> {run.target_of(p)} params={p.params}")
    for c in run.consumers:
        limits = [f"processes {c.min_processes}..{c.processes}", f"retries {c.retries} (backoff {c.retry_backoff:g}s)"]
        limits.append(f"idle_timeout {c.idle_timeout:g}s" if c.idle_timeout is not None else "no idle timeout")
        if c.job_timeout is not None:
            limits.append(f"job_timeout {c.job_timeout:g}s")
        if c.max_jobs_per_process:
            limits.append(f"recycle after {c.max_jobs_per_process} jobs")
        out.print(f"consumer {c.name}: {c.task} " + ", ".join(limits))
    out.print(f"shutdown grace {run.shutdown.grace:g}s; logs in {run.logs.dir}/ (level {run.logs.level}, jobs {run.logs.jobs})"
              + (f"; results to {run.results}" if run.results else ""))


def _register_optional() -> None:
    """Commands that live in their own modules (log inspection, multi-host)."""
    try:
        from runner.logcli import register
    except ImportError:
        return
    register(app)


_register_optional()


def main() -> None:
    try:
        app()
    except RunnerError as exc:  # pragma: no cover - commands catch their own
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(int(exc.exit_code))
