"""Reading run logs back: lazy, tolerant, merged by time, filtered, checked against the contract.

Every function here streams: a file is read line by line (never whole), several files are merged
with heapq.merge, and a damaged line (torn, not JSON, missing a field) is counted in a `Damage`
and skipped, so one bad byte never costs a person the rest of the log. The line contract is
runner/logs/contract.py; timestamps are fixed-width ISO 8601 UTC strings, so they compare as text.
The runs in a folder (which file a run id names, how a run went) are runner/logs/runs.py.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from runner.durations import parse_span
from runner.logs.contract import EVENTS, HOST, LEVELS, LOG_SUFFIX, NEEDS, REQUIRED, RESERVED_PREFIXES


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
def parse_when(text: str, now: float | None = None) -> str:
    """`--since`/`--until` as a contract timestamp: ISO 8601 (naive means UTC, like the logs) or `10m`, `2h`, `1h30m` ago."""
    spec = text.strip()
    seconds = parse_span(spec)
    if seconds is not None:
        moment = datetime.fromtimestamp((time.time() if now is None else now) - seconds, UTC)
    else:
        try:
            moment = datetime.fromisoformat(spec)
        except ValueError:
            raise ValueError(f"{text!r} is neither an ISO time (2026-11-26T23:30:00Z) nor a duration ago (30s, 10m, 2h, 1d)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return format_stamp(moment)


def format_stamp(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
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


def checked(lines: Iterable[LogLine], damage: Damage) -> Iterator[LogLine]:
    """Lines an analysis can use: runner events it knows, with the fields it needs; user events pass."""
    for line in lines:
        event = line.event
        if event.startswith(RESERVED_PREFIXES) and event not in EVENTS:
            damage.note(line.source, line.number, f"unknown event {event!r}")
            continue
        for key in NEEDS.get(event, ()):
            if line.fields.get(key) is None:
                damage.note(line.source, line.number, f"{event} without {key!r}")
                break
        else:
            yield line


# -- live runs ------------------------------------------------------------------------------
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
