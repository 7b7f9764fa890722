"""bench/simhosts.py runs from a fresh clone: 3 simulated worker hosts, a few hundred jobs, no timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_simhosts_harness_runs(tmp_path: Path) -> None:
    out = tmp_path / "simhosts.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "simhosts.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    table = out.read_text()
    assert "| hosts | jobs | jobs/s |" in table and "\n| 3 | 300 |" in table, table
    assert "⚠" not in table, table  # every job done, the run finished, no session reset
