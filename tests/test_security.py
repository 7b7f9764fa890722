"""Security on one machine and between hosts (issue 10): loopback is not a trust boundary.

A run bound without --keys makes its own CURVE keys in the user's private control folder; that folder is
checked (owner, mode, not a symlink); worker names are checked; a worker never imports from a path the
coordinator names; a key removed from authorized/ stops working and drops the host that used it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import log_events, runner_cli, start_host_run, wait_for
from test_multihost import TASKS, address, cleanup, config, coordinator, exactly_once, finish, joined, worker  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_loopback_run_makes_its_own_keys_and_plain_text_gets_nothing(tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    bind, gate = address(), tmp_path / "gate"
    run = coordinator(tmp_path, cleanup, config(n=30, gate=gate), "--bind", bind)
    started = run.events("run.started")[0]
    assert started["security"] == "run keys" and started["protocol"] == 2
    keys = Path(tempfile.gettempdir()) / f"runner-{os.getuid()}" / f"{run.run_id}.keys"
    assert (keys / "coordinator.key_secret").exists() and stat.S_IMODE(keys.stat().st_mode) == 0o700
    plain = worker(tmp_path, cleanup, bind, "mallory", "--insecure", "--give-up", "3")  # no keys: cannot even say HELLO
    good = worker(tmp_path, cleanup, bind, "hostb", "--processes", "2")  # same user, same host: finds the run's keys
    joined(tmp_path, "hostb")
    assert plain.wait(60) == 1, plain.stderr
    status = runner_cli("status", "--connect", bind, "--json", cwd=tmp_path, timeout=30)  # the same keys, found by address
    assert status.returncode == 0 and run.run_id in status.stdout, status.stderr
    gate.touch()
    finish(run, good)
    exactly_once(run, 30)
    assert not log_events(tmp_path, "host.joined", host="mallory")
    assert not keys.exists(), "a finished run's keys are removed"


def _control_dir_error(tmp_path: Path, make) -> str:
    base = tmp_path / "tmp"
    base.mkdir(parents=True)
    folder = base / f"runner-{os.getuid()}"
    make(folder)
    run = start_host_run(tmp_path / "run", config(n=3), tasks=TASKS, env={"TMPDIR": str(base)})
    assert run.wait(60) == 2, run.stderr
    assert "Traceback" not in run.stderr
    return run.stderr


def test_control_folder_must_be_private(tmp_path: Path) -> None:
    stderr = _control_dir_error(tmp_path / "mode", lambda f: f.mkdir(mode=0o755) or f.chmod(0o755))
    assert "chmod 700" in stderr, stderr

    def symlink(folder: Path) -> None:
        (folder.parent / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(folder.parent / "elsewhere")

    assert "symlink" in _control_dir_error(tmp_path / "link", symlink)
    if os.getuid() == 0:  # only root can make a folder that belongs to another user

        def foreign(folder: Path) -> None:
            folder.mkdir(mode=0o700)
            os.chown(folder, 12345, 12345)

        stderr = _control_dir_error(tmp_path / "owner", foreign)
        assert "belongs to another user (uid 12345)" in stderr, stderr


def test_finding_run_keys_skips_a_run_removing_its_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run can end between a `--serve` worker seeing its control socket and loading its keys (the run closes
    the socket, then removes the keys): that run is skipped, not a crash (it crashed on the missing key file once)."""
    from runner.errors import UsageError
    from runner.wire import zeromq as wire

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    address_ = "tcp://127.0.0.1:5999"
    for run_id in ("older-1", "newer-2"):
        wire.make_run_keys(run_id, address_)
        (wire.control_dir() / f"{run_id}.ctl").touch()
    newer, older = wire.run_keys_folder("newer-2"), wire.run_keys_folder("older-1")
    os.utime(older, (1, 1))
    assert wire.find_run_keys(address_).public == wire.WorkerKeys(newer).public
    (newer / "worker.key_secret").unlink()  # newer-2 is half way through removing its keys
    assert wire.find_run_keys(address_).public == wire.WorkerKeys(older).public
    (older / "worker.key_secret").unlink()
    assert wire.find_run_keys(address_) is None
    (older / "worker.key_secret").write_text("not a key")  # there, but broken: an error that says which file
    with pytest.raises(UsageError, match="worker.key_secret"):
        wire.find_run_keys(address_)


def test_worker_names_are_checked(tmp_path: Path) -> None:
    for bad in ("bad name", "a" * 65, "../etc", ""):
        result = runner_cli("worker", "--connect", "tcp://127.0.0.1:1", "--name", bad, "--give-up", "1", cwd=tmp_path)
        assert result.returncode == 2, (bad, result.stderr)
        assert "worker name" in result.stderr and "Traceback" not in result.stderr


def test_worker_never_imports_from_a_path_the_coordinator_names(tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    bind, gate = address(), tmp_path / "gate"
    run = coordinator(tmp_path, cleanup, config(n=10, gate=gate), "--bind", bind)
    elsewhere = tmp_path / "elsewhere"  # the worker runs here: the tasks are in the coordinator's folder only
    elsewhere.mkdir()
    lacking = worker(elsewhere, cleanup, bind, "hostb", env={"PYTHONPATH": ""})
    assert lacking.wait(60) == 2, lacking.stderr
    assert "no module named 'tasks'" in lacking.stderr and "--path" in lacking.stderr, lacking.stderr
    with_path = worker(elsewhere, cleanup, bind, "hostc", "--path", str(tmp_path), env={"PYTHONPATH": ""})  # --path is ours to give
    joined(tmp_path, "hostc")
    gate.touch()
    finish(run, with_path)
    exactly_once(run, 10)


def test_revoked_key_drops_the_host_that_uses_it(tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    assert runner_cli("keys", "generate", "keys", "--worker", "hostb", "--worker", "hostc", cwd=tmp_path).returncode == 0
    bind, gate = address(), tmp_path / "gate"
    run = coordinator(tmp_path, cleanup, config(n=40, work=0.02, gate=gate), "--bind", bind, "--keys", "keys")
    staying = worker(tmp_path, cleanup, bind, "hostb", "--keys", "keys", "--processes", "2")
    revoked = worker(tmp_path, cleanup, bind, "hostc", "--keys", "keys", "--processes", "2", "--give-up", "3")
    joined(tmp_path, "hostb", "hostc")
    (tmp_path / "keys" / "authorized" / "hostc.key").unlink()
    lost = wait_for(lambda: log_events(tmp_path, "host.lost", host="hostc"), what="hostc dropped")[0]
    assert "no longer authorized" in lost["reason"], lost
    assert revoked.wait(60) == 1, revoked.stderr  # its key opens nothing any more: it gives up
    gate.touch()
    finish(run, staying)
    exactly_once(run, 40)
    assert [e for e in run.events("host.refused") if "hostc" in str(e)]
