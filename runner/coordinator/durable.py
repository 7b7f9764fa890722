"""What the coordinator journals, in its own words: new jobs, settlements, producer ends, commits.

The loop calls these as things happen (a per-batch append to a list, never per job on the happy
path); `due`/`commit` turn what gathered into one journal frame every `journal.sync`. Without a
journal (`journal: false`) every method is a no-op, so the loop needs no `if`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runner.config import Config, RunConfig
from runner.coordinator import journal as J
from runner.coordinator.files import RunFiles
from runner.coordinator.ledger import Batch, Ledger
from runner.coordinator.resume import JournalState, config_hash
from runner.errors import UsageError

if TYPE_CHECKING:
    from runner.coordinator.supervisor import Supervisor

#: how often, at most, the job-time histograms are journaled (a resume's histogram lags by up to this)
HISTOGRAMS_EVERY_S = 1.0


class RunJournal:
    def __init__(self, journal: J.Journal | None, files: RunFiles) -> None:
        self.journal = journal
        self.files = files
        self.positions: dict[str, int] = {}  #: producer key -> yields journaled so far
        self.next_commit = 0.0
        self._counters: dict[str, Any] | None = None  #: the last journaled, to write them only when they change
        self._histograms: dict[str, Any] | None = None
        self._next_histograms = 0.0

    @property
    def on(self) -> bool:
        return self.journal is not None

    def start(self, pid: int) -> None:
        """A coordinator took the run: a commit with the files' sizes now (a results file may hold other runs' lines)."""
        if self.journal is not None:
            self.journal.add([J.START, pid])
            self.commit()

    def jobs(self, batch: Batch, producer: str | None) -> None:
        """New jobs: from a producer (its position advances) or emitted by a consumer (producer None)."""
        if self.journal is not None:
            position = None
            if producer is not None:
                position = self.positions.get(producer, 0)
                self.positions[producer] = position + batch.n
            self.journal.add([J.JOBS, batch.pool, batch.first_id, batch.n, batch.blob, batch.origin, position])

    def invalid(self, pool: str, job_id: int, producer: str) -> None:
        if self.journal is not None:
            self.positions[producer] = self.positions.get(producer, 0) + 1
            self.journal.add([J.INVALID, pool, job_id, producer])

    def done(self, batch: Batch, newly: range, failed: set[int]) -> None:
        """Jobs `newly` of `batch` settled, except the failed indexes (retried or dead, journaled apart)."""
        if self.journal is None or not newly:
            return
        if batch.ids is None and not failed:
            self.journal.add([J.DONE, batch.pool, batch.first_id + newly.start, len(newly)])
        else:
            ids = [batch.job_id(i) for i in newly if i not in failed]
            if ids:
                self.journal.add([J.DONE_IDS, batch.pool, ids])

    def dead(self, pool: str, job_id: int, attempts: int) -> None:
        if self.journal is not None:
            self.journal.add([J.DEAD, pool, job_id, attempts])

    def attempt(self, job_id: int, attempt: int) -> None:
        if self.journal is not None:
            self.journal.add([J.ATTEMPT, job_id, attempt])

    def producer_ended(self, key: str, status: str) -> None:
        if self.journal is not None:
            self.journal.add([J.END, key, status])

    def rerun(self, jobs: list[tuple[int, int]]) -> None:
        if self.journal is not None:
            self.journal.add([J.RERUN, [list(job) for job in jobs]])

    # -- commits -----------------------------------------------------------------------------
    def timeout(self, now: float, timeout: float) -> float:
        """The loop's wait, shortened so a commit is never late."""
        if self.journal is not None and self.journal.records:
            return min(timeout, max(0.0, self.next_commit - now))
        return timeout

    def tick(self, now: float, counts: Callable[[], dict[str, Any]], histograms: Callable[[], dict[str, Any]]) -> None:
        """A commit when one is due, with the metric counters if they changed since the last one."""
        if self.journal is None:
            return
        self._check()  # the group-commit thread's write may have failed since the last tick
        if self.journal.records and now >= self.next_commit:
            self.next_commit = now + self.journal.interval
            self.counters(counts(), histograms, now)
            self.commit()

    def counters(self, counts: dict[str, Any], histograms: Callable[[], dict[str, Any]], now: float | None = None) -> None:
        """The metric counters (cumulative over the run), journaled so that a resume goes on from them.

        The counts (failures, retries, produced, restarts) go in every commit in which they changed, so
        they match the settlements of the same commit exactly. The duration histograms change with every
        job and are the bulk: made and compared at most once every HISTOGRAMS_EVERY_S (now None: the last
        commit, always)."""
        if self.journal is None:
            return
        if counts != self._counters:
            self._counters = counts
            self.journal.add([J.COUNTERS, counts])
        if now is None or now >= self._next_histograms:
            self._next_histograms = (now or 0.0) + HISTOGRAMS_EVERY_S
            made = histograms()
            if made != self._histograms:
                self._histograms = made
                self.journal.add([J.HISTOGRAMS, made])

    def commit(self) -> None:
        if self.journal is not None:
            results, dead, fds = self.files.offsets()
            try:
                self.journal.commit(results, dead, fds)
            except J.JournalError as exc:
                raise self._broken(str(exc)) from exc.__cause__

    def commit_synced(self) -> None:
        """A commit now, on disk before this returns (see Journal.synced)."""
        if self.journal is not None:
            self.commit()
            try:
                self.journal.synced()
            except J.JournalError as exc:
                raise self._broken(str(exc)) from exc.__cause__

    def _check(self) -> None:
        """A journal that failed to write stops the run (the fail-safe path: exit 3, pending file), saying what to do."""
        assert self.journal is not None
        if self.journal.error is not None:
            raise self._broken(self.journal.error)

    def _broken(self, error: str) -> J.JournalError:
        return J.JournalError(f"{error}. The run cannot stay crash-safe without it, so it stops here: its unfinished jobs, "
                              f"if any, go to the pending file {self.files.pending_path}; once there is room again, "
                              f"`runner resume {self.files.run_id}` continues the run from the journal's last complete commit")

    def finish(self, status: str) -> None:
        """The run's end: the last commit, then the lock goes (the run is no longer alive). A journal that
        broke is only closed (nothing more is written after a failed write); one whose last commit fails raises."""
        journal = self.journal
        if journal is None:
            return
        try:
            if journal.error is None:
                journal.add([J.FINISH, status])
                results, dead, fds = self.files.offsets()
                journal.commit(results, dead, fds)
        finally:
            journal.close()
            self.journal = None
        journal.check()

    @property
    def bytes_written(self) -> int:
        return self.journal.bytes_written if self.journal is not None else 0


