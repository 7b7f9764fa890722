"""Reading run logs back: lazy, tolerant, merged by time, filtered; and finding the runs in a folder.

Every function here streams: a file is read line by line (never whole), several files are merged
with heapq.merge, and a damaged line (torn, not JSON, missing a field) is counted in a `Damage`
and skipped, so one bad byte never costs a person the rest of the log. The line contract is the
coordinator's (runner/logs.py); timestamps are fixed-width ISO 8601 UTC strings, so they compare as text.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
#: what a line must carry to be shown at all; event-specific fields are checked by the readers that need them
REQUIRED = ("timestamp", "level", "event")
LOG_SUFFIX = ".jsonl"
SIDE_FILES = (".dead.jsonl", ".pending.jsonl")
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


class LogSourceError(Exception):
    """A run id or file that names nothing readable; the CLI prints it as one line and exits 2."""


class Damage:
    """Lines skipped as damaged: counted, the first one remembered, reported once at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.first: tuple[str, int, str] | None = None  #: (file, line number, why)

    def note(self, source: str, number: int, why: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = (source, number, why)

    def message(self) -> str | None:
        if not self.count or self.first is None:
            return None
        source, number, why = self.first
        noun = "line" if self.count == 1 else "lines"
        return f"skipped {self.count} damaged {noun} (first: {source}:{number}: {why})"


class LogLine:
    """One parsed line with where it came from; `raw` is kept unchanged for `--json`."""

    __slots__ = ("fields", "raw", "source", "number", "timestamp")

    def __init__(self, fields: dict[str, Any], raw: bytes, source: str, number: int) -> None:
        self.fields = fields
        self.raw = raw
        self.source = source
        self.number = number
        self.timestamp: str = fields["timestamp"]

    @property
    def event(self) -> str:
        return self.fields["event"]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"LogLine({self.source}:{self.number} {self.timestamp} {self.event})"


def parse_line(raw: bytes, source: str, number: int, damage: Damage) -> LogLine | None:
    """A LogLine, or None after noting why the bytes are not one (blank lines are skipped silently)."""
    text = raw.rstrip(b"\r\n")
    if not text.strip():
        return None
    try:
        fields = orjson.loads(text)
    except orjson.JSONDecodeError:
        damage.note(source, number, "not JSON" if raw.endswith(b"\n") else "torn last line")
        return None
    if not isinstance(fields, dict):
        damage.note(source, number, "not a JSON object")
        return None
    for key in REQUIRED:
        if not isinstance(fields.get(key), str):
            damage.note(source, number, f"missing field {key!r}")
            return None
    return LogLine(fields, text, source, number)


def read_file(path: Path, damage: Damage, prefilter: Callable[[bytes], bool] | None = None) -> Iterator[LogLine]:
    """The lines of one file, lazily.

    `prefilter` sees the raw bytes first, so lines that cannot match are not parsed; a line it
    rejects that does not even look like a whole JSON object is still parsed, only to count it as damage.
    """
    source = str(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if prefilter is not None and not prefilter(raw):
                if not (raw.startswith(b"{") and raw.endswith(b"}\n")):
                    parse_line(raw, source, number, damage)
                continue
            line = parse_line(raw, source, number, damage)
            if line is not None:
                yield line


def _timestamp(line: LogLine) -> str:
    return line.timestamp


def read_lines(paths: Sequence[Path], damage: Damage, prefilter: Callable[[bytes], bool] | None = None,
               window: int = 4096) -> Iterator[LogLine]:
    """One file as written, or several merged by timestamp (each still read lazily).

    When several files hold copies of the same line (each host's copy of a run), the copies
    after the first are dropped: the same bytes seen from another file among the last `window` lines.
    """
    if len(paths) == 1:
        yield from read_file(paths[0], damage, prefilter)
        return
    merged = heapq.merge(*(read_file(path, damage, prefilter) for path in paths), key=_timestamp)
    recent: dict[bytes, str] = {}
    for line in merged:
        first = recent.get(line.raw)
        if first is not None and first != line.source:
            continue
        recent[line.raw] = line.source
        if len(recent) > window:
            del recent[next(iter(recent))]
        yield line


def follow_file(path: Path, damage: Damage, wait: Callable[[float], None] = time.sleep, poll_s: float = 0.2,
                alive: Callable[[dict[str, Any]], bool] | None = None) -> Iterator[LogLine]:
    """Tail a live run's file: every line so far, then new ones as they are written.

    A last line without its newline is held until the newline arrives. Ends after `run.finished`,
    or when the coordinator named in `run.started` is gone (then what is left is read once more).
    `wait` is called while nothing new has come (tests pass a function that appends instead).
    """
    alive = alive or coordinator_alive
    source = str(path)
    started: dict[str, Any] | None = None
    finished = False
    number = 0
    pending = b""
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(1 << 16)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    number += 1
                    line = parse_line(raw + b"\n", source, number, damage)
                    if line is None:
                        continue
                    yield line
                    if line.event in ("run.started", "run.resumed"):  # the latest coordinator is the one to watch
                        started, finished = line.fields, False
                    elif line.event == "run.finished":
                        finished = True  # the end, unless a resume wrote more after it
                continue
            if finished:
                return
            if started is not None and not alive(started):
                pending += handle.read()
                for raw in pending.splitlines(keepends=True):
                    number += 1
                    line = parse_line(raw, source, number, damage)
                    if line is not None:
                        yield line
                return
            wait(poll_s)


# -- filters --------------------------------------------------------------------------------
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: float | None = None) -> str:
    """`--since`/`--until` as a contract timestamp: ISO 8601 (naive means UTC, like the logs) or `10m`, `2h`, `1h30m` ago."""
    spec = text.strip()
    parts = _RELATIVE.findall(spec)
    if parts and "".join(n + u for n, u in parts) == spec:
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        moment = datetime.fromtimestamp((time.time() if now is None else now) - seconds, timezone.utc)
    else:
        try:
            moment = datetime.fromisoformat(spec)
        except ValueError:
            raise ValueError(f"{text!r} is neither an ISO time (2026-11-26T23:30:00Z) nor a duration ago (30s, 10m, 2h, 1d)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    return format_stamp(moment)


def format_stamp(moment: datetime) -> str:
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def stamp_seconds(stamp: str) -> float:
    """A contract timestamp as Unix seconds."""
    return datetime.fromisoformat(stamp).timestamp()


def _globs(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns))


@dataclass
class LineFilter:
    """The `runner logs` filters; they combine with AND, repeated values of one filter with OR.

    `event`, `pool`, `worker` and `host` take globs (`job.*`, `eater-*`); `since`/`until` are
    contract timestamps (see `parse_when`); `grep` is a regex over the raw line.
    A line without the field a filter looks at does not match that filter.
    """

    level: str | None = None
    event: Sequence[str] = ()
    pool: Sequence[str] = ()
    worker: Sequence[str] = ()
    host: Sequence[str] = ()
    job: Sequence[int] = ()
    since: str | None = None
    until: str | None = None
    grep: str | None = None
    limit: int | None = None  #: at most this many lines (applied by `lines`)

    def __post_init__(self) -> None:
        if self.level is not None and self.level not in LEVELS:
            raise ValueError(f"unknown level {self.level!r}; one of {', '.join(LEVELS)}")
        self._min_level = LEVELS[self.level] if self.level else 0
        self._checks: list[tuple[str, re.Pattern[str]]] = [
            (key, pattern) for key, patterns in (("event", self.event), ("pool", self.pool), ("worker", self.worker), ("host", self.host))
            if (pattern := _globs(patterns)) is not None
        ]
        self._jobs = set(self.job)
        try:
            self._grep = re.compile(self.grep.encode()) if self.grep else None
        except re.error as exc:
            raise ValueError(f"--grep {self.grep!r} is not a valid regex: {exc}") from None

    def prefilter(self) -> Callable[[bytes], bool] | None:
        """The part that works on raw bytes (the grep), so most lines need no parsing."""
        return self._grep.search if self._grep is not None else None  # type: ignore[return-value]

    def __call__(self, line: LogLine) -> bool:
        fields = line.fields
        if self._min_level and LEVELS.get(fields["level"], 20) < self._min_level:
            return False
        if self.since is not None and line.timestamp < self.since:
            return False
        if self.until is not None and line.timestamp > self.until:
            return False
        if self._jobs and fields.get("job_id") not in self._jobs:
            return False
        for key, pattern in self._checks:
            value = fields.get(key)
            if value is None or not pattern.match(str(value)):
                return False
        return True

    def lines(self, paths: Sequence[Path], damage: Damage) -> Iterator[LogLine]:
        """The matching lines of `paths` (merged), at most `limit`."""
        return take(filter(self, read_lines(paths, damage, self.prefilter())), self.limit)

    def follow(self, path: Path, damage: Damage, **kwargs: Any) -> Iterator[LogLine]:
        """The matching lines of a live file as they come (see `follow_file`), at most `limit`."""
        grep = self.prefilter()
        lines = (line for line in follow_file(path, damage, **kwargs) if (grep is None or grep(line.raw)) and self(line))
        return take(lines, self.limit)


def take(lines: Iterable[LogLine], limit: int | None) -> Iterator[LogLine]:
    for count, line in enumerate(lines):
        if limit is not None and count >= limit:
            return
        yield line


# -- runs -----------------------------------------------------------------------------------
_RUN_STAMP = re.compile(r"-(\d{8}T\d{6}Z)-[0-9a-f]+\Z")
HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped) is not running; psutil, where installed, tells
        import psutil
    except ImportError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def coordinator_alive(started: dict[str, Any]) -> bool:
    """Is the coordinator of a run (its `run.started` or `run.resumed` line) still running? The run's journal lock
    answers when there is a journal (pids are reused); else its pid, here (False if it ran on another host)."""
    journal = started.get("journal_path")
    if journal is None and started.get("log_file"):
        journal = str(started["log_file"]).removesuffix(LOG_SUFFIX) + ".journal"
    if journal and os.path.exists(journal):
        return journal_locked(Path(journal))
    pid = started.get("coordinator_pid") or started.get("pid")
    return started.get("host") == HOST and isinstance(pid, int) and pid_alive(pid)


