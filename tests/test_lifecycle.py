"""Process lifecycle with real processes: graceful and hard stops, orphans, zombies, titles, start methods.

Tests synchronise on files the jobs write (see conftest.TASK_HELPERS) and on process state, never on sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from conftest import CONFIGS, TASK_HELPERS, Run, assert_each_once, basic_config, live_events, marks, start_run, wait_for

pytestmark = pytest.mark.timeout(60)

N = 20

TASKS = TASK_HELPERS + '''

def produce(ctx, n=20):
    for i in range(n):
        yield {"i": i}
    mark("produced-all")


def gated(ctx, job):
    """Say the job started, then wait for the test to open the gate."""
    mark(f"started-{job['i']}", str(os.getpid()))
    wait_file("gate")
    return result(ctx, job)


def quick(ctx, job):
    time.sleep(0.01)
    return result(ctx, job)


def gated_producer(ctx, n=4):
    yield from ({"i": i} for i in range(n))
    mark("producer-waiting", str(os.getpid()))
    wait_file("gate")
'''


def gated_config(name: str, grace: str = "10s", retries: int = 0, start_method: str = "fork") -> dict[str, Any]:
    cfg = basic_config(retries=retries, retry_backoff="10ms")
    cfg["name"] = name
    cfg["consumers"][0]["task"] = "tasks:gated"
    cfg["producers"][0]["params"] = {"n": N}
    cfg["queue"] = {"maxsize": 100, "batch": 2}
    cfg["shutdown"] = {"grace": grace}
    cfg["start_method"] = start_method
    return cfg


def started(folder: Path) -> list[Path]:
    return marks(folder, "started-*")


def running(folder: Path, jobs: int = 2) -> bool:
    """The producer has sent every job and `jobs` jobs are in hand (each process blocks on one)."""
    return (folder / "produced-all").exists() and len(started(folder)) >= jobs


def check_pending(run: Any, done_expected: set[int] | None = None) -> list[dict[str, Any]]:
    """results and pending together hold every job exactly once; returns the pending lines."""
    results, pending = run.results(), run.pending()
    for line in pending:
        assert set(line) >= {"job_id", "pool", "payload", "attempts"}, line
        assert line["pool"] == "work"
    done = {r["result"]["i"] for r in results}
    waiting = [line["payload"]["i"] for line in pending]
    assert len(waiting) == len(set(waiting))
    assert not done & set(waiting), f"done and pending: {done & set(waiting)}"
    assert done | set(waiting) == set(range(N)), f"lost: {set(range(N)) - done - set(waiting)}"
    ids = [r["job_id"] for r in results] + [line["job_id"] for line in pending]
    assert len(ids) == len(set(ids)) == N
    if done_expected is not None:
        assert done == done_expected
    return pending


@pytest.mark.parametrize("gate", ["opened", "closed"])
def test_sigterm_mid_run_writes_pending_and_exits_143(tmp_path: Path, gate: str) -> None:
    """Opened: the jobs in hand finish within the grace. Closed: they are killed at its end, and pending."""
    grace = 5.0 if gate == "opened" else 1.0
    run = start_run(tmp_path, gated_config("sigterm", f"{grace}s"), tasks=TASKS)
    try:
        wait_for(lambda: running(tmp_path), what="jobs to be running")
        in_hand = {int(p.name.removeprefix("started-")) for p in started(tmp_path)}
        stopped_at = time.monotonic()
        run.process.send_signal(signal.SIGTERM)
        if gate == "opened":
            wait_for(lambda: live_events(run, "run.stopping"), what="the stop to begin")
            (tmp_path / "gate").touch()
        code = run.wait(30)
        took = time.monotonic() - stopped_at
    finally:
        run.process.kill()
    assert code == 143, run.stderr[-3000:]
    assert took < grace + 5, f"took {took:.1f}s with a grace of {grace}s"  # the documented bound: grace + 5 s
    pending = check_pending(run)
    done = {r["result"]["i"] for r in run.results()}
    if gate == "opened":  # the jobs in hand finished (a process may have begun its next before the stop reached it)
        assert in_hand <= done and len(done) <= 2 * len(in_hand), (in_hand, done)
    else:
        assert not done and len(pending) == N
    finished = run.events("run.finished")[0]
    assert finished["status"] == "stopped" and finished["pending"] == len(pending) and finished["dead"] == 0
    assert run.events("run.stopping")[0]["signal"] == "SIGTERM"
    if gate == "closed":  # killed by the stop, not by their own fault: pending with no attempt charged
        by_i = {line["payload"]["i"]: line for line in pending}
        assert all(by_i[i]["attempts"] == 0 for i in in_hand), [by_i[i] for i in in_hand]
    assert f"pending: {len(pending)} unfinished job(s)" in run.stdout


def test_second_sigint_stops_at_once(tmp_path: Path) -> None:
    run = start_run(tmp_path, gated_config("sigint", "30s"), tasks=TASKS)
    try:
        wait_for(lambda: running(tmp_path), what="jobs to be running")
        stopped_at = time.monotonic()
        run.process.send_signal(signal.SIGINT)
        wait_for(lambda: live_events(run, "run.stopping"), what="the first signal to begin the stop")
        run.process.send_signal(signal.SIGINT)
        code = run.wait(30)
        took = time.monotonic() - stopped_at
    finally:
        run.process.kill()
    assert code == 130, run.stderr[-3000:]
    assert took < 5, f"took {took:.1f}s"
    pending = check_pending(run, set())
    assert len(pending) == N
    assert all(line["attempts"] == 0 for line in pending), pending
    assert [e["reason"] for e in run.events("run.stopping")][-1] == "second signal: stopping now"


def _runner_titles(name: str) -> dict[int, str]:
    """Processes whose title says they belong to run `name`: {pid: title} (zombies excluded)."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or []).strip()  # setproctitle pads the old command line
        if cmdline.startswith("runner: ") and cmdline.endswith(f"[{name}]") and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found[proc.info["pid"]] = cmdline
    return found


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_coordinator_sigkilled_leaves_no_process(tmp_path: Path, method: str) -> None:
    name = f"orphans-{method}-{os.getpid()}"  # unique: the title scan looks at every process of the machine
    cfg = gated_config(name, start_method=method)
    cfg["producers"][0]["task"] = "tasks:gated_producer"
    cfg["producers"][0]["params"] = {"n": 8}
    run = start_run(tmp_path, cfg, tasks=TASKS)
    children: list[int] = []
    try:
        wait_for(lambda: (tmp_path / "producer-waiting").exists() and len(started(tmp_path)) >= 2, what="every process to be busy")
        coordinator = psutil.Process(run.process.pid)
        children = [p.pid for p in coordinator.children(recursive=True)]
        titled = _runner_titles(name)
        assert len(titled) == 3, titled  # prod-1, work-1, work-2
        assert set(titled) <= set(children)
        run.process.send_signal(signal.SIGKILL)
        run.wait(10)
        # they exit by themselves (parent-death signal, the parent watch); the deadline is generous, as the
        # machine may be loaded: it tells "exits on its own" from "orphaned for ever", not a speed
        try:
            wait_for(lambda: not _alive(children) and not _runner_titles(name), timeout=30.0, interval=0.01,
                     what="every child to exit")
        except AssertionError as timed_out:  # say which ones stayed, as they are when the wait ends
            raise AssertionError(f"{timed_out}; still alive: {_runner_titles(name)}, {_alive(children)}") from None
    finally:
        run.process.kill()
        for pid in _alive(children):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_no_zombies_during_a_run(tmp_path: Path, method: str) -> None:
    """Processes come and go (recycled after 2 jobs, idle ones retire); none stays a zombie."""
    cfg = basic_config(max_jobs_per_process=2, idle_timeout="100ms", processes=3)
    cfg["consumers"][0]["task"] = "tasks:quick"
    cfg["producers"][0]["params"] = {"n": 30}
    cfg["queue"] = {"maxsize": 100, "batch": 2}
    cfg["start_method"] = method
    run = start_run(tmp_path, cfg, tasks=TASKS)
    zombie_since: dict[int, float] = {}
    worst = 0.0
    samples = 0
    try:
        coordinator = psutil.Process(run.process.pid)
        while run.process.poll() is None:
            now = time.monotonic()
            try:
                children = coordinator.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            zombies = set()
            for child in children:
                try:
                    if child.status() == psutil.STATUS_ZOMBIE:
                        zombies.add(child.pid)
                except psutil.NoSuchProcess:
                    pass
            for pid in zombies:
                zombie_since.setdefault(pid, now)
                worst = max(worst, now - zombie_since[pid])
            for pid in set(zombie_since) - zombies:
                del zombie_since[pid]
            samples += 1
            time.sleep(0.005)  # sampling rate, not synchronisation
        assert run.wait(30) == 0, run.stderr[-3000:]
    finally:
        run.process.kill()
    assert samples > 20
    # a child is a zombie only between its exit and the coordinator's next loop turn
    assert worst < 1.0, f"a child stayed a zombie for {worst:.2f}s"
    assert_each_once(run.results(), range(30))
    assert len([e for e in run.events("worker.exited") if e["reason"] == "recycled"]) >= 10


