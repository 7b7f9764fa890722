"""The run's output files, written only by the coordinator: results, dead letters, pending jobs.

  results (`results:` in the config)   one line per done job: job_id, pool, result, run_id (appended)
  <run_id>.dead.jsonl                  one line per dead-lettered job: payload, error, traceback, attempts
  <run_id>.pending.jsonl               written at the end: every job not settled (a stopped run)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from runner import logs
from runner.errors import UsageError


def _check(what: str, path: Path | str, action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as exc:
        reason = "a file is there, not a folder" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
        path = path or exc.filename
        raise UsageError(f"cannot write the {what} {path}: {reason}. Nothing was started: make that folder writable "
                         "for this user, or choose another place in the config") from exc


def _append(path: Path) -> None:
    try:
        open(path, "a", encoding="utf-8").close()
    except FileNotFoundError:  # its folder is made, as the run would
        path.parent.mkdir(parents=True, exist_ok=True)
        open(path, "a", encoding="utf-8").close()


def writable(log_dir: Path, log_path: Path, results: str | None, control: Callable[[], str]) -> None:
    """Every file the run will write can be opened, checked before anything starts (UsageError: exit 2).

    The run log is opened in the log folder, where the dead and pending files go too."""
    _check("log folder (logs.dir)", log_dir, lambda: log_dir.mkdir(parents=True, exist_ok=True))
    _check("run log", log_path, lambda: _append(log_path))
    if results:
        _check("results file (results)", results, lambda: _append(Path(results)))
    _check("control socket's folder", "", control)


class LinesFile:
    """An append-only file of whole lines (results, dead letters), written with os.write: no buffer that could
    keep or drop part of a line. Its size after the last whole write is remembered; a write that fails (a full
    disk, the file-size limit) is cut back to it, so a torn line is never on disk and never in a journal commit."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass  # the journal's offset (this size) still says where the whole lines end: a resume cuts there
            raise
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)


class RunFiles:
    def __init__(self, log_dir: Path, run_id: str, results: str | None, truncate: tuple[int | None, int | None] | None = None) -> None:
        """truncate: a resumed run's (results, dead) offsets from the journal: lines after them belong to
        settlements the journal never recorded, and are cut (those jobs run again)."""
        self.run_id = run_id
        self.dead_path = log_dir / f"{run_id}.dead.jsonl"
        self.pending_path = log_dir / f"{run_id}.pending.jsonl"
        self.results_path = Path(results) if results else None
        self._results: LinesFile | None = None
        if truncate is not None:
            _truncate(self.results_path, truncate[0])
            _truncate(self.dead_path, truncate[1])
        if results:
            Path(results).parent.mkdir(parents=True, exist_ok=True)
            self._results = LinesFile(Path(results))  # UTF-8 lines straight from orjson
        self._dead: LinesFile | None = None

    @property
    def wants_results(self) -> bool:
        return self._results is not None

    def write_results(self, pool: str, results: Iterable[tuple[int, Any]]) -> None:
        """(job id, result) pairs of one report, handed to the OS before the jobs count as done: a write
        that fails (a full disk) raises here, while the report's jobs are still unsettled (one write a report)."""
        if self._results is not None:
            run_id = self.run_id
            lines = bytearray()  # each line freed as it is added: a list of orjson's bytes kept costs 17 us a line here
            for job_id, r in results:
                lines += logs.dumps_line({"job_id": job_id, "pool": pool, "result": r, "run_id": run_id})
            self._results.write(lines)

    def offsets(self) -> tuple[int | None, int | None, list[int]]:
        """(results size, dead size, their fds) for a journal commit: where their last whole lines end."""
        results = dead = None
        fds = []
        if self._results is not None:
            results = self._results.size
            fds.append(self._results.fd)
        if self._dead is not None:
            dead = self._dead.size
            fds.append(self._dead.fd)
        elif self.dead_path.exists():
            dead = self.dead_path.stat().st_size
        return results, dead, fds

    def rewrite_dead(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """`runner retry`: the dead file with only the lines `keep` accepts (atomically); its new size."""
        lines = []
        if self.dead_path.exists():
            lines = [line for line in self.dead_path.read_text(encoding="utf-8").splitlines(keepends=True)
                     if line.strip() and keep(json.loads(line))]
        if self._dead is not None:
            self._dead.close()
            self._dead = None
        temp = self.dead_path.with_name(self.dead_path.name + ".tmp")
        with open(temp, "w", encoding="utf-8") as out:
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.dead_path)
        return self.dead_path.stat().st_size

    def write_dead(self, line: dict[str, Any]) -> None:
        if self._dead is None:
            self._dead = LinesFile(self.dead_path)
        self._dead.write(logs.dumps_line(line))

    def write_pending(self, lines: list[dict[str, Any]]) -> None:
        if lines:
            with open(self.pending_path, "w", encoding="utf-8") as out:
                out.writelines(logs.dumps(line) + "\n" for line in lines)

    def close(self) -> None:
        for handle in (self._results, self._dead):
            if handle is not None:
                handle.close()
        self._results = self._dead = None


def _truncate(path: Path | None, size: int | None) -> None:
    """Cut a file back to `size` bytes (None: the journal has no offset for it: leave it)."""
    if path is None or size is None or not path.exists():
        return
    with open(path, "r+b") as handle:
        if handle.seek(0, os.SEEK_END) > size:
            handle.truncate(size)
