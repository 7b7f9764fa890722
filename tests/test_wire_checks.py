"""Every message is checked on arrival, by kind, at every receiver (issue 10, case 4).

Real sockets against a real coordinator (`runner start --bind ... --insecure`, so the test can speak the wire):
a peer that joins and then sends a malformed frame is reset, a local process that does is killed, a bad
control request gets an error reply, and a worker agent given garbage joins again. Each time the coordinator
stays alive, logs `protocol.error`, and the run ends with every job exactly once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import Command, log_events, run_config, wait_for
from test_multihost import address, cleanup, config, coordinator, exactly_once, finish, joined, worker  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def _pack(*items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def _join(context: zmq.Context, bind: str, name: str) -> zmq.Socket:
    """A fake worker host: HELLO, then wait for WELCOME."""
    from runner.wire import zeromq as wire

    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(bind)
    sock.send(wire.header(wire.HELLO, 0, name, ["work"], 1, os.getpid(), None))
    deadline_ms = 20_000
    while sock.poll(deadline_ms):
        envelope = wire.parse(sock.recv_multipart())
        if envelope.kind == wire.WELCOME:
            return sock
    raise AssertionError("no WELCOME")


def test_malformed_frames_from_a_joined_host_reset_it_and_lose_nothing(tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    from runner.wire import messages
    from runner.wire import zeromq as wire

    bind, gate = address(), tmp_path / "gate"
    run = coordinator(tmp_path, cleanup, config(n=40, work=0.01, gate=gate), "--bind", bind, "--insecure")
    frames = {
        "log-shape": _pack(messages.LOG, "not a dict"),  # RunLog.write raised AttributeError on this
        "hist-list": _pack(messages.REPORT, 1, 1, None, [], [], [1, 2]),  # hist that is not a dict
        "hist-zero": _pack(messages.REPORT, 1, 1, None, [], [], {0: 0}),  # divided by zero
        "batch-n": _pack(messages.BATCH, "work", 5, msgpack.packb([1, 2])),  # n does not match its blob
        "kind-list": _pack([1], 2),  # a list in the kind position
    }
    context = zmq.Context()
    try:
        for label, frame in frames.items():
            sock = _join(context, bind, f"fake-{label}")
            sock.send_multipart([wire.header(wire.FWD, 1, "work-1"), frame])
            lost = wait_for(lambda label=label: log_events(tmp_path, "host.lost", host=f"fake-{label}"), what=f"fake-{label} reset")[0]
            assert "malformed" in lost["reason"], lost
            sock.close(0)
        # a list in the kind position of the host header itself, and a session number out of order
        sock = _join(context, bind, "fake-header")
        sock.send_multipart([_pack(wire.PROTOCOL_VERSION, [wire.HEARTBEAT], 1)])
        wait_for(lambda: log_events(tmp_path, "host.lost", host="fake-header"), what="fake-header reset")
        sock = _join(context, bind, "fake-gap")
        sock.send_multipart([wire.header(wire.HEARTBEAT, 5)])
        lost = wait_for(lambda: log_events(tmp_path, "host.lost", host="fake-gap"), what="fake-gap reset")[0]
        assert "lost" in lost["reason"], lost
        errors = " ".join(e["error"] for e in log_events(tmp_path, "protocol.error"))
        for word in ("kind 6", "kind 5", "n=5", "unknown message kind", "after 0"):
            assert word in errors, (word, errors)
        assert run.process.poll() is None
        good = worker(tmp_path, cleanup, bind, "hostb", "--processes", "2", "--insecure")
        joined(tmp_path, "hostb")
        gate.touch()
        finish(run, good)
        exactly_once(run, 40)
    finally:
        context.destroy(linger=0)


def test_bad_control_request_gets_an_error_reply(tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    from runner.wire import zeromq as wire

    gate = tmp_path / "gate"
    run = coordinator(tmp_path, cleanup, config(n=10, gate=gate))
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(wire.control_address(run.run_id))
        for bad in ([_pack(wire.PROTOCOL_VERSION, [wire.STATUS], 0)], [b"\xc1junk"], [wire.header(wire.HEARTBEAT, 0)]):
            sock.send_multipart(bad)
            assert sock.poll(20_000), "no reply to a bad request"
            reply = wire.parse(sock.recv_multipart())
            assert reply.kind == wire.REPLY and "bad request" in reply.message.body["error"], reply
        assert wire.request(wire.control_address(run.run_id), wire.STATUS)["state"] == "running"
        assert run.process.poll() is None
    finally:
        context.destroy(linger=0)
    gate.touch()
    finish(run)
    exactly_once(run, 10)


def _forging_run(name: str) -> dict[str, Any]:
    """20 jobs, one a batch, 2 consumers that may forge frames on their pipe (tasks:consume), 2 retries."""
    return {"name": name, "producers": [{"name": "prod", "task": "tasks:produce", "params": {"n": 20}}],
            "consumers": [{"name": "work", "task": "tasks:consume", "processes": 2, "retries": 2, "retry_backoff": "10ms"}],
            "results": "results.jsonl", "logs": {"dir": "logs"}, "start_method": "fork", "queue": {"batch": 1}}


def test_local_process_sending_a_malformed_frame_is_killed_and_its_jobs_rerun(tmp_path: Path) -> None:
    tasks = '''
import time


def produce(ctx, n=20):
    for i in range(n):
        yield {"i": i}


def consume(ctx, job):
    if job["i"] == 5 and ctx.attempt == 1:
        ctx._services.send([6, "not a dict"])  # a LOG frame of the wrong shape, straight onto its pipe
        ctx._services.send([5, 1, 1, None, [], [], {0: 0}])
        time.sleep(60)  # killed for it while this job runs: the job is charged, as for any crash
    return {"i": job["i"]}
'''
    run = run_config(tmp_path, _forging_run("bad"), tasks=tasks, timeout=90)
    assert run.process.returncode == 0, run.stderr[-2000:]
    errors = run.events("protocol.error")
    assert errors and "kind 6" in errors[0]["error"], errors
    crashed = run.events("worker.crashed")
    assert crashed and "malformed message" in crashed[0]["reason"], crashed
    results = run.results()
    assert sorted(r["result"]["i"] for r in results) == list(range(20))
    assert len({r["job_id"] for r in results}) == 20


def test_reports_that_count_a_job_twice_or_drop_its_result_are_refused(tmp_path: Path) -> None:
    """A REPORT must give each job of its range exactly one result or failure. Forged from a local process:
    a job failed twice (it was retried twice), and a job done without its result line with a results file
    (it was counted done, its line missing). Each is a protocol error: the sender is killed, the job reruns."""
    tasks = '''
import time


def produce(ctx, n=20):
    for i in range(n):
        yield {"i": i}


def consume(ctx, job):
    loop = ctx._services
    if job["i"] in (5, 7) and ctx.attempt == 1:
        if job["i"] == 5:  # REPORT: batch, done, results, failures, emits, hist
            loop.send([5, loop.batch_id, 1, [], [[0, "a", None, None], [0, "b", None, None]], [], {}])
        else:
            loop.send([5, loop.batch_id, 1, [], [], [], {}])
        time.sleep(60)  # killed for it while this job runs
    return {"i": job["i"]}
'''
    run = run_config(tmp_path, _forging_run("twice"), tasks=tasks, timeout=90)
    assert run.process.returncode == 0, run.stderr[-2000:]
    errors = sorted(e["error"] for e in run.events("protocol.error"))
    assert len(errors) == 2 and all("exactly one result or failure" in e for e in errors), errors
    assert not [e for e in run.events("job.failed") if e.get("error") in ("a", "b")], "a forged failure was taken"
    assert len(run.events("job.retried")) == 2 and not run.events("job.dead")  # once each: the kill, not the forgery
    results = run.results()
    assert sorted(r["result"]["i"] for r in results) == list(range(20))
    assert len({r["job_id"] for r in results}) == 20


def test_agent_given_garbage_joins_again(tmp_path: Path) -> None:
    """A fake coordinator: WELCOME, then a message with a list in the kind position; the agent must not crash."""
    from runner.wire import zeromq as wire

    bind = address()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(bind)
    agent = Command(tmp_path, "agent", [sys.executable, "-m", "runner", "worker", "--connect", bind, "--name", "hostb",
                                        "--insecure", "--give-up", "30"])
    try:
        hellos = 0
        while hellos < 2:
            assert router.poll(30_000), f"no HELLO from the agent: {agent.stderr}"
            identity, *parts = router.recv_multipart()
            envelope = wire.parse(parts)
            if envelope.kind != wire.HELLO:
                continue
            hellos += 1
            if hellos == 1:
                router.send_multipart([identity, wire.header(wire.WELCOME, 0, "fake-run", "fake", "hostb", {},
                                                             {"interval": 1.0, "timeout": 30.0}, "fork")])
                router.send_multipart([identity, _pack(wire.PROTOCOL_VERSION, [wire.TO], 1, "work-1")])
        assert agent.process.poll() is None
        assert "malformed message" in agent.stderr and "joining again" in agent.stderr, agent.stderr
        assert "Traceback" not in agent.stderr
    finally:
        agent.process.send_signal(signal.SIGTERM)
        agent.wait(15)
        context.destroy(linger=0)
