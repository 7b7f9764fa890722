"""Messages between the coordinator and its processes: msgpack arrays tagged by kind, never pickle.

Every message is a msgpack array whose first item is its kind. Job payloads travel as a *blob*:
the msgpack encoding of the list of payloads, so a batch is encoded once by its producer and decoded
once by its consumer; the coordinator forwards it untouched unless a job must be retried.

Process -> coordinator (over the process's own pipe; see wire/pipe.py):
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
  [PROGRESS, batch_id, index, progress]    ctx.heartbeat(**progress) of the job at `index` of batch `batch_id`
                                           (a dict; at most one a second per process)
  [TOTAL, n]                               a producer declares it will yield n jobs in all (ctx.total; for the ETA)

Coordinator -> process (over the process's inbox pipe, the same frames):
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

READY, BATCH, INVALID, END, REPORT, LOG, LOCK, FATAL, PROGRESS, TOTAL = range(1, 11)
JOBS, CREDIT, GRANT, STOP = range(21, 25)
KNOWN_KINDS = frozenset({READY, BATCH, INVALID, END, REPORT, LOG, LOCK, FATAL, PROGRESS, TOTAL, JOBS, CREDIT, GRANT, STOP})

#: largest frame accepted from any peer; a bigger one is a protocol error, not an allocation
MAX_FRAME = 64 * 1024 * 1024


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list[Any]:
    """Decode one message; ProtocolError for bad bytes or an unknown kind.

    Only the envelope is checked here: the fields of each kind are checked by the code that reads them."""
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
    """The n payloads of a blob; ProtocolError if it does not hold exactly n."""
    try:
        payloads = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ProtocolError(f"undecodable batch blob: {exc}") from exc
    if not isinstance(payloads, list) or len(payloads) != n:
        raise ProtocolError(f"a batch blob should hold {n} jobs")
    return payloads


def repack(payloads: list[Any]) -> bytes:
    return msgpack.packb(payloads, use_bin_type=True)
