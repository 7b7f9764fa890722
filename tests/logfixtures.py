"""Run logs for the log-inspection tests: real runs of the runner, and hand-written logs per the contract.

Real runs give the filter, summary, trace and timeline tests lines exactly as the core writes
them; the hand-written `ContractLog` covers what a real run cannot produce on demand (damaged
files, other hosts, exact job times) and writes lines field by field as the log contract says.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from conftest import wait_for  # noqa: F401  (re-exported for the log tests)

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
START = datetime(2026, 11, 26, 23, 30, 1, tzinfo=timezone.utc)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- hand-written logs ------------------------------------------------------------------------
class ContractLog:
    """Writes a run log line by line, with every field the contract puts on every line, in its order."""

    def __init__(self, folder: Path, name: str = "demo", start: datetime = START, host: str = HOST,
                 coordinator_pid: int = 4000, suffix: str = "3f2a") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.start = start
        self.host = host
        self.coordinator_pid = coordinator_pid
        self.run_id = f"{name}-{start:%Y%m%dT%H%M%SZ}-{suffix}"
        self.name = name
        self.path = folder / f"{self.run_id}.jsonl"
        self.path.write_text("")

    def stamp(self, seconds: float) -> str:
        moment = self.start + timedelta(seconds=seconds)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    def line(self, t: float, event: str, level: str = "info", *, role: str = "coordinator", pool: str | None = None,
             worker: str = "coordinator", pid: int | None = None, host: str | None = None, **extra: Any) -> dict[str, Any]:
        fields = {"timestamp": self.stamp(t), "level": level, "event": event, "run_id": self.run_id,
                  "host": host or self.host, "pid": pid or self.coordinator_pid, "role": role, "pool": pool, "worker": worker, **extra}
        self.write_raw(json.dumps(fields, separators=(",", ":")) + "\n")
        return fields

    def write_raw(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(text)

    # the contract's events
    def run_started(self, t: float = 0.0, pools: dict[str, Any] | None = None) -> None:
        pools = pools or {"bake": {"role": "producer", "processes": 1, "task": "demo:bake"},
                          "eat": {"role": "consumer", "processes": 2, "task": "demo:eat"}}
        self.line(t, "run.started", name=self.name, config="demo.yaml", start_method="fork", pools=pools,
                  log_file=str(self.path), results=None, coordinator_pid=self.coordinator_pid)

    def worker_started(self, t: float, worker: str, pool: str, pid: int, role: str = "consumer", restart: int = 0, host: str | None = None) -> None:
        self.line(t, "worker.started", role=role, pool=pool, worker=worker, pid=pid, host=host, restart=restart)

    def job_queued(self, t: float, job_id: int, pool: str, origin: str) -> None:
        self.line(t, "job.queued", pool=pool, job_id=job_id, origin=origin)

    def job_done(self, t: float, job_id: int, worker: str, pid: int, duration_ms: float, pool: str = "eat", attempt: int = 1, host: str | None = None) -> None:
        self.line(t, "job.done", role="consumer", pool=pool, worker=worker, pid=pid, host=host, job_id=job_id, attempt=attempt, duration_ms=duration_ms)

    def job_failed(self, t: float, job_id: int, worker: str, pid: int, duration_ms: float, error: str, pool: str = "eat", attempt: int = 1, host: str | None = None) -> None:
        self.line(t, "job.failed", "warning", role="consumer", pool=pool, worker=worker, pid=pid, host=host, job_id=job_id,
                  attempt=attempt, duration_ms=duration_ms, error=error, traceback=f"Traceback (most recent call last):\n{error}\n")

    def worker_crashed(self, t: float, worker: str, pid: int, job_id: int | None, pool: str = "eat", reason: str = "killed by SIGKILL, possibly out of memory") -> None:
        self.line(t, "worker.crashed", "error", role="consumer", pool=pool, worker=worker, pid=pid, code=-9, signal="SIGKILL",
                  reason=reason, job_id=job_id, requeued=0, traceback=None)
        if job_id is not None:  # the coordinator charges the running job to the dead worker
            self.line(t, "job.failed", "warning", pool=pool, worker=worker, job_id=job_id, attempt=1,
                      error=f"worker {worker} {reason}", origin="bake-1")

    def job_retried(self, t: float, job_id: int, attempt: int, pool: str = "eat", delay_ms: int = 500) -> None:
        self.line(t, "job.retried", pool=pool, job_id=job_id, attempt=attempt, delay_ms=delay_ms)

    def job_dead(self, t: float, job_id: int, attempts: int, error: str, pool: str = "eat") -> None:
        self.line(t, "job.dead", "error", pool=pool, job_id=job_id, attempts=attempts, error=error, origin="bake-1")

    def progress(self, t: float, produced: int, done: int, failed: int = 0, dead: int = 0, rate: float = 0.0) -> None:
        self.line(t, "progress", produced=produced, done=done, failed=failed, dead=dead, queued=0, in_flight=0, rate=rate, elapsed_s=t)

    def run_finished(self, t: float, status: str = "finished", **figures: Any) -> None:
        level = "error" if status == "failed" else "info"
        self.line(t, "run.finished", level, status=status, exit_code={"finished": 0, "failed": 1, "stopped": 130}[status],
                  duration_s=t, **figures)


#: the demo run's known figures: jobs 1-8 done on first try, job 9 crashed eat-1 then done, job 10 dead
DEMO_DURATIONS = {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0, 5: 50.0, 6: 60.0, 7: 70.0, 8: 80.0}


def write_demo_run(folder: Path, name: str = "demo", finished: bool = True, **kwargs: Any) -> ContractLog:
    """A hand-written run with known counts: 10 jobs, 9 done (one after its worker crashed), one dead."""
    log = ContractLog(folder, name=name, **kwargs)
    log.run_started(0.0)
    log.worker_started(0.1, "bake-1", "bake", 4001, role="producer")
    log.worker_started(0.1, "eat-1", "eat", 4002)
    log.worker_started(0.1, "eat-2", "eat", 4003)
    for job_id in range(1, 11):
        log.job_queued(0.2 + job_id / 100, job_id, "eat", "bake-1")
    for job_id, ms in DEMO_DURATIONS.items():
        worker, pid = ("eat-1", 4002) if job_id % 2 else ("eat-2", 4003)
        log.job_done(0.5 + job_id / 10, job_id, worker, pid, ms)
    log.progress(1.0, produced=10, done=5)
    log.worker_crashed(1.5, "eat-1", 4002, 9)
    log.job_retried(1.5, 9, 2)
    log.worker_started(1.6, "eat-1", "eat", 4004, restart=1)
    log.job_done(2.1, 9, "eat-1", 4004, 90.0, attempt=2)
    log.job_failed(2.2, 10, "eat-2", 4003, 5.0, "ValueError: bad bun 10")
    log.job_retried(2.2, 10, 2)
    log.job_failed(2.8, 10, "eat-2", 4003, 6.0, "ValueError: bad bun 10", attempt=2)
    log.job_dead(2.8, 10, 2, "ValueError: bad bun 10")
    log.progress(2.9, produced=10, done=9, failed=3, dead=1)
    if finished:
        log.run_finished(3.0, "failed", produced=10, done=9, failed=3, retried=2, dead=1, pending=0,
                         pools={"eat": {"done": 9, "failed": 3, "retried": 2, "dead": 1, "p50_ms": 50.0, "p95_ms": 90.0, "p99_ms": 90.0, "jobs_per_s": 3.0}},
                         workers={"bake-1": {"pool": "bake", "host": log.host, "done": 0, "failed": 0, "crashes": 0, "restarts": 0},
                                  "eat-1": {"pool": "eat", "host": log.host, "done": 5, "failed": 0, "crashes": 1, "restarts": 1},
                                  "eat-2": {"pool": "eat", "host": log.host, "done": 4, "failed": 2, "crashes": 0, "restarts": 0}})
    return log


# -- checks ---------------------------------------------------------------------------------
PHASES = {"X", "B", "E", "i", "I", "C", "M", "b", "e", "n", "s", "t", "f", "P", "N", "O", "D"}


def validate_trace_events(document: Any) -> list[dict[str, Any]]:
    """Check the Trace Event Format (JSON object form) as chrome://tracing and Perfetto read it."""
    assert isinstance(document, dict) and isinstance(document.get("traceEvents"), list)
    assert document.get("displayTimeUnit", "ms") in ("ms", "ns")
    named_threads: set[tuple[int, int]] = set()
    named_processes: set[int] = set()
    events = document["traceEvents"]
    for event in events:
        assert isinstance(event, dict), event
        assert isinstance(event.get("name"), str) and event["name"], event
        assert event.get("ph") in PHASES, event
        assert isinstance(event.get("pid"), int), event
        if "args" in event:
            assert isinstance(event["args"], dict), event
        if event["ph"] == "M":
            assert event["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index", "process_labels"), event
            assert isinstance(event["args"].get("name"), str), event
            if event["name"] == "thread_name":
                assert isinstance(event.get("tid"), int), event
                named_threads.add((event["pid"], event["tid"]))
            else:
                named_processes.add(event["pid"])
            continue
        assert isinstance(event.get("ts"), (int, float)) and event["ts"] >= 0, event
        assert event["pid"] in named_processes, f"process {event['pid']} used before it is named"
        if event["ph"] == "X":
            assert isinstance(event.get("dur"), (int, float)) and event["dur"] >= 0, event
        if event["ph"] in ("i", "I"):
            assert event.get("s", "t") in ("g", "p", "t"), event
        if event["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in event["args"].values()), event
            continue
        if event["ph"] in ("X", "B", "E") or (event["ph"] in ("i", "I") and event.get("s", "t") == "t"):
            assert isinstance(event.get("tid"), int), event
            assert (event["pid"], event["tid"]) in named_threads, f"track {event['pid']}/{event['tid']} has no thread_name"
    slices: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for event in events:
        if event["ph"] == "X":
            slices.setdefault((event["pid"], event["tid"]), []).append((event["ts"], event["ts"] + event["dur"]))
    for track in slices.values():  # slices on one track never overlap (they would have to nest)
        track.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(track, track[1:], strict=False)), track
    return events


