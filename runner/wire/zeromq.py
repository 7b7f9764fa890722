"""ZeroMQ between hosts: a ROUTER at the coordinator, a DEALER per worker host, CURVE by pyzmq's zmq.auth.

Wire format: every message is one or two ZeroMQ frames. The first is a msgpack array
`[PROTOCOL_VERSION, kind, *fields]`; the second, when present, is a local protocol frame passed
through untouched (runner.wire.messages), so job batches are never re-encoded on the way.

  worker -> coordinator                         coordinator -> worker
  [HELLO, name, pools, processes, pid, run]     [WELCOME, run_id, run_name, specs, heartbeat]
  [FWD, worker] + frame    (a process's frame)  [REFUSE, reason]
  [EXITED, worker, code, signal, reason,        [SPAWN, worker, pool, role, index, restart, spec]
           running, fatal, cause]               [TO, worker] + frame     (into its inbox)
  [HEARTBEAT, procs]                            [SIGNAL, worker, signum, reason]
  [BYE, reason]                                 [HEARTBEAT]
  [STALLED, worker, running, running_s,         [RESET, reason]  (unknown session: join again)
            silent_s, stall_timeout, action,    [BYE, reason]    (the run is over)
            stack]                              [STACKS, request]  (send STACK_DUMPS for busy processes)
  [STACK_DUMPS, request, dumps]
  control client -> coordinator: [STATUS] / [STATUS, {"stacks": true}] / [STOP_RUN]; reply: [REPLY, dict]

  EXITED's cause (crashed / timed_out / stalled / memory) is what the job in hand is charged with.
  HEARTBEAT's procs: {worker: {"rss": bytes, "running": [batch_id, index] or None, "running_s": s}}.
  STALLED: a job of `worker` ran stall_timeout without a heartbeat; `running` is [batch_id, index].
  STACK_DUMPS' dumps: {worker: {"pid", "pool", "running", "running_s", "rss", "stack"}} (busy processes).
  Fields added at the end are optional: a receiver reads what it knows and defaults the rest.

Anything else (bad msgpack, wrong version, unknown kind, too many frames, oversized) raises
ProtocolError; the receiver logs it with the peer and drops it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import tempfile
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgpack
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from runner.errors import ProtocolError, UsageError
from runner.wire.messages import MAX_FRAME

PROTOCOL_VERSION = 1
(HELLO, WELCOME, REFUSE, SPAWN, TO, SIGNAL, FWD, EXITED, HEARTBEAT, BYE, RESET, STATUS, STOP_RUN, REPLY) = range(101, 115)
STALLED, STACKS, STACK_DUMPS = range(115, 118)
KINDS = frozenset(range(101, 118))
#: messages queued per peer before ZeroMQ pushes back; bounded so a stalled peer cannot eat memory
HWM = 10_000
#: largest header frame (the msgpack array): jobs travel in the second frame, so a bigger header is an attack or a bug
MAX_HEADER = 16 * 1024 * 1024


class WrongVersion(ProtocolError):
    """A peer speaking another protocol version: a runner of another release (answered, so it can say so)."""


def header(kind: int, *fields: Any) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, kind, *fields], use_bin_type=True)


def parse(parts: list[bytes]) -> tuple[int, list[Any], bytes | None]:
    """(kind, fields, passed-through frame) of a message, or ProtocolError."""
    if not 1 <= len(parts) <= 2:
        raise ProtocolError(f"expected 1 or 2 frames, got {len(parts)}")
    if any(len(part) > MAX_FRAME for part in parts):
        raise ProtocolError("frame over the size limit")
    if len(parts[0]) > MAX_HEADER:
        raise ProtocolError(f"header frame of {len(parts[0])} bytes is over the size limit ({MAX_HEADER})")
    try:
        head = msgpack.unpackb(parts[0], raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"undecodable header: {exc}") from exc
    if not isinstance(head, list) or len(head) < 2:
        raise ProtocolError("header is not [version, kind, ...]")
    if head[0] != PROTOCOL_VERSION:
        raise WrongVersion(f"protocol version {head[0]!r}, this runner speaks {PROTOCOL_VERSION}")
    if head[1] not in KINDS:
        raise ProtocolError(f"unknown message kind {head[1]!r}")
    return head[1], head[2:], parts[1] if len(parts) == 2 else None


# -- keys ----------------------------------------------------------------------------------
def generate_keys(folder: Path, workers: list[str]) -> list[Path]:
    """A coordinator key pair, one pair per worker name, and authorized/ holding the workers' public keys.

    Existing pairs are kept (so adding a worker later never changes the key other workers pinned)."""
    folder.mkdir(parents=True, exist_ok=True)
    authorized = folder / "authorized"
    authorized.mkdir(exist_ok=True)
    made = []
    for name in ["coordinator", *workers]:
        if (folder / f"{name}.key_secret").exists():
            continue
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
        made += [Path(public), Path(secret)]
        if name != "coordinator":
            (authorized / f"{name}.key").write_bytes(Path(public).read_bytes())
    return made


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise UsageError(f"key file {path} not found (make keys with `runner keys generate DIR`)")
    try:
        return zmq.auth.load_certificate(path)
    except Exception as exc:
        raise UsageError(f"key file {path} is not a ZeroMQ certificate: {exc}") from exc


class CoordinatorKeys:
    """DIR/coordinator.key_secret and the public keys allowed in DIR/authorized/."""

    def __init__(self, folder: Path) -> None:
        self.public, secret = _load(folder / "coordinator.key_secret", secret=True)
        if secret is None:
            raise UsageError(f"{folder / 'coordinator.key_secret'} has no secret key")
        self.secret = secret
        self.authorized = folder / "authorized"
        if not self.authorized.is_dir():
            raise UsageError(f"{self.authorized} is missing: put the workers' public .key files there")


class WorkerKeys:
    """DIR/<name>.key_secret (or DIR/worker.key_secret) and the pinned DIR/coordinator.key."""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        candidates = [folder / f"{name}.key_secret"] if name else []
        candidates.append(folder / "worker.key_secret")
        path = next((c for c in candidates if c.exists()), candidates[-1])
        self.public, secret = _load(path, secret=True)
        if secret is None:
            raise UsageError(f"{path} has no secret key")
        self.secret = secret
        self.server, _ = _load(folder / "coordinator.key", secret=False)


def is_loopback(address: str) -> bool:
    """True for tcp://127.x / [::1] / localhost and for ipc:// and inproc:// addresses."""
    url = urlparse(address)
    if url.scheme in ("ipc", "inproc"):
        return True
    host = (url.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def require_security(address: str, keys: object | None, insecure: bool, flag: str, warn: Any) -> None:
    """Refuse plain text off loopback unless --insecure is given (which warns)."""
    if keys is not None or is_loopback(address):
        return
    if not insecure:
        raise UsageError(
            f"{address} is not a loopback address and no CURVE keys were given: traffic would be unencrypted and "
            f"anyone could join. Make keys with `runner keys generate keys/`, then pass `{flag} keys/` "
            "(see README, Many hosts), or pass --insecure on a network you trust."
        )
    warn(f"warning: {address} without CURVE keys: unencrypted and unauthenticated (--insecure)")


# -- sockets -------------------------------------------------------------------------------
class Refusals(logging.Handler):
    """Collects zmq.auth's denials so the coordinator can log them as host.refused."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: deque[str] = deque(maxlen=1000)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "DENIED" in message or "denied" in message.lower():
            self.seen.append(message)


def _socket(context: zmq.Context, kind: int) -> zmq.Socket:
    """Every socket: no linger (shutdown never hangs), bounded queues, a size limit on what comes in."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    return sock


def bind_router(context: zmq.Context, address: str, keys: CoordinatorKeys | None) -> tuple[zmq.Socket, ThreadAuthenticator | None, Refusals]:
    refusals = Refusals()
    auth = None
    sock = _socket(context, zmq.ROUTER)
    if keys is not None:
        logger = logging.getLogger(f"runner.auth.{id(sock)}")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(refusals)
        logger.propagate = False
        auth = ThreadAuthenticator(context, log=logger)
        auth.start()
        auth.configure_curve(domain="*", location=str(keys.authorized))
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close(0)
        if auth:
            auth.stop()
        raise UsageError(f"cannot listen on {address}: {exc}") from exc
    return sock, auth, refusals


def connect_dealer(context: zmq.Context, address: str, keys: WorkerKeys | None) -> zmq.Socket:
    sock = _socket(context, zmq.DEALER)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = keys.server
    sock.connect(address)
    return sock


def control_address(run_id: str) -> str:
    """The local control socket of a run: a private folder per user, short enough for ipc paths."""
    folder = Path(tempfile.gettempdir()) / f"runner-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return f"ipc://{folder / run_id}.ctl"


def wants_stacks(kind: int, fields: list[Any]) -> bool:
    """A STATUS request asking for stacks too (`runner status --stacks`)."""
    return kind == STATUS and bool(fields) and isinstance(fields[0], dict) and bool(fields[0].get("stacks"))


def request(address: str, kind: int, keys: WorkerKeys | None = None, timeout: float = 5.0, *fields: Any) -> dict[str, Any]:
    """One control request (status, stop) to a coordinator; the reply's dict."""
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = connect_dealer(context, address, keys)
    try:
        sock.send(header(kind, *fields))
        if not sock.poll(int(timeout * 1000)):
            raise UsageError(f"no answer from the coordinator at {address} within {timeout:g}s")
        reply_kind, answer, _ = parse(sock.recv_multipart())
        if reply_kind == REFUSE:
            raise UsageError(f"the coordinator at {address} refused: {answer[0]}")
        return answer[0]
    finally:
        sock.close(0)
