"""Never hang, never crash (issue 10, the fail-safe side), each case through the CLI with real processes.

A closed console, a bad progress_interval, more bad payloads than the queue holds, a doubled --pool,
a result or payload over the frame limit, a log call with an unencodable value, files that cannot be
written, and a crash of the coordinator's loop itself (a full disk), which must stop every process,
write the pending file and exit 3.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import (
    TASK_HELPERS,
    assert_each_once,
    basic_config,
    free_port,
    marks,
    read_jsonl,
    run_config,
    runner_cli,
    small_tmpfs,
    start_host_run,
    start_run,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

TASKS = TASK_HELPERS + '''

class Unshowable:
    def __repr__(self):
        raise RuntimeError("no repr either")


def produce(ctx, n=20, gate=None, bad=0):
    if gate:
        wait_file(gate)
    for i in range(bad):
        yield {"i": -1 - i, "bad": {1, 2}} if i else Unshowable()  # msgpack refuses both; the first has no repr
    for i in range(n):
        yield {"i": i}


def chatty(ctx, job):
    ctx.log.info("chat", i=job["i"], text="x" * 200)
    return result(ctx, job)


def logs_object(ctx, job):
    ctx.log.info("x", value=object(), nested={"s": {1, 2}, (1, 2): b"raw"}, big=1 << 70)
    ctx.log.info("keyed", value={b"k": 1})  # msgpack carries a bytes key; JSON cannot: the coordinator's repr
    return {**result(ctx, job), b"k": [1]}  # the same in a result line


def huge_result(ctx, job):
    if job["i"] == 5:
        return {"i": 5, "blob": b"x" * (80 * 1024 * 1024)}
    return result(ctx, job)


def produce_huge(ctx, n=10):
    for i in range(n):
        if i == 3:
            yield {"i": i, "blob": b"y" * (70 * 1024 * 1024)}
        else:
            yield {"i": i}


def ok(ctx, job):
    return result(ctx, job)


consume = ok


def slow(ctx, job):
    time.sleep(0.01)
    return result(ctx, job)


def fast_then_slow(ctx, job):
    """Microsecond jobs (the consumer times them per batch), and every tenth of i 2300..2699 takes 0.1 s:
    in the middle of a credit window, so in batches that started in per-batch timing."""
    if 2300 <= job["i"] < 2700 and job["i"] % 10 == 5:
        time.sleep(0.1)
    return result(ctx, job)


def hang_late(ctx, job):
    """Microsecond jobs, then one that hangs (on its first attempt) inside a per-batch-timed batch."""
    if job["i"] == 2600 and ctx.attempt == 1:
        mark("hung", str(os.getpid()))
        time.sleep(600)
    return result(ctx, job)


def big_gated(ctx, job):
    """Hold the job until file `go`, then return 40 KB: two of them overflow a 64 KiB disk."""
    mark(f"running-{job['i']}")
    wait_file("go")
    return {"i": job["i"], "pad": "x" * 40000}
'''


def write_run(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(TASKS)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def events(folder: Path, name: str) -> list[dict]:
    logs = [p for p in (folder / "logs").glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
    assert len(logs) == 1, logs
    return [line for line in read_jsonl(logs[0]) if line["event"] == name]


# -- case 1: a closed console ---------------------------------------------------------------------
def _console_config(n: int = 400) -> dict:
    config = basic_config(consume_task := "tasks")
    config["producers"][0]["params"] = {"n": n, "gate": "go"}
    config["consumers"][0]["task"] = f"{consume_task}:chatty"
    config["logs"]["jobs"] = "all"  # a line per job on the console: many writes after it closed
    return config


def test_console_closed_like_head(folder: Path) -> None:
    """`runner start ... 2>&1 | head -3`: the pipe closes; the run finishes normally, exit 0, results whole."""
    path = write_run(folder, _console_config())
    process = subprocess.Popen([sys.executable, "-m", "runner", "start", "--config", str(path)], cwd=folder,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    lines = [process.stdout.readline() for _ in range(3)]  # what `head -3` reads ...
    process.stdout.close()  # ... before it exits
    assert all(lines), lines
    (folder / "go").write_text("")
    code = process.wait(60)
    assert code == 0
    assert_each_once(read_jsonl(folder / "results.jsonl"), range(400))
    finished = events(folder, "run.finished")
    assert finished[-1]["status"] == "finished" and finished[-1]["done"] == 400


def test_stdout_closed_like_less(folder: Path) -> None:
    """`runner start ... | less` then `q`: stdout is gone (the summary has nowhere to go); stderr lives on."""
    path = write_run(folder, _console_config(100))
    with open(folder / "stderr.txt", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "runner", "start", "--config", str(path)], cwd=folder,
                                   stdout=subprocess.PIPE, stderr=err)
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"run: ")
        process.stdout.close()
        (folder / "go").write_text("")
        code = process.wait(60)
    assert code == 0, (folder / "stderr.txt").read_text()[-2000:]
    assert "Traceback" not in (folder / "stderr.txt").read_text()
    assert_each_once(read_jsonl(folder / "results.jsonl"), range(100))


# -- case 2: progress_interval 0 ------------------------------------------------------------------
def test_progress_interval_zero_is_refused(folder: Path) -> None:
    config = basic_config()
    config["logs"]["progress_interval"] = 0
    path = write_run(folder, config)
    for command in ("check", "start"):
        done = runner_cli(command, "--config", str(path), cwd=folder)
        assert done.returncode == 2, done.stderr
        assert "logs.progress_interval: must be above 0" in done.stderr and "Traceback" not in done.stderr


# -- case 8: a log call that cannot be encoded ------------------------------------------------------
def test_log_call_with_unencodable_values_never_fails_the_job(folder: Path) -> None:
    config = basic_config()
    config["consumers"][0]["task"] = "tasks:logs_object"
    run = run_config(folder, config, tasks=TASKS)
    assert run.process.returncode == 0, run.stderr
    assert_each_once(run.results(), range(20))
    lines = run.events("x")
    assert len(lines) == 20
    assert lines[0]["value"].startswith("<object object at") and lines[0]["big"] == repr(1 << 70)
    assert lines[0]["nested"]["(1, 2)"] == {"$bytes": b"raw".hex()} and lines[0]["nested"]["s"] == "{1, 2}"
    # neither orjson nor json writes a bytes map key: it used to take the whole run down (exit 3)
    assert [line["value"] for line in run.events("keyed")] == [{"b'k'": 1}] * 20
    assert all(r["result"]["b'k'"] == [1] for r in run.results())


# -- case 9: files that cannot be written ------------------------------------------------------------
@pytest.mark.parametrize("key, value, named", [
    ("logs", {"dir": "afile/logs"}, "cannot write the log folder (logs.dir) afile/logs: Not a directory"),
    ("results", "/proc/no-such-place/results.jsonl", "cannot write the results file (results) /proc/no-such-place/results.jsonl"),
    ("results", "afile/results.jsonl", "cannot write the results file (results) afile/results.jsonl: Not a directory"),
])
def test_unwritable_files_fail_before_anything_starts(folder: Path, key: str, value: object, named: str) -> None:
    config = basic_config()
    config[key] = value
    path = write_run(folder, config)
    (folder / "afile").write_text("a regular file where a folder is expected")
    done = runner_cli("start", "--config", str(path), cwd=folder)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert "Nothing was started" in done.stderr


# -- case 3: more unencodable payloads than queue.maxsize -------------------------------------------
def test_more_bad_payloads_than_the_queue_holds(folder: Path) -> None:
    config = basic_config()
    config["queue"] = {"maxsize": 10}
    config["producers"][0]["params"] = {"n": 20, "bad": 40}
    config["consumers"][0]["task"] = "tasks:ok"
    run = run_config(folder, config, tasks=TASKS)
    assert run.process.returncode == 1, run.stderr[-2000:]
    assert_each_once(run.results(), range(20))
    dead = run.dead()
    assert len(dead) == 40 and all("not msgpack-encodable" in d["error"] for d in dead)
    assert "<Unshowable: its repr failed>" in [d["payload"] for d in dead]  # it used to take its batch down with it
    assert len([e for e in run.events("job.failed") if e.get("attempt") == 0]) == 40


# -- case 7: a result or a payload over the frame limit -----------------------------------------------
def _check_too_big_result(run_folder: Path, code: int, dead: list[dict], results: list[dict]) -> None:
    assert code == 1
    assert_each_once(results, [i for i in range(20) if i != 5])
    assert [d["payload"]["i"] for d in dead] == [5]
    assert dead[0]["error"].startswith("ValueError: result of 8388") and "over the 64 MiB frame limit" in dead[0]["error"]
    finished = events(run_folder, "run.finished")[-1]
    assert finished["done"] == 19 and finished["dead"] == 1


def test_result_over_the_frame_limit_fails_that_job_only(folder: Path) -> None:
    config = basic_config()
    config["consumers"][0]["task"] = "tasks:huge_result"
    run = run_config(folder, config, tasks=TASKS)
    _check_too_big_result(folder, run.process.returncode, run.dead(), run.results())


def test_payload_over_the_frame_limit_is_invalid(folder: Path) -> None:
    config = basic_config()
    config["producers"][0]["task"] = "tasks:produce_huge"
    config["consumers"][0]["task"] = "tasks:ok"
    run = run_config(folder, config, tasks=TASKS)
    assert run.process.returncode == 1, run.stderr[-2000:]
    assert_each_once(run.results(), [i for i in range(20) if i != 3])
    dead = run.dead()
    assert len(dead) == 1 and "payload of 7340" in dead[0]["error"] and "over the 64 MiB frame limit" in dead[0]["error"]


def _remote(folder: Path, config: dict, *worker_args: str) -> tuple[int, Path]:
    """`runner start --bind` on loopback with one `runner worker`; the producers wait for file `go`,
    made once the host has joined."""
    address = f"tcp://127.0.0.1:{free_port()}"
    run = start_host_run(folder, config, "--bind", address, tasks=TASKS)
    worker = start_worker(folder, address, "w1", "--path", str(folder), *worker_args)
    try:
        wait_for(lambda: [e for e in _log_lines(folder) if e["event"] == "host.joined"], 30, "the worker host to join")
        (folder / "go").write_text("")
        code = run.wait(60)
        assert worker.wait(30) == 0, worker.stderr[-2000:]
    finally:
        worker.kill_group()
        run.proc.kill_group()
    return code, folder


def _log_lines(folder: Path) -> list[dict]:
    logs = [p for p in (folder / "logs").glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
    if not logs:
        return []
    text = logs[0].read_text()
    import json

    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def test_result_over_the_frame_limit_over_zeromq(folder: Path) -> None:
    config = basic_config()
    config["producers"][0]["params"] = {"n": 20, "gate": "go"}
    config["consumers"][0].update(task="tasks:huge_result", processes=0, min_processes=0)
    code, _ = _remote(folder, config)
    logs_dir = folder / "logs"
    run_id = [p for p in logs_dir.glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))][0].stem
    _check_too_big_result(folder, code, read_jsonl(logs_dir / f"{run_id}.dead.jsonl"), read_jsonl(folder / "results.jsonl"))


# -- case 6: --pool given twice ------------------------------------------------------------------------
def test_worker_pool_given_twice_serves_it_once(folder: Path) -> None:
    config = basic_config()
    config["producers"][0]["params"] = {"n": 10, "gate": "go"}
    config["consumers"][0]["task"] = "tasks:ok"
    code, _ = _remote(folder, config, "--pool", "prod", "--pool", "prod")
    assert code == 0
    results = read_jsonl(folder / "results.jsonl")
    assert sorted(r["result"]["i"] for r in results) == sorted(list(range(10)) * 2)  # the local producer and the host's one
    joined = [e for e in _log_lines(folder) if e["event"] == "host.joined"]
    assert joined[0]["pools"] == ["prod"]


# -- the fail-safe coordinator: a crash of its own loop ------------------------------------------------
def _run_processes(name: str) -> list[psutil.Process]:
    """Processes of run `name` still alive (they are titled `runner: <worker> [<name>]`)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if f"[{name}]" in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _complete_lines(path: Path) -> list[dict]:
    import json

    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n")]