# -- real runs -------------------------------------------------------------------------------
CRASHY_TASKS = """
    import os
    import time


    def produce(ctx, n=20):
        for number in range(1, n + 1):
            yield {"n": number}


    def consume(ctx, job):
        # job 7 kills its worker on the first try, job 9 always fails, job 11 fails once
        if ctx.job_id == 7 and ctx.attempt == 1:
            os._exit(3)
        if ctx.job_id == 9:
            raise ValueError("nine is cursed")
        if ctx.job_id == 11 and ctx.attempt == 1:
            raise RuntimeError("flaky")
        time.sleep(0.002)
        return job["n"]
"""

GATED_TASKS = """
    import os
    import time


    def produce(ctx, n=10, gate="gate"):
        for number in range(1, n + 1):
            while not os.path.exists(gate):  # the test opens the gate once its follower is reading
                time.sleep(0.01)
            yield {"n": number}


    def consume(ctx, job):
        ctx.log.info("item.seen", n=job["n"])
        return job["n"]
"""


class RealRun:
    """A finished `runner start` in its own folder, and its log."""

    def __init__(self, folder: Path, process: subprocess.CompletedProcess[str] | None = None) -> None:
        self.folder = folder
        self.process = process

    @property
    def logs_dir(self) -> Path:
        return self.folder / "logs"

    @property
    def log_path(self) -> Path:
        logs = [p for p in self.logs_dir.glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
        assert len(logs) == 1, f"expected one run log in {self.logs_dir}, found {logs}"
        return logs[0]

    @property
    def run_id(self) -> str:
        return self.log_path.name.removesuffix(".jsonl")

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        return [line for line in read_jsonl(self.log_path) if event is None or line["event"] == event]


def start_command(folder: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "runner", "start", "--config", str(config)]


def run_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_until(folder: Path, config: Path, code: int, needs: str = "", tries: int = 1) -> subprocess.CompletedProcess[str]:
    """Run a config to the end and expect exit `code` (no retry: an unexpected end is a bug to see)."""
    failures = []
    for _ in range(tries):
        shutil.rmtree(folder / "logs", ignore_errors=True)
        done = subprocess.run(start_command(folder, config), cwd=folder, capture_output=True, text=True, timeout=90, env=run_env())
        if done.returncode == code and needs in done.stdout + done.stderr:
            return done
        failures.append(f"exit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    raise AssertionError(f"{config.name}: no run ended with exit {code} in {tries} tries:\n" + "\n".join(failures))


def real_bakery_run(folder: Path) -> RealRun:
    """configs/bakery.yaml as shipped, with every job logged and fork for speed: 2 bakers x 50 buns, 3 eaters."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "configs" / "bakery.py", folder / "bakery.py")
    config = yaml.safe_load((ROOT / "configs" / "bakery.yaml").read_text())
    config["logs"] = {**config.get("logs", {}), "dir": "logs", "jobs": "all"}
    config["start_method"] = "fork"
    (folder / "bakery.yaml").write_text(yaml.safe_dump(config))
    return RealRun(folder, run_until(folder, folder / "bakery.yaml", 0))


def real_crashy_run(folder: Path) -> RealRun:
    """20 jobs on 2 workers: job 7 kills its worker once, job 9 dies after 2 tries, job 11 fails once."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "crashy.py").write_text(textwrap.dedent(CRASHY_TASKS))
    config = {
        "name": "crashy",
        "producers": [{"name": "prod", "task": "crashy:produce", "params": {"n": 20}}],
        "consumers": [{"name": "work", "task": "crashy:consume", "processes": 2, "retries": 1, "retry_backoff": "0.01s"}],
        "results": "results.jsonl",
        "logs": {"dir": "logs", "jobs": "all"},
        "start_method": "fork",
    }
    (folder / "crashy.yaml").write_text(yaml.safe_dump(config))
    return RealRun(folder, run_until(folder, folder / "crashy.yaml", 1, "dead"))


def start_gated_run(folder: Path, jobs: int = 10) -> subprocess.Popen[str]:
    """A run whose producer waits for `folder/gate` before each job: a live log that grows when the test says."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gated.py").write_text(textwrap.dedent(GATED_TASKS))
    config = {
        "name": "gated",
        "producers": [{"name": "prod", "task": "gated:produce", "params": {"n": jobs, "gate": str(folder / "gate")}}],
        "consumers": [{"name": "work", "task": "gated:consume", "processes": 1}],
        "logs": {"dir": "logs", "jobs": "all", "progress_interval": "0.2s"},
        "start_method": "fork",
    }
    (folder / "gated.yaml").write_text(yaml.safe_dump(config))
    with (folder / "stdout.txt").open("w") as out, (folder / "stderr.txt").open("w") as err:  # files: a full pipe blocks
        return subprocess.Popen(start_command(folder, folder / "gated.yaml"), cwd=folder, stdout=out, stderr=err, text=True,
                                env=run_env())


#: a tiny typer app with the log commands registered, for `python -c` subprocesses
TINY_APP = (
    "import sys, typer; from runner.cli.logs import register; "
    "app = typer.Typer(add_completion=False); register(app); "
    "app(sys.argv[1:], prog_name='runner')"
)


def tiny_app_command(*args: str) -> list[str]:
    return [sys.executable, "-c", TINY_APP, *args]
