"""runner.logs (read, runs, trace, summary, timeline): filters, merging, damage, trace, summary, timeline and run discovery, in process."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from logfixtures import (
    DEMO_DURATIONS,
    HOST,
    ContractLog,
    RealRun,
    dead_pid,
    read_jsonl,
    real_bakery_run,
    real_crashy_run,
    validate_trace_events,
    write_demo_run,
)

from runner.logs.read import Damage, LineFilter, checked, follow_file, parse_when, read_lines
from runner.logs.runs import LogSourceError, find_runs, resolve_sources, run_info
from runner.logs.summary import ErrorTable, Quantiles, Throughput, sparkline, summarize
from runner.logs.timeline import write_timeline
from runner.logs.trace import job_prefilter, trace

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="session")
def bakery(tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    """configs/bakery.yaml run for real, every job logged."""
    return real_bakery_run(tmp_path_factory.mktemp("bakery"))


@pytest.fixture(scope="session")
def crashy(tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    """A real run where job 7 kills its worker once, job 9 is dead-lettered and job 11 fails once."""
    return real_crashy_run(tmp_path_factory.mktemp("crashy"))


def matching(paths: list[Path], **filters: Any) -> list[dict[str, Any]]:
    damage = Damage()
    lines = [line.fields for line in LineFilter(**filters).lines(paths, damage)]
    assert damage.count == 0, damage.message()
    return lines


# -- filters over a real run ----------------------------------------------------------------
def test_no_filter_reads_every_line_in_file_order(bakery: RealRun) -> None:
    assert matching([bakery.log_path]) == bakery.lines()


def test_each_filter_alone(bakery: RealRun) -> None:
    path, everything = [bakery.log_path], bakery.lines()
    done = [line for line in everything if line["event"] == "job.done"]
    assert len(done) >= 100
    assert matching(path, event=["job.done"]) == done
    assert {line["event"] for line in matching(path, event=["job.*"])} == {"job.queued", "job.done"}
    assert matching(path, event=["worker.*", "run.*"]) == [l for l in everything if l["event"].split(".")[0] in ("worker", "run")]
    assert matching(path, level="warning") == [l for l in everything if l["level"] in ("warning", "error", "critical")]
    assert matching(path, level="debug") == everything
    assert matching(path, pool=["baker"]) == [l for l in everything if l["pool"] == "baker"]
    assert matching(path, worker=["eater-*"]) == [l for l in everything if str(l["worker"]).startswith("eater-")]
    assert matching(path, worker=["eater-1"]) == [l for l in everything if l["worker"] == "eater-1"]
    assert matching(path, host=[HOST]) == everything
    assert matching(path, host=["elsewhere"]) == []
    assert matching(path, job=[5]) == [l for l in everything if l.get("job_id") == 5]
    assert {l["event"] for l in matching(path, job=[5])} == {"job.queued", "bun.eaten", "job.done"}
    assert matching(path, grep=r'"bun":4[0-9],') == [l for l in everything if l["event"] == "bun.eaten" and 40 <= l["bun"] <= 49]
    assert matching(path, limit=7) == everything[:7]
    assert matching(path, limit=0) == []


def test_since_and_until_take_the_run_own_timestamps(bakery: RealRun) -> None:
    everything = bakery.lines()
    middle = sorted(line["timestamp"] for line in everything)[len(everything) // 2]
    after = matching([bakery.log_path], since=parse_when(middle))
    before = matching([bakery.log_path], until=parse_when(middle))
    assert after == [l for l in everything if l["timestamp"] >= middle]
    assert before == [l for l in everything if l["timestamp"] <= middle]
    assert matching([bakery.log_path], since=parse_when("1d")) == everything  # the run was moments ago
    assert matching([bakery.log_path], until=parse_when("1d")) == []


def test_filters_combine_with_and_repeats_with_or(bakery: RealRun) -> None:
    everything = bakery.lines()
    got = matching([bakery.log_path], event=["job.done", "bun.eaten"], worker=["eater-1", "eater-2"], job=list(range(1, 31)), limit=1000)
    expected = [l for l in everything if l["event"] in ("job.done", "bun.eaten") and l["worker"] in ("eater-1", "eater-2")
                and l.get("job_id") in range(1, 31)]
    assert got == expected and got
    got = matching([bakery.log_path], pool=["eater"], level="info", grep="baker-2", event=["bun.*"], limit=5)
    assert got == [l for l in everything if l["event"] == "bun.eaten" and l["baker"] == "baker-2"][:5]
    assert matching([bakery.log_path], pool=["eater"], level="warning") == []


def test_parse_when_forms() -> None:
    now = datetime(2026, 11, 26, 23, 30, 0, tzinfo=timezone.utc).timestamp()
    assert parse_when("10m", now) == "2026-11-26T23:20:00.000Z"
    assert parse_when("1h30m", now) == "2026-11-26T22:00:00.000Z"
    assert parse_when("30s", now) == "2026-11-26T23:29:30.000Z"
    assert parse_when("1d", now) == "2026-11-25T23:30:00.000Z"
    assert parse_when("2026-11-26T23:30:01.123Z") == "2026-11-26T23:30:01.123Z"
    assert parse_when("2026-11-26T23:30:01") == "2026-11-26T23:30:01.000Z"  # naive: UTC, like the log
    assert parse_when("2026-11-27T00:30:01+01:00") == "2026-11-26T23:30:01.000Z"
    for bad in ("yesterday", "10 minutes", "5x", ""):
        with pytest.raises(ValueError):
            parse_when(bad)


def test_bad_filter_values_raise_value_error() -> None:
    with pytest.raises(ValueError):
        LineFilter(level="loud")
    with pytest.raises(ValueError):
        LineFilter(grep="([unclosed")


# -- several files --------------------------------------------------------------------------
def test_several_files_merge_by_timestamp(bakery: RealRun, tmp_path: Path) -> None:
    raw = bakery.log_path.read_text().splitlines(keepends=True)
    coordinator = tmp_path / "coordinator.jsonl"
    workers = tmp_path / "workers.jsonl"
    coordinator.write_text("".join(l for l in raw if '"role":"coordinator"' in l))
    workers.write_text("".join(l for l in raw if '"role":"coordinator"' not in l))
    merged = matching([coordinator, workers])
    assert Counter(json.dumps(l, sort_keys=True) for l in merged) == Counter(json.dumps(l, sort_keys=True) for l in bakery.lines())
    coordinator_stamps = [l["timestamp"] for l in merged if l["role"] == "coordinator"]
    assert coordinator_stamps == [l["timestamp"] for l in read_jsonl(coordinator)]  # each file's own order kept


def test_copies_of_one_run_are_not_counted_twice(bakery: RealRun, tmp_path: Path) -> None:
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(bakery.log_path.read_bytes())
    assert len(matching([bakery.log_path, copy])) == len(bakery.lines())


# -- damaged files --------------------------------------------------------------------------
def damaged_log(folder: Path) -> ContractLog:
    log = write_demo_run(folder)
    text = log.path.read_text().splitlines(keepends=True)
    text.insert(3, "this is not json\n")  # line 4
    text.insert(6, json.dumps({"timestamp": log.stamp(0.15), "level": "info", "run_id": log.run_id}) + "\n")  # line 7: no event
    text.insert(8, json.dumps({**json.loads(text[5]), "event": "job.teleported", "job_id": 3}) + "\n")  # line 9
    text.insert(9, json.dumps({**json.loads(text[5]), "event": "job.done", "job_id": None}) + "\n")  # line 10: job.done without job_id
    text.insert(10, "[1, 2, 3]\n")  # line 11
    text.append('{"timestamp":"2026-11-26T23:30:04.000Z","level":"info","event":"pro')  # torn last line
    log.path.write_text("".join(text))
    return log


def test_damaged_lines_are_counted_once_and_skipped(tmp_path: Path) -> None:
    log = damaged_log(tmp_path)
    damage = Damage()
    lines = list(read_lines([log.path], damage))
    assert damage.count == 4  # not JSON, missing event, not an object, torn last line
    assert damage.first == (str(log.path), 4, "not JSON")
    assert "skipped 4 damaged lines (first: " in str(damage.message()) and ":4: not JSON" in str(damage.message())
    assert [l.event for l in lines][-1] == "run.finished"
    assert "job.teleported" in {l.event for l in lines}  # an unknown event is still a line to show


def test_torn_last_line_is_named(tmp_path: Path) -> None:
    log = write_demo_run(tmp_path)
    log.write_raw('{"timestamp":"2026-11-26T23:30:04.000Z","lev')
    damage = Damage()
    assert list(read_lines([log.path], damage))[-1].event == "run.finished"
    assert damage.count == 1 and damage.first is not None and damage.first[2] == "torn last line"


def test_analyses_skip_unknown_runner_events_and_lines_missing_what_they_need(tmp_path: Path) -> None:
    log = damaged_log(tmp_path)
    damage = Damage()
    summary = summarize(read_lines([log.path], damage), damage)
    assert damage.count == 6
    assert summary["pools"]["eat"]["done"] == 9
    damage = Damage()
    assert trace(checked(read_lines([log.path], damage), damage), 3).outcome == "done"
    damage = Damage()
    out = tmp_path / "trace.json"
    with out.open("wb") as handle:
        write_timeline(read_lines([log.path], damage), handle, damage)
    validate_trace_events(json.loads(out.read_text()))


def test_a_user_event_in_its_own_namespace_is_fine(tmp_path: Path) -> None:
    log = write_demo_run(tmp_path)
    log.line(2.9, "bun.eaten", role="consumer", pool="eat", worker="eat-1", pid=4004, job_id=3, attempt=1, bun=3)
    damage = Damage()
    summarize(read_lines([log.path], damage), damage)
    assert damage.count == 0


# -- trace ----------------------------------------------------------------------------------
def test_trace_of_a_job_that_crashed_its_worker_was_retried_and_succeeded(crashy: RealRun) -> None:
    damage = Damage()
    lines = read_lines([crashy.log_path], damage, job_prefilter(7))
    job = trace(checked(lines, damage), 7)
    crash = next(l for l in crashy.lines("worker.crashed") if l["job_id"] == 7)
    restarted = next(l for l in crashy.lines("worker.started") if l["worker"] == crash["worker"] and l["restart"] > 0)
    done = next(l for l in crashy.lines("job.done") if l["job_id"] == 7)
    assert (job.pool, job.origin, job.outcome) == ("work", "prod-1", "done")
    assert [(a.number, a.outcome) for a in job.attempts] == [(1, "crashed"), (2, "done")]
    first, second = job.attempts
    assert (first.worker, first.pid, first.host) == (crash["worker"], crash["pid"], HOST)
    assert first.error == f"worker {crash['worker']} exited with code 3"
    assert (second.worker, second.pid, second.duration_ms) == (done["worker"], done["pid"], done["duration_ms"])
    if done["worker"] == crash["worker"]:
        assert second.pid == restarted["pid"]
    assert [s.what for s in job.steps] == ["queued", "crashed", "attempt 1", "retried", "attempt 2"]
    assert "produced by prod-1" in job.steps[0].detail
    assert job.steps[3].detail == "attempt 2 scheduled in 10 ms"
    assert [s.timestamp for s in job.steps] == sorted(s.timestamp for s in job.steps)


def test_trace_of_a_dead_job_and_of_one_that_failed_once(crashy: RealRun) -> None:
    damage = Damage()
    dead = trace(read_lines([crashy.log_path], damage), 9)
    assert dead.outcome == "dead"
    assert [(a.number, a.outcome, a.error) for a in dead.attempts] == [(1, "failed", "ValueError: nine is cursed"), (2, "failed", "ValueError: nine is cursed")]
    assert all(a.duration_ms is not None and a.pid and a.worker.startswith("work-") for a in dead.attempts)
    assert dead.steps[-1].what == "dead" and "after 2 attempt(s)" in dead.steps[-1].detail
    flaky = trace(read_lines([crashy.log_path], damage), 11)
    assert [(a.number, a.outcome) for a in flaky.attempts] == [(1, "failed"), (2, "done")] and flaky.outcome == "done"
    assert not trace(read_lines([crashy.log_path], damage), 999).found


def test_trace_prefilter_does_not_confuse_job_ids(crashy: RealRun) -> None:
    test = job_prefilter(1)
    assert test(b'{"event":"job.done","job_id":1,"attempt":1}') and test(b'{"job_id": 1}')
    assert not test(b'{"event":"job.done","job_id":12}') and not test(b'{"job_id":1.5}')
    assert test(b'{"event":"run.finished"}')


def test_trace_of_an_unfinished_job_in_a_stopped_run(tmp_path: Path) -> None:
    log = ContractLog(tmp_path, "stopped")
    log.run_started()
    log.job_queued(0.1, 1, "eat", "bake-1")
    log.run_finished(0.5, "stopped", produced=1, done=0, failed=0, retried=0, dead=0, pending=1, pools={}, workers={})
    assert trace(read_lines([log.path], Damage()), 1).outcome == "unfinished"


# -- summary --------------------------------------------------------------------------------
def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_summary_of_the_bakery_matches_its_lines(bakery: RealRun) -> None:
    damage = Damage()
    summary = summarize(read_lines([bakery.log_path], damage), damage)
    finished = bakery.lines("run.finished")[0]
    eater = summary["pools"]["eater"]
    assert (eater["done"], eater["failed"], eater["retried"], eater["dead"]) == (100, 0, 0, 0)
    durations = [l["duration_ms"] for l in bakery.lines("job.done")]
    assert (eater["p50_ms"], eater["p95_ms"], eater["p99_ms"]) == tuple(nearest_rank(durations, q) for q in (0.5, 0.95, 0.99))
    assert eater["times_from"] == "lines"
    exited = {l["worker"]: l["jobs"] for l in bakery.lines("worker.exited")}
    for name, worker in summary["workers"].items():
        assert worker["done"] == finished["workers"][name]["done"]
        if worker["pool"] == "eater":
            assert worker["done"] == exited.get(name, worker["done"])
    assert sum(w["done"] for w in summary["workers"].values()) == 100
    assert summary["hosts"][HOST]["done"] == 100
    assert set(summary["workers"]) == {"baker-1", "baker-2", "eater-1", "eater-2", "eater-3"}
    assert summary["errors"] == []
    throughput = summary["throughput"]
    assert throughput["jobs_per_s"] and sum(r * throughput["bucket_s"] for r in throughput["jobs_per_s"]) == pytest.approx(len(durations))


def test_summary_of_a_run_with_a_crash_a_retry_and_a_dead_job(crashy: RealRun) -> None:
    damage = Damage()
    summary = summarize(read_lines([crashy.log_path], damage), damage)
    work = summary["pools"]["work"]
    assert (work["done"], work["failed"], work["retried"], work["dead"], work["crashes"]) == (19, 4, 3, 1, 1)
    assert work["restarts"] == len([l for l in crashy.lines("worker.started") if l["restart"] > 0])
    crashed = next(l["worker"] for l in crashy.lines("worker.crashed"))
    assert summary["workers"][crashed]["crashes"] == 1
    assert sum(w["dead"] for w in summary["workers"].values()) == 1
    assert sum(w["retried"] for w in summary["workers"].values()) == 3
    errors = {e["message"]: e for e in summary["errors"]}
    assert errors["ValueError: nine is cursed"]["count"] == 2 and errors["ValueError: nine is cursed"]["examples"] == [9]
    assert errors[f"worker {crashed} exited with code 3"]["examples"] == [7]
    assert errors["RuntimeError: flaky"]["count"] == 1
    assert summary["errors"][0]["message"] == "ValueError: nine is cursed"  # most frequent first
    assert summary["runs"][crashy.run_id]["status"] == "failed"


def test_summary_figures_of_the_hand_written_run(tmp_path: Path) -> None:
    log = write_demo_run(tmp_path)
    summary = summarize(read_lines([log.path], Damage()), Damage())
    eat = summary["pools"]["eat"]
    assert {k: eat[k] for k in ("done", "failed", "retried", "dead", "crashes", "restarts")} == \
        {"done": 9, "failed": 3, "retried": 2, "dead": 1, "crashes": 1, "restarts": 1}
    times = [*DEMO_DURATIONS.values(), 90.0, 5.0, 6.0]
    assert (eat["p50_ms"], eat["p95_ms"], eat["p99_ms"]) == (nearest_rank(times, 0.5), 90.0, 90.0) == (40.0, 90.0, 90.0)
    assert summary["workers"]["eat-1"]["crashes"] == 1 and summary["workers"]["eat-1"]["restarts"] == 1
    assert summary["workers"]["eat-2"]["dead"] == 1 and summary["workers"]["eat-2"]["retried"] == 1
    assert summary["workers"]["eat-1"]["retried"] == 1
    errors = summary["errors"]
    assert errors[0] == {"message": "ValueError: bad bun 10", "count": 2, "first": log.stamp(2.2), "last": log.stamp(2.8), "examples": [10]}
    assert errors[1]["message"] == "worker eat-1 killed by SIGKILL, possibly out of memory" and errors[1]["examples"] == [9]


def test_summary_without_job_lines_falls_back_on_run_finished(tmp_path: Path) -> None:
    log = write_demo_run(tmp_path)
    kept = [l for l in log.path.read_text().splitlines(keepends=True) if '"job.done"' not in l and '"job.failed"' not in l]
    log.path.write_text("".join(kept))  # what logs.jobs: none would leave
    summary = summarize(read_lines([log.path], Damage()), Damage())
    eat = summary["pools"]["eat"]
    assert (eat["done"], eat["failed"], eat["p50_ms"], eat["p95_ms"], eat["times_from"]) == (9, 3, 50.0, 90.0, "run.finished")
    assert summary["workers"]["eat-1"]["done"] == 5
    assert summary["throughput"]["from"] == "progress" and sum(summary["throughput"]["jobs_per_s"]) > 0


def test_summary_of_a_crashed_run_counts_its_lines(tmp_path: Path) -> None:
    log = write_demo_run(tmp_path, finished=False)
    summary = summarize(read_lines([log.path], Damage()), Damage())
    assert summary["counts_from"] == "lines"
    assert (summary["pools"]["eat"]["done"], summary["pools"]["eat"]["dead"]) == (9, 1)


def test_quantiles_are_exact_up_to_the_cap_then_within_a_percent() -> None:
    exact = Quantiles(cap=1000)
    sketched = Quantiles(cap=1000)
    values = [((i * 7919) % 10007) / 10.0 + 0.1 for i in range(50_000)]
    for value in values[:1000]:
        exact.add(value)
    for value in values:
        sketched.add(value)
    assert exact.values is not None and sketched.values is None
    assert exact.quantile(0.95) == nearest_rank(values[:1000], 0.95)
    for q in (0.5, 0.95, 0.99):
        assert sketched.quantile(q) == pytest.approx(nearest_rank(values, q), rel=0.02)


def test_bounded_state_for_long_runs_and_many_errors() -> None:
    throughput = Throughput(slots=30)
    for second in range(200_000):
        throughput.add(1_000_000.0 + second, 2)
    assert len(throughput.counts) <= 60 and sum(throughput.counts) == 400_000
    errors = ErrorTable(cap=50)
    for n in range(500):
        errors.add(f"KeyError: {n}", "2026-11-26T23:30:01.000Z", n)
    assert len(errors.groups) == 50 and errors.other == 450


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 4, 8]) == " ▂▃▅█"
    assert sparkline([]) == "" and sparkline([0, 0]) == "  "


# -- timeline -------------------------------------------------------------------------------
def timeline_of(paths: list[Path], out: Path) -> list[dict[str, Any]]:
    damage = Damage()
    with out.open("wb") as handle:
        count = write_timeline(read_lines(paths, damage), handle, damage)
    document = json.loads(out.read_text())
    assert len(document["traceEvents"]) == count and damage.count == 0
    return validate_trace_events(document)


def test_timeline_of_a_real_run_is_valid_and_has_a_slice_per_attempt(crashy: RealRun, tmp_path: Path) -> None:
    events = timeline_of([crashy.log_path], tmp_path / "trace.json")
    attempts = [l for l in crashy.lines() if l["event"] in ("job.done", "job.failed") and l["role"] == "consumer"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(attempts)
    assert Counter((e["args"]["job_id"], e["args"]["attempt"], e["tid"]) for e in slices) == \
        Counter((l["job_id"], l["attempt"], l["pid"]) for l in attempts)
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    for started in crashy.lines("worker.started"):
        assert threads[started["pid"]].startswith(started["worker"])
    crash = crashy.lines("worker.crashed")[0]
    instants = [e for e in events if e["ph"] == "i" and e["name"] == "worker.crashed"]
    assert [(e["tid"], e["args"]["job_id"]) for e in instants] == [(crash["pid"], 7)]
    assert any(e["ph"] == "C" for e in events)
    crashed = [e for e in slices if e["args"]["outcome"] == "crashed"]
    assert [(e["args"]["job_id"], e["tid"]) for e in crashed] == [(7, crash["pid"])]
    failed = [e for e in slices if e["args"]["outcome"] == "failed"]
    assert len(failed) == 3 and {e["args"]["error"] for e in failed} == {"ValueError: nine is cursed", "RuntimeError: flaky"}


def test_timeline_slices_end_at_the_line_timestamp(tmp_path: Path) -> None:
    log = write_demo_run(tmp_path)
    events = timeline_of([log.path], tmp_path / "trace.json")
    job_3 = next(e for e in events if e["ph"] == "X" and e["args"]["job_id"] == 3)
    end = datetime.fromisoformat(log.stamp(0.8)).timestamp() * 1_000_000
    assert job_3["ts"] + job_3["dur"] == pytest.approx(end) and job_3["dur"] == 30_000
    assert job_3["tid"] == 4002
    hosts = [e for e in events if e["name"] == "process_name"]
    assert [h["args"]["name"] for h in hosts] == [f"host {HOST}"]


def test_timeline_puts_each_host_in_its_own_process(tmp_path: Path) -> None:
    log = ContractLog(tmp_path, "two")
    log.run_started()
    log.worker_started(0.1, "eat-1", "eat", 500, host="alpha")
    log.worker_started(0.1, "eat-2", "eat", 500, host="beta")
    log.job_done(0.5, 1, "eat-1", 500, 100.0, host="alpha")
    log.job_done(0.5, 2, "eat-2", 500, 100.0, host="beta")
    events = timeline_of([log.path], tmp_path / "trace.json")
    slices = [e for e in events if e["ph"] == "X"]
    assert len({e["pid"] for e in slices}) == 2 and {e["tid"] for e in slices} == {500}


# -- runs -----------------------------------------------------------------------------------
def test_runs_are_listed_newest_first_with_their_status(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    old = write_demo_run(logs, "old", start=datetime(2026, 11, 20, 8, 0, 0, tzinfo=timezone.utc))
    running = ContractLog(logs, "live", start=datetime(2026, 11, 26, 9, 0, 0, tzinfo=timezone.utc), coordinator_pid=os.getpid())
    running.run_started()
    running.progress(1.0, produced=5, done=3, failed=1)
    crashed = write_demo_run(logs, "gone", finished=False, start=datetime(2026, 11, 25, 9, 0, 0, tzinfo=timezone.utc), coordinator_pid=dead_pid())
    remote = ContractLog(logs, "remote", start=datetime(2026, 11, 24, 9, 0, 0, tzinfo=timezone.utc), host="not-" + HOST, coordinator_pid=os.getpid())
    remote.run_started()
    stopped = ContractLog(logs, "halted", start=datetime(2026, 11, 23, 9, 0, 0, tzinfo=timezone.utc))
    stopped.run_started()
    stopped.run_finished(2.5, "stopped", produced=4, done=2, failed=0, retried=0, dead=0, pending=2, pools={}, workers={})
    (logs / f"{old.run_id}.dead.jsonl").write_text('{"job_id":10}\n')
    (logs / f"{stopped.run_id}.pending.jsonl").write_text('{"job_id":3}\n')
    (logs / "notes.txt").write_text("not a log")
    found = find_runs(logs)
    assert found == [running.path, crashed.path, remote.path, stopped.path, old.path]
    infos = {info.run_id: info for info in map(run_info, found)}
    assert infos[running.run_id].status == "running" and (infos[running.run_id].done, infos[running.run_id].failed) == (3, 1)
    assert infos[crashed.run_id].status == "crashed" and infos[crashed.run_id].done == 9
    assert infos[crashed.run_id].duration_s == pytest.approx(2.9)  # up to its last line
    assert infos[remote.run_id].status == "crashed"  # no run.finished and not a process of this host
    assert infos[stopped.run_id].status == "stopped" and infos[stopped.run_id].duration_s == 2.5
    old_info = infos[old.run_id]
    assert (old_info.status, old_info.name, old_info.done, old_info.failed, old_info.dead) == ("failed", "old", 9, 3, 1)
    assert old_info.started == "2026-11-20T08:00:00.000Z"


def test_run_info_of_real_runs(bakery: RealRun, crashy: RealRun) -> None:
    info = run_info(bakery.log_path)
    assert (info.status, info.name, info.done, info.failed, info.dead) == ("finished", "bakery", 100, 0, 0)
    info = run_info(crashy.log_path)
    assert (info.status, info.done, info.failed, info.dead) == ("failed", 19, 4, 1)


def test_resolve_sources(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    first = write_demo_run(logs, "alpha", start=datetime(2026, 11, 20, tzinfo=timezone.utc))
    second = write_demo_run(logs, "alpha", start=datetime(2026, 11, 21, tzinfo=timezone.utc), suffix="b00c")
    other = write_demo_run(logs, "beta")
    assert resolve_sources([], logs) == [other.path]
    assert resolve_sources([first.run_id], logs) == [first.path]
    assert resolve_sources(["beta"], logs) == [other.path]
    assert resolve_sources([str(second.path)], tmp_path / "elsewhere") == [second.path]
    with pytest.raises(LogSourceError, match="ambiguous"):
        resolve_sources(["alpha"], logs)
    with pytest.raises(LogSourceError, match="no run or file 'gamma'"):
        resolve_sources(["gamma"], logs)
    with pytest.raises(LogSourceError, match="no runs in"):
        resolve_sources([], tmp_path / "empty")


# -- follow ---------------------------------------------------------------------------------
def test_follow_waits_for_a_line_to_end_and_stops_on_run_finished(tmp_path: Path) -> None:
    log = ContractLog(tmp_path, "live", coordinator_pid=os.getpid())
    log.run_started()
    done_line = json.dumps({"timestamp": log.stamp(0.5), "level": "info", "event": "job.done", "run_id": log.run_id, "host": HOST,
                            "pid": 7, "role": "consumer", "pool": "eat", "worker": "eat-1", "job_id": 1, "attempt": 1, "duration_ms": 2.0})
    script = [
        lambda: log.write_raw(done_line[:40]),  # a line half written...
        lambda: None,  # ...stays unread while nothing more comes
        lambda: log.write_raw(done_line[40:] + "\n"),
        lambda: log.progress(1.0, produced=1, done=1),
        lambda: log.run_finished(2.0, produced=1, done=1, failed=0, retried=0, dead=0, pending=0, pools={}, workers={}),
    ]
    seen: list[list[str]] = []
    events: list[str] = []

    def wait(_: float) -> None:
        seen.append(list(events))
        assert script, "follow kept waiting after run.finished"
        script.pop(0)()

    damage = Damage()
    for line in follow_file(log.path, damage, wait=wait):
        events.append(line.event)
    assert events == ["run.started", "job.done", "progress", "run.finished"]
    assert seen[:3] == [["run.started"]] * 3  # the half line was not read as damage or as a line
    assert damage.count == 0 and not script


def test_follow_stops_when_the_coordinator_is_gone(tmp_path: Path) -> None:
    log = ContractLog(tmp_path, "dying", coordinator_pid=dead_pid())
    log.run_started()
    log.progress(1.0, produced=1, done=0)
    log.write_raw('{"timestamp":"2026-11-26T23:30:04.000Z","level":"info","ev')
    damage = Damage()
    waits: list[float] = []
    events = [l.event for l in follow_file(log.path, damage, wait=waits.append)]
    assert events == ["run.started", "progress"] and waits == []
    assert damage.count == 1 and damage.first is not None and damage.first[1:] == (3, "torn last line")
