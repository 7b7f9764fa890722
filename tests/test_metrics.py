"""Prometheus metrics and /healthz: a real run scraped over HTTP, parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner.config import RunConfig
from runner.coordinator.monitor import Monitor
from runner.coordinator.web import Web
from conftest import TASK_HELPERS, free_port, runner_cli, start_run, wait_for

pytestmark = pytest.mark.timeout(300)  # real runs on a busy 2-core machine

TASKS = TASK_HELPERS + '''
def produce(ctx, n=40):
    ctx.total(n)
    for i in range(n):
        yield {"i": i}


def consume(ctx, job):
    if job["i"] >= 10:
        wait_file("go")          # the test scrapes while these wait
    if job["i"] % 10 == 3:
        raise ValueError("three")   # job 4, 14, ... fail every attempt: dead after 2
    if job["i"] % 10 == 5 and ctx.attempt == 1:
        raise RuntimeError("flaky")
    return result(ctx, job)
'''

EXPECTED = {"runner_run_info", "runner_jobs", "runner_job_failures", "runner_job_retries", "runner_job_duration_seconds",
            "runner_queue_depth", "runner_jobs_in_flight", "runner_jobs_produced", "runner_restarts", "runner_processes", "runner_hosts"}


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family_name: str, sample: str, **labels: str) -> float:
    family = families[family_name]
    found = [s.value for s in family.samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{sample} {labels}: {found}"
    return found[0]


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def config(port: int, **extra: Any) -> dict[str, Any]:
    return {"name": "m", "producers": [{"name": "prod", "task": "tasks:produce"}],
            "consumers": [{"name": "work", "task": "tasks:consume", "processes": 2, "retries": 1, "retry_backoff": 0.01}],
            "results": "results.jsonl", "start_method": "fork",
            "metrics": {"linger": 60, "buckets": ["1ms", "10ms", 0.1, 1]}, **extra}


def test_scrape_during_and_at_the_end_matches_run_finished(folder: Path) -> None:
    port = free_port()
    run = start_run(folder, config(port), "--metrics", f"127.0.0.1:{port}", "--dashboard", "127.0.0.1:0", tasks=TASKS)
    try:
        # during the run: the first ten jobs ran, the rest wait for "go"
        def settled_ten() -> dict[str, Any] | None:
            try:
                families = scrape(port)
            except OSError:
                return None
            if "runner_jobs" not in families:
                return None
            done = value(families, "runner_jobs", "runner_jobs_total", pool="work", outcome="done")
            failed = value(families, "runner_job_failures", "runner_job_failures_total", pool="work", cause="error")
            return families if done >= 8 and failed >= 2 else None  # jobs 3 and 5 failed once; their retries may wait

        families = wait_for(settled_ten, timeout=90, what="the first ten jobs run in /metrics")
        assert EXPECTED <= set(families), set(families)
        assert value(families, "runner_jobs_produced", "runner_jobs_produced_total", pool="prod") == 40
        assert value(families, "runner_run_info", "runner_run_info", name="m", version="0.1.0") == 1
        assert value(families, "runner_hosts", "runner_hosts", state="up") == 1
        busy = sum(s.value for s in families["runner_processes"].samples if s.labels["pool"] == "work" and s.labels["state"] == "busy")
        assert busy >= 1
        assert value(families, "runner_jobs_in_flight", "runner_jobs_in_flight", pool="work") >= 1
        assert health(port) == 200
        status = runner_cli("status", cwd=folder)  # the dashboard's URL again, for the user who started the run
        assert status.returncode == 0, status.stderr
        url = next(line.split("dashboard: ", 1)[1] for line in status.stdout.splitlines() if "dashboard: " in line)
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url and f":{port}/" not in url
        with urllib.request.urlopen(url.replace("/?", "/api/state?"), timeout=10) as reply:
            assert json.loads(reply.read())["run"]["name"] == "m"
        for family in families.values():  # bounded labels only: no job ids, no pids
            for sample in family.samples:
                assert set(sample.labels) <= {"pool", "outcome", "cause", "host", "state", "run_id", "name", "version", "le"}
        (folder / "go").write_text("")
        # the end: linger keeps the endpoint up with the final counts
        finished = wait_for(lambda: [e for e in _events(run) if e["event"] == "run.finished"], timeout=60, what="run.finished")[0]
        families = wait_for(lambda: (f := scrape(port)) and value(f, "runner_jobs", "runner_jobs_total", pool="work", outcome="done")
                            == finished["done"] and f, timeout=20, what="final counts")
        pool = finished["pools"]["work"]
        assert value(families, "runner_jobs", "runner_jobs_total", pool="work", outcome="dead") == finished["dead"] == 4
        assert value(families, "runner_job_retries", "runner_job_retries_total", pool="work") == finished["retried"] == pool["retried"]
        failures = {s.labels["cause"]: s.value for s in families["runner_job_failures"].samples if s.name.endswith("_total")}
        assert failures == {"error": finished["failed"], "crashed": 0, "timed_out": 0, "stalled": 0, "memory": 0}
        assert value(families, "runner_jobs_produced", "runner_jobs_produced_total", pool="prod") == finished["produced"] == 40
        assert value(families, "runner_queue_depth", "runner_queue_depth", pool="work") == 0
        # every attempt that ran to its end is in the histogram; the buckets are the configured ones
        count = value(families, "runner_job_duration_seconds", "runner_job_duration_seconds_count", pool="work")
        assert count == finished["done"] + finished["failed"]
        bounds = [s.labels["le"] for s in families["runner_job_duration_seconds"].samples if s.name.endswith("_bucket")]
        assert bounds == ["0.001", "0.01", "0.1", "1.0", "+Inf"]
        assert health(port) == 200
        run.process.send_signal(signal.SIGTERM)  # ends the linger early; the run's own exit code stays
        assert run.wait(30) == 1  # dead letters
        assert f"metrics: http://127.0.0.1:{port}/metrics" in run.stdout
        assert f"dashboard: {url}" in run.stdout
    finally:
        if run.process.poll() is None:
            run.process.kill()
            run.wait(10)


def _events(run: Any) -> list[dict[str, Any]]:
    from conftest import live_events

    return live_events(run, "run.finished")


def test_a_taken_port_is_a_usage_error(folder: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = start_run(folder, config(port), "--metrics", f"127.0.0.1:{port}", tasks=TASKS)
        assert run.wait(60) == 2
    assert f"cannot serve the metrics on 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_bad_listen_address_is_a_config_error(folder: Path) -> None:
    run = start_run(folder, config(0), "--dashboard", "localhost", tasks=TASKS)
    assert run.wait(60) == 2
    assert "--dashboard: expected HOST:PORT" in run.stderr


def _http_side_alone(tmp_path: Path, serve: str) -> tuple[Monitor, Web]:
    """The HTTP side alone (real objects, a real socket on a free port): `serve` is metrics or dashboard."""
    cfg = RunConfig.model_validate({"name": "h", "producers": [{"name": "p", "task": "t:p"}], "consumers": [{"name": "c", "task": "t:c"}],
                                    serve: {"listen": "127.0.0.1:0"}})
    monitor = Monitor("h-1", cfg, str(tmp_path / "h.jsonl"), enabled=True)
    web = Web(cfg, monitor, tmp_path / "h.jsonl")
    web.start()
    return monitor, web


def test_healthz_is_503_when_the_loop_has_not_turned_for_5_seconds(tmp_path: Path) -> None:
    """The HTTP side alone (real objects, a real socket): it judges the loop by the time of its last turn."""
    monitor, web = _http_side_alone(tmp_path, "metrics")
    try:
        assert web.metrics_url is not None
        port = int(web.metrics_url.split(":")[2].split("/")[0])
        monitor.turned = time.monotonic()
        assert health(port) == 200
        monitor.turned = time.monotonic() - 6
        assert health(port) == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.read() == b""  # no snapshot yet: no metric rather than made-up zeros
    finally:
        web.close()


def test_requests_the_handlers_do_not_foresee_get_an_answer_and_no_traceback(tmp_path: Path, capfd: Any) -> None:
    """A NUL in a static path (no token needed), a job id of digits int() refuses: each gets its answer, and
    the HTTP thread never prints a traceback on the run's console."""
    _, web = _http_side_alone(tmp_path, "dashboard")
    try:
        assert web.dashboard_url is not None
        base, token = web.dashboard_url.split("?token=")
        base = base.rstrip("/")

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(base + path, timeout=10) as reply:
                    return reply.status, reply.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert get("/static/a%00b")[0] == 404
        status, body = get(f"/api/trace?job=%C2%B2&token={token}")  # "²": str.isdigit() says yes, int() says no
        assert status == 200 and b"not a job id" in body, body
        status, body = get(f"/api/trace?job={'9' * 5000}&token={token}")
        assert status == 200 and b"not a job id" in body, body
        assert get("/healthz")[0] in (200, 503)
    finally:
        web.close()
    assert "Traceback" not in capfd.readouterr().err
