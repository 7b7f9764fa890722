"""How fast, and in how much memory, the log commands read a big run log.

Writes a contract-shaped log of --lines lines (default 1,000,000: a run with every job logged,
some failures, retries, crashes and dead letters, a progress line per second) to a temp folder,
then times `summary`, a filtered `logs` and a `trace`, in process and through the CLI
(`python -m runner logs ...` in a subprocess, its own peak RSS from wait4). Memory should not
grow with the file: the same commands also run over the first tenth of it for comparison.

    python bench/bench_logs.py [--lines 1000000] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.logs.read import Damage, LineFilter, read_lines  # noqa: E402
from runner.logs.summary import summarize  # noqa: E402
from runner.logs.trace import JobTrace, job_prefilter  # noqa: E402
from runner.logs.trace import trace as trace_job  # noqa: E402

RUN_ID = "bench-20261126T233001Z-b3c4"
HOST = "bench-host"
WORKERS = 8


def write_log(path: Path, lines: int, seed: int = 7) -> dict[str, int]:
    """A run log of about `lines` lines per the contract; returns the figures it holds."""
    rng = random.Random(seed)
    start = 1_795_735_801.0  # 2026-11-26T23:30:01Z
    written = 0
    clock = start
    figures = {"done": 0, "failed": 0, "retried": 0, "dead": 0, "crashes": 0}
    pids = {f"eat-{i}": 5000 + i for i in range(1, WORKERS + 1)}
    next_pid = 6000

    with path.open("wb", buffering=1 << 20) as out:
        def emit(event: str, level: str = "info", role: str = "coordinator", pool: Any = None, worker: str = "coordinator",
                 pid: int = 4000, **extra: Any) -> None:
            nonlocal written
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(clock)) + f".{int(clock % 1 * 1000):03d}Z"
            out.write(orjson.dumps({"timestamp": stamp, "level": level, "event": event, "run_id": RUN_ID, "host": HOST, "pid": pid,
                                    "role": role, "pool": pool, "worker": worker, **extra}) + b"\n")
            written += 1

        emit("run.started", name="bench", config="bench.yaml", start_method="forkserver", coordinator_pid=4000,
             pools={"make": {"role": "producer", "processes": 1, "task": "bench:make"}, "eat": {"role": "consumer", "processes": WORKERS, "task": "bench:eat"}},
             log_file=str(path), results=None)
        for worker, pid in pids.items():
            emit("worker.started", role="consumer", pool="eat", worker=worker, pid=pid, restart=0)
        job_id, next_progress = 0, start + 1
        while written < lines - 2:
            job_id += 1
            clock += 0.0004
            emit("job.queued", pool="eat", job_id=job_id, origin="make-1")
            attempt = 1
            while True:
                worker = f"eat-{rng.randint(1, WORKERS)}"
                pid = pids[worker]
                took = round(rng.lognormvariate(1.5, 0.6), 3)
                clock += 0.0002
                roll = rng.random()
                if roll < 0.0005:  # the worker dies running the job
                    figures["crashes"] += 1
                    emit("worker.crashed", "error", role="consumer", pool="eat", worker=worker, pid=pid, code=-9, signal="SIGKILL",
                         reason="killed by SIGKILL, possibly out of memory", job_id=job_id, requeued=3)
                    emit("job.failed", "warning", pool="eat", worker=worker, job_id=job_id, attempt=attempt,
                         error=f"worker {worker} killed by SIGKILL, possibly out of memory", origin="make-1")
                    next_pid += 1
                    pids[worker] = next_pid
                    emit("worker.started", role="consumer", pool="eat", worker=worker, pid=next_pid, restart=1)
                elif roll < 0.02:
                    emit("job.failed", "warning", role="consumer", pool="eat", worker=worker, pid=pid, job_id=job_id, attempt=attempt,
                         duration_ms=took, error=rng.choice(["ValueError: bad row", "TimeoutError: upstream slow", f"KeyError: 'k{job_id % 5}'"]),
                         traceback="Traceback (most recent call last):\n  ...\n")
                else:
                    emit("item.processed", role="consumer", pool="eat", worker=worker, pid=pid, job_id=job_id, attempt=attempt, size=rng.randint(1, 999))
                    emit("job.done", role="consumer", pool="eat", worker=worker, pid=pid, job_id=job_id, attempt=attempt, duration_ms=took)
                    figures["done"] += 1
                    break
                figures["failed"] += 1
                if attempt >= 3:
                    emit("job.dead", "error", pool="eat", job_id=job_id, attempts=attempt, error="gave up", origin="make-1")
                    figures["dead"] += 1
                    break
                attempt += 1
                figures["retried"] += 1
                emit("job.retried", pool="eat", job_id=job_id, attempt=attempt, delay_ms=500)
            if clock >= next_progress:
                emit("progress", produced=job_id, done=figures["done"], failed=figures["failed"], dead=figures["dead"],
                     queued=10, in_flight=WORKERS, rate=2000.0, elapsed_s=round(clock - start, 3))
                next_progress += 1
        emit("run.finished", status="failed" if figures["dead"] else "finished", exit_code=1 if figures["dead"] else 0,
             duration_s=round(clock - start, 3), produced=job_id, pending=0, pools={}, workers={}, **{k: v for k, v in figures.items() if k != "crashes"})
    figures["lines"] = written
    figures["jobs"] = job_id
    return figures


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_process(name: str, work: Callable[[], Any]) -> Any:
    before = peak_rss_mb()
    began = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - began
    print(f"  in process  {name:<34} {seconds:6.2f} s   peak RSS {peak_rss_mb():6.1f} MB (was {before:.1f} MB before)")
    return result


def through_cli(name: str, *args: str) -> None:
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "runner", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stderr is not None
    error = process.stderr.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"{name}: exit {process.returncode}: {error}")
    print(f"  CLI         {name:<34} {seconds:6.2f} s   peak RSS {usage.ru_maxrss / 1024:6.1f} MB")


def bench(path: Path, label: str, job_id: int) -> None:
    size_mb = path.stat().st_size / 1e6
    print(f"{label}: {path.name}, {size_mb:,.0f} MB")

    def summary() -> dict[str, Any]:
        damage = Damage()
        return summarize(read_lines([path], damage), damage)

    def filtered(**filters: Any) -> Callable[[], int]:
        return lambda: sum(1 for _ in LineFilter(**filters).lines([path], Damage()))

    def trace() -> JobTrace:
        damage = Damage()
        return trace_job(read_lines([path], damage, job_prefilter(job_id)), job_id)

    result = in_process("summary", summary)
    print(f"              (done {result['pools']['eat']['done']:,}, p50/p95/p99 {result['pools']['eat']['p50_ms']}/"
          f"{result['pools']['eat']['p95_ms']}/{result['pools']['eat']['p99_ms']} ms)")
    count = in_process("logs --level warning --worker eat-3", filtered(level="warning", worker=["eat-3"]))
    print(f"              ({count:,} lines match)")
    in_process("logs --grep 'KeyError'", filtered(grep="KeyError"))
    in_process(f"trace {job_id}", trace)
    through_cli("runner logs summary", "logs", "summary", str(path))
    through_cli("runner logs --level warning --worker eat-3", "logs", str(path), "--level", "warning", "--worker", "eat-3")
    through_cli("runner logs --event job.dead --json", "logs", str(path), "--event", "job.dead", "--json")
    through_cli(f"runner logs trace {job_id}", "logs", "trace", str(job_id), str(path))
    through_cli("runner logs timeline -o /dev/null", "logs", "timeline", str(path), "-o", os.devnull)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated log and print its folder")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    try:
        path = folder / f"{RUN_ID}.jsonl"
        began = time.perf_counter()
        figures = write_log(path, options.lines)
        print(f"wrote {figures['lines']:,} lines ({figures['jobs']:,} jobs, {figures['failed']:,} failures, "
              f"{figures['crashes']:,} crashes, {figures['dead']:,} dead) in {time.perf_counter() - began:.1f} s")
        small = folder / "small" / path.name
        small.parent.mkdir()
        with path.open("rb") as source, small.open("wb") as head:
            for number, raw in enumerate(source):
                if number >= options.lines // 10:
                    break
                head.write(raw)
        print(f"python {sys.version.split()[0]}, peak RSS of this process so far {peak_rss_mb():.1f} MB")
        bench(small, "a tenth of the log", 1234)
        bench(path, "the whole log", figures["jobs"] // 2)
        if options.keep:
            print(f"kept {folder}")
    finally:
        if not options.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