def journal_locked(path: Path) -> bool:
    """Does a coordinator hold this journal's flock (the run is alive)?"""
    import errno
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


@dataclass
class RunInfo:
    """One run as `runner runs` lists it: read from the first line and the tail of the file only."""

    run_id: str
    path: Path
    name: str | None = None
    started: str | None = None
    duration_s: float | None = None
    status: str = "unknown"
    done: int | None = None
    failed: int | None = None
    dead: int | None = None
    host: str | None = None
    pid: int | None = None
    hint: str | None = None  #: what to do next (a crashed or stopped run with a journal: `runner resume <id>`)


def is_run_log(path: Path) -> bool:
    return path.name.endswith(LOG_SUFFIX) and not path.name.endswith(SIDE_FILES)


def _sort_key(path: Path) -> tuple[str, float]:
    match = _RUN_STAMP.search(path.name.removesuffix(LOG_SUFFIX))
    return (match.group(1) if match else "", path.stat().st_mtime)


def find_runs(logs_dir: Path) -> list[Path]:
    """The run logs in a folder, newest first (by the stamp in the run id, then by mtime)."""
    if not logs_dir.is_dir():
        return []
    return sorted((p for p in logs_dir.iterdir() if p.is_file() and is_run_log(p)), key=_sort_key, reverse=True)


