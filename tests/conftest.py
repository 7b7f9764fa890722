"""Shared test helpers: real `runner` processes in a temporary folder, and deadline polls (no sleeps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# A shell without job control starts a background command (`.ci/run &`, `nohup pytest &`) with SIGINT
# ignored, and every process the tests start would inherit that: the runner rightly keeps a signal its
# caller ignores, so the tests of what SIGINT does would fail. The tests start from a terminal's state:
# a handler here is reset to the default at each exec, where an ignored signal would stay ignored.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition", interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Run:
    """A finished or running `runner start` in its own folder.

    Its stdout and stderr go to files (stdout.txt, stderr.txt in the folder), never to pipes: a
    coordinator writes every log line to stderr, and a pipe nobody reads blocks it after 64 KiB."""

    def __init__(self, folder: Path, process: subprocess.Popen[str], out: Path | None = None, err: Path | None = None) -> None:
        self.folder = folder
        self.process = process
        self._out = out
        self._err = err
        self.stdout = ""
        self.stderr = ""

    def wait(self, timeout: float = 60) -> int:
        if self._out is None:
            self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        else:
            self.process.wait(timeout=timeout)
            self.stdout = self._out.read_text(errors="replace")
            self.stderr = self._err.read_text(errors="replace") if self._err else ""
        return self.process.returncode

    @property
    def log_path(self) -> Path:
        logs = sorted((self.folder / "logs").glob("*.jsonl"))
        logs = [p for p in logs if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
        assert logs, f"no run log in {self.folder / 'logs'}"
        return logs[-1]

    @property
    def run_id(self) -> str:
        return self.log_path.name.removesuffix(".jsonl")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = read_jsonl(self.log_path)
        return [line for line in lines if name is None or line["event"] == name]

    def results(self, name: str = "results.jsonl") -> list[dict[str, Any]]:
        return read_jsonl(self.folder / name)

    def dead(self) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / "logs" / f"{self.run_id}.dead.jsonl")

    def pending(self) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / "logs" / f"{self.run_id}.pending.jsonl")


def start_run(folder: Path, config: dict[str, Any] | Path, *args: str, tasks: str | None = None,
              env: dict[str, str] | None = None) -> Run:
    """Start `runner start` in `folder` (a config dict is written there, with `tasks` as tasks.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        if tasks is not None:
            (folder / "tasks.py").write_text(textwrap.dedent(tasks))
        path = folder / "run.yaml"
        path.write_text(yaml.safe_dump(config))
    else:
        path = config
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    with out.open("w") as out_file, err.open("w") as err_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "runner", "start", "--config", str(path), *args],
            cwd=folder, stdout=out_file, stderr=err_file, text=True,
            env={**os.environ, **(env or {})},
        )
    return Run(folder, process, out, err)


def run_config(folder: Path, config: dict[str, Any] | Path, *args: str, tasks: str | None = None, timeout: float = 60) -> Run:
    run = start_run(folder, config, *args, tasks=tasks)
    run.wait(timeout)
    return run


