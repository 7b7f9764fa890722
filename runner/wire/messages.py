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

from typing import Annotated, Any, Literal, Union

import msgpack
import msgspec
from msgspec import Meta, Struct

from runner.errors import ProtocolError

READY, BATCH, INVALID, END, REPORT, LOG, LOCK, FATAL, PROGRESS, TOTAL = range(1, 11)
JOBS, CREDIT, GRANT, STOP = range(21, 25)
KNOWN_KINDS = frozenset({READY, BATCH, INVALID, END, REPORT, LOG, LOCK, FATAL, PROGRESS, TOTAL, JOBS, CREDIT, GRANT, STOP})

#: largest frame accepted from any peer; a bigger one is a protocol error, not an allocation
MAX_FRAME = 64 * 1024 * 1024
#: most jobs one batch (or one emit) may hold
MAX_BATCH = 1 << 20
#: largest progress a ctx.heartbeat(**progress) may carry (its msgpack bytes; the process checks it before sending)
MAX_PROGRESS = 4096
#: largest message of each kind, in bytes: a peer cannot make a small message kind carry a huge frame
MAX_SIZE = {READY: 256, BATCH: MAX_FRAME, INVALID: 64 * 1024, END: 1 << 20, REPORT: MAX_FRAME, LOG: 1 << 20,
            LOCK: 8 * 1024, FATAL: 1 << 20, PROGRESS: MAX_PROGRESS + 64, TOTAL: 64,
            JOBS: MAX_FRAME, CREDIT: 64, GRANT: 8 * 1024, STOP: 8 * 1024}

# -- field types: every schema below is built from these, so a later field gets the same checks ---------
Count = Annotated[int, Meta(ge=0, le=MAX_BATCH)]
Positive = Annotated[int, Meta(ge=1, le=MAX_BATCH)]
Id = Annotated[int, Meta(ge=0, le=2**63 - 1)]
#: a pool or process name (pools are config keys; processes are `<pool>-<index>`)
Name = Annotated[str, Meta(min_length=1, max_length=128)]
Text = Annotated[str, Meta(max_length=1 << 20)]
#: a time-histogram bucket (runner.timing: 4 per doubling of 1/8 us; 400 covers far more than a year)
Bucket = Annotated[int, Meta(ge=0, le=400)]
Hist = Annotated[dict[Bucket, Annotated[int, Meta(ge=1, le=2**40)]], Meta(max_length=401)]


class Message(Struct, array_like=True, tag_field="kind"):
    """A message: a msgpack array whose first item is its kind (the tag). Fields are checked on decode.

    To add a field to a kind, append it with a default: older senders still decode, and the array's
    extra trailing items from newer senders are ignored."""


# process -> coordinator
class Ready(Message, tag=READY):
    pid: Annotated[int, Meta(ge=0, le=2**31)] | None = None


class NewBatch(Message, tag=BATCH):
    pool: Name
    n: Positive
    blob: bytes


class Invalid(Message, tag=INVALID):
    error: Text
    payload_repr: Text


class End(Message, tag=END):
    status: Literal["ok", "failed", "stopped"]
    jobs: Id
    error: Text | None = None
    traceback: Text | None = None


Result = tuple[Count, Any]
Failure = tuple[Count, Text, Text | None, Annotated[float, Meta(ge=0)] | None]
Emit = tuple[Name, Positive, bytes]


class Report(Message, tag=REPORT):
    batch_id: Id
    done: Count
    results: Annotated[list[Result], Meta(max_length=MAX_BATCH)] | None
    failures: Annotated[list[Failure], Meta(max_length=MAX_BATCH)]
    emits: Annotated[list[Emit], Meta(max_length=1024)]
    hist: Hist


class Log(Message, tag=LOG):
    #: a structlog event dict; its values are the user's (rendered by the log writer), its shape is checked here
    line: Annotated[dict[str, Any], Meta(max_length=1024)]


class Lock(Message, tag=LOCK):
    op: Literal["acquire", "release"]
    name: Annotated[str, Meta(max_length=1024)]
    request: Id


class Fatal(Message, tag=FATAL):
    error: Text
    traceback: Text


class Progress(Message, tag=PROGRESS):
    """ctx.heartbeat(**progress) of the job at `index` of batch `batch_id` (-1: between two jobs)."""

    batch_id: Id
    index: Annotated[int, Meta(ge=-1, le=MAX_BATCH)]
    progress: Annotated[dict[str, Any], Meta(max_length=MAX_PROGRESS)]  #: its size is bounded by MAX_SIZE


class Total(Message, tag=TOTAL):
    """ctx.total(n): a producer will yield n jobs in all (the dashboard's ETA)."""

    n: Id


