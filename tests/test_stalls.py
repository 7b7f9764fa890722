"""Stuck jobs and memory limits through the CLI: job.stalled with the stack (blocked in time.sleep and in
select), stall_action kill, `runner status --stacks` (locally and on a worker host), memory_limit, max_rss.

Tests and job processes synchronise on files and log lines (conftest), never on sleeps.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TASK_HELPERS,
    Command,
    HostRun,
    assert_each_once,
    basic_config,
    free_port,
    live_events,
    log_events,
    runner_cli,
    start_host_run,
    start_run,
    start_worker,
    wait_for,
)

from runner.config import load_config, parse_size
from runner.errors import ConfigError
from runner.process.handle import describe_exit
from runner.process.memory import format_bytes, read_oom_kills

pytestmark = pytest.mark.timeout(150)

TASKS = TASK_HELPERS + '''
import select


def produce(ctx, n=6, hold_after=None):
    for i in range(n):
        if i == hold_after:
            wait_file("go", 60)
        yield {"i": i}


def sleep_until_released(limit=60.0):
    deadline = time.monotonic() + limit
    while not os.path.exists("release") and time.monotonic() < deadline:
        time.sleep(0.2)


def select_until_released(limit=60.0):
    deadline = time.monotonic() + limit
    while not os.path.exists("release") and time.monotonic() < deadline:
        select.select([], [], [], 0.5)


def stuck(ctx, job):
    """Job 2, first attempt: a heartbeat with progress, then blocked (in sleep or in select) until released."""
    if job["i"] == 2 and ctx.attempt == 1:
        ctx.heartbeat(step="waiting", rows=12)
        mark(f"stuck.{ctx.worker}")
        if ctx.params.get("block") == "select":
            select_until_released()
        else:
            sleep_until_released()
    return result(ctx, job)


def beating(ctx, job):
    """A long job that is alive: it heartbeats all along, so it never counts as stalled."""
    if job["i"] == 1:
        for n in range(40):
            ctx.heartbeat(n=n)
            time.sleep(0.05)
    return result(ctx, job)


HOARD = []


def hog(ctx, job):
    """Job 1, first attempt: 300 MB resident, then wait to be killed."""
    if job["i"] == 1 and ctx.attempt == 1:
        HOARD.append(b"x" * 300_000_000)
        sleep_until_released()
    return result(ctx, job)


def leak(ctx, job):
    """Job 1 keeps 200 MB for good: its process goes over max_rss and is recycled after the job."""
    if job["i"] == 1:
        HOARD.append(b"x" * 200_000_000)
    return result(ctx, job)
'''


def config(task: str, n: int = 6, processes: int = 1, **consumer: Any) -> dict[str, Any]:
    cfg = basic_config(**consumer)
    cfg["producers"][0]["params"] = {"n": n}
    cfg["consumers"][0].update(task=f"tasks:{task}", processes=processes)
    return cfg


def first_stall(folder: Path) -> dict[str, Any]:
    return wait_for(lambda: [e for e in log_events(folder, "job.stalled") if e.get("stack")], timeout=60, what="job.stalled")[0]


@pytest.mark.parametrize("block", ["sleep", "select"])
def test_a_stalled_job_is_reported_with_its_stack(tmp_path: Path, block: str) -> None:
    cfg = config("stuck", stall_timeout="0.5s", params={"block": block})
    run = start_run(tmp_path, cfg, tasks=TASKS)
    try:
        stall = first_stall(tmp_path)
    finally:
        (tmp_path / "release").touch()
    assert run.wait(60) == 0, run.stderr[-3000:]
    function = "sleep_until_released" if block == "sleep" else "select_until_released"
    assert f"in {function}" in stall["stack"] and "in stuck" in stall["stack"], stall["stack"]
    assert "in watch" not in stall["stack"]  # the runner's own helper thread is left out
    assert stall["job_id"] == 3 and stall["attempt"] == 1 and stall["worker"] == "work-1" and stall["pool"] == "work"
    assert stall["action"] == "warn" and stall["stall_timeout"] == 0.5 and stall["level"] == "warning"
    assert stall["progress"] == {"step": "waiting", "rows": 12}
    assert stall["running_s"] >= 0.5 and stall["silent_s"] >= 0.5
    assert_each_once(run.results(), range(6))  # warned, not killed: the job finishes once released
    assert not run.events("job.failed")


def test_a_job_that_heartbeats_is_not_stalled(tmp_path: Path) -> None:
    run = start_run(tmp_path, config("beating", n=3, stall_timeout="1s"), tasks=TASKS)
    assert run.wait(60) == 0, run.stderr[-3000:]
    assert not run.events("job.stalled")
    assert_each_once(run.results(), range(3))


def test_stall_action_kill_retries_the_job_charged_as_stalled(tmp_path: Path) -> None:
    cfg = config("stuck", stall_timeout="0.5s", stall_action="kill", retries=1)
    run = start_run(tmp_path, cfg, tasks=TASKS)
    assert run.wait(60) == 0, run.stderr[-3000:]
    stall = run.events("job.stalled")[0]
    assert stall["action"] == "kill" and "in sleep_until_released" in stall["stack"]
    failed = run.events("job.failed")
    assert len(failed) == 1 and failed[0]["job_id"] == 3 and failed[0]["cause"] == "stalled", failed
    assert re.match(r"worker work-1 killed: stalled, no heartbeat for [\d.]+s \(stall_timeout 0.5s\)", failed[0]["error"])
    crashed = run.events("worker.crashed")
    assert crashed[0]["cause"] == "stalled" and crashed[0]["signal"] == "SIGKILL" and crashed[0]["job_id"] == 3
    assert [r["result"]["attempt"] for r in run.results() if r["result"]["i"] == 2] == [2]
    assert_each_once(run.results(), range(6))
    traced = runner_cli("logs", "trace", "3", "--logs", "logs", cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    words = " ".join(traced.stdout.split())  # the table wraps its detail column where the path's length puts it
    assert "stalled" in words and "in sleep_until_released" in words, traced.stdout
    assert "crashed: worker work-1 killed: stalled" in words, traced.stdout


def test_status_stacks_shows_the_busy_process_and_its_progress(tmp_path: Path) -> None:
    run = start_run(tmp_path, config("stuck", stall_timeout=None), tasks=TASKS)
    try:
        wait_for(lambda: (tmp_path / "stuck.work-1").exists(), timeout=60, what="job 3 blocked")
        # the progress message travels after the heartbeat: wait for status to show it
        status = wait_for(lambda: _status_json(tmp_path, "progress"), timeout=60, what="progress in runner status")
        proc = next(p for p in status["processes"] if p["worker"] == "work-1")
        assert proc["job_id"] == 3 and proc["progress"] == {"step": "waiting", "rows": 12} and proc["rss"] > 0
        shown = runner_cli("status", "--stacks", "--logs", "logs", cwd=tmp_path, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert "progress step=waiting rows=12" in shown.stdout, shown.stdout
        assert re.search(r"work-1 \(pid \d+\): job 3 for [\d.]+s", shown.stdout), shown.stdout
        assert "in sleep_until_released" in shown.stdout and "in stuck" in shown.stdout, shown.stdout
        as_json = json.loads(runner_cli("status", "--stacks", "--json", "--logs", "logs", cwd=tmp_path, timeout=30).stdout)
        assert [s["job_id"] for s in as_json["stacks"]] == [3]
    finally:
        (tmp_path / "release").touch()
    assert run.wait(60) == 0, run.stderr[-3000:]
    assert not run.events("job.stalled")  # stall_timeout: null turns detection off


def _status_json(folder: Path, key: str) -> dict[str, Any] | None:
    shown = runner_cli("status", "--json", "--logs", "logs", cwd=folder, timeout=30)
    if shown.returncode != 0:
        return None
    status = json.loads(shown.stdout)
    return status if any(p.get(key) for p in status["processes"]) else None


def test_memory_limit_kills_the_process_and_charges_the_job(tmp_path: Path) -> None:
    cfg = config("hog", n=4, memory_limit="200MB", retries=1)
    run = start_run(tmp_path, cfg, tasks=TASKS)
    try:
        assert run.wait(60) == 0, run.stderr[-3000:]
    finally:
        (tmp_path / "release").touch()
    failed = run.events("job.failed")
    assert len(failed) == 1 and failed[0]["job_id"] == 2 and failed[0]["cause"] == "memory", failed
    assert re.fullmatch(r"worker work-1 killed: RSS [\d.]+ MiB over memory_limit 190.7 MiB", failed[0]["error"]), failed[0]["error"]
    crashed = run.events("worker.crashed")[0]
    assert crashed["cause"] == "memory" and crashed["signal"] == "SIGKILL"
    assert_each_once(run.results(), range(4))


def test_max_rss_recycles_the_process_after_its_job(tmp_path: Path) -> None:
    cfg = config("leak", n=6, max_rss="150MB")
    cfg["producers"][0]["params"]["hold_after"] = 3  # the run cannot end before the recycling is seen
    run = start_run(tmp_path, cfg, tasks=TASKS)
    try:
        exited = wait_for(lambda: [e for e in live_events(run, "worker.exited") if e["reason"] == "memory"], timeout=60, what="recycling")[0]
    finally:
        (tmp_path / "go").touch()
    assert run.wait(60) == 0, run.stderr[-3000:]
    assert exited["worker"] == "work-1" and exited["code"] == 0 and exited["rss"] > 150_000_000 and exited["max_rss"] == 150_000_000
    assert [e["restart"] for e in run.events("worker.started") if e["worker"] == "work-1"] == [0, 1]
    assert not run.events("job.failed") and not run.events("worker.crashed")
    assert_each_once(run.results(), range(6))


# -- a worker host on loopback ----------------------------------------------------------------
@pytest.fixture
def cleanup() -> Iterator[list[Command | HostRun]]:
    started: list[Command | HostRun] = []
    yield started
    for item in started:
        command = item.proc if isinstance(item, HostRun) else item
        if command.process.poll() is None:
            command.kill_group(signal.SIGKILL)
            command.process.wait(10)


def test_worker_host_stall_and_status_stacks(tmp_path: Path, cleanup: list[Command | HostRun]) -> None:
    bind = f"tcp://127.0.0.1:{free_port()}"
    cfg = config("stuck", processes=0, stall_timeout="0.5s", params={"block": "select"})
    cfg["consumers"][0]["min_processes"] = 0
    run = start_host_run(tmp_path, cfg, "--bind", bind, tasks=TASKS)
    cleanup.append(run)
    wait_for(lambda: log_events(tmp_path, "run.started") or run.process.poll() is not None, timeout=60, what="run.started")
    remote = start_worker(tmp_path, bind, "hostb", "--processes", "1")
    cleanup.append(remote)
    try:
        stall = first_stall(tmp_path)
        assert stall["host"] == "hostb" and stall["worker"] == "work-1" and stall["job_id"] == 3
        assert "in select_until_released" in stall["stack"] and stall["progress"] == {"step": "waiting", "rows": 12}
        shown = runner_cli("status", "--stacks", "--logs", "logs", cwd=tmp_path, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"hostb/work-1 \(pid \d+\): job 3 for [\d.]+s", shown.stdout), shown.stdout
        assert "in select_until_released" in shown.stdout, shown.stdout
    finally:
        (tmp_path / "release").touch()
    assert run.wait(60) == 0, run.stderr[-3000:]
    assert remote.wait(15) == 0, remote.stderr[-2000:]
    assert_each_once(run.results(), range(6))


def test_worker_host_memory_limit(tmp_path: Path, cleanup: list[Command | HostRun]) -> None:
    bind = f"tcp://127.0.0.1:{free_port()}"
    cfg = config("hog", n=4, processes=0, memory_limit="200MB", retries=1)
    cfg["consumers"][0]["min_processes"] = 0
    run = start_host_run(tmp_path, cfg, "--bind", bind, tasks=TASKS)
    cleanup.append(run)
    remote = start_worker(tmp_path, bind, "hostb", "--processes", "1")
    cleanup.append(remote)
    try:
        assert run.wait(60) == 0, run.stderr[-3000:]
    finally:
        (tmp_path / "release").touch()
    failed = run.events("job.failed")
    assert len(failed) == 1 and failed[0]["cause"] == "memory" and failed[0]["host"] == "hostb", failed
    assert "over memory_limit 190.7 MiB" in failed[0]["error"]
    assert_each_once(run.results(), range(4))


# -- the pieces ---------------------------------------------------------------------------------
def test_sizes_and_limits_in_the_config(tmp_path: Path) -> None:
    assert parse_size("200MB") == 200_000_000 and parse_size("2GiB") == 2 * 1024**3 and parse_size(4096) == 4096
    assert parse_size("512Mi") == 512 * 1024**2
    assert format_bytes(2.1 * 1024**3) == "2.1 GiB" and format_bytes(2 * 1024**3) == "2 GiB"
    path = tmp_path / "run.yaml"
    path.write_text("name: t\nproducers: [{name: p, task: 'm:f'}]\n"
                    "consumers: [{name: c, task: 'm:g', stall_action: nap, memory_limit: lots}]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "stall_action" in message and "expected a size such as 200MB" in message, message
    path.write_text("name: t\nproducers: [{name: p, task: 'm:f'}]\nconsumers: [{name: c, task: 'm:g', stall_timeout: 0}]\n")
    with pytest.raises(ConfigError, match="stall_timeout must be above 0"):
        load_config(path)
    path.write_text("name: t\nproducers: [{name: p, task: 'm:f'}]\nconsumers: [{name: c, task: 'm:g'}]\n")
    consumer = load_config(path).run.consumers[0]
    assert consumer.stall_timeout == 300.0 and consumer.stall_action == "warn" and consumer.max_rss is None


def test_oom_kills_are_named_when_the_cgroup_count_rose(tmp_path: Path) -> None:
    assert describe_exit(-9, oom=True) == ("SIGKILL", "killed by SIGKILL: out of memory")
    assert describe_exit(-9) == ("SIGKILL", "killed by SIGKILL, possibly out of memory")
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert read_oom_kills(events) == 2
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert read_oom_kills(tmp_path / "memory.oom_control") == 5
    assert read_oom_kills(tmp_path / "missing") is None
