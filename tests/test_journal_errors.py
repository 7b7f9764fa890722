"""A journal that cannot be written mid-run (a full disk, a file-size limit) takes the run's fail-safe path:
exit 3, `run.crashed` and `run.finished` `crashed` with one clear message, every unfinished job pending,
no process left, never a raw traceback or a hang; and `runner resume` then finishes it, each job once.

The failures are real: the coordinator runs under RLIMIT_FSIZE (its journal, the one big file, reaches
the limit; Python ignores SIGXFSZ, so write() fails with EFBIG), or its logs.dir is a tiny tmpfs that
fills (ENOSPC for the journal, the log and the pending file alike).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Run, read_jsonl, runner_cli, small_tmpfs
from test_failsafe import _complete_lines, _run_processes

pytestmark = pytest.mark.timeout(180)

N = 400
TASKS = '''
def produce(ctx, n=400, pad=8192):
    for i in range(n):
        yield {"i": i, "pad": "x" * pad}  # 8 KiB a job in the journal; a result line is ~100 bytes


def consume(ctx, job):
    return {"i": job["i"]}
'''


def _config(name: str, logs_dir: str = "logs", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "producers": [{"name": "prod", "task": "tasks:produce", "params": {"n": N}}],
        "consumers": [{"name": "work", "task": "tasks:consume", "processes": 2}],
        "queue": {"maxsize": 10, "batch": 4},  # production paced by consumption (credit: maxsize + one batch): some done, some pending at the crash
        "results": "results.jsonl",
        "logs": {"dir": logs_dir},
        "start_method": "fork",
        "shutdown": {"grace": "5s"},
        **extra,
    }


def _start(folder: Path, config: dict[str, Any], fsize: int | None = None, tasks: str = TASKS) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(textwrap.dedent(tasks))
    (folder / "run.yaml").write_text(yaml.safe_dump(config))

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    out, err = folder / "stdout.txt", folder / "stderr.txt"
    with out.open("w") as out_file, err.open("w") as err_file:
        process = subprocess.Popen([sys.executable, "-m", "runner", "start", "--config", "run.yaml"], cwd=folder,
                                   stdout=out_file, stderr=err_file, text=True, preexec_fn=limit)
    return Run(folder, process, out, err)


def _check_crash(run: Run, name: str, logs_dir: Path, reason: str) -> set[int]:
    """The fail-safe end: exit 3, one message, nothing lost, nothing left running. The ids done so far."""
    assert run.wait(90) == 3, run.stderr[-3000:]
    log = _complete_lines(next(p for p in logs_dir.glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))))
    crashed = [e for e in log if e["event"] == "run.crashed"]
    assert len(crashed) == 1, [e["event"] for e in log]
    assert crashed[0]["error"].startswith("JournalError: cannot write the journal ") and reason in crashed[0]["error"]
    assert "runner resume" in crashed[0]["error"]
    assert "failed: JournalError: cannot write the journal" in run.stdout, run.stdout[-2000:]
    assert "Traceback" not in run.stderr.split('"traceback"')[0], run.stderr[-3000:]  # only inside the JSON log line
    assert not _run_processes(name), "a process of the stopped run is still alive"
    written = [r["result"]["i"] for r in _complete_lines(run.folder / "results.jsonl")]
    assert len(written) == len(set(written))
    return set(written)


@pytest.mark.parametrize("sync", ["20ms", "always", "never"])
def test_journal_over_the_file_size_limit_stops_the_run_cleanly(tmp_path: Path, sync: str) -> None:
    name = f"jlimit{sync.replace('ms', '')}"
    run = _start(tmp_path, _config(name, journal={"sync": sync}), fsize=512 * 1024)
    written = _check_crash(run, name, tmp_path / "logs", "File too large")
    finished = [e for e in _complete_lines(run.log_path) if e["event"] == "run.finished"][-1]
    assert finished["status"] == "crashed" and finished["exit_code"] == 3
    pending = [p["payload"]["i"] for p in run.pending()]
    assert len(pending) == len(set(pending)) == finished["pending"] and not written & set(pending)
    assert written | set(pending) == set(range(finished["produced"])), "a job lost"
    assert 0 < finished["produced"] < N
    # with room again, the journal (good up to its last complete commit) continues the run: each job once
    runs = runner_cli("runs", "--logs", "logs", cwd=tmp_path, timeout=60)
    assert "crashed" in runs.stdout and f"runner resume {run.run_id}" in runs.stdout + runs.stderr
    resumed = runner_cli("resume", run.run_id, "--logs", "logs", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = read_jsonl(tmp_path / "results.jsonl")
    assert sorted(r["result"]["i"] for r in results) == list(range(N))
    assert not (tmp_path / "logs" / f"{run.run_id}.pending.jsonl").exists()


def test_full_disk_under_the_journal_and_the_complete_lines(tmp_path: Path) -> None:
    """logs.dir on a 256 KiB tmpfs: the journal fills it, and then the log and the pending file cannot be
    written either. The run still stops cleanly with exit 3 and says where its jobs are: in the journal,
    which `runner resume` continues once the disk has room."""
    with small_tmpfs(tmp_path / "full", "256k") as full:
        run = _start(tmp_path, _config("jfull", logs_dir="full/logs"))
        assert run.wait(90) == 3, run.stderr[-3000:]
        assert "No space left on device" in run.stdout.replace("\n", " ")
        assert "Traceback" not in run.stderr.split('"traceback"')[0], run.stderr[-3000:]
        assert not _run_processes("jfull")
        run_id = next((full / "logs").glob("*.journal")).name.removesuffix(".journal")
        pending_file = full / "logs" / f"{run_id}.pending.jsonl"
        if "pending: " in run.stdout:  # jobs were unfinished at the crash (none: no pending file, no message)
            if not pending_file.exists():  # the disk was too full for it: the console says so, and how to go on
                assert f"could not be written to {pending_file.relative_to(tmp_path)}" in run.stderr
                assert f"runner resume {run_id}" in run.stderr
        else:
            assert not pending_file.exists()
        written = [r["result"]["i"] for r in _complete_lines(tmp_path / "results.jsonl")]
        assert len(written) == len(set(written))
        # room again: resume continues from the journal's last complete commit; each job once
        subprocess.run(["mount", "-o", "remount,size=16m", str(full)], check=True, capture_output=True)
        resumed = runner_cli("resume", run_id, "--logs", "full/logs", cwd=tmp_path, timeout=120)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert sorted(r["result"]["i"] for r in results) == list(range(N))


def test_results_disk_full_mid_line_then_resume_each_job_once(tmp_path: Path) -> None:
    """The results file on a 64 KiB tmpfs, each result 3 KiB: a report's write tears (part of it fits) and
    then fails. The run takes the fail-safe path (exit 3); the torn part is cut back, so the journal's last
    offset covers whole lines only, and `runner resume` with room again adds each missing job once, every
    line whole JSON (a torn line counted as written used to be glued to the resume's first line)."""
    with small_tmpfs(tmp_path / "full", "64k") as full:
        tasks = TASKS.replace('return {"i": job["i"]}', 'return {"i": job["i"], "pad": "r" * 3072}')
        config = _config("rfull", results="full/results.jsonl", queue={"maxsize": 40, "batch": 8})
        config["producers"][0]["params"] = {"n": 200, "pad": 8}
        run = _start(tmp_path, config, tasks=tasks)
        assert run.wait(90) == 3, run.stderr[-3000:]
        assert "No space left on device" in run.stdout.replace("\n", " ")
        assert not _run_processes("rfull")
        text = (full / "results.jsonl").read_bytes()
        assert text.endswith(b"\n"), "a torn line was left in the results file"
        subprocess.run(["mount", "-o", "remount,size=16m", str(full)], check=True, capture_output=True)
        resumed = runner_cli("resume", run.run_id, "--logs", "logs", cwd=tmp_path, timeout=120)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        results = [json.loads(line) for line in (full / "results.jsonl").read_text().splitlines()]
        assert sorted(r["result"]["i"] for r in results) == list(range(200))
