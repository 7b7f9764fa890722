"""What the deploy tests share: the repository's deploy/ paths, the CI cache that .ci/debian-root
prepares (the Debian root, the stand-in base image, the wheelhouse), and small process helpers."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD_DIR = DEPLOY / "systemd"
DOCKER_DIR = DEPLOY / "docker"
K8S_DIR = DEPLOY / "k8s"
CONFIGS = ROOT / "configs"
BAKERY = CONFIGS / "bakery.yaml"
#: what .ci/debian-root prepares, and where (outside the clone)
CI_CACHE = Path(os.environ.get("RUNNER_CI_CACHE", "/var/tmp/runner-ci"))
DEBIAN_ROOT = CI_CACHE / "root"
DEBIAN_ROOT_STAMP = DEBIAN_ROOT / ".runner-ci-root-v1"
WHEELHOUSE = CI_CACHE / "wheels"
#: podman's settings for this machine (runc, no default ulimits, host network, cgroupfs)
CONTAINERS_CONF = ROOT / ".ci" / "containers.conf"
PREPARE_HINT = "run `sudo .ci/debian-root` first (CI does)"


def run(argv: list[str], timeout: float = 60, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """A short command, output captured; AssertionError with its output when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {result.returncode}\nstdout: {result.stdout[-4000:]}\nstderr: {result.stderr[-4000:]}")
    return result


def grace_of(config: Path = BAKERY) -> float:
    from runner.config import load_config

    return load_config(config).run.shutdown.grace


def seconds(text: str) -> float:
    """A systemd or compose time span: 30s, 1min, 2m 30s, 500ms, or plain seconds."""
    units = {"": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a JSON-lines file (a line still being written is left out)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n") and line.strip()]


def run_logs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl")))


def events_in(folder: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Events so far of the one run log in `folder` (none while it has none)."""
    logs = run_logs(folder) if folder.is_dir() else []
    assert len(logs) <= 1, f"more than one run log in {folder}: {logs}"
    return [e for e in (jsonl(logs[0]) if logs else []) if name is None or e["event"] == name]


def eaten_by_host(events: list[dict[str, Any]]) -> Counter[str]:
    """Jobs done per host, from the run's last run.finished event."""
    finished = [e for e in events if e["event"] == "run.finished"]
    assert finished, "no run.finished event"
    done: Counter[str] = Counter()
    for stats in finished[-1]["workers"].values():
        done[stats["host"]] += stats["done"]
    return done


def assert_buns_once(results: list[dict[str, Any]], buns: int) -> None:
    """The bakery's results: every bun of both bakers eaten exactly once, no job id twice."""
    eaten: Counter[tuple[str, int]] = Counter()
    for line in results:
        match = re.fullmatch(r"\S+ ate bun (\d+) from (baker-\d)", line["result"])
        assert match, line
        eaten[(match.group(2), int(match.group(1)))] += 1
    expected = {(baker, bun) for baker in ("baker-1", "baker-2") for bun in range(1, buns + 1)}
    assert set(eaten) == expected, f"missing {sorted(expected - set(eaten))[:10]}, unexpected {sorted(set(eaten) - expected)[:10]}"
    assert set(eaten.values()) == {1}, f"eaten twice: {[k for k, v in eaten.items() if v > 1][:10]}"
    assert len({line["job_id"] for line in results}) == len(results) == 2 * buns


def assert_stopped_cleanly(finished: dict[str, Any], results: list[dict[str, Any]], pending: list[dict[str, Any]]) -> None:
    """A run stopped mid-way: every produced job is either done once or in the pending file."""
    assert finished["status"] == "stopped" and finished["exit_code"] == 143, finished
    assert len(pending) == finished["pending"] > 0 and len(results) == finished["done"] > 0, finished
    assert finished["produced"] == finished["done"] + finished["dead"] + finished["pending"], finished
    ids = [r["job_id"] for r in results] + [p["job_id"] for p in pending]
    assert len(ids) == len(set(ids)) == finished["produced"], "each job either done once or pending"
