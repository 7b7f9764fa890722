"""Shared test helpers: real `runner` processes in a temporary folder, and deadline polls (no sleeps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Run:
    """A finished or running `runner start` in its own folder."""

    def __init__(self, folder: Path, process: subprocess.Popen[str]) -> None:
        self.folder = folder
        self.process = process
        self.stdout = ""
        self.stderr = ""

    def wait(self, timeout: float = 60) -> int:
        self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode

    @property
    def log_path(self) -> Path:
        logs = sorted((self.folder / "logs").glob("*.jsonl"))
        logs = [p for p in logs if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
        assert logs, f"no run log in {self.folder / 'logs'}"
        return logs[-1]

    @property
    def run_id(self) -> str:
        return self.log_path.name.removesuffix(".jsonl")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = read_jsonl(self.log_path)
        return [line for line in lines if name is None or line["event"] == name]

    def results(self, name: str = "results.jsonl") -> list[dict[str, Any]]:
        return read_jsonl(self.folder / name)

    def dead(self) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / "logs" / f"{self.run_id}.dead.jsonl")

    def pending(self) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / "logs" / f"{self.run_id}.pending.jsonl")


def start_run(folder: Path, config: dict[str, Any] | Path, *args: str, tasks: str | None = None,
              env: dict[str, str] | None = None) -> Run:
    """Start `runner start` in `folder` (a config dict is written there, with `tasks` as tasks.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        if tasks is not None:
            (folder / "tasks.py").write_text(textwrap.dedent(tasks))
        path = folder / "run.yaml"
        path.write_text(yaml.safe_dump(config))
    else:
        path = config
    process = subprocess.Popen(
        [sys.executable, "-m", "runner", "start", "--config", str(path), *args],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )
    return Run(folder, process)


def run_config(folder: Path, config: dict[str, Any] | Path, *args: str, tasks: str | None = None, timeout: float = 60) -> Run:
    run = start_run(folder, config, *args, tasks=tasks)
    run.wait(timeout)
    return run


def runner_cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def basic_config(tasks: str = "tasks", **consumer: Any) -> dict[str, Any]:
    """A small run: producer tasks:produce -> consumer tasks:consume, results to results.jsonl."""
    return {
        "name": "t",
        "producers": [{"name": "prod", "task": f"{tasks}:produce", "params": {"n": 20}}],
        "consumers": [{"name": "work", "task": f"{tasks}:consume", "processes": 2, **consumer}],
        "results": "results.jsonl",
        "logs": {"dir": "logs"},
        "start_method": "fork",
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path
