"""Reading a run's journal back: what was settled, what must run again, where each producer stood.

Two sequential passes, so memory holds the unsettled jobs and not the whole journal: the first
reads every commit into a one-byte-per-job map of settled jobs (10 M jobs: 10 MB) plus the small
tables (attempts, dead jobs, producer positions and ends, file offsets); the second reads the job
records again and keeps, per record, only the jobs the map says are unsettled, as a ready blob.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from runner.coordinator import journal as J
from runner.errors import UsageError
from runner.wire import messages as protocol

_ONES = b"\x01" * 65536


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Unsettled:
    """A group of jobs to queue again: same pool and origin, in id order."""

    pool: str
    origin: str
    ids: list[int] | range  #: a range: the whole record as journaled (its blob untouched, no list of ids kept)
    attempts: list[int] | None  #: None: every job's next attempt is its first
    blob: bytes


@dataclass
class JournalState:
    journaled: ClassVar[bool] = True  #: read from a journal, which the resumed run appends to
    path: Path
    run_id: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    config_path: str = ""
    base_dir: str = ""
    good_end: int = 0  #: end of the last good frame: a torn tail is cut here before appending
    results_offset: int | None = None
    dead_offset: int | None = None
    max_id: int = 0
    settled: bytearray = field(default_factory=bytearray)
    done: dict[str, int] = field(default_factory=dict)  #: jobs done per pool
    dead: dict[int, tuple[str, int]] = field(default_factory=dict)  #: job id -> (pool, attempts), still dead
    attempts: dict[int, int] = field(default_factory=dict)  #: next attempt of failed jobs not yet settled
    rerun_base: dict[int, int] = field(default_factory=dict)  #: `runner retry`: attempts made before the rerun
    positions: dict[str, int] = field(default_factory=dict)  #: producer key -> yields journaled
    ended: dict[str, str] = field(default_factory=dict)  #: producer key -> end status
    finished: str | None = None  #: the last coordinator's end status (None: it died without one)
    counters: dict[str, Any] = field(default_factory=dict)  #: the last COUNTERS record: metrics go on from it
    histograms: dict[str, Any] = field(default_factory=dict)  #: the last HISTOGRAMS record
    starts: int = 0
    #: (start, end, lowest id, highest id) of each frame holding jobs: pass two reads only frames with unsettled ones
    frames: list[tuple[int, int, int, int]] = field(default_factory=list)

    # -- pass one ---------------------------------------------------------------------------
    def _mark(self, first: int, n: int) -> None:
        end = first + n
        if end > len(self.settled):
            self.settled.extend(bytes(max(end - len(self.settled), len(self.settled))))
        while n > 0:
            step = min(n, len(_ONES))
            self.settled[first:first + step] = _ONES[:step]
            first += step
            n -= step

    def _grow(self, last_id: int) -> None:
        self.max_id = max(self.max_id, last_id)
        if last_id >= len(self.settled):
            self.settled.extend(bytes(max(last_id + 1 - len(self.settled), len(self.settled))))

    def _record(self, record: list[Any]) -> None:
        kind = record[0]
        if kind == J.JOBS:
            _, pool, first, n, _blob, origin, position = record
            self._grow(first + n - 1)
            if position is not None:
                self.positions[origin] = position + n
        elif kind == J.DONE:
            _, pool, first, n = record
            self._mark(first, n)
            self.done[pool] = self.done.get(pool, 0) + n
            if self.dead or self.attempts:
                for job_id in range(first, first + n):
                    self.dead.pop(job_id, None)
                    self.attempts.pop(job_id, None)
        elif kind == J.DONE_IDS:
            _, pool, ids = record
            for job_id in ids:
                self._mark(job_id, 1)
                self.dead.pop(job_id, None)
                self.attempts.pop(job_id, None)
            self.done[pool] = self.done.get(pool, 0) + len(ids)
        elif kind == J.DEAD:
            _, pool, job_id, attempts = record
            self._grow(job_id)
            self._mark(job_id, 1)
            self.dead[job_id] = (pool, attempts)
            self.attempts.pop(job_id, None)
        elif kind == J.INVALID:
            _, pool, job_id, origin = record
            self._grow(job_id)
            self._mark(job_id, 1)
            self.dead[job_id] = (pool, 0)
            self.positions[origin] = self.positions.get(origin, 0) + 1
        elif kind == J.ATTEMPT:
            self.attempts[record[1]] = record[2]
        elif kind == J.END:
            self.ended[record[1]] = record[2]
        elif kind == J.START:
            self.starts += 1
            self.finished = None
        elif kind == J.FINISH:
            self.finished = record[1]
        elif kind == J.COUNTERS:
            if isinstance(record[1], dict):
                self.counters = record[1]
        elif kind == J.HISTOGRAMS:
            if isinstance(record[1], dict):
                self.histograms = record[1]
        elif kind == J.RERUN:
            for job_id, previous in record[1]:
                self.settled[job_id] = 0
                self.dead.pop(job_id, None)
                self.rerun_base[job_id] = previous
                self.attempts[job_id] = previous + 1

    def settled_count(self) -> int:
        return self.settled.count(1)

    @property
    def unsettled_count(self) -> int:
        return self.max_id - self.settled.count(1, 1, self.max_id + 1)

    def dead_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for pool, _ in self.dead.values():
            counts[pool] = counts.get(pool, 0) + 1
        return counts

    # -- pass two ---------------------------------------------------------------------------
    def unsettled(self, only: set[int] | None = None) -> Iterator[Unsettled]:
        """The jobs not settled (or the ids in `only`), group by group, reading the journal again."""
        with open(self.path, "rb") as handle:
            for start, end, low, high in self.frames:
                if only is None and self.settled.find(0, low, high + 1) < 0:
                    continue  # every job of this frame is settled: not even read
                if only is not None and not any(low <= job_id <= high for job_id in only):
                    continue
                yield from self._unsettled_in(J.frame_at(handle, start, end), only)

    def _unsettled_in(self, body: list[Any], only: set[int] | None) -> Iterator[Unsettled]:
        settled = self.settled
        for record in body[1]:
            if record[0] != J.JOBS:
                continue
            _, pool, first, n, blob, origin, _position = record
            if only is None:
                if settled.find(0, first, first + n) < 0:
                    continue
                if settled.find(1, first, first + n) < 0:  # none settled (the bulk of a big resume): as journaled
                    whole = range(first, first + n)
                    yield Unsettled(pool, origin, whole, self._attempts_of(whole), blob)
                    continue
                wanted = [i for i in range(n) if not settled[first + i]]
            else:
                wanted = [i for i in range(n) if first + i in only]
                if not wanted:
                    continue
            ids = [first + i for i in wanted]
            if len(wanted) < n:
                payloads = protocol.unpack_blob(blob, n)
                blob = protocol.repack([payloads[i] for i in wanted])
            yield Unsettled(pool, origin, ids, self._attempts_of(ids), blob)

    def _attempts_of(self, ids: list[int] | range) -> list[int] | None:
        if not self.attempts:
            return None
        attempts = [self.attempts.get(job_id, 1) for job_id in ids]
        return None if all(a == 1 for a in attempts) else attempts


@dataclass
class DeadFileState(JournalState):
    """A `journal: false` run's dead jobs, for `runner retry`: read from its dead file and its log in
    place of a journal. The payloads are what the dead file holds: JSON, so a payload JSON cannot hold
    exactly (bytes, a tuple) comes back as JSON reads it. Nothing is journaled for the rerun either."""

    journaled: ClassVar[bool] = False
    payloads: dict[int, tuple[str, str, Any]] = field(default_factory=dict)  #: job id -> (pool, origin, payload)

    def unsettled(self, only: set[int] | None = None) -> Iterator[Unsettled]:
        groups: dict[tuple[str, str], list[int]] = {}
        for job_id in sorted(self.payloads if only is None else only & self.payloads.keys()):
            pool, origin, _payload = self.payloads[job_id]
            groups.setdefault((pool, origin), []).append(job_id)
        for (pool, origin), ids in groups.items():
            blob = protocol.repack([self.payloads[job_id][2] for job_id in ids])
            yield Unsettled(pool, origin, ids, self._attempts_of(ids), blob)


def load(path: Path) -> JournalState:
    """Pass one over a journal: its header and every commit up to the first torn or corrupt frame.

    UsageError (exit 2, one message) for a journal that cannot be read, comes from another version, or holds a
    whole frame (its CRC right) of a shape this runner never writes: a torn tail is normal, that is not."""
    state = JournalState(path)
    if not path.exists():
        raise UsageError(f"no journal {path} (was the run started with `journal: false`?)")
    start = 0
    try:
        for end, body in J.read_frames(path):
            _take_frame(state, path, start, end, body)
            start = end
    except OSError as exc:
        raise UsageError(f"cannot read the journal {path}: {exc.strerror or exc}") from exc
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise UsageError(f"the journal {path} is damaged at byte {start} (a whole frame of an unknown shape: "
                         f"{type(exc).__name__}: {exc}); nothing was changed. It was not written by this runner as it is") from exc
    if not state.run_id:
        raise UsageError(f"journal {path} has no readable header: nothing to resume")
    return state


def _take_frame(state: JournalState, path: Path, start: int, end: int, body: Any) -> None:
    if body[0] == J.COMMIT:
        ids = [(record[2], record[2] + record[3] - 1) for record in body[1] if record[0] == J.JOBS]
        if ids:
            state.frames.append((start, end, min(low for low, _ in ids), max(high for _, high in ids)))
    if body[0] == J.HEADER:
        if body[1] != J.VERSION:
            raise UsageError(f"the journal {path} is of version {body[1]!r}; this runner reads version {J.VERSION}")
        _, _version, state.run_id, state.name, state.config, state.config_hash, state.config_path, state.base_dir = body[:8]
        if not isinstance(state.config, dict) or not isinstance(state.run_id, str):
            raise TypeError("a header without a config or a run id")
    elif body[0] == J.COMMIT:
        for record in body[1]:
            state._record(record)
        if body[2] is not None:
            state.results_offset = body[2]
        if body[3] is not None:
            state.dead_offset = body[3]
    state.good_end = end
