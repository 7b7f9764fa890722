"""The run's output files, written only by the coordinator: results, dead letters, pending jobs.

  results (`results:` in the config)   one line per done job: job_id, pool, result (appended)
  <run_id>.dead.jsonl                  one line per dead-lettered job: payload, error, traceback, attempts
  <run_id>.pending.jsonl               written at the end: every job not settled (a stopped run)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

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


class RunFiles:
    def __init__(self, log_dir: Path, run_id: str, results: str | None) -> None:
        self.dead_path = log_dir / f"{run_id}.dead.jsonl"
        self.pending_path = log_dir / f"{run_id}.pending.jsonl"
        self._results: IO[str] | None = None
        if results:
            Path(results).parent.mkdir(parents=True, exist_ok=True)
            self._results = open(results, "a", encoding="utf-8")
        self._dead: IO[str] | None = None

    @property
    def wants_results(self) -> bool:
        return self._results is not None

    def write_results(self, pool: str, results: Iterable[tuple[int, Any]]) -> None:
        """(job id, result) pairs of one report, handed to the OS before the jobs count as done: a write
        that fails (a full disk) raises here, while the report's jobs are still unsettled (one write a report)."""
        if self._results is not None:
            self._results.write("".join(logs.dumps({"job_id": job_id, "pool": pool, "result": r}) + "\n" for job_id, r in results))
            self._results.flush()

    def write_dead(self, line: dict[str, Any]) -> None:
        if self._dead is None:
            self._dead = open(self.dead_path, "a", encoding="utf-8")
        self._dead.write(logs.dumps(line) + "\n")
        self._dead.flush()

    def write_pending(self, lines: list[dict[str, Any]]) -> None:
        if lines:
            with open(self.pending_path, "w", encoding="utf-8") as out:
                out.writelines(logs.dumps(line) + "\n" for line in lines)

    def flush(self) -> None:
        """A live run's results can be read as it goes, a progress tick behind at most."""
        if self._results is not None:
            self._results.flush()

    def close(self) -> None:
        for handle in (self._results, self._dead):
            if handle is not None:
                handle.close()
