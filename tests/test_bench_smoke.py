"""The benchmark harness (bench/run.py) runs from a fresh clone: tiny sizes, no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_bench_harness_runs(tmp_path: Path) -> None:
    out, raw = tmp_path / "results.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--only", "trivial,startup",
         "--out", str(out), "--json", str(raw)],
        cwd=tmp_path, capture_output=True, text=True, timeout=110, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    report = out.read_text()
    for heading in ("### Trivial jobs", "### Start-up", "### Targets"):
        assert heading in report, report
    figures = json.loads(raw.read_text())["results"]
    for system in ("runner", "runner_zmq", "mpq_batched", "zmq_batched", "pool1", "pool256"):
        assert figures["trivial"][system]["median"], f"no figure for {system}"
    assert figures["startup"]["default"]["median_s"] > 0