def open_journal(config: Config, run_id: str, resume: JournalState | None) -> J.Journal | None:
    """The run's journal, locked; a new run writes its header (the config, its hash, the run id)."""
    run = config.run
    if resume is not None and not resume.journaled:
        return None  # `runner retry` of a `journal: false` run: its dead file stood in for the journal
    if run.journal is None:
        if resume is not None:
            raise UsageError("a resumed run keeps its journal: `journal` cannot be turned off on resume")
        return None
    path = J.journal_path(run.logs.dir, run_id)
    if resume is not None:
        return J.Journal(path, run.journal.sync, None, truncate_to=resume.good_end)
    data = run.model_dump(mode="json")
    header = [J.HEADER, J.VERSION, run_id, run.name, data, config_hash(data), config.path, config.base_dir]
    return J.Journal(path, run.journal.sync, header)


def restore(state: JournalState, ledger: Ledger, supervisor: Supervisor, run: RunConfig, rerun: dict[int, int] | None) -> dict[str, Any]:
    """Queue a journal's unsettled jobs again, restore the counts, and tell the producers where to start.

    Jobs in flight when the coordinator died keep the attempt the journal gave them: no attempt is
    charged, since their failure was the coordinator's. A retry (`rerun`) queues only those dead jobs."""
    if rerun is not None:
        state._record([J.RERUN, [[job_id, previous] for job_id, previous in rerun.items()]])
    ledger.resume_ids(state.max_id)
    for pool, done in state.done.items():
        if pool in ledger.stats:
            ledger.stats[pool].done = done
    for pool, dead in state.dead_counts().items():
        if pool in ledger.stats:
            ledger.stats[pool].dead = dead
    requeued = 0
    for group in state.unsettled(set(rerun) if rerun is not None else None):
        ledger.restore(group.pool, group.ids, group.attempts, group.blob, group.origin)
        requeued += len(group.ids)
    supervisor.resume_positions = dict(state.positions)
    replay = 0
    if rerun is not None:
        supervisor.resume_ended = {"*"}
    else:
        supervisor.resume_ended = {key for key, status in state.ended.items() if status != "stopped"}
        replay = sum(1 for p in run.producers for i in range(1, p.processes + 1) if f"{p.name}-{i}" not in supervisor.resume_ended)
    return {"settled": state.max_id - requeued if rerun is None else state.max_id - len(rerun), "requeued": requeued,
            "producers_to_replay": replay, "resumes": state.starts}
