"""`runner runs` and `runner logs ...`: reading run logs from the command line, offline, on any machine.

`register(app)` adds the commands to the main app. `runner logs` is a group whose first token
picks a subcommand (trace, summary, timeline, show) and otherwise means `show`, so
`runner logs RUN_ID --level warning` and `runner logs trace 17` both work. Human output is
colourised on a TTY (rich; NO_COLOR respected) and plain when piped; `--json` is for scripts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, Optional

import orjson
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from runner.logs.read import Damage
from runner.logs.runs import LogSourceError, elapsed_text, find_runs, resolve_sources, run_info

# the readers each command needs are imported in it: every `runner` command registers these commands, and
# `runner start` or `runner status` should not load summary, trace and timeline code on each start

DEFAULT_COMMAND = "show"


class LogsGroup(TyperGroup):
    """`runner logs` dispatches to a subcommand named by the first token, else to `show` (runs, files, filters)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


logs_app = typer.Typer(
    cls=LogsGroup,
    name="logs",
    help="Read a run's log. `runner logs \\[RUN_ID|FILE...] \\[filters]` prints lines (see `runner logs show --help`); trace, summary and timeline answer questions.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

SourcesArgument = typer.Argument(
    None, metavar="[RUN_ID|FILE]...", show_default=False,
    help="Run ids in --logs (or unique prefixes) or log files; several are merged by time. Default: the newest run.",
)
LogsDirOption = typer.Option(Path("logs"), "--logs", help="The folder of run logs (the config's logs.dir).")
JsonOption = typer.Option(False, "--json", help="Machine-readable output for scripts.")


# -- output helpers -------------------------------------------------------------------------
def _stdout() -> Console:
    """Rich on a terminal; no escape codes at all when piped or with NO_COLOR (and wide, so tables stay on one line)."""
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        return Console(highlight=False, width=200, color_system=None)
    if os.environ.get("NO_COLOR"):
        return Console(highlight=False, color_system=None)
    return console


def _fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and an exit code, never a traceback."""
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code)


def _warn_damage(damage: Damage) -> None:
    message = damage.message()
    if message:
        sys.stdout.flush()
        sys.stderr.write(f"warning: {message}\n")


#: what reading a log line of a shape the runner never writes raises (valid JSON, wrong types)
_SHAPE_ERRORS = (TypeError, ValueError, KeyError, AttributeError)


@contextmanager
def _reading(damage: Damage) -> Iterator[None]:
    """Usage mistakes become exit 2; a closed pipe (`| head`) ends quietly; damage is reported once at the end."""
    try:
        yield
    except LogSourceError as exc:
        _fail(str(exc))
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except OSError as exc:  # a log file or folder this user may not read
        _fail(f"cannot read {exc.filename or 'the logs'}: {exc.strerror or exc}")
    except _SHAPE_ERRORS as exc:  # JSON of a shape the runner never writes
        _fail(f"a log line of an unexpected shape (not written by this runner as it is): {type(exc).__name__}: {exc}")
    finally:
        _warn_damage(damage)


def _table(console: Console, *columns: str, title: str | None = None) -> Table:
    table = Table(*columns, title=title, title_justify="left", box=box.SIMPLE_HEAD if console.is_terminal else None,
                  header_style="bold" if console.is_terminal else "", pad_edge=False, show_edge=False)
    for column in table.columns[1:]:
        column.justify = "right"
    return table


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _when(stamp: Any) -> str:
    return "-" if not stamp else str(stamp).replace("T", " ")[:19]


# -- runner runs ----------------------------------------------------------------------------
def _run_info_or_warn(path: Path) -> Any:
    """One run's summary; a log this user cannot read, or of a shape the runner never writes, is a warning and
    left out, so one bad file does not hide the others."""
    try:
        return run_info(path)
    except OSError as exc:
        sys.stderr.write(f"warning: cannot read {path}: {exc.strerror or exc}; left out\n")
    except _SHAPE_ERRORS as exc:
        sys.stderr.write(f"warning: {path} has a line of an unexpected shape ({type(exc).__name__}: {exc}); left out\n")
    return None


def runs(logs_dir: Path = LogsDirOption, as_json: bool = JsonOption) -> None:
    """The runs in a log folder, newest first: id, name, start, duration, status, jobs done / failed / dead."""
    if not logs_dir.is_dir():
        _fail(f"no log folder {logs_dir}/ (give --logs DIR)")
    with _reading(Damage()):
        infos = [info for info in map(_run_info_or_warn, find_runs(logs_dir)) if info is not None]
    if as_json:
        for info in infos:
            record = {k: v for k, v in vars(info).items() if k != "path"}
            sys.stdout.write(orjson.dumps({**record, "path": str(info.path)}).decode() + "\n")
        return
    if not infos:
        sys.stderr.write(f"no runs in {logs_dir}/\n")
        return
    console = _stdout()
    table = _table(console, "run id", "name", "started (UTC)", "duration", "status", "done", "failed", "dead")
    table.columns[1].justify = table.columns[2].justify = table.columns[4].justify = "left"
    style = {"finished": "green", "failed": "bold red", "crashed": "bold red", "stopped": "yellow", "running": "cyan"}
    for info in infos:
        table.add_row(info.run_id, info.name or "-", _when(info.started), elapsed_text(info.duration_s),
                      f"[{style.get(info.status, '')}]{info.status}[/]" if style.get(info.status) else info.status,
                      _count(info.done), _count(info.failed), _count(info.dead))
    console.print(table)
    for info in infos:
        if info.hint and info.status == "crashed":
            console.print(f"{info.run_id}: its coordinator died; continue it with: {info.hint}", highlight=False)


# -- runner logs [show] ---------------------------------------------------------------------
@logs_app.command(DEFAULT_COMMAND)
def show(
    sources: Optional[list[str]] = SourcesArgument,
    level: Optional[str] = typer.Option(None, "--level", "-l", help="Minimum level: debug, info, warning, error, critical."),
    event: Optional[list[str]] = typer.Option(None, "--event", "-e", help="Event name or glob, e.g. 'job.*' (repeatable)."),
    pool: Optional[list[str]] = typer.Option(None, "--pool", help="Pool name or glob (repeatable)."),
    worker: Optional[list[str]] = typer.Option(None, "--worker", "-w", help="Worker name or glob, e.g. 'eater-*' (repeatable)."),
    host: Optional[list[str]] = typer.Option(None, "--host", help="Host name or glob (repeatable)."),
    job: Optional[list[int]] = typer.Option(None, "--job", "-j", help="Job id (repeatable)."),
    since: Optional[str] = typer.Option(None, "--since", help="From this time: ISO (UTC unless given) or ago: 30s, 10m, 2h, 1d."),
    until: Optional[str] = typer.Option(None, "--until", help="Up to this time, same forms as --since."),
    grep: Optional[str] = typer.Option(None, "--grep", "-g", help="Regex over the whole raw line."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=0, help="Print at most this many lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the matching raw lines unchanged (for jq)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing a live run's new lines; stops when the run ends."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """Print log lines (the default: `runner logs RUN_ID ...` means `runner logs show RUN_ID ...`). Filters combine."""
    from runner.logs.read import LineFilter, parse_when

    try:
        line_filter = LineFilter(
            level=level, event=event or (), pool=pool or (), worker=worker or (), host=host or (), job=job or (),
            since=parse_when(since) if since else None, until=parse_when(until) if until else None,
            grep=grep, limit=limit,
        )
    except ValueError as exc:
        _fail(str(exc))
    damage = Damage()
    with _reading(damage):
        paths = resolve_sources(sources or [], logs_dir)
        if follow and len(paths) != 1:
            _fail("--follow takes one run or file")
        lines = line_filter.follow(paths[0], damage) if follow else line_filter.lines(paths, damage)
        _print_lines(lines, as_json, flush=follow)


def _print_lines(lines: Any, as_json: bool, flush: bool) -> None:
    from runner.logs.writer import human

    write = sys.stdout.write
    if as_json:
        for line in lines:
            write(line.raw.decode("utf-8", "replace") + "\n")
            if flush:
                sys.stdout.flush()
        return
    console = Console(highlight=False, soft_wrap=True)
    if console.is_terminal and not os.environ.get("NO_COLOR"):
        for line in lines:
            console.print(human(line.fields), soft_wrap=True)
        return
    for line in lines:
        write(human(line.fields).plain.rstrip() + "\n")
        if flush:
            sys.stdout.flush()


# -- runner logs trace ----------------------------------------------------------------------
@logs_app.command("trace")
def trace_command(
    job_id: int = typer.Argument(..., help="The job id (as in job.* lines and the dead-letter file)."),
    sources: Optional[list[str]] = SourcesArgument,
    logs_dir: Path = LogsDirOption,
    as_json: bool = JsonOption,
) -> None:
    """The life of one job: produced by, each attempt (worker, host, duration, error), retries, done or dead."""
    from runner.logs.read import checked, read_lines
    from runner.logs.trace import job_prefilter, trace

    damage = Damage()
    with _reading(damage):
        paths = resolve_sources(sources or [], logs_dir)
        lines = read_lines(paths, damage, job_prefilter(job_id))
        result = trace(checked(lines, damage), job_id)
    if not result.found:
        _fail(f"no line mentions job {job_id} in {', '.join(map(str, paths))} "
              "(with logs.jobs: failures, only failed jobs are logged; logs.jobs: all logs every job)", code=1)
    if as_json:
        data = {"job_id": result.job_id, "pool": result.pool, "origin": result.origin, "queued": result.queued,
                "outcome": result.outcome, "attempts": [vars(a) for a in result.attempts],
                "steps": [{"timestamp": s.timestamp, "what": s.what, "detail": s.detail} for s in result.steps]}
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
        return
    console = _stdout()
    tries = len(result.attempts)
    console.print(f"job {job_id} (pool {result.pool or '?'}, produced by {result.origin or '?'}): "
                  f"[bold]{result.outcome}[/] after {tries} attempt{'s' if tries != 1 else ''}")
    table = _table(console, "time (UTC)", "step", "detail")
    table.columns[1].justify = table.columns[2].justify = "left"
    colour = {"crashed": "bold red", "dead": "bold red", "retried": "yellow"}
    for step in result.steps:
        what = step.what
        style = colour.get(what) or ("red" if "failed" in step.detail or "crashed" in step.detail else "green" if step.detail.endswith(": done") else "")
        table.add_row(step.timestamp.replace("T", " ")[:23], f"[{style}]{what}[/]" if style else what, step.detail)
    console.print(table)
    if result.dropped_steps:
        console.print(f"... and {result.dropped_steps} more lines about this job")


# -- runner logs summary --------------------------------------------------------------------
@logs_app.command("summary")
def summary_command(
    sources: Optional[list[str]] = SourcesArgument,
    logs_dir: Path = LogsDirOption,
    top: int = typer.Option(10, "--top", min=1, help="How many error groups to show."),
    as_json: bool = JsonOption,
) -> None:
    """Per pool, worker and host: done / failed / retried / dead, job time p50/p95/p99, throughput, crashes, top errors."""
    from runner.logs.read import checked, read_lines
    from runner.logs.summary import Summary

    damage = Damage()
    with _reading(damage):
        paths = resolve_sources(sources or [], logs_dir)
        data = Summary().add_all(checked(read_lines(paths, damage), damage)).result(top)
        if as_json:
            sys.stdout.write(orjson.dumps(data).decode() + "\n")
            return
        _render_summary(_stdout(), data)


def _render_summary(console: Console, data: dict[str, Any]) -> None:
    from runner.logs.summary import sparkline

    for run_id, run in data["runs"].items():
        status = run.get("status") or "no run.finished"
        console.print(f"run {run_id} ({run.get('name') or '?'}): {status}, "
                      f"{elapsed_text(run.get('duration_s'))}, started {_when(run.get('started'))} UTC")
    console.print(f"{data['lines']:,} lines from {_when(data['first'])} to {_when(data['last'])}")
    figures = ("done", "failed", "retried", "dead")
    times = ("p50 ms", "p95 ms", "p99 ms")
    for title, key, extra in (("pools", "pools", ()), ("workers", "workers", ("pool", "host")), ("hosts", "hosts", ())):
        rows = data[key]
        if not rows:
            continue
        table = _table(console, title[:-1], *extra, *figures, "crashes", "restarts", *times)
        for column in table.columns[1:1 + len(extra)]:
            column.justify = "left"
        for name, row in rows.items():
            table.add_row(name, *(str(row.get(e) or "-") for e in extra), *(_count(row.get(f)) for f in figures),
                          _count(row.get("crashes")), _count(row.get("restarts")),
                          *(_ms(row.get(f"p{q}_ms")) for q in (50, 95, 99)))
        console.print()
        console.print(table)
    pools_from_finished = [name for name, row in data["pools"].items() if row.get("times_from") == "run.finished"]
    if pools_from_finished:
        console.print(f"(job times of {', '.join(pools_from_finished)} from run.finished: the run logged no job times; logs.jobs: all logs them)")
    throughput = data["throughput"]
    rates = throughput["jobs_per_s"]
    if rates:
        console.print()
        console.print(f"[bold]throughput[/] (jobs/s from {throughput['from']} lines, {throughput['bucket_s']:g}s per column, "
                      f"peak {max(rates):,.1f}/s over {elapsed_text(throughput['span_s'])})")
        console.print(f"[cyan]{sparkline(rates)}[/]", soft_wrap=True)
    if data["errors"]:
        table = _table(console, "count", "error", "first (UTC)", "last (UTC)", "example jobs")
        table.columns[0].justify, table.columns[1].justify = "right", "left"
        for group in data["errors"]:
            table.add_row(_count(group["count"]), group["message"], group["first"][11:23], group["last"][11:23],
                          ", ".join(map(str, group["examples"])) or "-")
        console.print()
        console.print("[bold]top errors[/]")
        console.print(table)
        if data["other_errors"]:
            console.print(f"... and {data['other_errors']:,} errors with other messages")


# -- runner logs timeline -------------------------------------------------------------------
@logs_app.command("timeline")
def timeline_command(
    sources: Optional[list[str]] = SourcesArgument,
    output: Path = typer.Option(Path("trace.json"), "--output", "-o", help="Where to write the trace ('-' for stdout)."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """Write the run as Chrome trace-event JSON: a track per worker process, a slice per job attempt (Perfetto, chrome://tracing)."""
    from runner.logs.read import read_lines
    from runner.logs.timeline import write_timeline

    damage = Damage()
    with _reading(damage):
        paths = resolve_sources(sources or [], logs_dir)
        lines = read_lines(paths, damage)
        if str(output) == "-":
            sys.stdout.flush()
            count = write_timeline(lines, sys.stdout.buffer, damage)
            sys.stdout.buffer.flush()
            return
        try:
            with output.open("wb") as out:
                count = write_timeline(lines, out, damage)
        except OSError as exc:
            _fail(f"cannot write {output}: {exc.strerror}")
        sys.stderr.write(f"wrote {count:,} trace events to {output} (open it in ui.perfetto.dev or chrome://tracing)\n")


def register(app: typer.Typer) -> None:
    """Add `runs` and the `logs` group to the main `runner` app."""
    app.command("runs")(runs)
    app.add_typer(logs_app, name="logs")
