"""The consumer's loop: a consumer task run over the batches the coordinator sends, reported as it goes."""

from __future__ import annotations

import time
import traceback
from typing import Any

import msgpack

from runner.process.base import FAST_JOB_S, FRAME_BUDGET, POLL_S, PROGRESS_EVERY_S, REPORT_EVERY_S, ProcessLoop, clip, loggable
from runner.process.slot import SLOT_BATCH, SLOT_BEAT, SLOT_INDEX, SLOT_STARTED, SLOT_TIMED
from runner.timing import time_bucket
from runner.wire import messages as protocol
from runner.wire.messages import (
    JOBS,
    MAX_FRAME,
    MAX_PROGRESS,
    PROGRESS,
    REPORT,
    STOP,
)


class ConsumerLoop(ProcessLoop):
    """Runs a consumer task over the batches the coordinator sends, reporting as it goes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.emits: dict[str, list[Any]] = {}
        self.job_emits: list[tuple[str, Any]] = []
        self.in_job = False
        self.timed = True  #: time each job (see run_batch); off while jobs take microseconds
        self.packer = msgpack.Packer(use_bin_type=True)
        self.job_emit_bytes = 0  #: packed size of the running job's emits (a REPORT stays under the frame limit)
        self.batch_id = 0
        self.progress_sent = 0.0

    def heartbeat(self, progress: dict[str, Any]) -> None:
        """ctx.heartbeat: the cheap part is the slot (read by the stall check); the progress travels as a
        PROGRESS message, at most every PROGRESS_EVERY_S (one given sooner is not sent: a later one replaces it)."""
        now = time.monotonic()
        self.slot[SLOT_BEAT] = now
        if not progress or now - self.progress_sent < PROGRESS_EVERY_S:
            return
        try:  # checked when it is sent (the first one always is), not at every call
            size = len(msgpack.packb(progress, use_bin_type=True))
        except Exception as exc:
            raise TypeError(f"ctx.heartbeat: progress must be msgpack-encodable: {type(exc).__name__}: {exc}") from None
        if size > MAX_PROGRESS:
            raise ValueError(f"ctx.heartbeat: progress is {size} bytes encoded, more than {MAX_PROGRESS}")
        self.progress_sent = now
        self.send([PROGRESS, self.batch_id, int(self.slot[SLOT_INDEX]), loggable(progress)])  # str keys: status and logs are JSON

    def emit(self, payload: Any, to: str | None) -> None:
        target = to or self.spec.get("emit_to")
        if not target:
            raise ValueError("ctx.emit needs to=POOL (or `to:` on this consumer pool in the config)")
        if target not in self.spec["pools"]:
            raise ValueError(f"ctx.emit: no consumer pool {target!r}; pools are {', '.join(self.spec['pools'])}")
        if not self.in_job:
            raise RuntimeError("ctx.emit can only be called while a job runs")
        try:
            size = len(self.packer.pack(payload))
        except Exception:
            self.packer.reset()
            raise
        if size > FRAME_BUDGET:
            raise ValueError(f"ctx.emit: payload of {size} bytes is over the {MAX_FRAME >> 20} MiB frame limit")
        self.job_emit_bytes += size
        self.job_emits.append((target, payload))

    def run(self) -> None:
        while True:
            message = self.next_message(POLL_S)
            if message is None:
                continue
            kind = message[0]
            if kind == JOBS:
                self.run_batch(message)
            elif kind == STOP:
                return
            if self.stopping:
                return

    def _report(self, batch_id: int, done: int, results: Any, failures: list[Any], hist: dict[int, int]) -> None:
        emits = [[pool, len(items), self.packer.pack(items)] for pool, items in self.emits.items()]
        self.emits = {}
        self.send([REPORT, batch_id, done, results, failures, emits, hist])

    def run_batch(self, message: list[Any]) -> None:
        """Run the jobs of one batch in order; the hot path, so it avoids per-job allocations and calls.

        While jobs take microseconds (the last batch's mean under FAST_JOB_S) and no per-job lines are
        asked for, jobs are timed per batch, not one by one, and the histogram gets the batch's mean for
        each job. The slot still names the job in hand, with two float stores a job and no clock read:
        SLOT_INDEX is its index while it runs and -1 between jobs (so a death is charged to the job that
        was running, never to the one that had just finished), and SLOT_STARTED the batch's start. The
        parent turns that into the job's own start (LocalProcess.job_started_at: the first time it saw the
        index), so job_timeout counts from the job, not the batch, even when a batch that started fast
        turns slow: the mode only changes at the next batch, and reading the clock per job to notice
        sooner would cost the fast path more than it saves."""
        _, batch_id, first_id, n, ids, attempts, blob, origin = message
        payloads = protocol.unpack_blob(blob, n)
        spec, ctx, task, slot, packer = self.spec, self.ctx, self.task, self.slot, self.packer
        ctx.origin = origin
        want_results = spec["results"]
        log_jobs = spec["jobs_log"]
        timed = self.timed or log_jobs == "all"
        monotonic = time.monotonic
        results: list[Any] | None = [] if want_results else None
        failures: list[Any] = []
        hist: dict[int, int] = {}
        done = reported = 0
        batch_started = last_report = monotonic()
        slot[SLOT_BATCH] = self.batch_id = batch_id
        slot[SLOT_INDEX] = -1.0
        slot[SLOT_TIMED] = 1.0 if timed else 0.0
        slot[SLOT_STARTED] = batch_started
        seconds = 0.0
        held = 0  #: packed bytes of the results (and emits) this report holds so far
        self.in_job = True
        for index, payload in enumerate(payloads):
            if self.stopping:
                break
            ctx.job_id = ids[index] if ids else first_id + index
            ctx.attempt = attempts[index] if attempts else 1
            ctx._job_log = None
            slot[SLOT_INDEX] = index
            if timed:
                started = monotonic()
                slot[SLOT_STARTED] = started
            try:
                result = task(ctx, payload)
                size = 0
                if want_results and result is not None:
                    try:  # fail the job here, not the whole report, if it cannot travel
                        size = len(packer.pack(result))
                    except Exception as exc:
                        raise TypeError(f"result is not msgpack-encodable: {type(exc).__name__}: {exc}") from None
                    if size > FRAME_BUDGET:
                        raise ValueError(f"result of {size} bytes is over the {MAX_FRAME >> 20} MiB frame limit")
                ok = True
            except BaseException as exc:  # a job's failure, whatever it raised, is the job's
                packer.reset()
                ok = False
                error = clip(f"{type(exc).__name__}: {exc}")
                trace = clip(traceback.format_exc())
            done = index + 1
            if timed:
                finished = monotonic()
                slot[SLOT_STARTED] = 0.0
                seconds = finished - started
                bucket = time_bucket(seconds)
                hist[bucket] = hist.get(bucket, 0) + 1
            else:
                slot[SLOT_INDEX] = -1.0  # between jobs: a death now is not the finished job's fault
                finished = 0.0 if ok and index & 63 != 63 else monotonic()  # untimed: a clock read every 64 jobs only
            if ok:
                if self.job_emits:
                    size += self.job_emit_bytes
                if held + size > FRAME_BUDGET and index > reported:
                    # this job's result would push the report over the frame limit: report the jobs before it
                    self._report(batch_id, index, results, failures, hist)
                    results = [] if want_results else None
                    failures, hist = [], {}
                    reported, held = index, 0
                held += size
                if self.job_emits:
                    for target, emitted in self.job_emits:
                        self.emits.setdefault(target, []).append(emitted)
                    self.job_emits = []
                    self.job_emit_bytes = 0
                if results is not None:
                    results.append([index, result])
                if log_jobs == "all":
                    ctx.log.info("job.done", duration_ms=round(seconds * 1000, 3))
            else:
                self.job_emits = []
                self.job_emit_bytes = 0
                took = round(seconds * 1000, 3) if timed else None
                failures.append([index, error, trace, took])
                if log_jobs != "none":
                    ctx.log.warning("job.failed", duration_ms=took, error=error, traceback=trace, cause="error")
            if finished - last_report > REPORT_EVERY_S and done < n:
                if not timed:
                    self._untimed(hist, finished - last_report, done - reported)
                self._report(batch_id, done, results, failures, hist)
                results = [] if want_results else None
                failures, hist = [], {}
                last_report, reported, held = finished, done, 0
        self.in_job = False
        ctx.job_id = ctx.attempt = ctx._job_log = None
        slot[SLOT_STARTED] = 0.0
        if not timed and done > reported:
            self._untimed(hist, monotonic() - last_report, done - reported)
        self.timed = done == 0 or (monotonic() - batch_started) / done >= FAST_JOB_S
        self._report(batch_id, done, results, failures, hist)

    @staticmethod
    def _untimed(hist: dict[int, int], seconds: float, jobs: int) -> None:
        if jobs > 0:
            bucket = time_bucket(seconds / jobs)
            hist[bucket] = hist.get(bucket, 0) + jobs


