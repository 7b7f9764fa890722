"""The messages between worker hosts (and control clients) and the coordinator, one typed schema per kind.

Every ZeroMQ message is one or two frames. The first is a msgpack array `[PROTOCOL_VERSION, kind, seq, *fields]`;
the second, for TO and FWD only, is a local protocol frame passed through untouched (runner.wire.messages),
so job batches are never re-encoded on the way. `seq` numbers the messages of one session in each direction
(HELLO and WELCOME are 0, then 1, 2, ...): a gap or a repeat means ZeroMQ lost or duplicated something,
and the session is reset. Messages outside a session (REFUSE, RESET, control requests and replies) carry 0.

  worker -> coordinator                         coordinator -> worker
  [HELLO, name, pools, processes, pid, run]     [WELCOME, run_id, run_name, host, specs, heartbeat, start_method, grace]
  [FWD, worker] + frame    (a process's frame)  [REFUSE, reason]
  [EXITED, worker, code, signal, reason,        [SPAWN, worker, pool, role, index, restart, spec]
           running, fatal, cause]               [TO, worker] + frame     (into its inbox)
  [HEARTBEAT, procs]                            [SIGNAL, worker, signum, reason]
  [BYE, reason]                                 [HEARTBEAT]
  [STALLED, worker, running, running_s,         [RESET, reason]  (unknown or broken session: join again)
            silent_s, stall_timeout, action,    [BYE, reason]    (the run is over)
            stack]                              [STACKS, request]  (send STACK_DUMPS for busy processes)
  [STACK_DUMPS, request, dumps]
  control client -> coordinator: [STATUS] / [STATUS, {"stacks": true}] / [STOP_RUN]; reply: [REPLY, dict]

  EXITED's cause (crashed / timed_out / stalled / memory) is what the job in hand is charged with.
  HEARTBEAT's procs: {worker: {"rss": bytes, "running": [batch_id, index] or None, "running_s": s}}.
  STALLED: a job of `worker` ran stall_timeout without a heartbeat; `running` is [batch_id, index].
  STACK_DUMPS' dumps: {worker: {"pid", "pool", "running", "running_s", "rss", "stack"}} (busy processes).

To add a field to a kind, append it to its Struct with a default (older peers' shorter arrays still decode;
extra trailing items are ignored) and raise PROTOCOL_VERSION if the meaning of the exchange changes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict, Union, get_args

import msgspec
from msgspec import Meta, Struct

from runner.errors import ProtocolError
from runner.wire.messages import MAX_FRAME

#: 2: typed messages and per-session sequence numbers (issue 10)
PROTOCOL_VERSION = 2
(HELLO, WELCOME, REFUSE, SPAWN, TO, SIGNAL, FWD, EXITED, HEARTBEAT, BYE, RESET, STATUS, STOP_RUN, REPLY) = range(101, 115)
STALLED, STACKS, STACK_DUMPS = range(115, 118)
KINDS = frozenset(range(101, 118))
#: kinds numbered within a session (the others travel outside one and carry seq 0)
SESSION_KINDS = frozenset({SPAWN, TO, SIGNAL, FWD, EXITED, HEARTBEAT, BYE, STALLED, STACKS, STACK_DUMPS})
#: largest header frame (the msgpack array): jobs travel in the second frame, so a bigger header is an attack or a bug
MAX_HEADER = 16 * 1024 * 1024
#: a worker host's name (`runner worker --name`, HELLO): also a file-name-safe label in logs and status
HOST_NAME = r"^[A-Za-z0-9._-]{1,64}$"
#: most processes per pool a worker host may ask for
MAX_HOST_PROCESSES = 1024

HostName = Annotated[str, Meta(pattern=HOST_NAME)]
Name = Annotated[str, Meta(min_length=1, max_length=128)]
Text = Annotated[str, Meta(max_length=1 << 20)]
Short = Annotated[str, Meta(max_length=4096)]
Spec = Annotated[dict[str, Any], Meta(max_length=256)]
Seconds = Annotated[float, Meta(gt=0, le=86400)]
Elapsed = Annotated[float, Meta(ge=0)]
Bytes = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Pid = Annotated[int, Meta(ge=0, le=2**31)]
#: (batch id, index) of a job in hand, as a process's slot names it
Running = tuple[Annotated[int, Meta(ge=0, le=2**63 - 1)], Annotated[int, Meta(ge=0, le=2**32)]]
#: what a dead process's job in hand is charged with (runner.process.handle.Exit's cause)
Cause = Literal["crashed", "timed_out", "stalled", "memory"]
#: a process's stack as its parent read it (runner.process.stacks)
Stack = Annotated[str, Meta(max_length=1 << 20)]


class HostMessage(Struct, array_like=True, tag_field="kind"):
    """[kind, *fields] of a header (its version and seq are taken off first)."""


class Hello(HostMessage, tag=HELLO):
    name: HostName
    pools: Annotated[list[Name], Meta(max_length=256)]
    processes: Annotated[int, Meta(ge=1, le=MAX_HOST_PROCESSES)] | None
    pid: Annotated[int, Meta(ge=0, le=2**31)]
    run: Short | None = None


class Heartbeat(Struct):
    interval: Seconds
    timeout: Seconds


class Welcome(HostMessage, tag=WELCOME):
    run_id: Short
    run_name: Short
    host: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,80}$")]
    specs: Annotated[dict[Name, Spec], Meta(max_length=256)]
    heartbeat: Heartbeat
    start_method: Literal["fork", "spawn", "forkserver"]
    #: the run's shutdown.grace: how long a worker host's processes get to finish after a signal to its agent
    grace: Annotated[float, Meta(ge=0, le=86400)] = 10.0


class Refuse(HostMessage, tag=REFUSE):
    reason: Text = ""


class Spawn(HostMessage, tag=SPAWN):
    worker: Name
    pool: Name
    role: Literal["producer", "consumer"]
    index: Annotated[int, Meta(ge=1, le=MAX_HOST_PROCESSES)]
    restart: Annotated[int, Meta(ge=0)]
    spec: Spec


class To(HostMessage, tag=TO):
    worker: Name


class Signal(HostMessage, tag=SIGNAL):
    worker: Name
    signum: Annotated[int, Meta(ge=1, le=64)]
    reason: Text | None = None


class Fwd(HostMessage, tag=FWD):
    worker: Name


class Exited(HostMessage, tag=EXITED):
    worker: Name
    code: Annotated[int, Meta(ge=-255, le=255)] | None
    signal: Annotated[str, Meta(max_length=32)] | None
    reason: Text
    running: tuple[Annotated[int, Meta(ge=0)], Annotated[int, Meta(ge=0)]] | None = None
    fatal: tuple[Text, Text] | None = None
    cause: Cause = "crashed"


class ProcInfo(TypedDict, total=False):
    """One process in a worker host's heartbeat (a dict on the wire: Health reads it as one)."""

    rss: Bytes | None
    running: Running | None
    running_s: Elapsed | None


