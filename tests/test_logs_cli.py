"""`runner runs` and `runner logs ...` through typer's CliRunner (a tiny app with `register(app)`) and subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer
from logfixtures import (
    HOST,
    ContractLog,
    RealRun,
    real_crashy_run,
    run_env,
    start_gated_run,
    tiny_app_command,
    validate_trace_events,
    wait_for,
    write_demo_run,
)
from typer.testing import CliRunner

from runner.cli.logs import register

pytestmark = pytest.mark.timeout(120)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7])[;m]")


def make_app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    register(app)
    return app


def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    base = {"NO_COLOR": None, "FORCE_COLOR": None, "COLUMNS": "200", "TTY_COMPATIBLE": None}
    return CliRunner().invoke(make_app(), list(args), env={**base, **(env or {})})


@pytest.fixture(scope="module")
def crashy(tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    return real_crashy_run(tmp_path_factory.mktemp("crashy-cli"))


@pytest.fixture
def demo_logs(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    write_demo_run(logs, "older", start=datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc))
    write_demo_run(logs, "demo")
    return logs


# -- runner logs ----------------------------------------------------------------------------
def test_logs_prints_the_newest_run_plain_when_piped(demo_logs: Path) -> None:
    result = invoke("logs", "--logs", str(demo_logs))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len((demo_logs / next(p.name for p in demo_logs.iterdir() if p.name.startswith("demo-"))).read_text().splitlines())
    assert "run.started" in lines[0] and "run.finished" in lines[-1] and not ANSI.search(result.stdout)
    assert lines[4].split()[:3] == ["23:30:01.210", "info", "job.queued"]


def test_logs_colours_a_terminal_unless_no_color(demo_logs: Path) -> None:
    coloured = invoke("logs", "--logs", str(demo_logs), "--level", "error", env={"FORCE_COLOR": "1"})
    assert COLOUR.search(coloured.stdout), coloured.stdout
    plain = invoke("logs", "--logs", str(demo_logs), "--level", "error", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert not ANSI.search(plain.stdout) and "worker.crashed" in plain.stdout
    for command in (["runs"], ["logs", "summary"], ["logs", "trace", "9"]):
        styled = invoke(*command, "--logs", str(demo_logs), env={"FORCE_COLOR": "1"})
        assert styled.exit_code == 0 and ANSI.search(styled.stdout), styled.output
        unstyled = invoke(*command, "--logs", str(demo_logs), env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
        assert unstyled.exit_code == 0 and not ANSI.search(unstyled.stdout) and unstyled.stdout.strip()


def test_logs_json_prints_the_raw_lines_unchanged(crashy: RealRun) -> None:
    result = invoke("logs", crashy.run_id, "--logs", str(crashy.logs_dir), "--json", "--event", "job.*", "--level", "warning")
    raw = [line for line in crashy.log_path.read_text().splitlines() if json.loads(line)["event"] in ("job.failed", "job.dead")]
    assert result.exit_code == 0 and result.stdout.splitlines() == raw and len(raw) == 5


def test_logs_filters_alone_and_combined_from_the_command_line(crashy: RealRun) -> None:
    def run_json(*flags: str) -> list[dict]:
        result = invoke("logs", str(crashy.log_path), "--json", *flags)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    everything = crashy.lines()
    assert run_json("--job", "7") == [l for l in everything if l.get("job_id") == 7]
    assert run_json("--job", "7", "--job", "9", "--event", "job.failed") == [l for l in everything if l["event"] == "job.failed" and l["job_id"] in (7, 9)]
    assert run_json("--worker", "work-*", "--level", "error") == [l for l in everything if l["level"] == "error" and str(l["worker"]).startswith("work-")]
    assert run_json("--pool", "work", "--grep", "cursed", "-n", "2") == [l for l in everything if l["pool"] == "work" and "cursed" in json.dumps(l)][:2]
    assert run_json("--host", HOST, "--since", "1h", "--until", "2099-01-01T00:00:00Z", "--event", "run.*") == [l for l in everything if l["event"].startswith("run.")]
    assert run_json("--since", "2099-01-01") == []


def test_logs_show_is_also_a_subcommand_and_help_lists_the_rest(demo_logs: Path) -> None:
    explicit = invoke("logs", "show", "--logs", str(demo_logs), "--event", "job.dead")
    implicit = invoke("logs", "--logs", str(demo_logs), "--event", "job.dead")
    assert explicit.stdout == implicit.stdout and "job.dead" in explicit.stdout
    helped = invoke("logs", "--help")
    assert helped.exit_code == 0 and all(name in helped.stdout for name in ("trace", "summary", "timeline", "show"))


# -- exit 2 and damage ----------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["logs", "no-such-run"],
    ["logs", "no-such-file.jsonl"],
    ["logs", "trace", "3", "no-such-run"],
    ["logs", "summary", "no-such-run"],
    ["logs", "timeline", "no-such-run", "-o", "x.json"],
    ["logs", "--since", "last tuesday"],
    ["logs", "--level", "loud"],
    ["logs", "--grep", "([oops"],
    ["logs", "--follow", "RUNS", "RUNS"],
])
def test_usage_mistakes_are_one_line_on_stderr_and_exit_2(demo_logs: Path, args: list[str]) -> None:
    run_id = next(p.name.removesuffix(".jsonl") for p in demo_logs.iterdir())
    args = [run_id if a == "RUNS" else a for a in args]
    result = invoke(*args, "--logs", str(demo_logs))
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output


def test_no_runs_and_no_folder_are_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for args in (["logs", "--logs", str(tmp_path / "empty")], ["logs", "summary", "--logs", str(tmp_path / "nowhere")],
                 ["runs", "--logs", str(tmp_path / "nowhere")]):
        result = invoke(*args)
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def test_damaged_lines_give_one_warning_at_the_end(tmp_path: Path) -> None:
    log = write_demo_run(tmp_path)
    text = log.path.read_text().splitlines(keepends=True)
    text.insert(2, "garbage\n")
    text.insert(5, json.dumps({"timestamp": log.stamp(0.2), "event": "job.queued"}) + "\n")  # no level
    log.path.write_text("".join(text) + '{"timestamp":"2026-11-26T23:30:09.000Z","le')
    # trace parses only lines that name its job or do not look like a whole JSON object: the line without a level is neither
    for args, count in ((["logs", str(log.path)], 3), (["logs", "summary", str(log.path)], 3), (["logs", "trace", "9", str(log.path)], 2)):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert result.stderr == f"warning: skipped {count} damaged lines (first: {log.path}:3: not JSON)\n"
    assert "run.finished" in invoke("logs", str(log.path)).stdout


def test_lines_of_a_shape_the_runner_never_writes_are_one_message_not_a_traceback(tmp_path: Path) -> None:
    """Valid JSON, wrong types (edited by hand, another program): `runs` lists the run with what it can read
    and leaves out a log it cannot; the readers end with one line and exit 2."""
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [{"timestamp": "2026-01-01T00:00:00.000Z", "level": "info", "event": "run.started", "run_id": "odd", "name": "odd"},
             {"timestamp": "2026-01-01T00:00:01.000Z", "level": "info", "event": "progress", "done": "x"},
             {"timestamp": "2026-01-01T00:00:02.000Z", "level": "error", "event": "job.dead", "job_id": [1]},
             {"timestamp": "2026-01-01T00:00:03.000Z", "level": "info", "event": "run.finished", "status": "finished",
              "duration_s": "5", "done": "many"}]
    (logs / "odd-20260101T000000Z-abcd.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    bad_month = {**lines[0], "timestamp": "2026-13-01T00:00:00.000Z"}
    (logs / "month-20260101T000000Z-abcd.jsonl").write_text(json.dumps(bad_month) + "\n")
    result = invoke("runs", "--logs", str(logs))
    assert result.exit_code == 0 and "odd-20260101T000000Z-abcd" in result.stdout, result.output
    assert "month-20260101T000000Z-abcd.jsonl has a line of an unexpected shape" in result.stderr, result.stderr
    for args in (["logs", "summary", "odd-20260101T000000Z-abcd"], ["logs", "odd-20260101T000000Z-abcd", "--job", "1"]):
        result = invoke(*args, "--logs", str(logs))
        assert result.exit_code == 2 and result.stderr.startswith("error: a log line of an unexpected shape"), (args, result.output)
        assert len(result.stderr.splitlines()) == 1 and isinstance(result.exception, SystemExit), (args, result.exception)


# -- trace, summary, timeline ---------------------------------------------------------------
def test_trace_command(crashy: RealRun) -> None:
    result = invoke("logs", "trace", "7", "--logs", str(crashy.logs_dir))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0] == "job 7 (pool work, produced by prod-1): done after 2 attempts"
    assert [w for w in ("queued", "crashed", "attempt 1", "retried", "attempt 2") if w in out] == ["queued", "crashed", "attempt 1", "retried", "attempt 2"]
    assert "exited with code 3" in out and out.index("attempt 1") < out.index("attempt 2")
    as_json = json.loads(invoke("logs", "trace", "7", crashy.run_id, "--logs", str(crashy.logs_dir), "--json").stdout)
    assert [a["outcome"] for a in as_json["attempts"]] == ["crashed", "done"] and as_json["outcome"] == "done"
    missing = invoke("logs", "trace", "4242", "--logs", str(crashy.logs_dir))
    assert missing.exit_code == 1 and "no line mentions job 4242" in missing.stderr


def test_summary_command(crashy: RealRun, demo_logs: Path) -> None:
    result = invoke("logs", "summary", "--logs", str(crashy.logs_dir))
    assert result.exit_code == 0, result.output
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("work "))
    assert row[:7] == ["work", "19", "4", "3", "1", "1", row[6]]
    assert "ValueError: nine is cursed" in result.stdout and "throughput" in result.stdout
    data = json.loads(invoke("logs", "summary", "--json", "--logs", str(demo_logs)).stdout)
    assert data["pools"]["eat"]["done"] == 9 and data["pools"]["eat"]["p50_ms"] == 40.0
    assert list(data["runs"]) == [next(p.name.removesuffix(".jsonl") for p in demo_logs.iterdir() if p.name.startswith("demo-"))]


def test_timeline_command_writes_valid_trace_events(crashy: RealRun, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    result = invoke("logs", "timeline", crashy.run_id, "--logs", str(crashy.logs_dir), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("wrote ") and str(out) in result.stderr
    events = validate_trace_events(json.loads(out.read_text()))
    assert sum(e["ph"] == "X" for e in events) == sum(1 for l in crashy.lines() if l["event"] in ("job.done", "job.failed") and l["role"] == "consumer")
    to_stdout = invoke("logs", "timeline", str(crashy.log_path), "-o", "-")
    assert json.loads(to_stdout.stdout) == json.loads(out.read_text())


# -- runner runs ----------------------------------------------------------------------------
def test_runs_command(tmp_path: Path, crashy: RealRun) -> None:
    logs = tmp_path / "logs"
    write_demo_run(logs, "demo")
    live = ContractLog(logs, "live", start=datetime(2026, 11, 26, 20, 0, 0, tzinfo=timezone.utc), coordinator_pid=os.getpid())
    live.run_started()
    (logs / crashy.log_path.name).write_bytes(crashy.log_path.read_bytes())
    result = invoke("runs", "--logs", str(logs))
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    assert [r[0] for r in rows] == [crashy.run_id, "demo-20261126T233001Z-3f2a", live.run_id]
    assert rows[0][1] == "crashy" and rows[0][-4:] == ["failed", "19", "4", "1"]
    assert rows[1][-4:] == ["failed", "9", "3", "1"]
    assert rows[2][-4:] == ["running", "-", "-", "-"]
    records = [json.loads(line) for line in invoke("runs", "--logs", str(logs), "--json").stdout.splitlines()]
    assert [(r["run_id"], r["status"]) for r in records] == [(crashy.run_id, "failed"), ("demo-20261126T233001Z-3f2a", "failed"), (live.run_id, "running")]


def test_main_runner_app_has_the_commands(crashy: RealRun) -> None:
    done = subprocess.run([sys.executable, "-m", "runner", "runs", "--logs", str(crashy.logs_dir)], capture_output=True, text=True,
                          timeout=60, env=run_env())
    assert done.returncode == 0, done.stderr
    assert crashy.run_id in done.stdout


# -- --follow -------------------------------------------------------------------------------
def test_follow_prints_appended_lines_and_stops_on_run_finished(tmp_path: Path) -> None:
    log = ContractLog(tmp_path / "logs", "live", coordinator_pid=os.getpid())
    log.run_started()
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        follower = subprocess.Popen(tiny_app_command("logs", "--follow", "--logs", str(tmp_path / "logs"), "--json"),
                                    stdout=sink, stderr=subprocess.PIPE, text=True, env=run_env())
    try:
        wait_for(lambda: "run.started" in out.read_text(), what="the first line")
        log.job_done(0.5, 1, "eat-1", 4002, 3.0)
        wait_for(lambda: '"job.done"' in out.read_text(), what="an appended line")
        log.write_raw('{"timestamp":"2026-11-26T23:30:01.900Z","level":"info","event":"job.done","run_id":"x",')
        log.write_raw('"host":"h","pid":1,"role":"consumer","pool":"eat","worker":"eat-2","job_id":2,"attempt":1,"duration_ms":1.0}\n')
        log.run_finished(2.0, produced=2, done=2, failed=0, retried=0, dead=0, pending=0, pools={}, workers={})
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
        follower.wait()
    events = [json.loads(line)["event"] for line in out.read_text().splitlines()]
    assert events == ["run.started", "job.done", "job.done", "run.finished"]
    assert follower.stderr is not None and follower.stderr.read() == ""


def test_follow_a_live_real_run_to_its_end(tmp_path: Path) -> None:
    run = start_gated_run(tmp_path, jobs=10)
    out = tmp_path / "out.txt"
    follower = None
    try:
        logs = tmp_path / "logs"
        wait_for(lambda: logs.is_dir() and any(logs.glob("*.jsonl")), what="the run's log file")
        with out.open("w") as sink:
            follower = subprocess.Popen(tiny_app_command("logs", "--follow", "--logs", str(logs), "--event", "item.seen", "--event", "run.*"),
                                        stdout=sink, stderr=subprocess.PIPE, text=True, env=run_env())
        assert follower.poll() is None  # no job has run yet: the producer waits for the gate
        (tmp_path / "gate").touch()
        assert follower.wait(timeout=60) == 0  # ends by itself once run.finished is written
        assert run.wait(timeout=60) == 0
    finally:
        for process in (follower, run):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    lines = out.read_text().splitlines()
    assert len([line for line in lines if " item.seen " in line]) == 10
    assert " run.started " in lines[0] and " run.finished " in lines[-1]
