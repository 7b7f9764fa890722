"""Every example config end to end: every job consumed exactly once, results complete."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import CONFIGS, run_config

pytestmark = pytest.mark.timeout(90)


def example(tmp_path: Path, name: str) -> Path:
    for suffix in (".yaml", ".py"):
        shutil.copy(CONFIGS / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path / f"{name}.yaml"


def test_bakery_every_bun_eaten_once(tmp_path: Path) -> None:
    run = run_config(tmp_path, example(tmp_path, "bakery"), "--set", "start_method=fork")
    assert run.process.returncode == 0, run.stderr[-2000:]
    assert f"run: {run.run_id}" in run.stdout and "log: logs/" in run.stdout
    results = run.results("results/bakery.jsonl")
    assert len(results) == 100
    assert len({r["job_id"] for r in results}) == 100
    eaten = Counter(r["result"].split(" from ")[1] + ":" + r["result"].split()[3] for r in results)
    assert set(eaten.values()) == {1}
    finished = run.events("run.finished")[0]
    assert finished["status"] == "finished" and finished["done"] == 100 and finished["dead"] == 0
    assert len(run.events("bun.eaten")) == 100  # the task's own ctx.log lines are in the run's log
    line = run.events("bun.eaten")[0]
    assert line["role"] == "consumer" and line["pool"] == "eater" and line["worker"].startswith("eater-") and line["job_id"]


def test_tickets_never_oversold(tmp_path: Path) -> None:
    run = run_config(tmp_path, example(tmp_path, "tickets"), "--set", "consumers.buyer.processes=6")
    assert run.process.returncode == 0, run.stderr[-2000:]
    results = run.results("results/tickets.jsonl")
    assert len(results) == 12
    assert sum(r["result"]["bought"] for r in results) == 3
    assert (tmp_path / "results/tickets.json").read_text() == '{"count": 0}'


def test_printer_documents_never_interleave(tmp_path: Path) -> None:
    run = run_config(tmp_path, example(tmp_path, "printer"), "--set", "producers.office.params.documents=6")
    assert run.process.returncode == 0, run.stderr[-2000:]
    lines = (tmp_path / "results/printer.txt").read_text().splitlines()
    assert len(lines) == 6 * 6
    for start in range(0, len(lines), 6):
        block = lines[start : start + 6]
        doc = block[0].removeprefix("start ")
        assert block == [f"start {doc}", *(f"{doc} page {p}" for p in range(1, 5)), f"end {doc}"]


def test_pipeline_bake_decorate_eat(tmp_path: Path) -> None:
    run = run_config(tmp_path, example(tmp_path, "pipeline"))
    assert run.process.returncode == 0, run.stderr[-2000:]
    results = run.results("results/pipeline.jsonl")
    by_pool = Counter(r["pool"] for r in results)
    assert by_pool == {"decorate": 30, "eat": 30}
    eaten = sorted(int(r["result"].split()[1]) for r in results if r["pool"] == "eat")
    assert eaten == list(range(1, 31))
    assert len({r["job_id"] for r in results}) == 60