class Beat(HostMessage, tag=HEARTBEAT):
    """A worker host's heartbeat carries its processes' RSS and jobs in hand (max_rss, status); the coordinator's, nothing."""

    procs: Annotated[dict[Name, ProcInfo], Meta(max_length=MAX_HOST_PROCESSES * 16)] | None = None


class Stalled(HostMessage, tag=STALLED):
    """A job of `worker` ran stall_timeout without a ctx.heartbeat(); its stack then."""

    worker: Name
    running: Running
    running_s: Elapsed
    silent_s: Elapsed
    stall_timeout: Annotated[float, Meta(gt=0)]
    action: Literal["warn", "kill"]
    stack: Stack


class Stacks(HostMessage, tag=STACKS):
    """`runner status --stacks`: send STACK_DUMPS for this request."""

    request: Annotated[int, Meta(ge=0, le=2**63 - 1)]


class StackDump(TypedDict, total=False):
    """One busy process in STACK_DUMPS (a dict, as the coordinator's own processes' dumps are)."""

    pid: Pid | None
    pool: Name
    running: Running | None
    running_s: Elapsed | None
    rss: Bytes | None
    stack: Stack


class StackDumps(HostMessage, tag=STACK_DUMPS):
    request: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    dumps: Annotated[dict[Name, StackDump], Meta(max_length=MAX_HOST_PROCESSES * 16)]