def test_full_disk_mid_run_crashes_cleanly(folder: Path) -> None:
    """Results on a 64 KiB tmpfs: a write raises OSError mid-run. Expected: run.crashed with the traceback,
    every process stopped, the unfinished jobs pending, run.finished `crashed`, exit 3, no process left."""
    with small_tmpfs(folder / "full", "64k") as full:
        config = basic_config()
        config["name"] = "crashy"
        config["producers"][0]["params"] = {"n": 2000}
        config["consumers"][0]["task"] = "tasks:slow"
        config["results"] = "full/results.jsonl"
        config["shutdown"] = {"grace": "5s"}
        run = run_config(folder, config, tasks=TASKS, timeout=60)
        assert run.process.returncode == 3, run.stderr[-3000:]
        crashed = run.events("run.crashed")
        assert len(crashed) == 1 and "No space left on device" in crashed[0]["error"]
        assert "Traceback" in crashed[0]["traceback"] and "write_results" in crashed[0]["traceback"]
        finished = run.events("run.finished")[-1]
        assert finished["status"] == "crashed" and finished["exit_code"] == 3 and finished["pending"] > 0
        written = {r["result"]["i"] for r in _complete_lines(full / "results.jsonl")}
        pending = [p["payload"]["i"] for p in run.pending()]
        assert len(pending) == len(set(pending)) == finished["pending"]
        assert 0 < finished["produced"] and written | set(pending) == set(range(finished["produced"])), "a job lost"
        assert not run.events("producer.failed")  # the producer was stopped, it did not fail
        assert finished["done"] <= len(written)
        assert not _run_processes("crashy"), "a process of the crashed run is still alive"
        assert "Traceback" not in run.stderr.split('"traceback"')[0]  # only inside the JSON log line, never raw


