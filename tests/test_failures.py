"""Failure paths with real processes: crashes, poison jobs, timeouts, crash loops, bad data, idle and recycled workers.

Tests and job processes synchronise on files (see conftest.TASK_HELPERS), never on sleeps.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import TASK_HELPERS, assert_each_once, basic_config, marks, run_config, start_run, wait_for

pytestmark = pytest.mark.timeout(60)

TASKS = TASK_HELPERS + '''

def produce(ctx, n=20, fail_at=None, bad_at=None, pause=0.0, pause_every=0):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"producer broke after {i} jobs")
        if pause and pause_every and i and i % pause_every == 0:
            time.sleep(pause)
        yield {"i": i, "bad": {1, 2}} if i == bad_at else {"i": i}
    mark("produced-all")


def block_once(ctx, job):
    """Job 3, first attempt: say which process runs it, then wait for a file that never comes."""
    if job["i"] == 3 and ctx.attempt == 1:
        mark("victim.pid", str(os.getpid()))
        wait_file("never")
    return result(ctx, job)


def exit_once(ctx, job):
    if job["i"] == 2 and ctx.attempt == 1:
        os._exit(1)
    return result(ctx, job)


def poison(ctx, job):
    if job["i"] == 5:
        raise ValueError(f"poison {job['i']}")
    return result(ctx, job)


def suicide(ctx, job):
    if job["i"] == 4:
        os.kill(os.getpid(), 9)
    return result(ctx, job)


def slow_once(ctx, job):
    if job["i"] == 1 and ctx.attempt == 1:
        time.sleep(30)
    return result(ctx, job)


def ok(ctx, job):
    return result(ctx, job)


def bad_result(ctx, job):
    if job["i"] == 6:
        return {"i": 6, "bad": {1, 2}}
    return result(ctx, job)


def locked(ctx, job):
    """The first job to get here holds lock L and blocks until the test kills its process."""
    mark(f"waiting-{job['i']}-{ctx.attempt}", str(os.getpid()))
    with ctx.lock("L"):
        try:
            fd = os.open("holder.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return result(ctx, job)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        mark("holder.ready")
        wait_file("never")
'''


def config(task: str, n: int = 20, producer: dict[str, Any] | None = None, **consumer: Any) -> dict[str, Any]:
    cfg = basic_config(**{"retries": 2, "retry_backoff": "10ms", **consumer})
    cfg["consumers"][0]["task"] = f"tasks:{task}"
    cfg["producers"][0]["params"] = {"n": n, **(producer or {})}
    cfg["queue"] = {"maxsize": 100, "batch": 4}
    return cfg


def crashed(run: Any) -> list[dict[str, Any]]:
    return run.events("worker.crashed")


def test_consumer_sigkilled_mid_job_loses_nothing(tmp_path: Path) -> None:
    run = start_run(tmp_path, config("block_once"), tasks=TASKS)
    try:
        pid = int(wait_for(lambda: (tmp_path / "victim.pid").exists() and (tmp_path / "victim.pid").read_text(), what="job 3 to start"))
        os.kill(pid, signal.SIGKILL)
        assert run.wait(45) == 0, run.stderr[-3000:]
    finally:
        run.process.kill()
    results = run.results()
    assert_each_once(results, range(20))
    assert {r["result"]["i"]: r["result"]["attempt"] for r in results}[3] == 2
    victim = [e for e in crashed(run) if e["pid"] == pid]
    assert len(victim) == 1, crashed(run)
    assert victim[0]["reason"] == "killed by SIGKILL, possibly out of memory"
    assert victim[0]["signal"] == "SIGKILL" and victim[0]["job_id"] is not None
    failed = run.events("job.failed")
    assert any(e["job_id"] == victim[0]["job_id"] and "SIGKILL" in e["error"] for e in failed), failed
    assert any(e["job_id"] == victim[0]["job_id"] and e["attempt"] == 2 for e in run.events("job.retried"))
    finished = run.events("run.finished")[0]
    assert finished["done"] == 20 and finished["dead"] == 0 and finished["status"] == "finished"


def test_os_exit_on_first_attempt_is_retried(tmp_path: Path) -> None:
    run = run_config(tmp_path, config("exit_once"), tasks=TASKS)
    assert run.process.returncode == 0, run.stderr[-3000:]
    results = run.results()
    assert_each_once(results, range(20))
    assert {r["result"]["i"]: r["result"]["attempt"] for r in results}[2] == 2
    [crash] = crashed(run)
    assert crash["code"] == 1 and crash["reason"] == "exited with code 1" and crash["job_id"] is not None


def test_poison_job_is_dead_lettered_after_its_retries(tmp_path: Path) -> None:
    run = run_config(tmp_path, config("poison", retries=2), tasks=TASKS)
    assert run.process.returncode == 1, run.stderr[-3000:]
    assert_each_once(run.results(), set(range(20)) - {5})
    dead = run.dead()
    assert len(dead) == 1
    [line] = dead
    assert set(line) >= {"job_id", "pool", "payload", "error", "traceback", "attempts"}
    assert line["pool"] == "work" and line["payload"] == {"i": 5} and line["attempts"] == 3
    assert line["error"] == "ValueError: poison 5"
    assert "Traceback" in line["traceback"] and "ValueError: poison 5" in line["traceback"]
    failures = [e for e in run.events("job.failed") if e["job_id"] == line["job_id"]]
    assert sorted(e["attempt"] for e in failures) == [1, 2, 3]
    assert [e["attempts"] for e in run.events("job.dead")] == [3]
    finished = run.events("run.finished")[0]
    assert finished["status"] == "failed" and finished["dead"] == 1 and finished["done"] == 19
    assert finished["dead_file"].endswith(".dead.jsonl")
    assert "dead: 1 job(s)" in run.stdout


def test_job_that_kills_its_process_every_time_ends_dead(tmp_path: Path) -> None:
    run = run_config(tmp_path, config("suicide", retries=1), tasks=TASKS)
    assert run.process.returncode == 1, run.stderr[-3000:]
    assert_each_once(run.results(), set(range(20)) - {4})
    [line] = run.dead()
    assert line["payload"] == {"i": 4} and line["attempts"] == 2
    assert "killed by SIGKILL" in line["error"]
    assert len(crashed(run)) == 2
    assert not run.events("pool.failed")  # a job's crashes are charged to the job, not the pool


def test_job_timeout_kills_and_retries(tmp_path: Path) -> None:
    run = run_config(tmp_path, config("slow_once", job_timeout="300ms"), tasks=TASKS)
    assert run.process.returncode == 0, run.stderr[-3000:]
    results = run.results()
    assert_each_once(results, range(20))
    assert {r["result"]["i"]: r["result"]["attempt"] for r in results}[1] == 2
    [crash] = crashed(run)
    assert "job_timeout" in crash["reason"] and crash["job_id"] is not None
    [failed] = run.events("job.failed")
    assert "exceeded job_timeout 0.3s" in failed["error"]
    assert run.events("run.finished")[0]["duration_s"] < 20


def test_crash_loop_at_start_up_fails_the_pool(tmp_path: Path) -> None:
    (tmp_path / "prod.py").write_text("def produce(ctx, n=10):\n    yield from ({'i': i} for i in range(n))\n")
    broken = TASKS + '''
import multiprocessing
if multiprocessing.parent_process() is not None:
    raise ImportError("this module cannot be imported in a child process")
'''
    cfg = config("poison", restart_limit=4)
    cfg["producers"][0]["task"] = "prod:produce"
    cfg["start_method"] = "spawn"
    run = run_config(tmp_path, cfg, tasks=broken, timeout=45)
    assert run.process.returncode == 1, run.stderr[-3000:]
    [failed] = run.events("pool.failed")
    assert failed["pool"] == "work"
    assert "4 processes in a row died before finishing a job" in failed["reason"]
    assert "cannot be imported in a child process" in failed["reason"]
    finished = run.events("run.finished")[0]
    assert finished["status"] == "failed" and failed["reason"] == finished["error"]
    assert finished["duration_s"] < 20
    assert "failed: pool 'work'" in run.stdout
    assert all("ImportError" in e["reason"] or "cannot be imported" in e["reason"] for e in crashed(run))
    # nothing produced is lost: what was not done is pending
    produced = finished["produced"]
    assert len(run.pending()) + finished["done"] + finished["dead"] == produced


def test_producer_that_raises_midway(tmp_path: Path) -> None:
    run = run_config(tmp_path, config("poison", producer={"fail_at": 10}, retries=0), tasks=TASKS)
    assert run.process.returncode == 1, run.stderr[-3000:]
    assert_each_once(run.results(), set(range(10)) - {5})
    [failed] = run.events("producer.failed")
    assert failed["error"] == "RuntimeError: producer broke after 10 jobs" and "Traceback" in failed["traceback"]
    assert failed["jobs"] == 10
    finished = run.events("run.finished")[0]
    assert finished["status"] == "failed" and finished["produced"] == 10


def test_unencodable_payload_and_result_fail_only_their_job(tmp_path: Path) -> None:
    run = run_config(tmp_path, config("bad_result", producer={"bad_at": 3}, retries=0), tasks=TASKS)
    assert run.process.returncode == 1, run.stderr[-3000:]
    assert_each_once(run.results(), set(range(20)) - {3, 6})
    assert len(run.dead()) == 2, run.dead()
    payload = next(line for line in run.dead() if "'i': 3" in str(line["payload"]))
    assert "payload is not msgpack-encodable" in payload["error"] and "set" in payload["error"]
    bad = next(line for line in run.dead() if line["payload"] == {"i": 6})
    assert "result" in bad["error"] and "msgpack" in bad["error"] and "set" in bad["error"], bad["error"]
    assert not crashed(run)
    finished = run.events("run.finished")[0]
    assert finished["produced"] == 20 and finished["done"] == 18 and finished["dead"] == 2


@pytest.mark.parametrize("least", [1, 0])
def test_slow_producer_short_idle_timeout_loses_nothing(tmp_path: Path, least: int) -> None:
    cfg = config("ok", n=12, producer={"pause": 0.4, "pause_every": 3}, idle_timeout="200ms", min_processes=least)
    run = run_config(tmp_path, cfg, tasks=TASKS)
    assert run.process.returncode == 0, run.stderr[-3000:]
    assert_each_once(run.results(), range(12))
    idle = [e for e in run.events("worker.exited") if e["reason"] == "idle"]
    assert idle, run.events("worker.exited")
    assert all(e["code"] == 0 for e in idle)
    assert not crashed(run)


def test_max_jobs_per_process_recycles(tmp_path: Path) -> None:
    run = run_config(tmp_path, config("ok", max_jobs_per_process=3), tasks=TASKS)
    assert run.process.returncode == 0, run.stderr[-3000:]
    results = run.results()
    assert_each_once(results, range(20))
    recycled = [e for e in run.events("worker.exited") if e["reason"] == "recycled"]
    assert len(recycled) >= 4
    per_pid: dict[int, int] = {}
    for r in results:
        per_pid[r["result"]["pid"]] = per_pid.get(r["result"]["pid"], 0) + 1
    assert max(per_pid.values()) <= 3, per_pid
    assert not crashed(run)


def test_lock_holder_dies_next_waiter_proceeds(tmp_path: Path) -> None:
    cfg = config("locked", n=10, retries=1)
    cfg["queue"]["batch"] = 2  # the holder's process can hold 4 jobs at most: the other one gets the rest
    run = start_run(tmp_path, cfg, tasks=TASKS)
    try:
        wait_for(lambda: (tmp_path / "holder.ready").exists(), what="a job to hold the lock")
        holder = int((tmp_path / "holder.pid").read_text())
        # another job is on its way to the lock (its request may be queued or just about to be)
        wait_for(lambda: [p for p in marks(tmp_path, "waiting-*") if p.read_text() != str(holder)], what="another process going for the lock")
        os.kill(holder, signal.SIGKILL)
        assert run.wait(45) == 0, run.stderr[-3000:]
    finally:
        run.process.kill()
    assert_each_once(run.results(), range(10))
    broken = run.events("lock.broken")
    assert [e["name"] for e in broken] == ["L"]
    assert [e["pid"] for e in crashed(run)] == [holder]
