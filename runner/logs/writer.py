"""One log stream per run: every process logs with structlog; only the coordinator writes the file.

A child's events travel to the coordinator as LOG frames on its own pipe, in order with its job
reports, so the run's JSON-lines file never holds interleaved or torn lines. Field order and names
are a contract (runner/logs/contract.py, README "Log events"); runner/logs/read.py reads them back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.text import Text

from runner import console as consoles
from runner.logs.contract import CONTEXT_KEYS, HOST, LEVELS

if TYPE_CHECKING:
    import structlog


def iso_now(now: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-26T23:30:01.123Z."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _stamp(_: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["timestamp"] = iso_now()
    event_dict["level"] = "warning" if method == "warn" else method
    return event_dict


def ordered(event_dict: dict[str, Any]) -> dict[str, Any]:
    """The contract's key order first, then the event's own fields."""
    line = {key: event_dict.get(key) for key in CONTEXT_KEYS}
    for key, value in event_dict.items():
        if key not in line:
            line[key] = value
    return line


def configure(level: str, sink: Callable[[dict[str, Any]], None], **context: Any) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog in this process; every event ends in `sink` as an ordered dict.

    structlog is imported here, not with the module: reading logs (`runner logs`, `runner runs`) never
    needs it, and it is a third of such a command's start-up. Processes get it preloaded (process/loop.py)."""
    import structlog

    def deliver(_: Any, __: str, event_dict: dict[str, Any]) -> Any:
        sink(ordered(event_dict))
        raise structlog.DropEvent

    processors: list[Any] = [_stamp, structlog.processors.format_exc_info, deliver]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(**{"host": HOST, "pid": os.getpid(), **context})


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, float):  # a float subclass (numpy.float64): a number, as json writes it, not its repr
        return float(value)
    return repr(value)


#: datetimes and dataclasses go to _json_default (their repr), as with the json module
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def dumps(line: dict[str, Any]) -> str:
    """One JSON line, without its newline. Results and log lines are encoded per job on the coordinator's
    loop, so orjson does it: 2.0-2.5 us a result line here against 31-38 us for json.dumps (which builds an
    encoder at every call). What orjson refuses (a non-string key, an integer beyond 64 bits, a lone
    surrogate) goes through json as before. Unlike json, orjson writes NaN and infinities as null (JSON
    has no NaN), a UUID as its string and an Enum member as its value."""
    try:
        return orjson.dumps(line, default=_json_default, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError
        return _json_text(line, ensure_ascii=False)


def dumps_line(line: dict[str, Any]) -> bytes:
    """dumps() as UTF-8 bytes with its newline, for a file opened in binary: the results file's lines go
    from orjson to the file as they are (no decode to str and encode back per line)."""
    try:
        return orjson.dumps(line, default=_json_default, option=_ORJSON_OPTIONS | orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError: as dumps()
        try:
            return (_json_text(line, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:  # a lone surrogate: escaped, so the line is still JSON and still UTF-8
            return (_json_text(line, ensure_ascii=True) + "\n").encode()


def _json_text(line: dict[str, Any], ensure_ascii: bool) -> str:
    """What orjson refused, through json; what json refuses too (a bytes or tuple key, which a msgpack map
    from a task may hold) made loggable (such keys as their repr): a line is always written, never raised."""
    try:
        return json.dumps(line, ensure_ascii=ensure_ascii, default=_json_default, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return json.dumps(loggable(line), ensure_ascii=ensure_ascii, default=_json_default, separators=(",", ":"))


def loggable(value: Any, depth: int = 0) -> Any:
    """`value` made of what msgpack and JSON both hold (str keys, 64-bit ints, nesting < 32); the rest as repr."""
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else repr(value)
    if depth < 32 and isinstance(value, (list, tuple)):
        return [loggable(item, depth + 1) for item in value]
    if depth < 32 and isinstance(value, dict):
        return {key if isinstance(key, str) else repr(key): loggable(item, depth + 1) for key, item in value.items()}
    return repr(value)


_LEVEL_STYLE = {"debug": "dim", "info": "cyan", "warning": "yellow", "error": "bold red", "critical": "bold red"}


def human(line: dict[str, Any]) -> Text:
    """A log line for people: time, level, event, who, then the other fields."""
    text = Text()
    text.append(str(line.get("timestamp", ""))[11:23] + " ", style="dim")
    level = str(line.get("level", ""))
    text.append(f"{level:<7} ", style=_LEVEL_STYLE.get(level, ""))
    text.append(f"{line.get('event')} ", style="bold")
    who = line.get("worker") or ""
    if line.get("host") and line.get("host") != HOST:
        who = f"{line['host']}/{who}"
    text.append(f"{who} ", style="magenta")
    for key, value in line.items():
        if key in CONTEXT_KEYS or key in ("traceback", "stack", "pools", "workers") or value is None:
            continue
        text.append(f"{key}=", style="dim")
        text.append(f"{value} ")
    return text


class RunLog:
    """The coordinator's writer: the run's JSON-lines file plus the console (human on a TTY, JSON otherwise)."""

    def __init__(self, path: Path, level: str, console: Console, tty: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8", buffering=1 << 16)
        self._threshold = LEVELS[level]
        self._console = console
        self._tty = tty
        self.file_error: OSError | None = None  #: set when the file could not be written: it is skipped from then on

    def write(self, line: dict[str, Any]) -> None:
        """One line to the file and the console. The first failure to write the file (a full disk) is raised,
        so the run takes its fail-safe path; from then on the file is skipped and the console still gets lines."""
        if LEVELS.get(str(line.get("level")), 20) < self._threshold:
            return
        text = dumps(line)
        event = str(line.get("event"))
        failed: OSError | None = None
        if self.file_error is None:
            try:
                self._file.write(text + "\n")
                if LEVELS.get(str(line.get("level")), 20) >= LEVELS["warning"] or event == "progress":
                    self._file.flush()  # warnings at once, the rest each progress tick: readers of a live run (and a killed one) see them
            except OSError as exc:
                self.file_error = failed = exc
        if self._tty:
            if event != "progress":
                with consoles.guard(sys.stderr):
                    self._console.print(human(line), highlight=False, soft_wrap=True)
        else:
            with consoles.guard(sys.stderr):
                sys.stderr.write(text + "\n")
        if failed is not None:
            raise failed

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # its last lines could not be flushed (the error was raised when it happened)
            pass