def test_crash_during_a_stop_exits_3_not_143(folder: Path) -> None:
    """SIGTERM first; then, as the consumers finish the jobs in hand, their results overflow the disk:
    the crash wins over the signal (exit 3, status crashed), and the stop still ends with no process left."""
    with small_tmpfs(folder / "full", "64k") as full:
        config = basic_config()
        config["name"] = "crashstop"
        config["consumers"][0]["task"] = "tasks:big_gated"
        config["results"] = "full/results.jsonl"
        config["shutdown"] = {"grace": "10s"}
        run = start_run(folder, config, tasks=TASKS)
        wait_for(lambda: len(marks(folder, "running-*")) == 2, 30, "two jobs in hand")
        run.process.send_signal(signal.SIGTERM)
        wait_for(lambda: [e for e in _log_lines(folder) if e["event"] == "run.stopping"], 30, "run.stopping")
        (folder / "go").write_text("")
        assert run.wait(30) == 3, run.stderr[-3000:]
        finished = run.events("run.finished")[-1]
        assert finished["status"] == "crashed" and finished["exit_code"] == 3
        assert len(run.events("run.crashed")) == 1
        written = {r["result"]["i"] for r in _complete_lines(full / "results.jsonl")}
        pending = {p["payload"]["i"] for p in run.pending()}
        assert written | pending == set(range(finished["produced"]))
        assert not _run_processes("crashstop")


