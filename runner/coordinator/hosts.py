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
from runner.wire import zeromq as wire


#: most processes per pool a worker host may ask for (a HELLO field: checked, never trusted)
MAX_HOST_PROCESSES = 1024
#: what a worker host may say a dead process's job in hand is charged with (EXITED's cause)
CAUSES = frozenset({"crashed", "timed_out", "stalled", "memory"})


def _ints(value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _strs(value: Any, n: int | None = None) -> bool:
    return isinstance(value, list) and (n is None or len(value) == n) and all(isinstance(v, str) for v in value)


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

    def on_stalled(self, member: Member, fields: list[Any]) -> None: ...

    def on_stack_dumps(self, host: str, request: int, dumps: Any) -> None: ...

    def on_heartbeat(self, host: RemoteHost, procs: Any) -> None: ...


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
        self.heartbeat = events.run_cfg.heartbeat
        self._next_beat = 0.0

    def by_name(self, name: str) -> RemoteHost | None:
        return next((h for h in self.hosts.values() if h.name == name), None)

    # -- receiving ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Handle every message waiting on the socket (never blocks, never raises on bad input)."""
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            identity, rest = parts[0], parts[1:]
            try:
                kind, fields, frame = wire.parse(rest)
                self._on_message(identity, kind, fields, frame)
            except ProtocolError as exc:
                host = self.hosts.get(identity)
                self.log.error("protocol.error", peer=host.name if host else identity.hex(), error=str(exc))
                if isinstance(exc, wire.WrongVersion) and host is None:
                    # a worker of another release: tell it, instead of leaving it to time out wondering
                    self._send(identity, wire.REFUSE, f"{exc}: install the same runner version on every host")
            except (TypeError, ValueError, IndexError, KeyError) as exc:
                host = self.hosts.get(identity)
                self.log.error("protocol.error", peer=host.name if host else identity.hex(), error=f"malformed message: {exc!r}")
        while self.refusals.seen:
            self.log.warning("host.refused", reason=self.refusals.seen.popleft())
        self._drain_monitor()

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

    def _send(self, identity: bytes, kind: int, *fields: Any, frame: bytes | None = None) -> None:
        parts = [identity, wire.header(kind, *fields)]
        if frame is not None:
            parts.append(frame)
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            # Never drop a message silently: the ledger would wait for it for ever. A host this far
            # behind is treated as lost, and what it held goes back to the queue.
            host = self.hosts.get(identity)
            if host is not None:
                self._drop(host, "host.lost", "its send queue is full (it stopped reading)")

    def _on_message(self, identity: bytes, kind: int, fields: list[Any], frame: bytes | None) -> None:
        events = self.events
        if wire.wants_stacks(kind, fields):
            events.status_with_stacks(lambda reply: self._send(identity, wire.REPLY, reply))
            return
        if kind in (wire.STATUS, wire.STOP_RUN):
            self._send(identity, wire.REPLY, events.control_reply(kind))
            return
        if kind == wire.HELLO:
            self._on_hello(identity, fields)
            return
        host = self.hosts.get(identity)
        if host is None:
            if kind != wire.BYE:
                self._send(identity, wire.RESET, "unknown session: join again")
            return
        host.last_seen = time.monotonic()
        if kind == wire.FWD:
            proc = host.procs.get(fields[0])
            if proc is None or frame is None:
                raise ProtocolError(f"frame from unknown process {fields[0]!r}")
            events.on_frame(proc, frame)
        elif kind == wire.EXITED:
            worker, code, signal_name, reason, running, fatal = fields[:6]
            cause = fields[6] if len(fields) > 6 and fields[6] in CAUSES else "crashed"
            if not (_ints(running, 2) or running is None) or not (fatal is None or _strs(fatal, 2)) or not isinstance(reason, str):
                raise ProtocolError(f"malformed EXITED for {worker!r}")  # checked before the process is forgotten
            proc = host.procs.pop(worker, None)
            if proc is not None:
                proc.remote_running = tuple(running) if running else None  # type: ignore[assignment]
                if fatal:
                    proc.fatal = tuple(fatal)  # type: ignore[assignment]
                events.on_exit(proc, Exit(code, signal_name, reason, cause))
        elif kind == wire.STALLED:
            proc = host.procs.get(fields[0])
            if not (proc is not None and _ints(fields[1], 2) and len(fields) >= 7 and isinstance(fields[6], str)):
                raise ProtocolError(f"malformed STALLED for {fields[0]!r}")
            events.on_stalled(proc, fields)
        elif kind == wire.STACK_DUMPS:
            events.on_stack_dumps(host.name, fields[0], fields[1])
        elif kind == wire.HEARTBEAT:
            if fields:
                events.on_heartbeat(host, fields[0])
        elif kind == wire.BYE:
            self._drop(host, "host.left", f"left: {fields[0] if fields else 'bye'}")
        else:
            raise ProtocolError(f"unexpected message kind {kind} from a worker")

    def _on_hello(self, identity: bytes, fields: list[Any]) -> None:
        name, pools, processes, pid, run = fields[:5]
        events = self.events
        if not (isinstance(name, str) and 0 < len(name) <= 255 and _strs(pools) and isinstance(pid, int)
                and (run is None or isinstance(run, str))
                and (processes is None or (_ints([processes], 1) and 1 <= processes <= MAX_HOST_PROCESSES))):
            raise ProtocolError(f"malformed HELLO (name, pools, processes 1..{MAX_HOST_PROCESSES}, pid, run)")
        if run and run not in (events.run_id, events.run_cfg.name):
            self._send(identity, wire.REFUSE, f"this coordinator runs {events.run_id}, not {run}")
            return
        known = events.run_cfg
        all_pools = [p.name for p in known.producers] + [c.name for c in known.consumers]
        unknown = [p for p in pools if p not in all_pools]
        if unknown:
            self._send(identity, wire.REFUSE, f"no pool {', '.join(unknown)} in run {events.run_id}; pools are {', '.join(all_pools)}")
            return
        if events.state != "running":
            self._send(identity, wire.REFUSE, f"run {events.run_id} is {events.state}")
            return
        old = self.hosts.get(identity)
        if old is not None:
            self._drop(old, "host.lost", "joined again: its earlier session is void")
        taken = {h.name for h in self.hosts.values()}
        unique, n = name, 2
        while unique in taken or unique == events.host:
            unique, n = f"{name}-{n}", n + 1
        host = RemoteHost(identity, unique, list(dict.fromkeys(pools)) or [c.name for c in known.consumers], processes, pid, time.monotonic())
        self.hosts[identity] = host
        specs = {pool: events.pool_spec(pool) for pool in host.pools}
        self._send(identity, wire.WELCOME, events.run_id, known.name, unique, specs,
                   {"interval": self.heartbeat.interval, "timeout": self.heartbeat.timeout}, known.start_method)
        self.log.info("host.joined", host=unique, pools=host.pools, processes=processes, agent_pid=pid)
        events.on_host_joined(host)

    # -- sending -----------------------------------------------------------------------------
    def spawn(self, host: RemoteHost, name: str, pool: str, role: str, index: int, restart: int, spec: dict[str, Any]) -> RemoteMember:
        proc = RemoteMember(name, pool, role, index, restart, host.name)
        proc.route = (host.identity, wire.header(wire.TO, name))
        host.procs[name] = proc
        self._send(host.identity, wire.SPAWN, name, pool, role, index, restart, spec)
        return proc

    def send(self, proc: Member, frame: bytes) -> None:
        """A frame into a remote process's inbox (the hot path: the header was encoded at spawn)."""
        assert isinstance(proc, RemoteMember)
        identity, head = proc.route
        if identity not in self.hosts:
            return  # its host is gone; the ledger has already taken its jobs back
        try:
            self.sock.send_multipart([identity, head, frame], zmq.NOBLOCK)
        except zmq.Again:
            self._drop(self.hosts[identity], "host.lost", "its send queue is full (it stopped reading)")

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
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat.interval
            for host in list(self.hosts.values()):
                self._send(host.identity, wire.HEARTBEAT)
        for host in list(self.hosts.values()):
            silent = now - host.last_seen
            if silent > self.heartbeat.timeout:
                self._drop(host, "host.lost", f"no heartbeat for {silent:.1f}s (heartbeat.timeout {self.heartbeat.timeout:g}s)")

    def _drop(self, host: RemoteHost, event: str, reason: str) -> None:
        """A host is gone: its processes end now and their jobs go back to the queue."""
        self.hosts.pop(host.identity, None)
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
        for identity in waiting:
            self._send(identity, wire.BYE, reason)
        deadline = time.monotonic() + wait
        while waiting and time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            parts = self.sock.recv_multipart()
            try:
                kind, _, _ = wire.parse(parts[1:])
            except ProtocolError:
                continue
            if kind == wire.BYE:
                waiting.discard(parts[0])
            elif parts[0] in waiting and kind != wire.BYE:
                self._send(parts[0], wire.BYE, reason)
        for identity in waiting:
            self.log.warning("host.left", host=self.hosts[identity].name, reason="did not acknowledge the end of the run")
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
