"""The producer's loop: a generator task's jobs, sent in adaptive batches within the credit it is given."""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
from collections import deque
from typing import Any

import msgpack

from runner.process.base import FLUSH_AFTER_S, FRAME_BUDGET, POLL_S, SLOW_STEP_S, ProcessLoop, clip
from runner.wire import messages as protocol
from runner.wire.messages import (
    BATCH,
    CREDIT,
    END,
    INVALID,
    MAX_FRAME,
    STOP,
)


def _shown(item: Any) -> str:
    """A refused payload, as the dead file shows it: its repr, or its type if even that fails."""
    try:
        return repr(item)[:1000]
    except Exception:  # a broken __repr__, a nesting too deep for it (RecursionError)
        return f"<{type(item).__name__}: its repr failed>"


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
        self.send([INVALID, clip(error, 8192), _shown(item)])  # INVALID's size limit is 64 KiB
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
        try:
            while not self.done.is_set():
                self.wake.wait()
                self.wake.clear()
                if self.done.wait(FLUSH_AFTER_S):
                    return
                self.flush()
        except BaseException:  # jobs it took from the buffer would be lost unseen: the process ends, as for a crash
            traceback.print_exc()
            os._exit(70)

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


