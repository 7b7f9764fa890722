"""`runner worker` under SIGINT/SIGTERM: a stop is bounded whatever its processes do, and a signal that
comes while the worker starts (before or during its first handshake) ends it cleanly with 128 + signal.

Real processes and sockets; synchronised on the run's log, on /proc (which signals a process catches)
and on the handshake a test socket receives, never on sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from conftest import free_port, log_events, start_host_run, wait_for
from test_multihost import address, cleanup, config, finish, worker  # noqa: F401 (cleanup: a fixture)

pytestmark = pytest.mark.timeout(120)

#: a job on host `stubborn` ignores SIGTERM and blocks: only a kill ends it
STUBBORN = '''
import signal
import time


def produce(ctx, n=10):
    for i in range(n):
        yield {"i": i}


def consume(ctx, job):
    if ctx.host == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ctx.log.warning("job.blocked", i=job["i"])  # a warning: in the run's log at once
        time.sleep(600)
    return {"i": job["i"], "host": ctx.host, "attempt": ctx.attempt}
'''


def test_worker_stop_is_bounded_when_a_process_ignores_sigterm(tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    grace = 2.0
    bind = address()
    cfg = config(n=10, local=0, shutdown={"grace": f"{grace:g}s"})
    cfg["consumers"][0]["retries"] = 0  # a job charged for the host's stop would be dead: none may be
    run = start_host_run(tmp_path, cfg, "--bind", bind, tasks=STUBBORN)
    cleanup.append(run)
    stubborn = worker(tmp_path, cleanup, bind, "stubborn", "--processes", "1")
    wait_for(lambda: log_events(tmp_path, "job.blocked"), what="a job blocked on host stubborn")
    stubborn.process.send_signal(signal.SIGTERM)
    assert stubborn.wait(grace + 5) == 143, stubborn.stderr  # the bound: shutdown.grace + 5 s
    assert "still running after shutdown.grace" in stubborn.stderr, stubborn.stderr
    assert "Traceback" not in stubborn.stderr
    left = wait_for(lambda: log_events(tmp_path, "host.left", host="stubborn"), what="host.left stubborn")[0]
    assert "stopped" in left["reason"]
    # its jobs went back to the queue, uncharged: another host runs every one of them
    other = worker(tmp_path, cleanup, bind, "other", "--processes", "2")
    finish(run, other)
    results = run.results()
    assert sorted(r["result"]["i"] for r in results) == list(range(10))
    assert {r["result"]["host"] for r in results} == {"other"}
    assert {r["result"]["attempt"] for r in results} == {1}
    assert not run.events("job.failed")
    # its killed process is logged as ended with its host, charged with nothing
    assert [e["job_id"] for e in run.events("worker.crashed")] == [None]


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (SigCgt in /proc): the runner's own, for SIGTERM."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def _worker(tmp_path: Path, label: str, port: int) -> subprocess.Popen[str]:
    err = (tmp_path / f"{label}.err").open("w")
    return subprocess.Popen([sys.executable, "-m", "runner", "worker", "--connect", f"tcp://127.0.0.1:{port}", "--insecure",
                             "--give-up", "60"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, text=True,
                            start_new_session=True)


def _ended(proc: subprocess.Popen[str], tmp_path: Path, label: str) -> tuple[int, str]:
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return code, (tmp_path / f"{label}.err").read_text()


def test_worker_signalled_as_soon_as_it_exists(tmp_path: Path) -> None:
    """Before Python runs any of the runner's code the default disposition applies (death by SIGTERM, which
    a shell reports as 143); from the runner's first line on, an exit with 143. Never a traceback."""
    proc = _worker(tmp_path, "at-once", free_port())
    proc.send_signal(signal.SIGTERM)
    code, err = _ended(proc, tmp_path, "at-once")
    assert code in (143, -signal.SIGTERM), err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_worker_signalled_while_it_starts(tmp_path: Path, signum: int) -> None:
    """Once `runner` holds the signals (its entry point, before the seconds of imports), the exit is 128 + signal."""
    proc = _worker(tmp_path, "starting", free_port())
    wait_for(lambda: _catches(proc.pid, signal.SIGTERM) or proc.poll() is not None, what="the runner holding signals")
    proc.send_signal(signum)
    code, err = _ended(proc, tmp_path, "starting")
    assert code == 128 + signum, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_worker_signalled_during_its_handshake(tmp_path: Path) -> None:
    """A coordinator that takes the HELLO and never answers: SIGTERM then ends the worker with 143."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        proc = _worker(tmp_path, "handshake", port)
        assert router.poll(60_000), "no HELLO from the worker"
        router.recv_multipart()
        proc.send_signal(signal.SIGTERM)
        code, err = _ended(proc, tmp_path, "handshake")
        assert code == 143, err
        assert "Traceback" not in err, err
    finally:
        router.close(0)
        context.term()

