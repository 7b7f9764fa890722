"""The run's write-ahead journal, `<logs.dir>/<run_id>.journal`: what a resume needs, and nothing more.

A coordinator killed by SIGKILL, the OOM killer or a reboot leaves its ledger in memory only; the
journal keeps it on disk. It is append-only: length-prefixed frames, each with a CRC32, holding
msgpack. Reading stops at the first torn or corrupt frame and uses everything before it.

  [u32 length][u32 crc32 of the body][body: msgpack]

The first frame is the header: [HEADER, version, run_id, name, config, config_hash, config_path, base_dir].
Every later frame is one *commit*: [COMMIT, records, results_offset, dead_offset]. A commit is made
every `journal.sync` (group commit) from the records the loop gathered meanwhile; the offsets are
the sizes of the results and dead files once the lines of those records were flushed. Since a commit
is one frame, its settlements and the offsets that cover their lines are on disk together or not at
all: a resume truncates both files to the last offsets and re-queues whatever was settled after them.
Payload blobs are journaled as the bytes the producer encoded: never decoded, never encoded again.

Records (msgpack arrays, first item the kind):
  [JOBS, pool, first_id, n, blob, origin, position]  n new jobs, ids first_id..; position: where in its
                                                     producer's output the first one is (None: emitted)
  [DONE, pool, first_id, n] / [DONE_IDS, pool, ids]   jobs done (results written)
  [DEAD, pool, job_id, attempts]                      dead-lettered (line in the dead file)
  [INVALID, pool, job_id, origin]                     an unencodable yield: one position, straight to dead
  [ATTEMPT, job_id, attempt]                          a failed job's next attempt is due
  [END, producer_key, status]                         a producer process's stream ended
  [START, pid]                                        a coordinator started (or resumed) the run
  [FINISH, status]                                    the coordinator ended the run (run.finished)
  [RERUN, [[job_id, previous_attempts], ...]]         `runner retry`: these dead jobs are unsettled again
  [COUNTERS, {...}]                                   the metric counters so far, in a commit where they
                                                      changed (the last one wins): a resume goes on from them
  [HISTOGRAMS, {pool: [[bucket, n], ...]}]            the job-time histograms so far (at most once a second)

While its coordinator lives, the run holds an exclusive flock on the journal: that lock, not a pid,
answers "is this run alive" (pids are reused; containers renumber them).

A write or fsync that fails (a full disk, EIO, a file-size limit) breaks the journal for good: nothing
more is written after it (a frame after a torn one would never be read), and `check()` raises
JournalError in the loop, which takes the run's fail-safe path (exit 3, the pending file). The journal
stays good up to its last complete commit, so a resume, once the disk has room, continues from there.
"""

from __future__ import annotations

import fcntl
import os
import queue
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from runner.errors import ExitCode, RunnerError, UsageError
from runner.logs.read import journal_locked

VERSION = 1
HEADER, COMMIT = 0, 1
JOBS, DONE, DONE_IDS, DEAD, INVALID, ATTEMPT, END, START, FINISH, RERUN, COUNTERS, HISTOGRAMS = range(10, 22)
_PREFIX = struct.Struct("<II")
#: a frame longer than this is corruption, not data
MAX_FRAME = 1 << 31
_READ_CHUNK = 1 << 22

#: journal fds of this process, closed in every child forked from it (a child must not hold the run's lock)
_LOCKED_FDS: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_LOCKED_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCKED_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class JournalError(RunnerError):
    """The journal could not be written mid-run: the run cannot stay crash-safe, so it stops (exit 3)."""

    exit_code = ExitCode.CRASHED


def journal_path(logs_dir: str | Path, run_id: str) -> Path:
    return Path(logs_dir) / f"{run_id}.journal"


def frame(body: Any) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    return _PREFIX.pack(len(data), zlib.crc32(data)) + data


def is_alive(path: Path) -> bool:
    """Does a coordinator hold this run's journal lock right now? (The readers' check: one place.)"""
    return journal_locked(path)


def read_frames(path: Path, start: int = 0) -> Iterator[tuple[int, Any]]:
    """(end offset, body) of every good frame, in order; stops at the first torn or corrupt one."""
    with open(path, "rb") as handle:
        handle.seek(start)
        offset = start
        buffer = b""
        while True:
            chunk = handle.read(_READ_CHUNK)
            if chunk:
                buffer = buffer + chunk if buffer else chunk
            view = memoryview(buffer)
            position = 0
            while len(view) - position >= _PREFIX.size:
                length, crc = _PREFIX.unpack_from(view, position)
                end = position + _PREFIX.size + length
                if length > MAX_FRAME:
                    return
                if end > len(view):
                    break
                data = view[position + _PREFIX.size:end]
                if zlib.crc32(data) != crc:
                    return
                try:
                    body = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
                except Exception:  # corrupt though its CRC matched: stop here all the same
                    return
                position = end
                offset += _PREFIX.size + length
                yield offset, body
            buffer = bytes(view[position:])
            view.release()
            if not chunk:
                return


