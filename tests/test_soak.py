"""The soak in CI (20 s): random SIGKILLs to consumers, producers and worker agents on loopback, with
random job durations. Every produced job's result exactly once, no zombie, no orphan, coordinator RSS
flat (a loose bound). bench/soak.py runs the same for minutes by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import soak


@pytest.mark.timeout(240)
def test_soak_with_random_kills(tmp_path: Path) -> None:
    figures = soak.soak(20.0, tmp_path / "soak", seed=None, say=print)
    assert not figures["problems"], figures
    assert figures["jobs"] > 0 and sum(figures["kills"].values()) > 0
