"""The loops that run inside each producer and consumer process.

A process owns one pipe to the coordinator (FrameWriter) and one inbox pipe from it (FrameReceiver). It never decides its
own lifecycle: the coordinator tells it to stop (idle, recycled, done) with a STOP message, so the
coordinator's ledger always knows which jobs a process holds. SIGTERM means "finish the job in hand,
report, exit"; SIGINT is ignored (the terminal's Ctrl-C is the coordinator's to handle).
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from runner import logs
from runner.process import stacks
from runner.process.context import Context, import_task
from runner.process.slot import SLOT_BATCH, SLOT_BEAT, SLOT_INDEX, SLOT_STARTED, SLOT_TIMED
from runner.timing import time_bucket
from runner.wire import messages as protocol
from runner.wire.messages import (
    BATCH,
    CREDIT,
    END,
    FATAL,
    GRANT,
    INVALID,
    JOBS,
    LOCK,
    LOG,
    MAX_FRAME,
    MAX_PROGRESS,
    MAX_SIZE,
    PROGRESS,
    READY,
    REPORT,
    STOP,
    TOTAL,
)
from runner.wire.pipe import FrameReceiver, FrameWriter

#: a long batch reports its progress at least this often, so a crash re-runs little
REPORT_EVERY_S = 0.05
#: a producer's buffered jobs are sent at the latest after this long
FLUSH_AFTER_S = 0.002
#: a generator step slower than this probably blocks again: send what we have first
SLOW_STEP_S = 0.0001
#: how often a blocked wait looks at the stop flag
POLL_S = 0.5
#: jobs faster than this on average are timed per batch, not one by one
FAST_JOB_S = 0.00005
#: the most a frame's payloads, results or emits may hold: the frame limit less room for the envelope
#: and the relay header a worker host adds; a single payload or result above it fails with a size error
FRAME_BUDGET = MAX_FRAME - 64 * 1024
#: longest error text or traceback a message carries: the coordinator checks each kind's size on arrival
#: (runner.wire.messages.MAX_SIZE), and an exception's message may be huge; the rest is cut
MAX_ERROR = 64 * 1024


def clip(text: str, limit: int = MAX_ERROR) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters cut)"


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


#: ctx.heartbeat(**progress) sends its progress to the coordinator at most this often
PROGRESS_EVERY_S = 1.0


def _die_with_parent() -> None:
    """No orphans: exit when the coordinator (or the worker agent) dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us with our parent
    except (OSError, AttributeError):
        pass
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ProcessLoop:
    """What producers and consumers share: setup, the pipe, the inbox, locks and logging."""

    def __init__(self, spec: dict[str, Any], writer: Connection, inbox: Connection, slot: Any) -> None:
        self.spec = spec
        self.out = FrameWriter(writer)
        self.inbox = FrameReceiver(inbox)
        self.slot = slot
        self.stopping = False
        self.stash: deque[list[Any]] = deque()
        self._lock_requests = 0
        self.log: Any = None
        self.ctx = Context(self, spec)
        self.task: Any = None

    def send(self, message: list[Any]) -> None:
        self.out.send(protocol.pack(message))

    def _log_sink(self, line: dict[str, Any]) -> None:
        """A log call never fails the work: what msgpack cannot hold travels as its repr."""
        try:
            frame = protocol.pack([LOG, line])
        except Exception:
            frame = protocol.pack([LOG, loggable(line)])
        if len(frame) > MAX_SIZE[LOG] or len(line) > 1000:  # the line's own fields are dropped, never the work
            short = {key: line.get(key) for key in logs.CONTEXT_KEYS}
            frame = protocol.pack([LOG, {**loggable(short), "error": f"log line of {len(frame)} bytes and {len(line)} fields is over "
                                         f"the limit of a log message ({MAX_SIZE[LOG] >> 20} MiB, 1000 fields): its fields were dropped"}])
        self.out.send(frame)

    def setup(self) -> bool:
        """Name the process, install signals, configure logs, import the task; False if it cannot run."""
        try:
            import setproctitle

            setproctitle.setproctitle(f"runner: {self.spec['worker']} [{self.spec['run_name']}]")
        except ImportError:
            pass
        signal.set_wakeup_fd(-1)  # a forked child must not wake the coordinator's loop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while we started (handle.py); ignored now
        signal.signal(signal.SIGTERM, self._on_term)
        _die_with_parent()
        spec = self.spec
        try:
            stacks.install(spec["run_id"])  # before READY: its parent only signals a ready process
        except OSError:
            pass  # no stack file (a full or read-only temp folder): stalls are reported without a stack
        self.log = logs.configure(
            spec["log_level"], self._log_sink, run_id=spec["run_id"], host=spec["host"], role=spec["role"], pool=spec["pool"], worker=spec["worker"]
        )
        for extra in reversed(spec.get("paths") or []):  # a worker host's --path (its own, never the coordinator's)
            if extra not in sys.path:
                sys.path.insert(0, extra)
        try:
            self.task = import_task(spec["task"], spec.get("base_dir"))
        except Exception as exc:
            self.send([FATAL, clip(str(exc)), clip(traceback.format_exc())])
            return False
        self.send([READY, os.getpid()])
        return True

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def next_message(self, timeout: float) -> list[Any] | None:
        if self.stash:
            return self.stash.popleft()
        frame = self.inbox.get(timeout)
        return None if frame is None else protocol.unpack(frame)

    def acquire(self, name: str) -> None:
        self._lock_requests += 1
        request = self._lock_requests
        self.send([LOCK, "acquire", name, request])
        while True:
            frame = self.inbox.get(None)
            assert frame is not None  # no timeout: a frame or EOFError
            message = protocol.unpack(frame)
            if message[0] == GRANT and message[2] == request:
                return
            self.stash.append(message)

    def release(self, name: str) -> None:
        self.send([LOCK, "release", name, 0])

    def emit(self, payload: Any, to: str | None) -> None:
        raise RuntimeError("ctx.emit is for consumer tasks; a producer yields its jobs")

    def heartbeat(self, progress: dict[str, Any]) -> None:
        """A producer is never stalled (stall_timeout is a consumer pool's): nothing to note."""

    def total(self, n: int) -> None:
        if self.spec["role"] != "producer":
            raise RuntimeError("ctx.total is for producer tasks: it declares how many jobs the producer will yield")
        self.send([TOTAL, n])


