"""Messages between the coordinator and its processes: msgpack arrays tagged by kind, never pickle.

Every message is a msgpack array whose first item is its kind. Job payloads travel as a *blob*:
the msgpack encoding of the list of payloads, so a batch is encoded once by its producer and decoded
once by its consumer; the coordinator forwards it untouched unless a job must be retried.

Process -> coordinator (over the process's own pipe; see transports/local.py):
  [READY]                                  the task imported, ready for work
  [BATCH, pool, n, blob]                   n new jobs for consumer pool `pool` (producer)
  [INVALID, error, payload_repr]           a yielded payload msgpack cannot encode (producer)
  [END, status, jobs, error, traceback]    a producer's stream ended: ok / failed / stopped
  [REPORT, batch_id, done, results, failures, emits, hist]
      progress of the batch being run: `done` jobs of it are settled (ok or failed);
      results: [[index, result], ...] or None; failures: [[index, error, traceback, ms], ...];
      emits: [[pool, n, blob], ...] from jobs that succeeded; hist: {bucket: count} job times
  [LOG, event_dict]                        a structlog event to write to the run's log
  [LOCK, op, name, request]                op: acquire / release a named run-wide lock
  [FATAL, error, traceback]                start-up failed (import error ...); exit follows

Coordinator -> process (over the process's inbox multiprocessing.Queue, as bytes):
  [JOBS, batch_id, first_id, n, ids, attempts, blob, origin]
      n jobs from `origin` (the producing or emitting process); ids None: the ids are first_id, first_id + 1, ...; attempts None: every job is attempt 1
  [CREDIT, n]                              a producer may send n more jobs
  [GRANT, name, request]                   the named lock is yours
  [STOP, reason]                           finish what came before, then exit 0 (reason logged)
"""

from __future__ import annotations

from typing import Any

import msgpack

from runner.errors import ProtocolError

READY, BATCH, INVALID, END, REPORT, LOG, LOCK, FATAL = range(1, 9)
JOBS, CREDIT, GRANT, STOP = range(21, 25)
KNOWN_KINDS = frozenset({READY, BATCH, INVALID, END, REPORT, LOG, LOCK, FATAL, JOBS, CREDIT, GRANT, STOP})

#: largest frame accepted from any peer; a bigger one is a protocol error, not an allocation
MAX_FRAME = 64 * 1024 * 1024


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list[Any]:
    """Decode one message, refusing anything that is not a known kind (never raises anything else)."""
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes is over the {MAX_FRAME} limit")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(message, list) or not message or message[0] not in KNOWN_KINDS:
        raise ProtocolError(f"unknown message: {str(message)[:80]}")
    return message


def unpack_blob(blob: bytes, n: int) -> list[Any]:
    """The n payloads of a blob."""
    payloads = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    if not isinstance(payloads, list) or len(payloads) != n:
        raise ProtocolError(f"a batch blob should hold {n} jobs")
    return payloads


def repack(payloads: list[Any]) -> bytes:
    return msgpack.packb(payloads, use_bin_type=True)


# Job-time histogram: 4 buckets per doubling of (1/8) microseconds, so percentiles are within ~19 %,
# computed with integer operations only (this runs once per job).
_SUB = 4


def time_bucket(seconds: float) -> int:
    ticks = int(seconds * 8e6)
    bits = ticks.bit_length()
    if bits <= 2:
        return ticks
    return bits * _SUB + ((ticks >> (bits - 3)) & 3)


def bucket_ms(bucket: int) -> float:
    """The upper edge of a bucket, in milliseconds."""
    if bucket < 4:
        return (bucket + 1) / 8e3
    bits, sub = divmod(bucket, _SUB)
    return ((4 + sub + 1) << (bits - 3)) / 8e3


def percentile_ms(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(bucket_ms(bucket), 3)
    return round(bucket_ms(max(hist)), 3)
