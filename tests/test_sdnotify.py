"""systemd's Type=notify: READY=1, WATCHDOG=1 and STOPPING=1 read from a datagram socket the test binds."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.sdnotify import Notifier
from conftest import TASK_HELPERS, free_port, start_host_run, start_worker, wait_for

pytestmark = pytest.mark.timeout(300)  # real runs on a busy 2-core machine

TASKS = TASK_HELPERS + '''
def produce(ctx, n=6):
    for i in range(n):
        yield {"i": i}


def consume(ctx, job):
    wait_file("go")  # the run lasts until the test has seen its watchdog pings
    return result(ctx, job)
'''


class NotifySocket:
    """The service manager's end: a bound AF_UNIX datagram socket, read all the time as systemd does.

    A reader that reads only while a test polls lets the kernel's queue (10 datagrams by default) fill
    while the test waits for something else; the runner then drops messages, as it must.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read_all_the_time, daemon=True)
        self._reader.start()

    def _read_all_the_time(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def read(self) -> list[dict[str, str]]:
        """The messages so far."""
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(5)
        self.sock.close()

    def wait_for(self, key: str, value: str, count: int = 1) -> list[dict[str, str]]:
        return wait_for(lambda: len([m for m in self.read() if m.get(key) == value]) >= count and self.read(),
                        timeout=60, what=f"{count} x {key}={value} on the notify socket")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def config() -> dict[str, object]:
    return {"name": "sd", "producers": [{"name": "prod", "task": "tasks:produce"}],
            "consumers": [{"name": "work", "task": "tasks:consume", "processes": 1}], "start_method": "fork"}


def test_runner_start_sends_ready_then_watchdog_pings_then_stopping(folder: Path, notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
    run = start_host_run(folder, config(), tasks=TASKS, env=env)
    try:
        notify.wait_for("READY", "1")
        ready = next(m for m in notify.read() if m.get("READY") == "1")
        assert ready["MAINPID"] == str(run.process.pid)
        notify.wait_for("WATCHDOG", "1", count=3)  # while jobs wait, the loop goes on turning and pinging
        assert "STOPPING" not in {k for m in notify.read() for k in m}
        (folder / "go").write_text("")
        assert run.wait(60) == 0
        notify.wait_for("STOPPING", "1")
        keys = [next(iter(m)) for m in notify.read()]
        assert keys.index("READY") < keys.index("WATCHDOG") < keys.index("STOPPING")
    finally:
        run.proc.kill_group()


def test_runner_worker_sends_ready_and_watchdog_pings(folder: Path, notify: NotifySocket) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    cfg = config()
    cfg["consumers"][0]["processes"] = 0  # type: ignore[index]
    run = start_host_run(folder, cfg, "--bind", address, tasks=TASKS)
    worker = start_worker(folder, address, "hostb", "--processes", "1",
                          env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
    try:
        notify.wait_for("READY", "1")
        notify.wait_for("WATCHDOG", "1", count=3)
        (folder / "go").write_text("")
        assert run.wait(60) == 0
        assert worker.wait(60) == 0
        notify.wait_for("STOPPING", "1")
    finally:
        worker.kill_group()
        run.proc.kill_group()


def test_without_notify_socket_nothing_is_sent_and_abstract_names_work() -> None:
    assert not Notifier({}).enabled
    Notifier({}).ready()  # no socket: nothing happens, nothing raises
    assert Notifier({"NOTIFY_SOCKET": "@runner-test"}).address == "\0runner-test"
    other = Notifier({"NOTIFY_SOCKET": "/nonexistent/sock", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None  # the watchdog is for another process
    other.ready()  # a socket that is gone: ignored


def test_a_full_queue_drops_pings_and_state_messages_wait_for_room(tmp_path: Path) -> None:
    """A manager that stops reading: pings are dropped at once; a state message waits until there is room."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify.sock"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        for _ in range(200):  # far more than the kernel queues (net.unix.max_dgram_qlen, 10 by default)
            notifier.send("WATCHDOG=1")  # never blocks: the test would time out
        manager.settimeout(30)
        drained = threading.Event()

        def make_room() -> None:
            manager.recv(4096)  # one slot free is enough
            drained.set()

        reader = threading.Thread(target=make_room)
        reader.start()
        notifier.send("STOPPING=1", patience_s=60)
        reader.join(30)
        assert drained.is_set()
        got = []
        manager.settimeout(0.1)
        try:
            while True:
                got.append(manager.recv(4096))
        except TimeoutError:
            pass
        assert got[-1] == b"STOPPING=1"
    finally:
        notifier.close()
        manager.close()
