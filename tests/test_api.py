"""`runner.run(config)` from Python: all three start methods, errors from the error tree, the caller's state restored."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import runner
from runner.errors import ConfigError, TaskImportError, UsageError
from conftest import ROOT, runner_cli

pytestmark = pytest.mark.timeout(300)  # real runs on a busy 2-core machine

#: one script, as a user would write it: tasks defined in it, runner.run behind the __main__ guard
SCRIPT = '''
import json
import signal
import sys

import structlog

import runner


def bake(ctx, buns=10):
    for number in range(buns):
        yield {"bun": number}


def eat(ctx, job):
    if job["bun"] == 3 and ctx.attempt == 1:
        raise ValueError("burnt")
    return job["bun"] * 2


def mine(signum, frame):
    pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, mine)
    structlog.configure(processors=[structlog.processors.JSONRenderer()])
    before = structlog.get_config()
    result = runner.run({"name": "bakery", "start_method": sys.argv[1], "results": "results.jsonl",
                         "producers": [{"name": "baker", "task": bake, "params": {"buns": 5}}],
                         "consumers": [{"name": "eater", "task": eat, "processes": 2, "retries": 1, "retry_backoff": 0.01}]},
                        overrides=["producers.baker.params.buns=30"], quiet=True)
    print(json.dumps({"run_id": result.run_id, "status": result.status, "exit_code": result.exit_code, "counts": result.counts,
                      "log": str(result.log), "results": str(result.results), "dead": result.dead,
                      "sigterm_kept": signal.getsignal(signal.SIGTERM) is mine,
                      "sigint_kept": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                      "structlog_kept": structlog.get_config() == before}))
'''


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_run_from_a_script_under_each_start_method(folder: Path, method: str) -> None:
    (folder / "bakery_script.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, "bakery_script.py", method], cwd=folder, capture_output=True, text=True, timeout=110,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "finished" and result["exit_code"] == 0
    assert result["counts"] == {"produced": 30, "done": 30, "failed": 1, "retried": 1, "dead": 0, "pending": 0}
    assert result["sigterm_kept"] and result["sigint_kept"] and result["structlog_kept"]
    assert result["dead"] is None
    lines = [json.loads(line) for line in (folder / result["log"]).read_text().splitlines()]
    finished = [line for line in lines if line["event"] == "run.finished"][0]
    assert finished["run_id"] == result["run_id"] and finished["done"] == 30
    results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert sorted(r["result"] for r in results) == [2 * n for n in range(30)]


def test_a_failed_run_returns_its_result_with_the_exit_code(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (folder / "failing.py").write_text(textwrap.dedent('''
        def produce(ctx):
            yield from ({"i": i} for i in range(3))

        def consume(ctx, job):
            raise RuntimeError("no")
    '''))
    monkeypatch.chdir(folder)
    config = folder / "run.yaml"
    config.write_text("name: f\nproducers: [{name: p, task: 'failing:produce'}]\nconsumers: [{name: c, task: 'failing:consume'}]\n"
                      "start_method: fork\n")
    result = runner.run(config, quiet=True)
    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.counts["dead"] == 3 and result.dead is not None and result.dead.exists()
    assert not result.ok


def test_config_errors_raise_with_the_cli_message(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    bad = folder / "bad.yaml"
    bad.write_text("name: b\nproducers: [{name: p, task: 'x:y'}]\nconsumers: [{name: c, task: 'x:z', idle_timeot: 3}]\n")
    with pytest.raises(ConfigError) as raised:
        runner.run(bad)
    cli = runner_cli("start", "--config", str(bad), cwd=folder)
    assert cli.returncode == 2
    assert f"error: {raised.value}" in cli.stderr.replace("\n", " ") or str(raised.value).splitlines()[1] in cli.stderr
    with pytest.raises(ConfigError, match="unknown key 'idle_timeot'"):
        runner.run({"name": "b", "producers": [{"name": "p", "task": "x:y"}], "consumers": [{"name": "c", "task": "x:z", "idle_timeot": 3}]})
    with pytest.raises(TaskImportError, match="no module named 'nowhere'"):
        runner.run({"name": "b", "producers": [{"name": "p", "task": "nowhere:y"}], "consumers": [{"name": "c", "task": "nowhere:z"}]})
    with pytest.raises(UsageError, match="top level of a module"):
        runner.run({"name": "b", "producers": [{"name": "p", "task": lambda ctx: iter(())}], "consumers": [{"name": "c", "task": "x:z"}]})


def test_only_from_the_main_thread() -> None:
    raised: list[BaseException] = []

    def call() -> None:
        try:
            runner.run({"name": "t"})
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(30)
    assert len(raised) == 1 and isinstance(raised[0], UsageError)
    assert "main thread" in str(raised[0])


def test_import_runner_stays_cheap() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, runner; print(sorted(m for m in sys.modules if m.startswith(('runner', 'structlog', 'zmq', 'pydantic'))))"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.strip() == "['runner']"
