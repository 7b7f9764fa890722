"""Crash-safe runs (issue 11), through the CLI: the journal, `runner resume`, `runner retry`.

The coordinator is SIGKILLed alone (not its process group) at points chosen from the results file's
progress, never from time; its processes exit by themselves; a resume must leave every job in the
results file exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from conftest import TASK_HELPERS, Command, assert_each_once, free_port, marks, read_jsonl, runner_cli, start_run, wait_for

N = 1500
pytestmark = pytest.mark.timeout(600)  # each test runs a 1,500-job run two or three times on a shared machine

TASKS = TASK_HELPERS + '''

def produce(ctx, n):
    for i in range(n):
        yield {"i": i}


def produce_offset(ctx, n):
    mark(f"offset-{ctx.resume_offset}")
    for i in range(ctx.resume_offset, n):
        yield {"i": i}


def consume(ctx, job):
    time.sleep(0.001)  # the run must last long enough to be killed in the middle; no test waits on it
    return {"i": job["i"]}


def gated(ctx, job):
    if job["i"] >= 100:
        wait_file("go", 120)
    time.sleep(0.001)  # as consume: the run lasts long enough to be killed in the middle
    return {"i": job["i"]}


def flaky_once(ctx, job):
    if job["i"] % 100 == 7 and ctx.attempt == 1:
        raise ValueError(f"flaky job {job['i']}")
    time.sleep(0.001)  # as consume: the run lasts long enough to be killed in the middle
    return {"i": job["i"]}


def fragile(ctx, job):
    if job["i"] % 100 == 7 and not os.path.exists("fixed"):
        raise ValueError(f"bad job {job['i']}")
    return {"i": job["i"]}
'''


def config(**extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "j",
        "producers": [{"name": "prod", "task": "tasks:produce", "params": {"n": N}}],
        "consumers": [{"name": "work", "task": "tasks:consume", "processes": 2}],
        "queue": {"maxsize": 200, "batch": 32},
        "results": "results.jsonl",
        "logs": {"dir": "logs", "progress_interval": "50ms"},
        "start_method": "fork",
        "shutdown": {"grace": "5s"},
    }
    cfg.update(extra)
    return cfg


def results(folder: Path) -> list[dict[str, Any]]:
    return read_jsonl(folder / "results.jsonl")


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_coordinator_at(folder: Path, process: subprocess.Popen[str], done: int) -> None:
    """SIGKILL the coordinator alone once `done` results are written; its processes must exit by themselves."""
    wait_for(lambda: lines_in(folder / "results.jsonl") >= done or process.poll() is not None, timeout=180,
             what=f"{done} results")
    assert process.poll() is None, f"the run ended before {done} results: {process.communicate()}"
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)

    def gone() -> bool:
        return all(not c.is_running() or c.status() == psutil.STATUS_ZOMBIE for c in children)

    wait_for(gone, timeout=15, what="the dead coordinator's processes to exit by themselves")


def run_id_of(folder: Path) -> str:
    """The one run's id, from its journal, or from its log for a `journal: false` run."""
    journals = list((folder / "logs").glob("*.journal"))
    if not journals:
        logs = [p for p in (folder / "logs").glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
        assert len(logs) == 1, logs
        return logs[0].name.removesuffix(".jsonl")
    assert len(journals) == 1, journals
    return journals[0].name.removesuffix(".journal")


def status_of(folder: Path, run_id: str) -> dict[str, Any]:
    out = cli("runs", "--logs", "logs", "--json", cwd=folder)
    assert out.returncode == 0, out.stderr
    return next(r for r in map(json.loads, out.stdout.splitlines()) if r["run_id"] == run_id)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A `runner` command; generous deadline: on a loaded shared machine the CLI alone can take many seconds to start."""
    return runner_cli(*args, cwd=cwd, timeout=240)


def resume(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("resume", *args, "--logs", "logs", cwd=folder)


def start_resume(folder: Path, run_id: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runner", "resume", run_id, "--logs", "logs", *args], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_events(folder: Path, run_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(folder / "logs" / f"{run_id}.jsonl") if e["event"] == name]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_then_resume_exactly_once(folder: Path, seed: int) -> None:
    point = random.Random(seed).randrange(50, N - 300)
    run = start_run(folder, config(), tasks=TASKS)
    kill_coordinator_at(folder, run.process, point)
    run_id = run_id_of(folder)
    info = status_of(folder, run_id)
    assert info["status"] == "crashed", info
    assert info["hint"] == f"runner resume {run_id}"
    table = cli("runs", "--logs", "logs", cwd=folder)
    assert f"runner resume {run_id}" in table.stdout
    done = resume(folder, run_id)
    assert done.returncode == 0, done.stderr
    assert_each_once(results(folder), range(N))
    assert all(r["run_id"] == run_id for r in results(folder))
    resumed = log_events(folder, run_id, "run.resumed")
    assert len(resumed) == 1 and resumed[0]["coordinator_pid"] != run.process.pid
    assert resumed[0]["settled"] + resumed[0]["requeued"] <= N and resumed[0]["producers_to_replay"] == 1
    assert status_of(folder, run_id)["status"] == "finished"
    again = resume(folder, run_id)
    assert again.returncode == 0 and "finished already" in again.stdout


def test_second_crash_during_resume_then_third(folder: Path) -> None:
    run = start_run(folder, config(), tasks=TASKS)
    kill_coordinator_at(folder, run.process, 300)
    run_id = run_id_of(folder)
    second = start_resume(folder, run_id)
    kill_coordinator_at(folder, second, 800)
    assert status_of(folder, run_id)["status"] == "crashed"
    third = resume(folder, run_id)
    assert third.returncode == 0, third.stderr
    assert_each_once(results(folder), range(N))
    assert len(log_events(folder, run_id, "run.resumed")) == 2


def test_torn_journal_tail_then_resume(folder: Path) -> None:
    run = start_run(folder, config(), tasks=TASKS)
    kill_coordinator_at(folder, run.process, 600)
    run_id = run_id_of(folder)
    journal = folder / "logs" / f"{run_id}.journal"
    size = journal.stat().st_size
    with open(journal, "r+b") as handle:
        handle.truncate(size - 7)
        handle.seek(0, os.SEEK_END)
        handle.write(b"\x13garbage\xff\x00" * 5)
    done = resume(folder, run_id)
    assert done.returncode == 0, done.stderr
    assert_each_once(results(folder), range(N))


def test_resume_after_sigterm_stop(folder: Path) -> None:
    run = start_run(folder, config(), tasks=TASKS)
    wait_for(lambda: lines_in(folder / "results.jsonl") >= 400, timeout=180, what="400 results")
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 143
    run_id = run_id_of(folder)
    assert (folder / "logs" / f"{run_id}.pending.jsonl").exists()
    assert status_of(folder, run_id)["status"] == "stopped"
    done = resume(folder, "--last", "j")
    assert done.returncode == 0, done.stderr
    assert not (folder / "logs" / f"{run_id}.pending.jsonl").exists()
    assert_each_once(results(folder), range(N))
    assert status_of(folder, run_id)["status"] == "finished"


def test_resume_offset_producer(folder: Path) -> None:
    cfg = config(producers=[{"name": "prod", "task": "tasks:produce_offset", "params": {"n": N}, "resume": "offset"}])
    run = start_run(folder, cfg, tasks=TASKS)
    kill_coordinator_at(folder, run.process, 500)
    run_id = run_id_of(folder)
    done = resume(folder, run_id)
    assert done.returncode == 0, done.stderr
    assert_each_once(results(folder), range(N))
    offsets = sorted(int(p.name.removeprefix("offset-")) for p in marks(folder, "offset-*"))
    assert offsets[0] == 0 and len(offsets) == 2 and offsets[1] >= 500, offsets


def test_start_resume_and_refusals(folder: Path) -> None:
    run = start_run(folder, config(consumers=[{"name": "work", "task": "tasks:gated", "processes": 2}]), tasks=TASKS)
    wait_for(lambda: lines_in(folder / "results.jsonl") >= 50, timeout=180, what="50 results")
    run_id = run_id_of(folder)
    alive = resume(folder, run_id)  # its jobs from 100 on wait for the file `go`: the run is alive
    assert alive.returncode == 2 and "still running" in alive.stderr, alive.stderr
    (folder / "go").write_text("")
    kill_coordinator_at(folder, run.process, 200)
    changed = config(consumers=[{"name": "worker", "task": "tasks:consume", "processes": 2}],
                     producers=[{"name": "prod", "task": "tasks:produce", "params": {"n": N}}])
    (folder / "changed.yaml").write_text(yaml.safe_dump(changed))
    refused = cli("start", "--config", "changed.yaml", "--resume", cwd=folder)
    assert refused.returncode == 2 and "work" in refused.stderr and "removed or renamed" in refused.stderr, refused.stderr
    params = cli("resume", run_id, "--logs", "logs", "--set", "producers.prod.params.n=5", cwd=folder)
    assert params.returncode == 2 and "params" in params.stderr, params.stderr
    (folder / "other.jsonl").write_text("another file's line\n")
    moved = cli("resume", run_id, "--logs", "logs", "--set", "results=other.jsonl", cwd=folder)
    assert moved.returncode == 2 and "results changed" in moved.stderr, moved.stderr
    assert (folder / "other.jsonl").read_text() == "another file's line\n"  # the journal's offset was never applied to it
    more = cli("start", "--config", "run.yaml", "--resume", "--set", "consumers.work.processes=3", cwd=folder)
    assert more.returncode == 0, more.stderr
    assert f"run: {run_id}" in more.stdout
    assert_each_once(results(folder), range(N))


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "dead-file"])
def test_retry_after_fix(folder: Path, journal: bool) -> None:
    """With a journal the payloads come from it; with `journal: false`, from the dead file."""
    cfg = config(consumers=[{"name": "work", "task": "tasks:fragile", "processes": 2, "retries": 1, "retry_backoff": "10ms"}],
                 **({} if journal else {"journal": False}))
    run = start_run(folder, cfg, tasks=TASKS)
    assert run.wait(240) == 1, run.stderr
    run_id = run_id_of(folder)
    dead_path = folder / "logs" / f"{run_id}.dead.jsonl"
    dead = read_jsonl(dead_path)
    bad = sorted(d["job_id"] for d in dead)
    assert len(bad) == N // 100 and all(d["attempts"] == 2 for d in dead)
    listing = cli("retry", run_id, "--logs", "logs", "--dry-run", cwd=folder)
    assert listing.returncode == 0 and f"{len(bad)} job(s) would run again" in listing.stdout
    (folder / "fixed").write_text("")
    again = cli("retry", run_id, "--logs", "logs", cwd=folder)
    assert again.returncode == 0, again.stderr
    assert_each_once(results(folder), range(N))
    assert read_jsonl(dead_path) == []
    reruns = log_events(folder, run_id, "job.rerun")
    assert sorted(e["job_id"] for e in reruns) == bad and all(e["previous_attempts"] == 2 for e in reruns)
    finished = log_events(folder, run_id, "run.finished")[-1]
    assert (finished["status"], finished["done"], finished["dead"]) == ("finished", N, 0), finished
    assert bool(list((folder / "logs").glob("*.journal"))) == journal  # a `journal: false` run stays without one
    nothing = cli("retry", run_id, "--logs", "logs", cwd=folder)
    assert nothing.returncode == 0 and "no dead job" in nothing.stdout


def test_retry_without_journal_refuses_a_run_that_did_not_finish(folder: Path) -> None:
    """A `journal: false` run whose log has no run.finished (killed, or still running): exit 2, saying why."""
    logs = folder / "logs"
    logs.mkdir()
    run_id = "nj-20261201T000000Z-abcdef"
    (logs / f"{run_id}.jsonl").write_text(json.dumps({"timestamp": "2026-12-01T00:00:00.000Z", "level": "info", "event": "run.started", "config": "run.yaml", "run_id": run_id}) + "\n")
    refused = cli("retry", run_id, "--logs", "logs", cwd=folder)
    assert refused.returncode == 2, refused.stderr
    assert "did not finish" in refused.stderr and "journal: false" in refused.stderr and "Traceback" not in refused.stderr


def test_metric_counters_go_on_across_a_resume(folder: Path) -> None:
    """Counters are cumulative over the run, resume included: the journal carries them (COUNTERS records)."""
    from test_metrics import scrape, value

    cfg = config(consumers=[{"name": "work", "task": "tasks:flaky_once", "processes": 2, "retries": 1, "retry_backoff": "10ms"}])
    run = start_run(folder, cfg, tasks=TASKS)
    kill_coordinator_at(folder, run.process, 700)  # jobs 7, 107, ... failed once so far (their attempt 1)
    run_id = run_id_of(folder)
    port = free_port()
    resumed = Command(folder, "resume", [sys.executable, "-m", "runner", "resume", run_id, "--logs", "logs",
                                         "--set", f"metrics.listen=127.0.0.1:{port}", "--set", "metrics.linger=300s"])
    try:
        finished = wait_for(lambda: log_events(folder, run_id, "run.finished"), timeout=240, what="run.finished")[-1]
        families = wait_for(lambda: (f := scrape(port)) and value(f, "runner_jobs", "runner_jobs_total", pool="work", outcome="done")
                            == N and f, timeout=30, what="the final counts in /metrics")
    finally:
        resumed.kill_group()
    # each of the 15 flaky jobs failed exactly once in all: under the first coordinator or the second
    assert (finished["status"], finished["done"], finished["failed"], finished["retried"]) == ("finished", N, N // 100, N // 100)
    assert value(families, "runner_job_failures", "runner_job_failures_total", pool="work", cause="error") == N // 100
    assert value(families, "runner_job_retries", "runner_job_retries_total", pool="work") == N // 100
    assert value(families, "runner_jobs_produced", "runner_jobs_produced_total", pool="prod") == N
    assert_each_once(results(folder), range(N))


def test_resume_with_a_worker_host_that_reconnects(folder: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    # jobs from 100 on wait for "go", written once the worker host has joined: the run cannot end before it joins
    cfg = config(consumers=[{"name": "work", "task": "tasks:gated", "processes": 1}], transport={"bind": address})
    run = start_run(folder, cfg, "--insecure", tasks=TASKS)
    worker = Command(folder, "worker", [sys.executable, "-m", "runner", "worker", "--connect", address, "--insecure",
                                        "--give-up", "60", "--path", str(folder)])
    try:
        run_id = wait_for(lambda: (folder / "logs").exists() and list((folder / "logs").glob("*.journal")), timeout=180, what="journal")[0]
        run_id = run_id.name.removesuffix(".journal")
        wait_for(lambda: log_has(folder, run_id, "host.joined"), timeout=180, what="the worker host to join")
        (folder / "go").write_text("")
        kill_coordinator_at(folder, run.process, 500)
        # no local consumer in the resumed run: it cannot end before the worker host rejoins (with one, a fast
        # machine ran the last 1,000 jobs before the worker noticed the coordinator was gone, and it gave up)
        done = resume(folder, run_id, "--insecure", "--set", "consumers.work.processes=0")
        assert done.returncode == 0, done.stderr
        assert worker.wait(120) == 0, worker.stderr
    finally:
        if worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGKILL)
    assert_each_once(results(folder), range(N))
    events = read_jsonl(folder / "logs" / f"{run_id}.jsonl")
    resumed_at = next(i for i, e in enumerate(events) if e["event"] == "run.resumed")
    assert any(e["event"] == "host.joined" for e in events[resumed_at:])


def test_resumed_run_keeps_its_run_keys(folder: Path) -> None:
    """Loopback, no --keys: the run's own CURVE keys outlive a stop, the resumed run uses the same ones (a worker
    without --keys finds them again), and they go once the run has finished."""
    import tempfile

    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = config(consumers=[{"name": "work", "task": "tasks:gated", "processes": 1}], transport={"bind": address})
    run = start_run(folder, cfg, tasks=TASKS)  # gated: the run cannot end before the worker host joins
    worker_argv = [sys.executable, "-m", "runner", "worker", "--connect", address, "--give-up", "120", "--path", str(folder)]
    workers: list[Command] = []
    try:
        journal = wait_for(lambda: (folder / "logs").exists() and list((folder / "logs").glob("*.journal")), timeout=180, what="journal")[0]
        run_id = journal.name.removesuffix(".journal")
        keys = Path(tempfile.gettempdir()) / f"runner-{os.getuid()}" / f"{run_id}.keys"
        public = wait_for(lambda: (keys / "coordinator.key").exists() and (keys / "coordinator.key").read_bytes(), timeout=60,
                          what="the run's keys")
        workers.append(Command(folder, "worker1", worker_argv))
        wait_for(lambda: log_has(folder, run_id, "host.joined"), timeout=180, what="the worker host to join with the run's keys")
        (folder / "go").write_text("")
        wait_for(lambda: lines_in(folder / "results.jsonl") >= 300, timeout=180, what="300 results")
        run.process.send_signal(signal.SIGTERM)
        assert run.wait() == 143
        assert (keys / "coordinator.key").read_bytes() == public, "a stopped run keeps its keys for a resume"
        assert workers[0].wait(120) == 0, workers[0].stderr
        workers.append(Command(folder, "worker2", worker_argv))  # waits for the resumed run, then finds the same keys
        done = resume(folder, run_id)
        assert done.returncode == 0, done.stderr
        assert workers[1].wait(120) == 0, workers[1].stderr
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGKILL)
    assert_each_once(results(folder), range(N))
    events = read_jsonl(folder / "logs" / f"{run_id}.jsonl")
    resumed_at = next(i for i, e in enumerate(events) if e["event"] == "run.resumed")
    assert events[resumed_at]["security"] == "run keys"
    assert any(e["event"] == "host.joined" for e in events[resumed_at:]), "the worker joined the resumed run with the same keys"
    assert not keys.exists(), "a finished run's keys are removed"


def log_has(folder: Path, run_id: str, event: str) -> bool:
    path = folder / "logs" / f"{run_id}.jsonl"
    return path.exists() and f'"event":"{event}"' in path.read_text().replace(" ", "")


def test_reader_stops_at_the_first_torn_or_corrupt_frame(tmp_path: Path) -> None:
    from runner.coordinator import journal as J

    path = tmp_path / "x.journal"
    frames = [J.frame([J.COMMIT, [[J.START, n]], n, None]) for n in range(3)]
    path.write_bytes(frames[0] + frames[1] + frames[2][:-3])
    assert [body[2] for _, body in J.read_frames(path)] == [0, 1]
    damaged = bytearray(frames[0] + frames[1] + frames[2])
    damaged[len(frames[0]) + 10] ^= 0xFF  # a flipped bit in the second frame's body
    path.write_bytes(bytes(damaged))
    assert [body[2] for _, body in J.read_frames(path)] == [0]


def test_journal_off_and_results_placeholders(folder: Path) -> None:
    cfg = config(journal=False, results="out/{name}-{run_id}.jsonl", producers=[{"name": "prod", "task": "tasks:produce", "params": {"n": 20}}])
    run = start_run(folder, cfg, tasks=TASKS)
    assert run.wait(240) == 0, run.stderr
    assert not list((folder / "logs").glob("*.journal"))
    (out,) = list((folder / "out").glob("j-*.jsonl"))
    run_id = out.name.removeprefix("j-").removesuffix(".jsonl")
    assert run_id == run.run_id and {r["run_id"] for r in read_jsonl(out)} == {run_id}
    refused = cli("resume", run_id, "--logs", "logs", cwd=folder)
    assert refused.returncode == 2 and "journal: false" in refused.stderr


def test_a_journal_damaged_other_than_at_its_tail_is_refused_with_one_message(tmp_path: Path) -> None:
    """A torn tail is normal (reading stops there); a whole frame of a shape the runner never writes, another
    version, or a journal that cannot be read is exit 2 with one message naming it, never a traceback."""
    from runner.coordinator import journal as J

    config = {"name": "d", "producers": [{"name": "prod", "task": "tasks:produce"}], "consumers": [{"name": "work", "task": "tasks:consume"}]}
    header = [J.HEADER, J.VERSION, "", "d", config, "0", "run.yaml", str(tmp_path)]
    cases = {
        "a frame that is a number": [5],
        "a record of the wrong length": [header, [J.COMMIT, [[J.DONE, "work", 1]], None, None]],
        "another version": [[J.HEADER, J.VERSION + 1, *header[2:]]],
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    for i, (case, frames) in enumerate(cases.items()):
        run_id = f"d-20260101T00000{i}Z-0000"
        frames = [[*f[:2], run_id, *f[3:]] if f and isinstance(f, list) and f[0] == J.HEADER else f for f in frames]
        (logs / f"{run_id}.journal").write_bytes(b"".join(J.frame(f) for f in frames))
        done = runner_cli("resume", run_id, "--logs", "logs", cwd=tmp_path, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (case, done.stderr)
        assert f"{run_id}.journal" in done.stderr and ("damaged" in done.stderr or "version" in done.stderr), (case, done.stderr)
    (logs / "d-20260101T000009Z-0000.journal").mkdir()
    done = runner_cli("resume", "d-20260101T000009Z-0000", "--logs", "logs", cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "cannot read the journal" in done.stderr and "Traceback" not in done.stderr, done.stderr
