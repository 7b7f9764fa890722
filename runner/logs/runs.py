"""The runs in a log folder: finding them, which file a run id names, and how each run went.

A run's status and figures come from its first line (`run.started`) and the tail of its file
(`run.finished` or the last `progress`), so listing many big runs stays quick.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from runner.logs.contract import LOG_SUFFIX, SIDE_FILES
from runner.logs.read import Damage, coordinator_alive, parse_line, stamp_seconds

_RUN_STAMP = re.compile(r"-(\d{8}T\d{6}Z)-[0-9a-f]+\Z")


class LogSourceError(Exception):
    """A run id or file that names nothing readable; the CLI prints it as one line and exits 2."""


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


def first_line(path: Path) -> dict[str, Any] | None:
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
    started = first_line(path)
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
    info.done, info.failed, info.dead = (_count(figures.get(key)) for key in ("done", "failed", "dead"))
    if finished is not None:
        info.status = str(finished.get("status", "finished"))
        duration = finished.get("duration_s")
        info.duration_s = float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else None
    elif latest is not None:
        info.status = "running" if coordinator_alive(latest) else "crashed"
    journal = path.with_name(info.run_id + ".journal")
    if info.status in ("crashed", "stopped") and journal.exists():
        info.hint = f"runner resume {info.run_id}"
    if info.duration_s is None and info.started:
        end = (time.time() if now is None else now) if info.status == "running" else stamp_seconds(last) if last else None
        info.duration_s = None if end is None else max(0.0, round(end - stamp_seconds(info.started), 3))
    return info


def _count(value: Any) -> int | None:
    """A count from a log line; what is not one (a line of a shape the runner never writes) shows as unknown."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
