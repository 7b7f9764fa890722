"""The ledger: every job of the run is in exactly one place, so none is lost and none counted twice.

A job is pending (in its pool's queue), in flight (in a batch some process holds), waiting for a
retry, or settled (done or dead). The ledger works per batch, not per job: the happy path costs a
few dictionary operations per batch of up to `queue.batch` jobs, and payloads stay encoded unless a
job has to be retried, dead-lettered or written as pending.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runner.wire import messages as protocol


@dataclass(slots=True)
class Batch:
    """Jobs that travel together. ids/attempts None: ids first_id.., every attempt 1."""

    id: int
    pool: str
    n: int
    first_id: int
    blob: bytes
    origin: str
    ids: list[int] | None = None
    attempts: list[int] | None = None
    done: int = 0  #: jobs settled (ok or failed) as reported by the process holding it
    owner: str | None = None
    credit_to: str | None = None  #: the producer whose credit this batch holds while pending
    _payloads: list[Any] | None = None

    def job_id(self, index: int) -> int:
        return self.ids[index] if self.ids is not None else self.first_id + index

    def attempt(self, index: int) -> int:
        return self.attempts[index] if self.attempts is not None else 1

    def payload(self, index: int) -> Any:
        if self._payloads is None:
            self._payloads = protocol.unpack_blob(self.blob, self.n)
        return self._payloads[index]

    def message(self) -> list[Any]:
        return [protocol.JOBS, self.id, self.first_id, self.n, self.ids, self.attempts, self.blob, self.origin]


@dataclass(slots=True)
class Job:
    """One job outside a batch: waiting for its retry, or about to be regrouped."""

    id: int
    pool: str
    attempt: int
    payload: Any
    origin: str


@dataclass
class PoolStats:
    done: int = 0
    failed: int = 0  #: failed attempts (each retry follows one)
    retried: int = 0
    dead: int = 0
    hist: dict[int, int] = field(default_factory=dict)


class Ledger:
    def __init__(self, pools: list[str]) -> None:
        self.pending: dict[str, deque[Batch]] = {pool: deque() for pool in pools}
        self.pending_jobs: dict[str, int] = {pool: 0 for pool in pools}
        self.in_flight: dict[int, Batch] = {}
        self.in_flight_jobs = 0
        self.retries: list[tuple[float, int, Job]] = []
        self.stats: dict[str, PoolStats] = {pool: PoolStats() for pool in pools}
        self.produced = 0
        self._next_job = 1
        self._next_batch = 1

    # -- new work --------------------------------------------------------------------------
    def add(self, pool: str, n: int, blob: bytes, origin: str, credit_to: str | None = None) -> Batch:
        """New jobs from a producer or an emit: they get their ids here, in arrival order."""
        batch = Batch(self._batch_id(), pool, n, self._next_job, blob, origin, credit_to=credit_to)
        self._next_job += n
        self.produced += n
        self._enqueue(batch)
        return batch

    def resume_ids(self, last_id: int) -> None:
        """A resumed run: the journal knew jobs up to `last_id`; new ones continue after it."""
        self._next_job = last_id + 1
        self.produced = last_id

    def restore(self, pool: str, ids: list[int] | range, attempts: list[int] | None, blob: bytes, origin: str) -> None:
        """Unsettled jobs read back from the journal, queued again (in id order, behind nothing). A range of
        ids is one batch as produced: no list of ids travels or is kept, and its settlements journal as DONE."""
        fresh = attempts is None or all(a == 1 for a in attempts)
        listed = None if isinstance(ids, range) else ids
        self._enqueue(Batch(self._batch_id(), pool, len(ids), ids[0], blob, origin, ids=listed, attempts=None if fresh else attempts))

    def new_job_id(self) -> int:
        """An id for a job that never reaches a queue (an unencodable payload goes straight to dead)."""
        self._next_job += 1
        self.produced += 1
        return self._next_job - 1

    def _batch_id(self) -> int:
        self._next_batch += 1
        return self._next_batch - 1

    def _enqueue(self, batch: Batch, front: bool = False) -> None:
        queue = self.pending[batch.pool]
        queue.appendleft(batch) if front else queue.append(batch)
        self.pending_jobs[batch.pool] += batch.n

    def regroup(self, jobs: list[Job], front: bool = True) -> None:
        """Put single jobs (retries, a dead process's unfinished jobs) back as batches."""
        by_pool: dict[str, list[Job]] = {}
        for job in jobs:
            by_pool.setdefault(job.pool, []).append(job)
        for pool, group in by_pool.items():
            batch = Batch(
                self._batch_id(),
                pool,
                len(group),
                group[0].id,
                protocol.repack([job.payload for job in group]),
                group[0].origin,
                ids=[job.id for job in group],
                attempts=[job.attempt for job in group],
            )
            self._enqueue(batch, front=front)

    # -- dispatch --------------------------------------------------------------------------
    def take(self, pool: str, most: int, owner: str) -> Batch | None:
        """The next pending batch of `pool` for `owner`, split if it is larger than `most`."""
        queue = self.pending[pool]
        if not queue:
            return None
        batch = queue.popleft()
        if batch.n > most:
            rest = self._split(batch, most)
            queue.appendleft(rest)
        self.pending_jobs[pool] -= batch.n
        batch.owner = owner
        self.in_flight[batch.id] = batch
        self.in_flight_jobs += batch.n
        return batch

    def _split(self, batch: Batch, most: int) -> Batch:
        """Cut `batch` to `most` jobs in place; return the rest as a new batch."""
        payloads = [batch.payload(i) for i in range(batch.n)]
        ids = [batch.job_id(i) for i in range(batch.n)]
        attempts = [batch.attempt(i) for i in range(batch.n)]
        rest = Batch(
            self._batch_id(), batch.pool, batch.n - most, ids[most], protocol.repack(payloads[most:]), batch.origin,
            ids=ids[most:], attempts=attempts[most:], credit_to=batch.credit_to,
        )
        batch.n, batch.blob, batch.ids, batch.attempts = most, protocol.repack(payloads[:most]), ids[:most], attempts[:most]
        batch._payloads = payloads[:most]
        return rest

    # -- settling --------------------------------------------------------------------------
    def settle(self, batch: Batch, done: int) -> range:
        """The process reports `done` jobs of `batch` settled; returns the newly settled indexes."""
        newly = range(batch.done, done)
        self.in_flight_jobs -= len(newly)
        batch.done = done
        if done >= batch.n:
            del self.in_flight[batch.id]
        return newly

    def release(self, batch: Batch) -> list[Job]:
        """Take back the unsettled jobs of a batch whose process is gone."""
        jobs = [Job(batch.job_id(i), batch.pool, batch.attempt(i), batch.payload(i), batch.origin) for i in range(batch.done, batch.n)]
        self.in_flight_jobs -= len(jobs)
        self.in_flight.pop(batch.id, None)
        return jobs

    def schedule_retry(self, job: Job, due: float) -> None:
        heapq.heappush(self.retries, (due, job.id, job))

    def due_retries(self, now: float) -> list[Job]:
        jobs = []
        while self.retries and self.retries[0][0] <= now:
            jobs.append(heapq.heappop(self.retries)[2])
        return jobs

    def next_retry_at(self) -> float | None:
        return self.retries[0][0] if self.retries else None

    # -- state -----------------------------------------------------------------------------
    def queued(self, pool: str | None = None) -> int:
        if pool is not None:
            return self.pending_jobs[pool]
        return sum(self.pending_jobs.values())

    def settled(self) -> bool:
        """No job is waiting, in flight or due for a retry."""
        return not self.in_flight and not self.retries and not any(self.pending_jobs.values())

    def unsettled(self) -> list[Job]:
        """Every job not done or dead, for the pending file when a run is stopped."""
        jobs: list[Job] = []
        for queue in self.pending.values():
            for batch in queue:
                jobs.extend(Job(batch.job_id(i), batch.pool, batch.attempt(i), batch.payload(i), batch.origin) for i in range(batch.n))
        for batch in list(self.in_flight.values()):
            jobs.extend(self.release(batch))
        jobs.extend(job for _, _, job in self.retries)
        return sorted(jobs, key=lambda job: job.id)
