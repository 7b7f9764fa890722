"""A chaos proxy between a worker host and the coordinator (issue 10, case 5).

Both sides run with --insecure so the proxy sees ZeroMQ messages: a ROUTER faces the worker, and one DEALER
per worker identity faces the coordinator. For its first stretch the proxy drops, duplicates, reorders and
injects garbage into a few percent of messages in both directions; then it goes quiet and passes everything.
Session numbers make each fault a reset of that host (its jobs back in the queue, it joins again): the run
ends with exit 0, every job's result exactly once, and the coordinator alive throughout.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq
from conftest import wait_for
from test_multihost import address, cleanup, config, coordinator, exactly_once, finish, worker  # noqa: F401

pytestmark = pytest.mark.timeout(150)


class ChaosProxy(threading.Thread):
    def __init__(self, front: str, back: str, rate: float, chaos_s: float, seed: int) -> None:
        super().__init__(daemon=True, name="chaos-proxy")
        self.front, self.back, self.rate, self.chaos_s = front, back, rate, chaos_s
        self.random = random.Random(seed)
        self.faults: Counter[str] = Counter()
        self.passed = 0
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.started_at: float | None = None  #: the first message: chaos runs from then for chaos_s

    def quiet(self) -> bool:
        return self.started_at is not None and time.monotonic() - self.started_at > self.chaos_s

    def run(self) -> None:
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.front)
        dealers: dict[bytes, zmq.Socket] = {}
        identities: dict[zmq.Socket, bytes] = {}
        held: dict[str, list] = {"up": [], "down": []}  #: a message held back, to be sent after the next one (reorder)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        self.ready.set()
        try:
            while not self.stopping.is_set():
                for sock, _ in poller.poll(50):
                    if sock is router:
                        identity, *parts = router.recv_multipart()
                        dealer = dealers.get(identity)
                        if dealer is None:
                            dealer = dealers[identity] = context.socket(zmq.DEALER)
                            dealer.setsockopt(zmq.LINGER, 0)
                            dealer.connect(self.back)
                            identities[dealer] = identity
                            poller.register(dealer, zmq.POLLIN)
                        self._forward("up", parts, lambda p, d=dealer: d.send_multipart(p), held)
                    else:
                        identity = identities[sock]
                        parts = sock.recv_multipart()
                        self._forward("down", parts, lambda p, i=identity: router.send_multipart([i, *p]), held)
        finally:
            context.destroy(linger=0)

    def _forward(self, way: str, parts: list[bytes], send, held: dict[str, list]) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
        roll = self.random.random()
        if self.quiet() or roll >= self.rate:
            send(parts)
            self.passed += 1
            for waiting in held[way]:
                send(waiting)
            held[way].clear()
            return
        fault = self.random.choice(["drop", "duplicate", "reorder", "garbage"])
        self.faults[f"{way} {fault}"] += 1
        if fault == "duplicate":
            send(parts)
            send(parts)
        elif fault == "reorder":
            held[way].append(parts)
        elif fault == "garbage":
            send([os.urandom(self.random.randint(1, 40))])
            send(parts)
        # drop: nothing


def test_chaos_between_a_worker_and_the_coordinator(tmp_path: Path, cleanup: list) -> None:  # noqa: F811
    back, front = address(), address()
    proxy = ChaosProxy(front, back, rate=0.04, chaos_s=4.0, seed=int(os.environ.get("CHAOS_SEED", "10")))
    proxy.start()
    assert proxy.ready.wait(10)
    try:
        # the last 50 jobs are made once the proxy is quiet: the run, and its goodbye, outlast the chaos. On a fast
        # machine the run ended inside it, a duplicated message had just reset the worker, and the worker (not
        # told the run was over) tried to join again until --give-up
        quiet = tmp_path / "quiet"
        cfg = config(n=300, work=0.005, local=0, gate=quiet, gate_after=250)
        cfg["consumers"][0]["processes"] = 0
        run = coordinator(tmp_path, cleanup, cfg, "--bind", back, "--insecure")
        remote = worker(tmp_path, cleanup, front, "hostb", "--processes", "2", "--insecure", "--give-up", "60")
        wait_for(lambda: proxy.quiet() or run.process.poll() is not None, timeout=90, what="the chaos stretch over")
        assert run.process.poll() is None, run.proc.stderr[-3000:]
        quiet.touch()
        finish(run, remote, timeout=90)
        exactly_once(run, 300)
    finally:
        proxy.stopping.set()
        proxy.join(10)
    assert sum(proxy.faults.values()) > 0, "the proxy made no fault: the test proved nothing"
    events = run.events()
    if any(k.startswith("up") for k in proxy.faults):
        assert [e for e in events if e["event"] in ("protocol.error", "host.lost")], proxy.faults
    print("faults:", dict(proxy.faults), "passed:", proxy.passed,
          "resets:", len([e for e in events if e["event"] == "host.lost"]))