# coordinator -> process
class Jobs(Message, tag=JOBS):
    batch_id: Id
    first_id: Id
    n: Positive
    ids: Annotated[list[Id], Meta(max_length=MAX_BATCH)] | None
    attempts: Annotated[list[Positive], Meta(max_length=MAX_BATCH)] | None
    blob: bytes
    origin: Annotated[str, Meta(max_length=300)]


class Credit(Message, tag=CREDIT):
    n: Count


class Grant(Message, tag=GRANT):
    name: Annotated[str, Meta(max_length=1024)]
    request: Id


class Stop(Message, tag=STOP):
    reason: Annotated[str, Meta(max_length=4096)]


FromProcess = Union[Ready, NewBatch, Invalid, End, Report, Log, Lock, Fatal, Progress, Total]
ToProcess = Union[Jobs, Credit, Grant, Stop]
_from_process = msgspec.msgpack.Decoder(FromProcess)
_to_process = msgspec.msgpack.Decoder(ToProcess)
_structure = msgspec.msgpack.Decoder(msgspec.Raw)


def _size_check(data: bytes) -> None:
    """The per-kind size limit, read off the frame's first bytes (our arrays are short: a fixarray and a fixint kind)."""
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes is over the {MAX_FRAME} limit")
    if len(data) >= 2 and 0x91 <= data[0] <= 0x9F:
        limit = MAX_SIZE.get(data[1])
        if limit is not None and len(data) > limit:
            raise ProtocolError(f"a message of kind {data[1]} has {len(data)} bytes, over its limit of {limit}")


def decode_from_process(data: bytes) -> FromProcess:
    """One message from a process (local, or relayed by its worker host), checked by kind; else ProtocolError."""
    _size_check(data)
    try:
        message = _from_process.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed message: {exc} ({_kind_of(data)})") from None
    except Exception as exc:  # DecodeError, and anything else bad bytes may raise
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if isinstance(message, NewBatch):
        check_blob(message.blob, message.n)
    elif isinstance(message, Report):
        for _, n, blob in message.emits:
            check_blob(blob, n)
    return message


def decode_to_process(data: bytes) -> ToProcess:
    """One message from the coordinator to a process, checked by kind; else ProtocolError."""
    _size_check(data)
    try:
        message = _to_process.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed message: {exc} ({_kind_of(data)})") from None
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if isinstance(message, Jobs):
        check_blob(message.blob, message.n)
        if (message.ids is not None and len(message.ids) != message.n) or (message.attempts is not None and len(message.attempts) != message.n):
            raise ProtocolError(f"JOBS for {message.n} jobs with {len(message.ids or message.attempts or [])} ids or attempts")
    return message


def _kind_of(data: bytes) -> str:
    return f"kind {data[1]}" if len(data) >= 2 and 0x90 <= data[0] <= 0x9F and data[1] < 0x80 else "no kind"


def check_blob(blob: bytes, n: int) -> None:
    """A blob is one msgpack array of exactly n items, whole (checked without building the payloads: the hot path)."""
    if not blob:
        raise ProtocolError("an empty batch blob")
    head = blob[0]
    if 0x90 <= head <= 0x9F:
        count = head & 0x0F
    elif head == 0xDC and len(blob) >= 3:
        count = int.from_bytes(blob[1:3], "big")
    elif head == 0xDD and len(blob) >= 5:
        count = int.from_bytes(blob[1:5], "big")
    else:
        raise ProtocolError("a batch blob is not a msgpack array")
    if count != n:
        raise ProtocolError(f"a batch of n={n} whose blob holds {count} jobs")
    try:
        _structure.decode(blob)
    except Exception as exc:
        raise ProtocolError(f"undecodable batch blob: {exc}") from None


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list[Any]:
    """Decode one message as a plain list; ProtocolError for bad bytes or an unknown kind.

    Only the envelope is checked here (a process reading its own inbox); receivers that must not trust
    their peer use decode_from_process / decode_to_process."""
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
    """The n payloads of a blob; ProtocolError if it does not hold exactly n.

    Strings that are not UTF-8 survive as surrogate escapes (the structural check on arrival does not read
    inside strings), so re-encoding a checked blob (a retry, a split) never raises."""
    try:
        payloads = msgpack.unpackb(blob, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ProtocolError(f"undecodable batch blob: {exc}") from exc
    if not isinstance(payloads, list) or len(payloads) != n:
        raise ProtocolError(f"a batch blob should hold {n} jobs")
    return payloads


def repack(payloads: list[Any]) -> bytes:
    return msgpack.packb(payloads, use_bin_type=True, unicode_errors="surrogateescape")
