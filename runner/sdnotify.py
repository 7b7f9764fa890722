"""systemd's notify protocol, in a few lines: READY=1, WATCHDOG=1 and STOPPING=1 over $NOTIFY_SOCKET.

A unit with `Type=notify` waits for READY=1 before it counts as started; with `WatchdogSec=` it
restarts the service when WATCHDOG=1 stops arriving for that long. The socket is a datagram unix
socket whose path systemd puts in $NOTIFY_SOCKET (a leading `@` is the abstract namespace), and
the watchdog period in $WATCHDOG_USEC (only for the pid in $WATCHDOG_PID, when that is set).

The environment is read when a Notifier is made, never at import. Without $NOTIFY_SOCKET every call
does nothing, so the same code runs under systemd, in a terminal and in tests. Sending never raises:
a service manager that went away must not end a run.
"""

from __future__ import annotations

import os
import socket
import time

STATE_PATIENCE_S = 1.0  #: how long READY=1 and STOPPING=1 wait for room in a full notify queue


class Notifier:
    """Sends notify messages to the service manager, and WATCHDOG=1 at half the watchdog period."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self.address = address
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC")
        watchdog_pid = env.get("WATCHDOG_PID")
        if address and usec and usec.isdigit() and int(usec) > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6 / 2  #: systemd's advice: ping at half the period
        self._next_ping = 0.0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str, patience_s: float = 0.0) -> None:
        """Send one message; when the manager's queue is full, retry for up to `patience_s`, then drop it.

        A ping may be dropped (the next one follows), but READY=1 and STOPPING=1 are state changes
        the manager acts on, so those wait a little for room. Never for ever: a manager that stopped
        reading must not hang the run (a blocking socket did, for 55 s, in CI).
        """
        if self.address is None:
            return
        data = "\n".join(fields).encode()
        deadline = time.monotonic() + patience_s
        while True:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                self._sock.sendto(data, self.address)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return  # the queue stayed full: drop it
                time.sleep(0.01)
            except OSError:
                return  # the service manager is gone: nothing to do about it here

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []), f"MAINPID={os.getpid()}", patience_s=STATE_PATIENCE_S)

    def stopping(self) -> None:
        self.send("STOPPING=1", patience_s=STATE_PATIENCE_S)

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self, now: float | None = None) -> None:
        """Called from the loop on every turn; sends WATCHDOG=1 only when half the period passed."""
        if self.watchdog_s is None:
            return
        now = time.monotonic() if now is None else now
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_s
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