class ProducerLoop(ProcessLoop):
    """Runs a generator task; sends its jobs in adaptive batches within the credit it is given.

    Batching never waits to fill a batch: a batch goes when it is full, when the generator was slow
    to yield (it will likely be slow again), or FLUSH_AFTER_S after its first job (a flusher thread),
    so a producer at 1,000 jobs/s sends each job at once and one at 1,000,000 jobs/s sends 256 at a time.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.credit: int = self.spec["credit"]
        self.buffer: deque[Any] = deque()  #: appended by the main thread only; emptied under flush_lock
        self.flush_lock = threading.Lock()
        self.wake = threading.Event()
        self.done = threading.Event()
        self.packer = msgpack.Packer(use_bin_type=True)
        self.refund = 0  #: credit of payloads that were refused (INVALID): they never reach the queue

    def flush(self) -> None:
        with self.flush_lock:
            buffer = self.buffer
            items = [buffer.popleft() for _ in range(len(buffer))]
            if not items:
                return
            try:
                blob = self.packer.pack(items)
            except Exception:
                self.packer.reset()
                blob = None
            if blob is not None and len(blob) <= FRAME_BUDGET:
                self.send([BATCH, self.spec["target"], len(items), blob])
            else:
                self._send_checked(items)

    def _send_checked(self, items: list[Any]) -> None:
        """The rare path: some payload cannot be encoded or the batch is over the frame limit. Each payload
        is packed alone: a bad one is INVALID (its credit comes back), the rest go in batches under the limit,
        all in yield order, so the coordinator's count of this producer's output (a resume's replay position)
        is never ahead of it."""
        chunk: list[bytes] = []
        size = 0
        for item in items:
            packed = self._encodable(item, chunk)
            if packed is None:
                chunk, size = [], 0  # sent before the INVALID
                continue
            if chunk and size + len(packed) > FRAME_BUDGET:
                self._send_packed(chunk)
                chunk, size = [], 0
            chunk.append(packed)
            size += len(packed)
        if chunk:
            self._send_packed(chunk)

    def _send_packed(self, packed: list[bytes]) -> None:
        header = self.packer.pack_array_header(len(packed))
        self.send([BATCH, self.spec["target"], len(packed), header + b"".join(packed)])

    def _encodable(self, item: Any, before: list[bytes]) -> bytes | None:
        """The payload packed, or None after an INVALID for it (and its credit refunded); the packed
        payloads `before` it are sent first."""
        try:
            packed = self.packer.pack(item)
            if len(packed) > FRAME_BUDGET:
                error = f"payload of {len(packed)} bytes is over the {MAX_FRAME >> 20} MiB frame limit"
            else:
                return packed
        except Exception as exc:
            self.packer.reset()
            error = f"payload is not msgpack-encodable: {type(exc).__name__}: {exc}"
        if before:
            self._send_packed(before)
        self.send([INVALID, clip(error, 8192), repr(item)[:1000]])  # INVALID's size limit is 64 KiB
        self.refund += 1  # under flush_lock; the main thread takes it back (take_refunds)
        return None

    def take_refunds(self) -> None:
        """Credit of refused payloads back to the main thread's count (the flusher thread may refuse some)."""
        if self.refund:
            with self.flush_lock:
                self.credit += self.refund
                self.refund = 0

    def _take_credit(self) -> None:
        """Collect credit the coordinator granted meanwhile, without blocking (main thread only)."""
        while True:
            message = self._poll_inbox()
            if message is None:
                return
            if message[0] == CREDIT:
                self.credit += message[1]
            elif message[0] == STOP:
                self.stopping = True
            else:
                self.stash.append(message)
                return

    def _poll_inbox(self) -> list[Any] | None:
        frame = self.inbox.get(0)
        return None if frame is None else protocol.unpack(frame)

    def _flusher(self) -> None:
        """Sends a buffer that waited FLUSH_AFTER_S, so a generator that pauses never holds jobs back."""
        while not self.done.is_set():
            self.wake.wait()
            self.wake.clear()
            if self.done.wait(FLUSH_AFTER_S):
                return
            self.flush()

    def wait_for_credit(self) -> None:
        self.flush()
        self.take_refunds()
        while self.credit <= 0 and not self.stopping:
            message = self.next_message(POLL_S)
            if message is None:
                continue
            if message[0] == CREDIT:
                self.credit += message[1]
            elif message[0] == STOP:
                self.stopping = True

    def run(self) -> None:
        spec = self.spec
        threading.Thread(target=self._flusher, name="flusher", daemon=True).start()
        produced, status, error, tb = 0, "ok", None, None
        batch_max = spec["batch"]
        buffer, monotonic, stash = self.buffer, time.monotonic, self.stash
        sample_every = countdown = 0  # time every step while steps are slow, then ever fewer
        try:
            items = iter(self.task(self.ctx, **spec.get("params", {})))
            skip = spec.get("skip", 0)
            if skip:  # a resumed run replays this producer: its first `skip` yields were journaled already
                next(itertools.islice(items, skip, skip), None)
            while not self.stopping:
                if self.credit <= 0:
                    self.wait_for_credit()
                    if self.stopping:
                        break
                while stash and stash[0][0] == CREDIT:
                    self.credit += stash.popleft()[1]
                # the fast loop: as many jobs as the credit allows, with no attribute writes
                credit = self.credit
                exhausted = False
                try:
                    while credit > 0:
                        if countdown:
                            countdown -= 1
                            buffer.append(next(items))
                            slow = False
                        else:
                            started = monotonic()
                            buffer.append(next(items))
                            slow = monotonic() - started > SLOW_STEP_S
                            sample_every = 0 if slow else min(2 * sample_every + 1, 63)
                            countdown = sample_every
                        credit -= 1
                        produced += 1
                        size = len(buffer)
                        if slow or size >= batch_max:
                            break
                        if size == 1:
                            self.wake.set()
                        if self.stopping:
                            break
                except StopIteration:
                    exhausted = True
                self.credit = credit
                if exhausted:
                    break
                self.flush()
                self.take_refunds()
                self._take_credit()
            if self.stopping:
                status = "stopped"
        except Exception as exc:
            status, error, tb = "failed", clip(f"{type(exc).__name__}: {exc}"), clip(traceback.format_exc())
        self.done.set()
        self.wake.set()
        self.flush()
        self.send([END, status, produced, error, tb])


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


def process_main(kind: str, spec: dict[str, Any], writer: Connection, inbox: Connection, slot: Any) -> None:
    """Entry point of every child process (a module-level function, so every start method can run it)."""
    loop = (ProducerLoop if kind == "producer" else ConsumerLoop)(spec, writer, inbox, slot)
    try:
        if not loop.setup():
            os._exit(3)  # its FATAL (the import error) is sent; a SystemExit here would replace it
        loop.run()
    except (BrokenPipeError, EOFError):
        os._exit(71)  # the coordinator is gone; nobody to report to
    except BaseException as exc:
        try:
            loop.send([FATAL, clip(f"{type(exc).__name__}: {exc}"), clip(traceback.format_exc())])
        finally:
            os._exit(1)
    # Leave without running the task's atexit handlers (and without multiprocessing joining anything).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