def frame_at(handle: Any, start: int, end: int) -> Any:
    """The body of the frame at [start, end) of an open journal (a frame read_frames found good)."""
    handle.seek(start)
    data = handle.read(end - start)
    length, crc = _PREFIX.unpack_from(data)
    body = data[_PREFIX.size:]
    if len(body) != length or zlib.crc32(body) != crc:
        raise ValueError(f"journal frame at {start} changed since it was read")
    return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)


class Journal:
    """The writer: records gathered by the loop, committed as one frame every `sync` interval.

    sync: seconds (group commit: a thread writes and fsyncs, results and dead files first, then the
    journal), "always" (the loop writes and fsyncs at every commit, one per loop step), or "never"
    (the loop writes; the OS flushes when it likes: safe from a killed coordinator, not from a reboot)."""

    def __init__(self, path: Path, sync: float | str, header: list[Any] | None, truncate_to: int | None = None) -> None:
        self.path = path
        self.sync = sync
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot open the journal {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"run {path.name.removesuffix('.journal')} is still running: its coordinator holds {path} "
                             f"(stop it first: runner stop {path.name.removesuffix('.journal')})") from exc
        _LOCKED_FDS.add(fd)
        self.fd = fd
        self.records: list[Any] = []
        self.bytes_written = 0
        self._queue: queue.SimpleQueue[tuple[bytes, list[int]] | threading.Event | None] | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None  #: why the journal broke (a failed write or fsync): nothing is written after it
        try:
            if truncate_to is not None:
                os.ftruncate(fd, truncate_to)  # a torn tail would hide every frame written after it
            os.lseek(fd, 0, os.SEEK_END)
            if header is not None:
                self._write(frame(header))
                os.fsync(fd)
        except (OSError, JournalError) as exc:
            self.close()
            raise UsageError(f"cannot write the journal {path}: {getattr(exc, 'strerror', None) or exc}. Nothing was started: "
                             "make room there, or choose another logs.dir") from exc
        if isinstance(sync, float):
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._syncer, name="journal", daemon=True)
            self._thread.start()

    @property
    def interval(self) -> float:
        return self.sync if isinstance(self.sync, float) else 0.0 if self.sync == "always" else 0.02

    def add(self, record: list[Any]) -> None:
        self.records.append(record)

    def commit(self, results_offset: int | None, dead_offset: int | None, fds: list[int]) -> None:
        """One frame of everything since the last commit, with the files' offsets after their lines."""
        self.check()
        data = frame([COMMIT, self.records, results_offset, dead_offset])
        self.records = []
        if self._queue is not None:
            self._queue.put((data, fds))
            return
        try:
            if self.sync == "always":
                for fd in fds:
                    os.fdatasync(fd)
            self._write(data)
            if self.sync == "always":
                os.fdatasync(self.fd)
        except OSError as exc:
            self._broke(exc)
            raise JournalError(self.error) from exc

    def synced(self, timeout: float = 60.0) -> None:
        """Wait until every commit so far is on disk (group commit: the thread's next fsync). For the rare write
        that must follow a commit, not race it: `runner retry` rewrites the dead file only once its RERUN is safe."""
        if self._queue is not None:
            done = threading.Event()
            self._queue.put(done)
            if not done.wait(timeout):
                self._broke(OSError(f"the journal's fsync took over {timeout:g}s"))
        self.check()

    def check(self) -> None:
        """Raise JournalError if a write or fsync failed (in the loop, or in the group-commit thread)."""
        if self.error is not None:
            raise JournalError(self.error)

    def _broke(self, exc: OSError) -> None:
        if self.error is None:
            self.error = f"cannot write the journal {self.path}: {exc.strerror or exc}"

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.bytes_written += len(data)

    def _syncer(self) -> None:
        """Group commit: files first (their lines must be on disk before the offsets that cover them), then the journal."""
        assert self._queue is not None
        while True:
            item = self._queue.get()
            items = [item]
            while not self._queue.empty():
                items.append(self._queue.get())
            stop = None in items
            commits = [entry for entry in items if isinstance(entry, tuple)]
            try:
                fds = {fd for entry in commits for fd in entry[1]}
                data = b"".join(entry[0] for entry in commits)
                if data and self.error is None:  # once broken, nothing more: the loop sees `error` and stops the run
                    for fd in fds:
                        os.fdatasync(fd)
                    self._write(data)
                    os.fdatasync(self.fd)
            except OSError as exc:  # a full disk, EIO: the loop's next check() takes the run to its fail-safe path
                self._broke(exc)
            for entry in items:
                if isinstance(entry, threading.Event):
                    entry.set()  # what was committed before it is on disk (or `error` says why not)
            if stop:
                return

    def close(self) -> None:
        """Write what is left, fsync, and release the lock (the run is no longer alive)."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        else:
            try:
                os.fsync(self.fd)
            except OSError:
                pass
        if self.fd in _LOCKED_FDS:
            _LOCKED_FDS.discard(self.fd)
            os.close(self.fd)

