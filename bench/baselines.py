"""The raw transports the runner is measured against: 1 producer process, N consumer processes.

Every function returns {"jobs": n, "seconds": s} (or latencies) timed from before the first process
starts to after the last job is counted, like the runner's own `duration_s` (which runs from the
coordinator's start to the end of the run). Processes are started with fork. Streams end with an
application-level acknowledgement, never by relying on LINGER (see ../shared/FACTS.md, pitfalls).
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import socket
import time
from typing import Any

import msgpack
import zmq
from bench_tasks import cpu_job, nothing_job, pace, spin

CTX = mp.get_context("fork")
#: the longest any single baseline may take before it is declared hung
DEADLINE_S = 600.0


class BaselineError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(q: Any, what: str) -> Any:
    try:
        return q.get(timeout=DEADLINE_S)
    except queue_module.Empty:
        raise BaselineError(f"{what}: no answer within {DEADLINE_S:g}s") from None


def _finish(procs: list[Any]) -> None:
    for p in procs:
        p.join(10)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


# -- multiprocessing.Queue ------------------------------------------------------------------------
def _mpq_produce(q: Any, n: int, batch: int, consumers: int) -> None:
    if batch <= 1:
        for i in range(n):
            q.put({"i": i, "name": "job", "value": 1.5})
    else:
        buf = []
        for i in range(n):
            buf.append({"i": i, "name": "job", "value": 1.5})
            if len(buf) >= batch:
                q.put(buf)
                buf = []
        if buf:
            q.put(buf)
    for _ in range(consumers):
        q.put(None)
    q.close()
    q.join_thread()


def _mpq_consume(q: Any, done: Any, batched: bool) -> None:
    count = 0
    while True:
        item = q.get()
        if item is None:
            break
        if batched:
            for job in item:
                nothing_job(job)
            count += len(item)
        else:
            nothing_job(item)
            count += 1
    done.put(count)


def mpq(n: int, batch: int = 256, consumers: int = 2, maxsize_jobs: int = 10_000) -> dict[str, Any]:
    """multiprocessing.Queue, `batch` jobs a put (1: one job a put), bounded to about `maxsize_jobs`."""
    q = CTX.Queue(maxsize=max(2, maxsize_jobs // max(1, batch)))
    done = CTX.Queue()
    t0 = time.perf_counter()
    procs = [CTX.Process(target=_mpq_consume, args=(q, done, batch > 1)) for _ in range(consumers)]
    procs.append(CTX.Process(target=_mpq_produce, args=(q, n, batch, consumers)))
    for p in procs:
        p.start()
    total = sum(_get(done, "mp.Queue consumer") for _ in range(consumers))
    seconds = time.perf_counter() - t0
    _finish(procs)
    if total != n:
        raise BaselineError(f"mp.Queue: {total} jobs consumed, expected {n}")
    return {"jobs": n, "seconds": seconds}


# -- ZeroMQ PUSH/PULL + msgpack -------------------------------------------------------------------
END = b"E"


def _zmq_produce(address: str, n: int, batch: int, all_in: Any, ready: Any, consumers: int) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(address)
    for _ in range(consumers):  # every consumer has connected: PUSH would otherwise feed the first alone
        ready.get(timeout=60)
    packer = msgpack.Packer()
    buf = []
    for i in range(n):
        buf.append({"i": i, "name": "job", "value": 1.5})
        if len(buf) >= batch:
            push.send(packer.pack(buf))
            buf = []
    if buf:
        push.send(packer.pack(buf))
    # End of stream: keep offering END markers (round-robin reaches every consumer) until the
    # parent acknowledges that every job was counted; only then close.
    while not all_in.wait(0.02):
        try:
            push.send(END, zmq.NOBLOCK)
        except zmq.Again:
            pass
    push.close(0)
    ctx.term()


def _zmq_consume(address: str, sink: str, ready: Any) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(address)
    report = ctx.socket(zmq.PUSH)
    report.connect(sink)
    ready.put(1)
    unpackb = msgpack.unpackb
    count = 0
    while True:
        data = pull.recv()
        if data == END:
            report.send(count.to_bytes(8, "little"))  # counted since the last report
            count = 0
            continue
        jobs = unpackb(data)
        for job in jobs:
            nothing_job(job)
        count += len(jobs)


def zmq_pushpull(n: int, batch: int = 256, consumers: int = 2) -> dict[str, Any]:
    """ZeroMQ PUSH/PULL over tcp loopback, msgpack, `batch` jobs a message."""
    address = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    sink = ctx.socket(zmq.PULL)
    sink_port = sink.bind_to_random_port("tcp://127.0.0.1")
    sink_address = f"tcp://127.0.0.1:{sink_port}"
    all_in = CTX.Event()
    ready = CTX.Queue()
    t0 = time.perf_counter()
    producer = CTX.Process(target=_zmq_produce, args=(address, n, batch, all_in, ready, consumers))
    producer.start()
    procs = [CTX.Process(target=_zmq_consume, args=(address, sink_address, ready)) for _ in range(consumers)]
    for p in procs:
        p.start()
    total = 0
    deadline = time.monotonic() + DEADLINE_S
    while total < n:
        if not sink.poll(1000):
            if time.monotonic() > deadline or not producer.is_alive() and not any(p.is_alive() for p in procs):
                break
            continue
        total += int.from_bytes(sink.recv(), "little")
    seconds = time.perf_counter() - t0
    all_in.set()
    producer.join(10)
    for p in procs:  # consumers block in recv for ever: they are done, end them
        p.terminate()
    _finish([producer, *procs])
    sink.close(0)
    ctx.term()
    if total != n:
        raise BaselineError(f"ZeroMQ PUSH/PULL: {total} jobs counted, expected {n}")
    return {"jobs": n, "seconds": seconds}


# -- multiprocessing.Pool and mpire ---------------------------------------------------------------
def pool_imap(n: int, chunksize: int, consumers: int = 2) -> dict[str, Any]:
    """multiprocessing.Pool.imap_unordered; the parent process is the producer."""
    t0 = time.perf_counter()
    with CTX.Pool(consumers) as pool:
        count = 0
        for _ in pool.imap_unordered(nothing_job, ({"i": i, "name": "job", "value": 1.5} for i in range(n)), chunksize=chunksize):
            count += 1
        seconds = time.perf_counter() - t0
    if count != n:
        raise BaselineError(f"mp.Pool: {count} results, expected {n}")
    return {"jobs": n, "seconds": seconds}


def mpire_available() -> str | None:
    try:
        from importlib.metadata import version

        import mpire  # noqa: F401
        return version("mpire")
    except Exception:  # noqa: BLE001 - any failure means: skip it
        return None


def mpire_map(n: int, consumers: int = 2) -> dict[str, Any]:
    """mpire WorkerPool.map with its default chunking (jobs passed as 1-tuples: mpire unpacks dicts)."""
    from mpire import WorkerPool

    t0 = time.perf_counter()
    with WorkerPool(n_jobs=consumers, start_method="fork") as pool:
        results = pool.map(nothing_job, (({"i": i, "name": "job", "value": 1.5},) for i in range(n)), iterable_len=n)
    seconds = time.perf_counter() - t0
    if len(results) != n:
        raise BaselineError(f"mpire: {len(results)} results, expected {n}")
    return {"jobs": n, "seconds": seconds}


# -- CPU-bound ------------------------------------------------------------------------------------
def calibrate(ms: float) -> int:
    """How many loops of `spin` take about `ms` milliseconds here."""
    loops = 10_000
    while True:
        t0 = time.perf_counter()
        spin(loops)
        took = time.perf_counter() - t0
        if took > 0.05:
            break
        loops *= 2
    return max(1, int(loops * (ms / 1000) / took))


def _job_seconds(loops: int, jobs: int, rounds: int, out: Any) -> None:
    per = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(jobs):
            spin(loops)
        per.append((time.process_time() - t0) / jobs)
    per.sort()
    out.put(per[len(per) // 2])


def job_seconds(loops: int, cores: int = 2, jobs: int = 40, rounds: int = 3) -> float:
    """CPU seconds one `spin(loops)` job takes, measured as the consumers will run: in `cores` forked
    processes at once, every core busy (median of `rounds` rounds of `jobs` in each, then their mean).
    CPU time, not wall time: other processes sharing the cores do not inflate the ideal."""
    out = CTX.Queue()
    procs = [CTX.Process(target=_job_seconds, args=(loops, jobs, rounds, out)) for _ in range(cores)]
    for p in procs:
        p.start()
    per = [_get(out, "calibration") for _ in procs]
    _finish(procs)
    return sum(per) / len(per)


def _cpu_produce(q: Any, n: int, loops: int, consumers: int) -> None:
    for i in range(n):
        q.put((i, loops))
    for _ in range(consumers):
        q.put(None)
    q.close()
    q.join_thread()


def _cpu_consume(q: Any, done: Any) -> None:
    count = 0
    while True:
        item = q.get()
        if item is None:
            break
        cpu_job(item)
        count += 1
    done.put(count)


def cpu_mpq(n: int, loops: int, consumers: int = 2) -> dict[str, Any]:
    """CPU-bound jobs through a multiprocessing.Queue, one job a put (bounded 100)."""
    q = CTX.Queue(maxsize=100)
    done = CTX.Queue()
    t0 = time.perf_counter()
    procs = [CTX.Process(target=_cpu_consume, args=(q, done)) for _ in range(consumers)]
    procs.append(CTX.Process(target=_cpu_produce, args=(q, n, loops, consumers)))
    for p in procs:
        p.start()
    total = sum(_get(done, "mp.Queue CPU consumer") for _ in range(consumers))
    seconds = time.perf_counter() - t0
    _finish(procs)
    if total != n:
        raise BaselineError(f"mp.Queue CPU: {total} jobs, expected {n}")
    return {"jobs": n, "seconds": seconds}


def cpu_pool(n: int, loops: int, consumers: int = 2) -> dict[str, Any]:
    t0 = time.perf_counter()
    with CTX.Pool(consumers) as pool:
        count = sum(1 for _ in pool.imap_unordered(cpu_job, ((i, loops) for i in range(n)), chunksize=1))
        seconds = time.perf_counter() - t0
    if count != n:
        raise BaselineError(f"mp.Pool CPU: {count} results, expected {n}")
    return {"jobs": n, "seconds": seconds}


# -- latency at a fixed rate ----------------------------------------------------------------------
def _lat_mpq_produce(q: Any, n: int, rate: float, consumers: int) -> None:
    for i, stamp in pace(n, rate):
        q.put((i, stamp))
    for _ in range(consumers):
        q.put(None)
    q.close()
    q.join_thread()


def _lat_mpq_consume(q: Any, out: Any) -> None:
    lat = []
    while True:
        item = q.get()
        if item is None:
            break
        lat.append((item[0], time.monotonic_ns() - item[1]))
    out.put(lat)


def latency_mpq(n: int, rate: float, consumers: int = 2) -> list[tuple[int, int]]:
    """One multiprocessing.Queue hop at a fixed rate: [(job index, latency ns)]."""
    q = CTX.Queue()
    out = CTX.Queue()
    procs = [CTX.Process(target=_lat_mpq_consume, args=(q, out)) for _ in range(consumers)]
    procs.append(CTX.Process(target=_lat_mpq_produce, args=(q, n, rate, consumers)))
    for p in procs:
        p.start()
    lat = [x for _ in range(consumers) for x in _get(out, "mp.Queue latency consumer")]
    _finish(procs)
    if len(lat) != n:
        raise BaselineError(f"mp.Queue latency: {len(lat)} jobs, expected {n}")
    return lat


def _lat_zmq_produce(address: str, n: int, rate: float, all_in: Any, ready: Any, consumers: int) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(address)
    packb = msgpack.Packer().pack
    for _ in range(consumers):  # wait until every consumer is connected, or PUSH sends all to the first
        ready.get(timeout=60)
    time.sleep(0.05)
    for i, stamp in pace(n, rate):
        push.send(packb({"i": i, "t": stamp}))
    while not all_in.wait(0.02):
        try:
            push.send(END, zmq.NOBLOCK)
        except zmq.Again:
            pass
    push.close(0)
    ctx.term()


def _lat_zmq_consume(address: str, out: Any, ready: Any) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(address)
    ready.put(1)
    unpackb = msgpack.unpackb
    lat = []
    while True:
        data = pull.recv()
        if data == END:
            out.put(lat)
            lat = []
            continue
        job = unpackb(data)
        lat.append((job["i"], time.monotonic_ns() - job["t"]))


def latency_zmq(n: int, rate: float, consumers: int = 2) -> list[tuple[int, int]]:
    """One ZeroMQ PUSH/PULL hop (tcp loopback, msgpack, one job a message) at a fixed rate."""
    address = f"tcp://127.0.0.1:{free_port()}"
    all_in = CTX.Event()
    out = CTX.Queue()
    ready = CTX.Queue()
    producer = CTX.Process(target=_lat_zmq_produce, args=(address, n, rate, all_in, ready, consumers))
    producer.start()
    procs = [CTX.Process(target=_lat_zmq_consume, args=(address, out, ready)) for _ in range(consumers)]
    for p in procs:
        p.start()
    lat: list[tuple[int, int]] = []
    while len(lat) < n:
        lat.extend(_get(out, "ZeroMQ latency consumer"))
    all_in.set()
    producer.join(10)
    for p in procs:
        p.terminate()
    _finish([producer, *procs])
    if len(lat) != n:
        raise BaselineError(f"ZeroMQ latency: {len(lat)} jobs, expected {n}")
    return lat


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        spin(10_000)


def warm_up(seconds: float = 1.5, cores: int = 2) -> None:
    """Spin every core for a moment: the first second after an idle period runs slower (FACTS)."""
    procs = [CTX.Process(target=busy, args=(seconds,)) for _ in range(cores)]
    for p in procs:
        p.start()
    _finish(procs)


def msgpack_roundtrip_us(n: int = 200_000) -> float:
    """CPU µs to msgpack-pack and unpack one trivial job (the dict every producer here yields), once:
    the unit issue 14 measures the coordinator's CPU per job against."""
    job = {"i": 12345, "name": "job", "value": 1.5}
    packb, unpackb = msgpack.packb, msgpack.unpackb
    started = time.process_time()
    for _ in range(n):
        unpackb(packb(job))
    return (time.process_time() - started) / n * 1e6
