"""Names that code outside this repo relies on: a rename must fail here, not silently elsewhere."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

import pytest

pytestmark = pytest.mark.timeout(30)


def test_forkserver_preloads_the_child_loop() -> None:
    """A wrong preload name is ignored by multiprocessing without a word: every process would then
    import its code after the fork, slower, and nothing would say why."""
    from runner.process import handle

    assert importlib.util.find_spec(handle.PRELOAD) is not None
    assert handle.process_main.__module__ == handle.PRELOAD


def test_console_script_entry_point() -> None:
    """runner/__main__.py holds signals before the command line's imports (runner/early.py), so the
    console script starts there, as `python -m runner` does."""
    scripts = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "runner"]
    assert [ep.value for ep in scripts] == ["runner.__main__:main"]
    assert callable(scripts[0].load())


def test_log_event_contract_is_importable() -> None:
    logs = importlib.import_module("runner.logs")
    assert "run.finished" in logs.EVENTS
    assert {"job.failed", "host.lost", "protocol.error"} <= logs.EVENTS


def test_version_flag_alone() -> None:
    """`runner --version` needs no command (it once exited 2 with "Missing command")."""
    import subprocess
    import sys

    from runner import __version__

    shown = subprocess.run([sys.executable, "-m", "runner", "--version"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip() == f"runner {__version__}", shown.stderr
