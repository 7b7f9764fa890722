"""The `runner` command line: parse, load, delegate. Supervision lives in runner/coordinator/.

User mistakes (config, flags, task imports) print one paragraph and exit 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console

from runner import __version__, early
from runner.console import QuietConsole, guard
from runner.errors import ExitCode, RunnerError, UsageError
from runner.process.context import import_task

if TYPE_CHECKING:  # pydantic and the config's models load with the commands that read a config
    from runner.config import Config

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
BindOption = typer.Option(None, "--bind", help="Also accept worker hosts here, e.g. tcp://0.0.0.0:5555 (or transport.bind).")
StartKeysOption = typer.Option(None, "--keys", help="CURVE keys folder: coordinator.key_secret and authorized/*.key.")
InsecureOption = typer.Option(False, "--insecure", help="Allow a non-loopback --bind without CURVE keys (warns).")


def _stderr() -> Console:
    return QuietConsole(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False)


def _say(console: Console) -> Callable[[str], None]:
    """A one-line console message that never raises: a closed console just goes quiet."""
    def say(message: str) -> None:
        with guard(console.file):
            console.print(message, markup=False, soft_wrap=True)
    return say


def _fail(exc: BaseException) -> None:
    console = _stderr()
    if _state["debug"]:
        console.print(traceback.format_exc(), markup=False)
    message = str(exc)
    console.print(f"error: {message}", markup=False, soft_wrap=True)
    code = exc.exit_code if isinstance(exc, RunnerError) else ExitCode.FAILED
    raise typer.Exit(int(code))


def _print_version(value: bool) -> None:
    """`runner --version` alone: eager, so it answers before typer asks for a command."""
    if value:
        typer.echo(f"runner {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
) -> None:
    _state["debug"] = debug
    if ctx.invoked_subcommand != "worker":  # the worker's agent takes the held signals over (runner/early.py)
        early.release()


def _import_tasks(config: Config) -> list[str]:
    """Import every task once, so a missing module fails fast with exit 2, before any process starts."""
    refs = []
    for pool in config.run.all_pools():
        import_task(pool.task, config.base_dir)
        refs.append(pool.task)
    return refs


class _StoppedWhileImporting(BaseException):  # not an Exception: an import failure is wrapped, this is not
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _import_tasks_stoppable(config: Config) -> list[str]:
    """_import_tasks with SIGINT/SIGTERM live (the commands that start a run hold them blocked until the
    coordinator's handlers exist): a task module slow to import (it connects to a database, loads a model)
    must not hold a stop back for its whole import. Nothing has started yet, so a signal ends the command
    there: 128 + signal, quietly."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise _StoppedWhileImporting(signum)

    wanted = {signal.SIGINT, signal.SIGTERM}
    before = {signum: signal.getsignal(signum) for signum in wanted}
    for signum, handler in before.items():
        if handler is not signal.SIG_IGN:  # ignored (nohup, a supervisor's choice) stays ignored
            signal.signal(signum, stop)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)  # one that came meanwhile is delivered now
        try:
            return _import_tasks(config)
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    except _StoppedWhileImporting as exc:
        raise typer.Exit(128 + exc.signum) from None
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@app.command()
def start(
    config: Path = ConfigOption,
    set_: Optional[list[str]] = SetOption,
    bind: Optional[str] = BindOption,
    keys: Optional[Path] = StartKeysOption,
    insecure: bool = InsecureOption,
    resume: bool = typer.Option(False, "--resume", help="Resume the newest unfinished run of this config's name, if there is one; else start."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Serve Prometheus /metrics and /healthz at HOST:PORT (or metrics.listen)."),
    dashboard: Optional[str] = typer.Option(None, "--dashboard", help="Serve the live dashboard at HOST:PORT (or dashboard.listen; may equal --metrics)."),
) -> None:
    """Run a config to the end: producers, consumers, retries, logs. Exit 0 all done, 1 failures, 2 usage, 130/143 stopped."""
    import signal

    # A signal before the coordinator's handlers exist waits for them (Coordinator.run unblocks).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        from runner.config import load_config, with_listen

        cfg = with_listen(load_config(config, set_), metrics, dashboard)
        state = None
        if resume:
            from runner.cli.resume import resumable

            state = resumable(cfg)
    except RunnerError as exc:
        _fail(exc)
        return
    _launch(cfg, bind, keys, insecure, state)


def _launch(cfg: Config, bind: Optional[str], keys: Optional[Path], insecure: bool, resume: Any = None,
            rerun: Optional[dict[int, int]] = None) -> None:
    """Start a coordinator for `cfg` (a new run, or a journal's run to resume or retry) and exit with its code."""
    try:
        from runner.coordinator.run import Coordinator
        from runner.display import Display
        from runner.wire import zeromq as wire

        _import_tasks_stoppable(cfg)
        address = bind or cfg.run.transport.bind
        idle = [c.name for c in cfg.run.consumers if c.processes == 0]
        if idle and not address:
            raise UsageError(f"consumer pool {', '.join(idle)} has processes: 0 here and no worker host can join "
                             "(no --bind / transport.bind): its jobs would never run")
        coordinator_keys = wire.CoordinatorKeys(keys) if keys else None
        if address:
            wire.require_security(address, coordinator_keys, insecure, "--keys", lambda m: _stderr().print(m, markup=False))
        wire.control_dir()  # checked before anything starts: ours, 0700, not a symlink
        tty = sys.stderr.isatty()
        display = Display(_stderr(), QuietConsole(no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False), tty)
        # no --keys and no --insecure: the run makes its own keys (a resumed or retried run, under the same run id, keeps them)
        coordinator = Coordinator(cfg, display, address, coordinator_keys, resume, rerun,
                                  run_keys=bool(address) and not keys and not insecure)
    except RunnerError as exc:
        _fail(exc)
        return
    with guard(sys.stdout):  # `| head -1` may close stdout at once: the run goes on regardless
        typer.echo(f"run: {coordinator.run_id}")
        typer.echo(f"log: {coordinator.log_path}")
        if coordinator.web is not None:
            for what, url in (("metrics", coordinator.web.metrics_url), ("dashboard", coordinator.web.dashboard_url)):
                if url:
                    typer.echo(f"{what}: {url}")
        sys.stdout.flush()
    try:
        code = coordinator.run()
    except RunnerError as exc:  # its sockets could not be opened: nothing was started
        _fail(exc)
        return
    raise typer.Exit(int(code))


@app.command()
def resume(
    run_id: Optional[str] = typer.Argument(None, help="The run to resume (see `runner runs`)."),
    last: Optional[str] = typer.Option(None, "--last", help="Resume the newest unfinished run of this name."),
    logs_dir: Path = typer.Option(Path("logs"), "--logs", help="Folder of run logs and journals."),
    set_: Optional[list[str]] = SetOption,
    bind: Optional[str] = BindOption,
    keys: Optional[Path] = StartKeysOption,
    insecure: bool = InsecureOption,
) -> None:
    """Continue a run whose coordinator died or was stopped, under the same run id. Exit codes as for start."""
    import signal

    from runner.cli import resume as journals

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        state, note = journals.to_resume(run_id, last, logs_dir, set_ or [])
    except RunnerError as exc:
        _fail(exc)
        return
    if state is None:
        typer.echo(note)
        raise typer.Exit(0)
    _launch(journals.config_of(state, set_ or [], logs_dir), bind, keys, insecure, state)


@app.command()
def retry(
    run_id: str = typer.Argument(..., help="The finished run whose dead-lettered jobs to re-run."),
    job: Optional[list[int]] = typer.Option(None, "--job", help="Only this job id (repeatable)."),
    error: Optional[str] = typer.Option(None, "--error", help="Only jobs whose error matches this regular expression."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs that would run, and run nothing."),
    logs_dir: Path = typer.Option(Path("logs"), "--logs", help="Folder of run logs and journals."),
) -> None:
    """Re-run the dead jobs of a finished run (after a fix), under the same run id. Exit codes as for start."""
    import signal

    from runner.cli import resume as journals

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        state, chosen, listing = journals.to_retry(run_id, job or [], error, logs_dir)
        if not chosen or dry_run:
            typer.echo(listing)
            raise typer.Exit(0)
        cfg = journals.config_of(state, [], logs_dir)
    except RunnerError as exc:
        _fail(exc)
        return
    _launch(cfg, None, None, False, state, chosen)


@app.command()
def check(config: Path = ConfigOption, set_: Optional[list[str]] = SetOption) -> None:
    """Validate a config, import every task and print the plan. Exit 2 on any problem."""
    from runner.config import load_config

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


@app.command()
def worker(
    connect: str = typer.Option(..., "--connect", help="The coordinator's address, e.g. tcp://coordinator:5555."),
    pool: Optional[list[str]] = typer.Option(None, "--pool", help="Serve this pool (repeatable; default: every consumer pool)."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1, max=1024,  # host_messages.MAX_HOST_PROCESSES
                                            help="Processes per pool here (default: the pool's `processes`)."),
    name: Optional[str] = typer.Option(None, "--name", help="This host's name in the run (default: the host name)."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="CURVE keys folder: <name>.key_secret or worker.key_secret, and coordinator.key."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback address without CURVE keys (warns)."),
    give_up: float = typer.Option(60.0, "--give-up", help="Seconds without a coordinator before exiting 1."),
    serve: bool = typer.Option(False, "--serve", help="After a run ends, wait for the next one instead of exiting."),
    run: Optional[str] = typer.Option(None, "--run", help="Join only this run id or run name."),
    path: Optional[list[str]] = typer.Option(None, "--path", help="Add a folder to the import path for task code (repeatable)."),
) -> None:
    """Join a coordinator's run from this host and run processes for it. Exit 0 when the run ends, 1 gave up, 2 usage."""
    from runner.agent.agent import Agent
    from runner.wire import zeromq as wire

    console = _stderr()
    try:
        if name is not None and not re.fullmatch(wire.HOST_NAME.strip("^$"), name):
            raise UsageError(f"--name {name!r}: a worker name is 1 to 64 letters, digits, '.', '_' or '-'")
        worker_keys = wire.WorkerKeys(keys, name) if keys else None
        wire.require_security(connect, worker_keys, insecure, "--keys", lambda m: console.print(m, markup=False))
        # no --keys on loopback: use the keys of this user's run at that address (found again for every session)
        discover = worker_keys is None and not insecure
        if discover:
            wire.control_dir()
    except RunnerError as exc:
        _fail(exc)
        return
    pools = list(dict.fromkeys(pool or []))  # `--pool src --pool src` serves src once
    agent = Agent(connect, pools, processes, name, worker_keys, give_up, serve, run, _say(console), path or [], discover)
    raise typer.Exit(int(agent.run()))


# the options `runner status` and `runner stop` share: which run, and how to reach its coordinator
RunIdArgument = typer.Argument(None, help="The run (default: the newest running run in --logs).")
LogsOption = typer.Option(Path("logs"), "--logs", help="Folder of run logs.")
ConnectOption = typer.Option(None, "--connect", help="A remote coordinator's bound address.")
ControlKeysOption = typer.Option(None, "--keys", help="CURVE keys folder (a worker key the coordinator authorizes).")
KeyNameOption = typer.Option(None, "--name", help="Use <name>.key_secret from --keys (default: worker.key_secret).")


def _control(run_id: Optional[str], logs_dir: Path, connect: Optional[str], keys: Optional[Path], kind: int, name: Optional[str] = None,
             *fields: Any) -> dict:
    """Ask a running coordinator: by --connect (remote, CURVE), or the control socket of a run in --logs."""
    from runner.wire import zeromq as wire

    timeout = 10.0 if fields else 5.0  # stacks take a moment: the coordinator waits up to 3 s for worker hosts'
    if connect:
        # without --keys: the keys of this user's run at that address, if it is one (loopback is not a trust boundary)
        return wire.request(connect, kind, wire.WorkerKeys(keys, name) if keys else wire.find_run_keys(connect), timeout, *fields)
    address = _local_control(run_id, logs_dir)
    return wire.request(address, kind, None, timeout, *fields)


def _local_control(run_id: Optional[str], logs_dir: Path) -> str:
    from runner.wire import zeromq as wire

    logs = sorted((p for p in logs_dir.glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    if run_id:
        logs = [p for p in logs if p.name == f"{run_id}.jsonl"]
        if not logs:
            raise RunnerError(f"no run {run_id} in {logs_dir}/")
    for log in logs:
        address = wire.control_address(log.name.removesuffix(".jsonl"))
        if os.path.exists(address.removeprefix("ipc://")):
            return address
        if run_id:
            break
    with_id = f" {run_id}" if run_id else ""
    raise RunnerError(f"no running run{with_id} found in {logs_dir}/ (its control socket is gone: the run is over or was killed)")


@app.command()
def status(
    run_id: Optional[str] = RunIdArgument,
    logs_dir: Path = LogsOption,
    connect: Optional[str] = ConnectOption,
    keys: Optional[Path] = ControlKeysOption,
    name: Optional[str] = KeyNameOption,
    as_json: bool = typer.Option(False, "--json", help="Print the raw status as JSON."),
    stacks: bool = typer.Option(False, "--stacks", help="Also print every busy process's job and Python stack (worker hosts too)."),
) -> None:
    """Show a running coordinator's hosts, pools, processes (job in hand, progress, RSS), queue depths, counts and rate."""
    import json

    from runner.wire import zeromq as wire

    try:
        reply = _control(run_id, logs_dir, connect, keys, wire.STATUS, name, *([{"stacks": True}] if stacks else []))
    except RunnerError as exc:
        _fail(exc)
        return
    dashboard = None if connect else _dashboard_url(reply.get("run_id", ""))
    if as_json:
        typer.echo(json.dumps({**reply, **({"dashboard": dashboard} if dashboard else {})}, indent=2))
        return
    out = Console(highlight=False)
    counts = reply["counts"]
    out.print(f"run {reply['run_id']} ({reply['state']}), {reply['elapsed_s']:.1f}s, {reply['rate']:,.0f} jobs/s")
    if dashboard:
        out.print(f"  dashboard: {dashboard}", soft_wrap=True)
    out.print("  " + "  ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items()))
    for host, info in reply["hosts"].items():
        seen = f", last heard {info['last_seen_s']:.1f}s ago" if "last_seen_s" in info else ""
        out.print(f"  host {host}: {info['processes']} processes{seen}")
    for pool, info in reply["pools"].items():
        extra = f", queued {info['queued']:,}, done {info['done']:,}, failed {info['failed']:,}, dead {info['dead']:,}" if "queued" in info else ""
        out.print(f"  pool {pool} ({info['role']}): {info['processes']} processes{extra}")
    _print_processes(out, reply)
    if stacks:
        _print_stacks(out, reply.get("stacks") or [])


def _job_text(entry: dict[str, Any]) -> str:
    """`job 17 for 12.3s, progress rows=1200 of=5000, RSS 52.1 MiB`: what a process is doing."""
    from runner.process.memory import format_bytes

    parts = []
    if entry.get("job_id") is not None:
        parts.append(f"job {entry['job_id']}" + (f" for {entry['running_s']:.1f}s" if entry.get("running_s") is not None else ""))
    if entry.get("progress"):
        parts.append("progress " + " ".join(f"{k}={v}" for k, v in entry["progress"].items()))
    if entry.get("rss"):
        parts.append(f"RSS {format_bytes(entry['rss'])}")
    return ", ".join(parts)


def _print_processes(out: Console, reply: dict[str, Any]) -> None:
    for proc in reply.get("processes", []):
        what = _job_text(proc) or ("idle" if proc.get("ready") else "starting")
        out.print(f"  process {proc['host']}/{proc['worker']} (pid {proc['pid']}): {what}", markup=False, soft_wrap=True)


def _print_stacks(out: Console, entries: list[dict[str, Any]]) -> None:
    if not entries:
        out.print("no busy process: no stack to show")
    for entry in entries:
        who = f"{entry['host']}/{entry['worker']}" if entry.get("worker") else f"host {entry['host']}"
        pid = f" (pid {entry['pid']})" if entry.get("pid") else ""
        out.print(f"\n{who}{pid}: {_job_text(entry) or 'a job'}", markup=False, soft_wrap=True)
        out.print(entry.get("stack") or "(no stack)", markup=False, soft_wrap=True, highlight=False)


def _dashboard_url(run_id: str) -> Optional[str]:
    """The dashboard's URL with its token, from the run's private control folder (only its user can read it)."""
    from runner.wire import zeromq as wire

    path = Path(wire.control_address(run_id).removeprefix("ipc://")).with_suffix(".dashboard")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@app.command()
def stop(
    run_id: Optional[str] = RunIdArgument,
    logs_dir: Path = LogsOption,
    connect: Optional[str] = ConnectOption,
    keys: Optional[Path] = ControlKeysOption,
    name: Optional[str] = KeyNameOption,
) -> None:
    """Ask a running coordinator for the graceful stop (the same as SIGTERM)."""
    from runner.wire import zeromq as wire

    try:
        reply = _control(run_id, logs_dir, connect, keys, wire.STOP_RUN, name)
    except RunnerError as exc:
        _fail(exc)
        return
    typer.echo(f"stopping run {reply['run_id']}")


keys_app = typer.Typer(help="CURVE key pairs for multi-host runs.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    folder: Path = typer.Argument(..., help="Where to write the keys."),
    worker_names: Optional[list[str]] = typer.Option(None, "--worker", help="Worker key pair names (repeatable; default: worker)."),
) -> None:
    """Make coordinator.key(_secret), one pair per worker, and authorized/ with the workers' public keys."""
    from runner.wire import zeromq as wire

    try:
        made = wire.generate_keys(folder, worker_names or ["worker"])
    except OSError as exc:
        raise UsageError(f"cannot write keys in {folder}: {exc.strerror or exc}") from exc
    for path in made:
        typer.echo(str(path))
    typer.echo(f"coordinator: runner start --keys {folder} ...; workers: runner worker --keys {folder} ... "
               f"(a worker needs only its own .key_secret and coordinator.key)")


def _register_log_commands() -> None:
    """`runner runs` and `runner logs ...` live in their own module (cli/logs.py)."""
    from runner.cli.logs import register

    register(app)


_register_log_commands()


def main() -> None:
    try:
        app()
    except RunnerError as exc:  # pragma: no cover - commands catch their own
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(int(exc.exit_code))