class Bye(HostMessage, tag=BYE):
    reason: Text = ""


class Reset(HostMessage, tag=RESET):
    reason: Text = ""


class StatusOptions(Struct):
    """What a STATUS asks for besides the status: {"stacks": true} (`runner status --stacks`)."""

    stacks: bool = False


class Status(HostMessage, tag=STATUS):
    options: StatusOptions | None = None


class StopRun(HostMessage, tag=STOP_RUN):
    pass


class Reply(HostMessage, tag=REPLY):
    body: dict[str, Any]


Any_ = Union[Hello, Welcome, Refuse, Spawn, To, Signal, Fwd, Exited, Beat, Bye, Reset, Status, StopRun, Reply, Stalled, Stacks,
             StackDumps]
#: each kind's schema: converting to one class costs ~5 us, to the Union ~100 us (msgspec rebuilds a Union's
#: type info on every call), and a coordinator with a thousand worker hosts parses a thousand heartbeats a second
_BY_KIND: dict[int, type[HostMessage]] = {cls.__struct_config__.tag: cls for cls in get_args(Any_)}  # type: ignore[misc]
#: the kinds that carry a second (passed-through) frame
WITH_FRAME = frozenset({TO, FWD})
_header = msgspec.msgpack.Decoder(list)


class WrongVersion(ProtocolError):
    """A peer speaking another protocol version: a runner of another release (answered, so it can say so)."""


class Envelope(Struct):
    """A parsed message: its kind, its session number, its checked fields and its passed-through frame."""

    kind: int
    seq: int
    message: HostMessage
    frame: bytes | None


def parse(parts: list[bytes]) -> Envelope:
    """A message checked by kind, or ProtocolError (WrongVersion for another release's peer)."""
    if not 1 <= len(parts) <= 2:
        raise ProtocolError(f"expected 1 or 2 frames, got {len(parts)}")
    if any(len(part) > MAX_FRAME for part in parts):
        raise ProtocolError("frame over the size limit")
    if len(parts[0]) > MAX_HEADER:
        raise ProtocolError(f"header frame of {len(parts[0])} bytes is over the size limit ({MAX_HEADER})")
    try:
        head = _header.decode(parts[0])
    except Exception as exc:
        raise ProtocolError(f"undecodable header: {exc}") from None
    if len(head) < 2:
        raise ProtocolError("header is not [version, kind, seq, ...]")
    if head[0] != PROTOCOL_VERSION:
        raise WrongVersion(f"protocol version {str(head[0])[:20]}, this runner speaks {PROTOCOL_VERSION}")
    kind = head[1]
    if type(kind) is not int or kind not in KINDS:
        raise ProtocolError(f"unknown message kind {str(kind)[:40]}")
    if len(head) < 3 or type(head[2]) is not int or not 0 <= head[2] < 2**63:
        raise ProtocolError(f"message kind {kind} without a sequence number")
    try:
        message = msgspec.convert([kind, *head[3:]], _BY_KIND[kind], strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed {_NAMES[kind]}: {exc}") from None
    frame = parts[1] if len(parts) == 2 else None
    if (frame is not None) != (kind in WITH_FRAME):
        raise ProtocolError(f"{_NAMES[kind]} {'without' if frame is None else 'with'} a second frame")
    return Envelope(kind, head[2], message, frame)


_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", REFUSE: "REFUSE", SPAWN: "SPAWN", TO: "TO", SIGNAL: "SIGNAL", FWD: "FWD",
          EXITED: "EXITED", HEARTBEAT: "HEARTBEAT", BYE: "BYE", RESET: "RESET", STATUS: "STATUS", STOP_RUN: "STOP_RUN",
          REPLY: "REPLY", STALLED: "STALLED", STACKS: "STACKS", STACK_DUMPS: "STACK_DUMPS"}