def test_process_titles_name_role_and_run(tmp_path: Path) -> None:
    cfg = gated_config("bakery")
    cfg["producers"][0].update(name="baker", task="tasks:gated_producer", params={"n": 8})
    cfg["consumers"][0].update(name="eater", processes=2)
    cfg["producers"][0]["to"] = "eater"
    run = start_run(tmp_path, cfg, tasks=TASKS)
    try:
        wait_for(lambda: (tmp_path / "producer-waiting").exists() and len(started(tmp_path)) >= 2, what="every process to be busy")
        coordinator = psutil.Process(run.process.pid)
        titles = sorted(" ".join(p.cmdline()).strip() for p in coordinator.children(recursive=True))
        for title in ("runner: baker-1 [bakery]", "runner: eater-1 [bakery]", "runner: eater-2 [bakery]"):
            assert title in titles, titles
        (tmp_path / "gate").touch()
        assert run.wait(30) == 0, run.stderr[-3000:]
    finally:
        run.process.kill()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_every_start_method_runs_the_bakery(tmp_path: Path, method: str) -> None:
    for suffix in (".yaml", ".py"):
        shutil.copy(CONFIGS / f"bakery{suffix}", tmp_path / f"bakery{suffix}")
    run = start_run(tmp_path, tmp_path / "bakery.yaml", "--set", f"start_method={method}",
                    "--set", "producers.baker.params.buns=15", "--set", "producers.baker.params.pause=0.005")
    assert run.wait(45) == 0, run.stderr[-3000:]
    results = run.results("results/bakery.jsonl")
    buns = sorted((r["result"].split(" from ")[1], int(r["result"].split()[3])) for r in results)
    assert buns == sorted((f"baker-{b}", n) for b in (1, 2) for n in range(1, 16))
    assert len({r["job_id"] for r in results}) == 30
    started_line = run.events("run.started")[0]
    assert started_line["start_method"] == method
    assert run.events("run.finished")[0]["done"] == 30


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_ctrl_c_while_processes_start(tmp_path: Path, method: str) -> None:
    """Ctrl-C in a terminal reaches the whole process group, here while children (and a forkserver) start."""
    cfg = gated_config(f"ctrlc-{method}", grace="5s", start_method=method)
    (tmp_path / "tasks.py").write_text(TASKS)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    process = subprocess.Popen([sys.executable, "-m", "runner", "start", "--config", "run.yaml"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = Run(tmp_path, process)
    try:
        # the first pool process (its title set): the others are starting. Not the first child of all: `runner start`
        # starts the forkserver first thing, while the task modules import, and a Ctrl-C then ends the command with
        # no run at all (test_failsafe)
        coordinator = psutil.Process(process.pid)

        def pool_process() -> bool:
            for child in coordinator.children(recursive=True):
                try:
                    if " ".join(child.cmdline()).startswith("runner: "):
                        return True
                except psutil.Error:
                    pass
            return False

        wait_for(pool_process, interval=0.001, what="the first pool process")
        os.killpg(process.pid, signal.SIGINT)
        assert run.wait(30) == 130, run.stderr[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr[-3000:]
    finished = run.events("run.finished")[0]
    assert finished["status"] == "stopped"
    assert not run.events("worker.crashed") and not run.events("producer.failed")
    produced = finished["produced"]
    results, pending = run.results(), run.pending()
    assert len(results) + len(pending) == produced
    assert len({r["job_id"] for r in results} | {p["job_id"] for p in pending}) == produced
