"""ZeroMQ between hosts: a ROUTER at the coordinator, a DEALER per worker host, CURVE by pyzmq's zmq.auth.

The messages and their checks are in runner.wire.host_messages (re-exported here). Anything that fails
them (bad msgpack, wrong version, unknown kind, a field of the wrong type or range, too many frames,
oversized) raises ProtocolError; the receiver logs it with the peer and resets that peer's session.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
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
from runner.wire.host_messages import (  # noqa: F401  (the wire's vocabulary, one import away)
    BYE,
    EXITED,
    FWD,
    HEARTBEAT,
    HELLO,
    HOST_NAME,
    KINDS,
    MAX_HEADER,
    PROTOCOL_VERSION,
    REFUSE,
    REPLY,
    RESET,
    SESSION_KINDS,
    SIGNAL,
    SPAWN,
    STACK_DUMPS,
    STACKS,
    STALLED,
    STATUS,
    STOP_RUN,
    TO,
    WELCOME,
    Envelope,
    Status,
    WrongVersion,
    parse,
)
from runner.wire.messages import MAX_FRAME

#: messages queued per peer before ZeroMQ pushes back; bounded so a stalled peer cannot eat memory
HWM = 10_000


def header(kind: int, seq: int, *fields: Any) -> bytes:
    """[version, kind, seq, *fields]: seq numbers a session's messages (0 outside a session)."""
    return msgpack.packb([PROTOCOL_VERSION, kind, seq, *fields], use_bin_type=True)


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


def authorized_keys(folder: Path) -> set[str]:
    """The public keys (z85, as ZAP's User-Id gives them) in an authorized/ folder; a file that does not load is skipped."""
    keys = set()
    for path in sorted(folder.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except Exception:
            continue
        if public:
            keys.add(public.decode("ascii"))
    return keys


# -- a run's own keys: loopback is not a trust boundary ------------------------------------
def run_keys_folder(run_id: str) -> Path:
    """Where a run without --keys keeps its ephemeral key pairs: the user's private control folder, named by the
    run id (so a resumed run finds the same keys)."""
    return control_dir() / f"{run_id}.keys"


def make_run_keys(run_id: str, address: str) -> CoordinatorKeys:
    """An ephemeral CURVE key pair for the coordinator and one for the same user's workers, readable only by that user."""
    folder = run_keys_folder(run_id)
    folder.mkdir(mode=0o700, exist_ok=True)
    generate_keys(folder, ["worker"])
    (folder / "address").write_text(address)
    return CoordinatorKeys(folder)


def remove_run_keys(run_id: str) -> None:
    folder = run_keys_folder(run_id)
    if folder.is_dir() and not folder.is_symlink():
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        folder.rmdir()


def _port(address: str) -> tuple[str, int | None]:
    url = urlparse(address)
    try:
        return url.scheme, url.port
    except ValueError:
        return url.scheme, None


def find_run_keys(address: str, run: str | None = None) -> WorkerKeys | None:
    """The keys of this user's running run at `address` (or run id `run`): the run's control folder says which
    address each run listens on. Newest first; None if no run of this user listens there."""
    try:
        folder = control_dir()
    except UsageError:
        return None
    scheme, port = _port(address)
    found = []
    for keys in folder.glob("*.keys"):
        run_id = keys.name.removesuffix(".keys")
        try:
            bound = (keys / "address").read_text().strip()
        except OSError:
            continue
        same = bound == address or (scheme == "tcp" and _port(bound) == (scheme, port) and port is not None)
        if same and (folder / f"{run_id}.ctl").exists():  # a live run (its control socket is there)
            wanted = run is None or run_id == run or run_id.startswith(f"{run}-")
            found.append((wanted, keys.stat().st_mtime, keys))
    # the run asked for first; else whichever run listens there, which will say which run it is (REFUSE)
    for *_, keys in sorted(found, reverse=True):
        try:
            return WorkerKeys(keys)
        except UsageError:
            if all((keys / name).exists() for name in ("worker.key_secret", "coordinator.key")):
                raise  # the files are there but are not keys: say so
            # a run that ended between the look at its control socket above and this load (it closes that
            # socket, then removes its keys): not a run to join
    return None


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
    """Refuse plain text off loopback unless --insecure is given (which warns, on any address).

    On loopback without keys the run makes its own (make_run_keys) and the same user's workers find them."""
    if keys is not None:
        return
    if is_loopback(address) and not insecure:
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
    # a message to a peer that is gone, or past its high-water mark, raises instead of vanishing (zguide ch. 4)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
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
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:  # no scheme, no port, a name that does not resolve: the user's address
        sock.close(0)
        raise UsageError(f"cannot connect to {address!r}: {exc.strerror} (an address looks like tcp://HOST:5555)") from exc
    return sock


def control_dir() -> Path:
    """$TMPDIR/runner-<uid>: the user's private folder for control sockets and run keys (the systemd unit's TMPDIR
    relies on this place). It must be a real folder (not a symlink), owned by this user, mode 0700: a folder
    another user made there could watch or fake our runs, so it is an error, never used."""
    folder = Path(tempfile.gettempdir()) / f"runner-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot make the control folder {folder}: {exc.strerror}") from None
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"the control folder {folder} is not a folder (a symlink or a file): remove it, or set TMPDIR elsewhere")
    if info.st_uid != os.getuid():
        raise UsageError(f"the control folder {folder} belongs to another user (uid {info.st_uid}), not to you (uid {os.getuid()}): "
                         "someone made it to watch or fake your runs; remove it, or set TMPDIR to a folder of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UsageError(f"the control folder {folder} has mode {stat.S_IMODE(info.st_mode):o}: other users may enter it; "
                         f"`chmod 700 {folder}`, or remove it")
    return folder


def control_address(run_id: str) -> str:
    """The local control socket of a run: in the user's private folder, short enough for ipc paths."""
    return f"ipc://{control_dir() / run_id}.ctl"


def wants_stacks(envelope: Envelope) -> bool:
    """A STATUS request asking for stacks too (`runner status --stacks`)."""
    return isinstance(envelope.message, Status) and envelope.message.options is not None and envelope.message.options.stacks


def request(address: str, kind: int, keys: WorkerKeys | None = None, timeout: float = 5.0, *fields: Any) -> dict[str, Any]:
    """One control request (status, stop) to a coordinator; the reply's dict (its answer checked like any message)."""
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = connect_dealer(context, address, keys)
    try:
        sock.send(header(kind, 0, *fields))
        if not sock.poll(int(timeout * 1000)):
            raise UsageError(f"no answer from the coordinator at {address} within {timeout:g}s")
        try:
            reply = parse(sock.recv_multipart())
        except ProtocolError as exc:
            raise UsageError(f"the coordinator at {address} answered in a way this runner does not understand: {exc}") from None
        if reply.kind == REFUSE:
            raise UsageError(f"the coordinator at {address} refused: {reply.message.reason}")  # type: ignore[attr-defined]
        if reply.kind != REPLY:
            raise UsageError(f"the coordinator at {address} answered with message kind {reply.kind}, not a reply")
        body: dict[str, Any] = reply.message.body  # type: ignore[attr-defined]
        if "error" in body:
            raise UsageError(f"the coordinator at {address} refused the request: {body['error']}")
        return body
    finally:
        sock.close(0)