WATCHDOG = """
import multiprocessing, sys, time
from runner.process.watchdog import Watchdog

def child():
    time.sleep(600)

if __name__ == "__main__":
    proc = multiprocessing.get_context("fork").Process(target=child, daemon=False)  # joined at exit: a hang
    proc.start()
    print(proc.pid, flush=True)
    Watchdog(lambda: [proc.pid], lambda m: print(m, file=sys.stderr)).arm(0.5, 3, "SIGTERM")
    while True:  # a loop stuck for ever
        time.sleep(0.1)
"""


def test_watchdog_ends_a_stuck_process_and_its_children(folder: Path) -> None:
    """The last resort behind `shutdown.grace + 5 s`: a main thread stuck for ever, a non-daemon child
    that interpreter exit would wait on; the watchdog SIGKILLs the child and leaves with exit 3."""
    script = folder / "stuck.py"
    folder.mkdir(parents=True, exist_ok=True)
    script.write_text(WATCHDOG)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert "did not stop within 0.5s of SIGTERM" in done.stderr
    child = int(done.stdout.split()[0])
    wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, 10, "the child gone")


# -- known wrong attributions: per-batch timing ------------------------------------------------------------
def _fast_then_slow_config(task: str) -> dict:
    config = basic_config()
    config["queue"] = {"maxsize": 1000}
    config["producers"][0]["params"] = {"n": 3030}
    config["consumers"][0].update(task=task, processes=1, job_timeout="0.5s", retries=1, retry_backoff=0)
    return config


def test_job_timeout_counts_from_the_jobs_own_start_in_per_batch_timing(folder: Path) -> None:
    """40 jobs of 0.1 s land in batches that started in per-batch timing (fast jobs before them):
    no job runs 0.5 s, so none may time out, however long its batch takes."""
    run = run_config(folder, _fast_then_slow_config("tasks:fast_then_slow"), tasks=TASKS)
    assert run.process.returncode == 0, run.stderr[-2000:]
    assert not run.events("job.failed") and not run.events("worker.crashed")
    assert_each_once(run.results(), range(3030))


def test_a_job_hanging_in_per_batch_timing_is_the_one_charged(folder: Path) -> None:
    """The job that hangs is killed by job_timeout and charged (then retried), not a job that had finished."""
    run = run_config(folder, _fast_then_slow_config("tasks:hang_late"), tasks=TASKS)
    assert run.process.returncode == 0, run.stderr[-2000:]
    failed = run.events("job.failed")
    assert len(failed) == 1 and "exceeded job_timeout" in failed[0]["error"]
    retried = [r for r in run.results() if r["result"]["attempt"] == 2]
    assert [r["result"]["i"] for r in retried] == [2600] and retried[0]["job_id"] == failed[0]["job_id"]
    assert_each_once(run.results(), range(3030))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_a_task_module_imports_ends_the_command(folder: Path, signum: int, code: int) -> None:
    """A task module slow to import (a database, a model): a stop must not wait for its whole import. Nothing
    has started yet, so the command ends there, 128 + signal, no traceback (it used to start the run first)."""
    tasks = TASKS + "\nmark('importing')\nwait_file('never', 60)  # at import: a module that takes its time\n"
    run = start_run(folder, basic_config(), tasks=tasks)
    try:
        wait_for(lambda: (folder / "importing").exists() or run.process.poll() is not None, timeout=60, what="the slow import")
        run.process.send_signal(signum)
        assert run.wait(15) == code, run.stderr[-2000:]
    finally:
        if run.process.poll() is None:
            run.process.kill()
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not list(folder.glob("logs/*.jsonl")), "the run started anyway"