def _first_line(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as handle:
        raw = handle.readline(1 << 20)
    line = parse_line(raw, str(path), 1, Damage())
    return line.fields if line else None


def tail_lines(path: Path, max_bytes: int = 1 << 20, chunk: int = 1 << 16) -> Iterator[dict[str, Any]]:
    """Complete lines from the end of a file backwards, parsed; at most `max_bytes` are read."""
    with path.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        position, carry, scanned = end, b"", 0
        while position > 0 and scanned < max_bytes:
            step = min(chunk, position)
            position -= step
            scanned += step
            handle.seek(position)
            block = handle.read(step) + carry
            lines = block.split(b"\n")
            carry = lines.pop(0) if position > 0 else b""
            for raw in reversed(lines):
                line = parse_line(raw, str(path), 0, Damage())
                if line is not None:
                    yield line.fields
        if position == 0 and carry:
            line = parse_line(carry, str(path), 1, Damage())
            if line is not None:
                yield line.fields


def run_info(path: Path, now: float | None = None) -> RunInfo:
    """A run's status and figures from `run.started` (first line) and `run.finished` or the last `progress` (tail)."""
    info = RunInfo(run_id=path.name.removesuffix(LOG_SUFFIX), path=path)
    started = _first_line(path)
    if started is not None and started.get("event") == "run.started":
        info.name, info.started = started.get("name"), started.get("timestamp")
        info.host, info.pid = started.get("host"), started.get("coordinator_pid") or started.get("pid")
    last: str | None = None
    finished = progress = latest = None
    for fields in tail_lines(path):  # backwards: the first of run.finished / run.resumed / run.started decides
        last = last or fields.get("timestamp")
        event = fields.get("event")
        if event == "progress" and progress is None:
            progress = fields
        elif event == "run.finished":
            finished = fields
            break
        elif event in ("run.resumed", "run.started"):
            latest = fields
            break
    if latest is None and finished is None and started is not None and started.get("event") == "run.started":
        latest = started
    if latest is not None:
        latest = {**latest, "log_file": str(path)}
    figures = finished or progress or {}
    info.done, info.failed, info.dead = figures.get("done"), figures.get("failed"), figures.get("dead")
    if finished is not None:
        info.status = str(finished.get("status", "finished"))
        info.duration_s = finished.get("duration_s")
    elif latest is not None:
        info.status = "running" if coordinator_alive(latest) else "crashed"
    journal = path.with_name(info.run_id + ".journal")
    if info.status in ("crashed", "stopped") and journal.exists():
        info.hint = f"runner resume {info.run_id}"
    if info.duration_s is None and info.started:
        end = (time.time() if now is None else now) if info.status == "running" else stamp_seconds(last) if last else None
        info.duration_s = None if end is None else max(0.0, round(end - stamp_seconds(info.started), 3))
    return info


def resolve_sources(tokens: Sequence[str], logs_dir: Path) -> list[Path]:
    """Run ids (or unique prefixes of one) in `logs_dir`, or paths; none given: the newest run there."""
    if not tokens:
        runs = find_runs(logs_dir)
        if not runs:
            raise LogSourceError(f"no runs in {logs_dir}/ (give a run id or a log file, or --logs DIR)")
        return [runs[0]]
    paths = []
    for token in tokens:
        path = Path(token)
        if path.is_file():
            paths.append(path)
            continue
        exact = logs_dir / f"{token}{LOG_SUFFIX}"
        if exact.is_file():
            paths.append(exact)
            continue
        matches = [p for p in find_runs(logs_dir) if p.name.startswith(token)]
        if len(matches) == 1:
            paths.append(matches[0])
        elif matches:
            raise LogSourceError(f"run id {token!r} is ambiguous in {logs_dir}/: {', '.join(p.name.removesuffix(LOG_SUFFIX) for p in matches[:5])}")
        else:
            raise LogSourceError(f"no run or file {token!r} (looked for {exact})")
    return paths


def elapsed_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(timedelta(seconds=round(seconds))) if seconds >= 60 else f"{seconds:.1f}s"
