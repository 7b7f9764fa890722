"""Flow control: producer credit (the queue bound), batch sizing, and fair dispatch to processes.

Credit: each producer process may have `share` jobs waiting in its target pool's queue, where the
shares of a pool's producers add up to `queue.maxsize`, plus one batch in transit (`queue.batch`). A batch taken from the queue gives its
producer that much credit back, returned in bulk (see `return_credit`), so a full queue blocks the
producers (backpressure) and `queue.full` is logged.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

from runner.config import ConsumerConfig, RunConfig
from runner.coordinator.ledger import Batch, Ledger
from runner.coordinator.members import Member
from runner.wire.messages import CREDIT

#: a batch should take about this long, so slow jobs spread over every process
TARGET_BATCH_S = 0.02
#: batches a consumer holds at once: one running, one ready to start
PREFETCH = 2
#: a process on a worker host holds more, to hide the network round trip
PREFETCH_REMOTE = 4
#: `queue.full` is logged at most this often per pool
FULL_EVERY_S = 5.0


class Flow:
    def __init__(self, run: RunConfig, ledger: Ledger, log: Any, send: Callable[[Member, list[Any]], None],
                 find: Callable[[str], Member | None]) -> None:
        self.run = run
        self.ledger = ledger
        self.log = log
        self._send = send
        self._find = find
        self.credit: dict[str, int] = {}  #: jobs each open producer may still send (as we count it)
        self.credit_owed: dict[str, int] = {}  #: credit returned but not yet sent
        self.credit_share: dict[str, int] = {}
        self.mean_job_s: dict[str, float] = {}
        self.last_full: dict[str, float] = {}
        self.emits_to: dict[str, set[str]] = {c.name: set() for c in run.consumers}
        self._served: dict[str, int] = {}  #: process key -> when it last got a batch (a counter)
        self._served_count = 0

    # -- producers ---------------------------------------------------------------------------
    @property
    def producers_open(self) -> int:
        """Producer processes started whose stream has not ended."""
        return len(self.credit)

    def producer_share(self, name: str) -> int:
        """The credit of one process of producer pool `name`: its part of the target's `queue.maxsize`, plus one
        batch in transit. Without that batch, a small maxsize (the default 100) cut every producer batch to a
        fraction of it, and the run went at one credit round trip per few dozen jobs."""
        run = self.run
        target = run.target_of(run.pool(name))  # type: ignore[arg-type]
        senders = sum(p.processes for p in run.producers if run.target_of(p) == target)
        return max(1, run.queue.maxsize // senders) + run.queue.batch

    def producer_started(self, key: str, share: int) -> None:
        self.credit[key] = self.credit_share[key] = share
        self.credit_owed[key] = 0

    def producer_ended(self, key: str) -> None:
        self.credit.pop(key, None)
        self.credit_owed.pop(key, None)
        self.credit_share.pop(key, None)

    def on_batch(self, key: str, pool: str, n: int) -> None:
        """A producer sent n jobs: they use its credit; at none left, its queue is full."""
        if key in self.credit:
            self.credit[key] -= n
            if self.credit[key] - self.credit_owed.get(key, 0) <= 0:  # what the producer itself has left
                self._queue_full(pool)

    def _queue_full(self, pool: str) -> None:
        now = time.monotonic()
        if now - self.last_full.get(pool, -10.0) >= FULL_EVERY_S:
            self.last_full[pool] = now
            self.log.warning("queue.full", pool=pool, depth=self.ledger.queued(pool), maxsize=self.run.queue.maxsize)

    def return_credit(self, producer: str, n: int) -> None:
        """Jobs left the queue: the producer may send as many more. Sent in bulk, not per batch,
        unless the producer is running low (then at once, so it never waits on us)."""
        self.credit[producer] += n
        owed = self.credit_owed.get(producer, 0) + n
        share = self.credit_share.get(producer, 1)
        if owed * 4 >= share or self.credit[producer] - owed < share // 4 or owed >= self.run.queue.batch * 8:
            target = self._find(producer)
            if target is not None:
                self._send(target, [CREDIT, owed])
            owed = 0
        self.credit_owed[producer] = owed

    # -- batches -----------------------------------------------------------------------------
    def batch_size(self, pool: str) -> int:
        mean = self.mean_job_s.get(pool)
        most = self.run.queue.batch
        if mean is None:
            return 1  # until a job's time is known: one job each, so the first process (or host) cannot hoard them
        return max(1, min(most, int(TARGET_BATCH_S / mean) if mean > 0 else most))

    def job_time(self, pool: str, mean: float) -> None:
        """A report's mean job time: batches are sized to TARGET_BATCH_S of work."""
        old = self.mean_job_s.get(pool)
        self.mean_job_s[pool] = mean if old is None else 0.7 * old + 0.3 * mean

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self, consumers: dict[str, ConsumerConfig], members_of: Callable[[str], list[Member]]) -> None:
        """Hand pending batches to processes with room: the least loaded first, then the longest unserved,
        so local and remote processes share the queue fairly even when jobs trickle in one by one."""
        maxsize = self.run.queue.maxsize
        ledger = self.ledger
        for pool, cfg in consumers.items():
            if not ledger.pending[pool]:
                continue
            if any(ledger.queued(down) >= maxsize for down in self.emits_to[pool]):
                continue  # backpressure on a stage whose downstream queue is full
            size = self.batch_size(pool)
            limit = cfg.max_jobs_per_process
            # a heap of the processes with room, least loaded then longest unserved first: one walk over the
            # pool a dispatch, not one a batch (with a thousand worker hosts, that walk was O(hosts) per batch)
            room = [(len(p.outstanding), self._served.get(p.key, 0), i, p) for i, p in enumerate(members_of(pool))
                    if p.ready and self._has_room(p, limit)]
            heapq.heapify(room)
            while ledger.pending[pool] and room:
                _, _, i, member = heapq.heappop(room)
                if self._find(member.key) is not member:
                    continue  # it ended meanwhile (its host was dropped by a failed send): a batch sent to it would be lost
                most = min(size, limit - member.assigned) if limit else size
                batch = ledger.take(pool, most, member.key)
                assert batch is not None
                self._served_count += 1
                self._served[member.key] = self._served_count
                self._hand_over(member, batch)
                if self._has_room(member, limit):
                    heapq.heappush(room, (len(member.outstanding), self._served_count, i, member))

    @staticmethod
    def _has_room(member: Member, limit: int | None) -> bool:
        return len(member.outstanding) < (PREFETCH_REMOTE if member.remote else PREFETCH) and not (limit and member.assigned >= limit)

    def _hand_over(self, member: Member, batch: Batch) -> None:
        member.outstanding.append(batch.id)
        member.assigned += batch.n
        self._send(member, batch.message())
        if self.run.logs.jobs == "all":
            self.log.info("batch.sent", pool=batch.pool, worker=member.name, host=member.host,
                          job_ids=[batch.job_id(i) for i in range(batch.n)], attempts=batch.attempts)
        producer = batch.credit_to
        if producer and producer in self.credit:
            self.return_credit(producer, batch.n)
        batch.credit_to = None

    def forget(self, key: str) -> None:
        """A process is gone: no fairness record is kept for it."""
        self._served.pop(key, None)