def runner_cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def basic_config(tasks: str = "tasks", **consumer: Any) -> dict[str, Any]:
    """A small run: producer tasks:produce -> consumer tasks:consume, results to results.jsonl."""
    return {
        "name": "t",
        "producers": [{"name": "prod", "task": f"{tasks}:produce", "params": {"n": 20}}],
        "consumers": [{"name": "work", "task": f"{tasks}:consume", "processes": 2, **consumer}],
        "results": "results.jsonl",
        "logs": {"dir": "logs"},
        "start_method": "fork",
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def marks(folder: Path, pattern: str) -> list[Path]:
    """The files `mark` (in TASK_HELPERS) has finished matching `pattern`: not its `.tmp<pid>` files, which
    a glob can list just before they are renamed away."""
    return [p for p in folder.glob(pattern) if ".tmp" not in p.name]


#: Helpers for task modules written by tests (prepend to a `tasks=` text): files are how a test and
#: the job processes synchronise; every wait inside a task has its own deadline.
TASK_HELPERS = '''
import os
import time


def mark(name, text=""):
    """Create file `name` atomically (a reader never sees it half written)."""
    tmp = f"{name}.tmp{os.getpid()}"
    with open(tmp, "w") as out:
        out.write(text)
    os.replace(tmp, name)


def wait_file(name, limit=30.0):
    deadline = time.monotonic() + limit
    while not os.path.exists(name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no file {name} after {limit}s")
        time.sleep(0.005)


def result(ctx, job):
    return {"i": job["i"], "attempt": ctx.attempt, "pid": os.getpid(), "worker": ctx.worker}
'''


def assert_each_once(results: list[dict[str, Any]], expected: set[int] | range) -> None:
    """Every expected job (by payload `i`) is in the results exactly once, and no job id twice."""
    seen = [r["result"]["i"] for r in results]
    assert sorted(seen) == sorted(expected), f"jobs done: {sorted(seen)}"
    ids = [r["job_id"] for r in results]
    assert len(ids) == len(set(ids)), f"a job id twice in the results: {sorted(ids)}"


def live_events(run: Run, name: str) -> list[dict[str, Any]]:
    """Events of a run still going: only complete lines of its log so far (warnings are flushed at once)."""
    logs = [p for p in (run.folder / "logs").glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
    if not logs:
        return []
    text = logs[0].read_text()
    lines = text.splitlines(keepends=True)
    return [event for event in (json.loads(line) for line in lines if line.endswith("\n")) if event["event"] == name]


# -- multi-host helpers (tests/test_multihost.py, tests/test_netns.py) ------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Command:
    """A `runner` command started in its own process group, its output in files (never a full pipe)."""

    def __init__(self, folder: Path, label: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.label = label
        self.out_path = folder / f"{label}.out"
        self.err_path = folder / f"{label}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text() if self.out_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)

    def kill_group(self, signum: int = 9) -> None:
        """Kill the command and everything it started (its whole process group)."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


class HostRun(Run):
    """A `runner start` whose output goes to files, so a long run never blocks on a full pipe."""

    def __init__(self, folder: Path, proc: Command) -> None:
        super().__init__(folder, proc.process)
        self.proc = proc

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        self.stdout, self.stderr = self.proc.stdout, self.proc.stderr
        return code


def start_host_run(folder: Path, config: dict[str, Any], *args: str, tasks: str | None = None,
                   env: dict[str, str] | None = None, prefix: list[str] | None = None) -> HostRun:
    """`runner start` of a config dict in `folder` (tasks.py from `tasks`), output to coordinator.out/.err.

    `prefix` wraps the command (e.g. ["ip", "netns", "exec", NS])."""
    folder.mkdir(parents=True, exist_ok=True)
    if tasks is not None:
        (folder / "tasks.py").write_text(textwrap.dedent(tasks))
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [*(prefix or []), sys.executable, "-m", "runner", "start", "--config", str(path), *args]
    return HostRun(folder, Command(folder, "coordinator", argv, env))


def start_worker(folder: Path, address: str, name: str, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> Command:
    """`runner worker --connect ADDRESS --name NAME ...` in `folder`, in its own process group."""
    argv = [*(prefix or []), sys.executable, "-m", "runner", "worker", "--connect", address, "--name", name, *args]
    return Command(folder, f"worker-{name}", argv, env)


def log_events(folder: Path, name: str | None = None, **match: Any) -> list[dict[str, Any]]:
    """Complete lines of the (single) run log in folder/logs so far, by event name and field values."""
    logs_dir = folder / "logs"
    logs = [p for p in logs_dir.glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))] if logs_dir.is_dir() else []
    found = []
    for path in logs:
        for line in path.read_text().splitlines(keepends=True):
            if not line.endswith("\n") or not line.strip():
                continue
            event = json.loads(line)
            if (name is None or event["event"] == name) and all(event.get(k) == v for k, v in match.items()):
                found.append(event)
    return found


# -- tests that need the machine (root, podman, systemd-nspawn) --------------------------------
def skip_or_fail(reason: str) -> None:
    """Skip a test whose tools are missing here, in one line; in CI (CI=true) that is a failure instead,
    so that a CI machine that lost a tool cannot pass by skipping the tests that need it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, so this cannot be skipped: {reason}", pytrace=False)
    pytest.skip(reason)


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path` (a disk that fills), unmounted after; the test is skipped where none can be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
