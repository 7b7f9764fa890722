"""The coordinator's side of worker hosts: handshake, relaying, heartbeats, loss, control requests.

A worker host's processes are Members like local ones (RemoteMember): the coordinator's ledger,
dispatch and lifecycle decisions are the same; only start, send and signal travel over ZeroMQ. Hosts
report to the run through a small protocol of callbacks (HostEvents), never by holding it. A host silent
for `heartbeat.timeout` is lost: its processes count as ended and their jobs go back to the queue.
Messages from a session the coordinator no longer knows get RESET, so a host that comes back after
a partition drops its stale work and joins again instead of double-counting.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from runner.config import RunConfig
from runner.coordinator.members import Member, RemoteMember
from runner.errors import ProtocolError
from runner.process.handle import Exit
from runner.wire import host_messages as hm
from runner.wire import zeromq as wire

#: most messages one drain handles: the loop's timers (heartbeats, host loss, dispatch, progress) run between
#: drains, so a thousand hosts' messages arriving as fast as they are read can never starve them
MAX_DRAIN = 512
#: how often the authorized keys are read again (a revoked key stops working within this, and the heartbeat timeout)
KEYS_RELOAD_S = 1.0


class HostEvents(Protocol):
    """What Hosts tell the run, and ask of it."""

    run_id: str
    run_cfg: RunConfig
    host: str  #: this machine's name (no worker host may take it)
    state: str

    def pool_spec(self, pool: str) -> dict[str, Any]: ...

    def control_reply(self, kind: int) -> dict[str, Any]: ...

    def on_frame(self, member: Member, frame: bytes) -> None: ...

    def on_exit(self, member: Member, ended: Exit, host_gone: bool = False) -> None: ...

    def on_host_joined(self, host: RemoteHost) -> None: ...

    def on_host_gone(self, name: str) -> None: ...

    def status_with_stacks(self, answer: Any) -> None: ...

    def on_stalled(self, member: Member, stall: hm.Stalled) -> None: ...

    def on_stack_dumps(self, host: str, request: int, dumps: dict[str, hm.StackDump]) -> None: ...

    def on_heartbeat(self, host: RemoteHost, procs: dict[str, hm.ProcInfo]) -> None: ...


@dataclass(eq=False)
class RemoteHost:
    identity: bytes
    name: str
    pools: list[str]
    processes: int | None  #: per pool; None: the pool's own `processes`
    pid: int
    last_seen: float
    procs: dict[str, RemoteMember] = field(default_factory=dict)
    leaving: bool = False
    public_key: str | None = None  #: its CURVE key (z85), as ZAP authenticated it
    sent: int = 0  #: the last session number sent to it
    heard: int = 0  #: the last session number heard from it

    def capacity(self, configured: int) -> int:
        return self.processes if self.processes is not None else max(configured, 1)


class Hosts:
    def __init__(self, events: HostEvents, log: Any, context: zmq.Context, address: str, keys: wire.CoordinatorKeys | None) -> None:
        self.events = events
        self.log = log
        self.address = address
        self.sock, self.auth, self.refusals = wire.bind_router(context, address, keys)
        # connections that never become ZeroMQ peers (raw TCP garbage, a plain-text peer on a CURVE port)
        # fail inside libzmq; its monitor is the only place they show up
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self.hosts: dict[bytes, RemoteHost] = {}
        self.names: dict[str, RemoteHost] = {}  #: the same hosts by name (by_name is on the hot path of every spawn and signal)
        self.heartbeat = events.run_cfg.heartbeat
        self._next_beat = 0.0
        self.authorized = keys.authorized if keys is not None else None
        self._next_keys = 0.0
        self._keys_seen: list[tuple[str, int]] | None = None

    def by_name(self, name: str) -> RemoteHost | None:
        return self.names.get(name)

    # -- receiving ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Handle the messages waiting on the socket, MAX_DRAIN at most (never blocks, never raises on bad input)."""
        for _ in range(MAX_DRAIN):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            identity, rest = frames[0].bytes, [f.bytes for f in frames[1:]]
            try:
                self._on_message(identity, wire.parse(rest), frames[1] if len(frames) > 1 else None)
            except ProtocolError as exc:
                self._bad_message(identity, exc)
        while self.refusals.seen:
            self.log.warning("host.refused", reason=self.refusals.seen.popleft())
        self._drain_monitor()

    def _bad_message(self, identity: bytes, exc: ProtocolError) -> None:
        host = self.hosts.get(identity)
        self.log.error("protocol.error", peer=host.name if host else identity.hex(), error=str(exc))
        if host is not None:
            self._reset(host, f"it sent a malformed message ({str(exc)[:200]})")
        elif isinstance(exc, wire.WrongVersion):
            # a worker of another release: tell it, instead of leaving it to time out wondering
            self._send(identity, wire.REFUSE, f"{exc}: install the same runner version on every host")

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                names = [n for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_") and getattr(zmq, n) == event["value"]]
                detail = names[0].removeprefix("PROTOCOL_ERROR_").lower() if names else f"code {event['value']:#x}"
            else:
                detail = os.strerror(event["value"]) if 0 < event["value"] < 200 else "no detail"
            self.log.error("protocol.error", peer=f"a connection to {self.address}",
                           error=f"ZeroMQ handshake failed ({detail}): not a runner worker, or no CURVE keys")

    def _send(self, identity: bytes, kind: int, *fields: Any, frame: bytes | None = None) -> bool:
        """Send one message; a known host that cannot take it is reset (never a silent loss). False if not sent."""
        host = self.hosts.get(identity)
        seq = 0
        if host is not None and kind in wire.SESSION_KINDS:
            host.sent += 1
            seq = host.sent
        parts = [identity, wire.header(kind, seq, *fields)]
        if frame is not None:
            parts.append(frame)
        return self._deliver(host, parts)

    def _deliver(self, host: RemoteHost | None, parts: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EAGAIN: past its high-water mark; EHOSTUNREACH: disconnected (ROUTER_MANDATORY)
            if host is not None and host.identity in self.hosts:
                why = "its send queue is full (it stopped reading)" if exc.errno == zmq.EAGAIN else f"it cannot be reached ({exc.strerror})"
                self._drop(host, "host.lost", why)
            return False

    def _on_message(self, identity: bytes, envelope: hm.Envelope, first: Any) -> None:
        events, kind, message = self.events, envelope.kind, envelope.message
        if wire.wants_stacks(envelope):
            events.status_with_stacks(lambda reply: self._send(identity, wire.REPLY, reply))
            return
        if kind in (wire.STATUS, wire.STOP_RUN):
            self._send(identity, wire.REPLY, events.control_reply(kind))
            return
        if kind == wire.HELLO:
            assert isinstance(message, hm.Hello)
            self._on_hello(identity, message, _user_id(first))
            return
        host = self.hosts.get(identity)
        if host is None:
            if kind != wire.BYE:
                self._send(identity, wire.RESET, "unknown session: join again")
            return
        if kind not in wire.SESSION_KINDS:
            raise ProtocolError(f"unexpected message kind {kind} from a worker")
        if envelope.seq != host.heard + 1:
            what = "repeated" if envelope.seq <= host.heard else f"{envelope.seq - host.heard - 1} lost"
            self.log.error("protocol.error", peer=host.name, error=f"message {envelope.seq} after {host.heard}: {what} (or reordered)")
            self._reset(host, f"messages {what} between it and the coordinator")
            return
        host.heard = envelope.seq
        host.last_seen = time.monotonic()
        if isinstance(message, hm.Fwd):
            proc = host.procs.get(message.worker)
            if proc is None:
                return  # a process that ended (its EXITED crossed this frame): what it held is settled already
            assert envelope.frame is not None
            events.on_frame(proc, envelope.frame)
        elif isinstance(message, hm.Exited):
            proc = host.procs.pop(message.worker, None)
            if proc is not None:
                proc.remote_running = message.running
                if message.fatal:
                    proc.fatal = message.fatal
                events.on_exit(proc, Exit(message.code, message.signal, message.reason, message.cause))
        elif isinstance(message, hm.Beat):
            if message.procs is not None:
                events.on_heartbeat(host, message.procs)
        elif isinstance(message, hm.Stalled):
            proc = host.procs.get(message.worker)
            if proc is not None:  # else it ended (its EXITED crossed this): its job is settled already
                events.on_stalled(proc, message)
        elif isinstance(message, hm.StackDumps):
            events.on_stack_dumps(host.name, message.request, message.dumps)
        elif isinstance(message, hm.Bye):
            self._drop(host, "host.left", f"left: {message.reason or 'bye'}")

    def _on_hello(self, identity: bytes, hello: hm.Hello, public_key: str | None) -> None:
        events = self.events
        if hello.run and hello.run not in (events.run_id, events.run_cfg.name):
            self._send(identity, wire.REFUSE, f"this coordinator runs {events.run_id}, not {hello.run}")
            return
        known = events.run_cfg
        all_pools = [p.name for p in known.producers] + [c.name for c in known.consumers]
        unknown = [p for p in hello.pools if p not in all_pools]
        if unknown:
            self._send(identity, wire.REFUSE, f"no pool {', '.join(unknown)} in run {events.run_id}; pools are {', '.join(all_pools)}")
            return
        if events.state != "running":
            self._send(identity, wire.REFUSE, f"run {events.run_id} is {events.state}")
            return
        for old in [h for h in self.hosts.values() if h.identity == identity or (h.name == hello.name and h.pid == hello.pid)]:
            # the same agent again (a new socket after a reset or a lost connection): its earlier session is void
            self._drop(old, "host.lost", "joined again: its earlier session is void")
        unique, n = hello.name, 2
        while unique in self.names or unique == events.host:
            unique, n = f"{hello.name}-{n}", n + 1
        pools = list(dict.fromkeys(hello.pools)) or [c.name for c in known.consumers]  # `--pool a --pool a` serves a once
        host = RemoteHost(identity, unique, pools, hello.processes, hello.pid, time.monotonic(), public_key=public_key)
        self.hosts[identity] = self.names[unique] = host
        specs = {pool: events.pool_spec(pool) for pool in host.pools}
        self._send(identity, wire.WELCOME, events.run_id, known.name, unique, specs,
                   {"interval": self.heartbeat.interval, "timeout": self.heartbeat.timeout}, known.start_method, known.shutdown.grace)
        self.log.info("host.joined", host=unique, pools=host.pools, processes=hello.processes, agent_pid=hello.pid)
        events.on_host_joined(host)

    # -- sending -----------------------------------------------------------------------------
    def spawn(self, host: RemoteHost, name: str, pool: str, role: str, index: int, restart: int, spec: dict[str, Any]) -> RemoteMember:
        proc = RemoteMember(name, pool, role, index, restart, host.name)
        proc.route = host
        host.procs[name] = proc
        self._send(host.identity, wire.SPAWN, name, pool, role, index, restart, spec)
        return proc

    def send(self, proc: Member, frame: bytes) -> None:
        """A frame into a remote process's inbox (the hot path: one small header per batch)."""
        assert isinstance(proc, RemoteMember)
        host = proc.route
        if host.identity not in self.hosts:
            return  # its host is gone; the ledger has already taken its jobs back
        host.sent += 1
        self._deliver(host, [host.identity, wire.header(wire.TO, host.sent, proc.name), frame])

    def signal(self, proc: Member, signum: int, reason: str | None) -> None:
        host = self.by_name(proc.host)
        if host is not None:
            self._send(host.identity, wire.SIGNAL, proc.name, signum, reason)

    def ask_stacks(self, name: str, request: int) -> None:
        """Ask a worker host for its busy processes' stacks (it answers STACK_DUMPS)."""
        host = self.by_name(name)
        if host is not None:
            self._send(host.identity, wire.STACKS, request)

    def members(self) -> list[Member]:
        return [proc for host in self.hosts.values() for proc in host.procs.values()]

    # -- time --------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.auth is not None and self.authorized is not None and now >= self._next_keys:
            self._next_keys = now + min(KEYS_RELOAD_S, self.heartbeat.interval)
            self._reload_keys()
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat.interval
            for host in list(self.hosts.values()):
                self._send(host.identity, wire.HEARTBEAT)
        for host in list(self.hosts.values()):
            silent = now - host.last_seen
            if silent > self.heartbeat.timeout:
                self._drop(host, "host.lost", f"no heartbeat for {silent:.1f}s (heartbeat.timeout {self.heartbeat.timeout:g}s)")

    def _reload_keys(self) -> None:
        """pyzmq's authenticator reads authorized/ once: read it again when it changes, and drop hosts whose key left it."""
        assert self.authorized is not None and self.auth is not None
        try:
            listing = sorted((p.name, p.stat().st_mtime_ns) for p in self.authorized.iterdir())
        except OSError:
            listing = []
        if listing == self._keys_seen:
            return
        self._keys_seen = listing
        self.auth.configure_curve(domain="*", location=str(self.authorized))
        allowed = wire.authorized_keys(self.authorized)
        for host in list(self.hosts.values()):
            if host.public_key is not None and host.public_key not in allowed:
                self.log.warning("host.refused", host=host.name, reason=f"its key was removed from {self.authorized}")
                self._reset(host, "its CURVE key is no longer authorized")

    def reset_host(self, name: str, reason: str) -> None:
        host = self.by_name(name)
        if host is not None:
            self._reset(host, reason)

    def _reset(self, host: RemoteHost, reason: str) -> None:
        """A broken session: the host's jobs go back to the queue now, and it is told to join again."""
        self._drop(host, "host.lost", f"reset: {reason}")
        self._send(host.identity, wire.RESET, reason)

    def _drop(self, host: RemoteHost, event: str, reason: str) -> None:
        """A host is gone: its processes end now and their jobs go back to the queue."""
        self.hosts.pop(host.identity, None)
        if self.names.get(host.name) is host:
            del self.names[host.name]
        self.events.on_host_gone(host.name)
        level = "error" if event == "host.lost" else "info"
        getattr(self.log, level)(event, host=host.name, reason=reason, processes=len(host.procs))
        for proc in list(host.procs.values()):
            host.procs.pop(proc.name, None)
            self.events.on_exit(proc, Exit(None, None, f"host {host.name} {reason}"), host_gone=True)

    def close(self, reason: str, wait: float = 2.0) -> None:
        """Tell every host the run is over and wait (briefly) for each to answer: delivery by acknowledgement,
        not by linger."""
        waiting = set(self.hosts)
        for identity in list(waiting):
            if not self._send(identity, wire.BYE, reason):
                waiting.discard(identity)
        deadline = time.monotonic() + wait
        while waiting and time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            parts = self.sock.recv_multipart()
            try:
                kind = wire.parse(parts[1:]).kind
            except ProtocolError:
                continue
            if kind == wire.BYE:
                waiting.discard(parts[0])
            elif parts[0] in waiting:
                self._send(parts[0], wire.BYE, reason)
        for identity in waiting:
            if identity in self.hosts:
                self.log.warning("host.left", host=self.hosts[identity].name, reason="did not acknowledge the end of the run")
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()


def _user_id(frame: Any) -> str | None:
    """The CURVE key ZAP authenticated this message's sender with (z85), None without CURVE."""
    try:
        user = frame.get("User-Id") if frame is not None else None
    except (zmq.ZMQError, AttributeError):
        return None
    return user or None
