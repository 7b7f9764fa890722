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
    from runner.process import handle, start

    assert importlib.util.find_spec(start.PRELOAD) is not None
    assert handle.process_main.__module__ == start.PRELOAD


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


@pytest.mark.timeout(120)
def test_the_console_script_is_imported_once(tmp_path) -> None:
    """`runner start` (the console script, forkserver by default): the CLI is imported in one process only,
    never again by the forkserver or a child (multiprocessing would import `__main__`, the console script);
    the forkserver preloads the process code itself."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "tasks.py").write_text("def produce(ctx):\n    yield {'x': 1}\n\n\ndef consume(ctx, job):\n    return job\n")
    (tmp_path / "run.yaml").write_text("name: one\nproducers: [{name: p, task: 'tasks:produce'}]\n"
                                       "consumers: [{name: c, task: 'tasks:consume', processes: 2}]\n")
    script = Path(sys.executable).parent / "runner"
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        done = subprocess.run([str(script), "start", "--config", "run.yaml"], cwd=tmp_path, stdout=out, stderr=err, timeout=100,
                              env={**__import__("os").environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, (tmp_path / "err").read_text()[-2000:]
    lines = (tmp_path / "err").read_text().splitlines()
    imports = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    assert imports.count("runner.cli.main") == 1, "the CLI was imported again by the forkserver or a child"
    # the forkserver imported the process code itself, at its top level (the preload), not under the CLI's imports
    assert any(line.startswith("import time:") and line.endswith("| runner.process.loop") for line in lines)


def test_the_start_method_guess_follows_the_flags_then_the_config(tmp_path) -> None:
    from runner.cli.early import start_method_of

    (tmp_path / "a.yaml").write_text("name: a\nstart_method: fork\n")
    (tmp_path / "b.yaml").write_text("name: b\n")
    assert start_method_of(["--config", str(tmp_path / "a.yaml")]) == "fork"
    assert start_method_of(["-c", str(tmp_path / "b.yaml")]) == "forkserver"
    assert start_method_of([f"--config={tmp_path / 'a.yaml'}", "--set", "start_method=spawn"]) == "spawn"
    assert start_method_of(["--set", "start_method=forkserver"]) == "forkserver"
    assert start_method_of(["--resume"]) is None


def test_a_resume_guesses_the_start_method_from_the_journal_header(tmp_path) -> None:
    """`runner resume|retry RUN_ID`: the forkserver starts first when the journaled config uses it."""
    from runner.cli.early import journaled_start_method
    from runner.coordinator import journal as J

    logs = tmp_path / "logs"
    logs.mkdir()
    for run_id, config in (("f-1", {"name": "f", "start_method": "fork"}), ("d-1", {"name": "d"})):
        journal = J.Journal(J.journal_path(logs, run_id), "never", [J.HEADER, J.VERSION, run_id, config["name"], config, "h", "x.yaml", "."])
        journal.close()
    assert journaled_start_method(["f-1", "--logs", str(logs)]) == "fork"
    assert journaled_start_method([f"--logs={logs}", "d-1"]) == "forkserver"
    assert journaled_start_method(["--set", "start_method=spawn", "d-1", "--logs", str(logs)]) == "spawn"
    assert journaled_start_method(["--insecure", "--bind", "tcp://127.0.0.1:1", "f-1", "--logs", str(logs)]) == "fork"
    assert journaled_start_method(["--last", "f", "--logs", str(logs)]) is None  # no RUN_ID: no guess
    assert journaled_start_method(["nope-1", "--logs", str(logs)]) is None  # no journal (a `journal: false` retry)
