"""Resume speed (issue 11): how long `runner resume` takes to dispatch its first job from a big journal.

    python bench/journal_resume.py --jobs 10000000 --unsettled 1000000

It writes a journal as a killed coordinator would leave it (trivial payloads, batches of 256, one
commit every 64 batches, every job done but the last `--unsettled`), then times:
  load     pass one over the journal (settled map, positions, offsets), in this process
  restore  pass two: every unsettled job regrouped, in this process
  first    `runner resume` from exec until a consumer starts its first job (a file it writes)
The producer ended in the journal, so only the unsettled jobs run; the run is then stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.coordinator import journal as J  # noqa: E402
from runner.coordinator.resume import config_hash, load  # noqa: E402

TASKS = '''
import os, time

def produce(ctx, n):
    yield from ({"i": i} for i in range(n))

def first(ctx, job):
    if not os.path.exists("first"):
        with open("first.tmp", "w") as out:
            out.write(repr(time.time()))
        os.replace("first.tmp", "first")
'''


def write_journal(folder: Path, jobs: int, unsettled: int, batch: int = 256, per_commit: int = 64) -> Path:
    run_id = "big-20261201T000000Z-0000"
    config = {"name": "big", "producers": [{"name": "prod", "task": "tasks:produce", "processes": 1, "params": {"n": jobs}}],
              "consumers": [{"name": "work", "task": "tasks:first", "processes": 2}], "logs": {"dir": "logs"},
              "start_method": "fork", "journal": {"sync": 0.02}}
    path = folder / "logs" / f"{run_id}.journal"
    path.parent.mkdir(parents=True)
    settled_until = jobs - unsettled
    with open(path, "wb") as out:
        out.write(J.frame([J.HEADER, J.VERSION, run_id, "big", config, config_hash(config), str(folder / "run.yaml"), str(folder)]))
        out.write(J.frame([J.COMMIT, [[J.START, 1]], None, 0]))
        records: list[list[object]] = []
        first = 1
        while first <= jobs:
            n = min(batch, jobs - first + 1)
            blob = msgpack.packb([{"i": i} for i in range(first - 1, first - 1 + n)], use_bin_type=True)
            records.append([J.JOBS, "work", first, n, blob, "prod-1", first - 1])
            done = max(0, min(n, settled_until - first + 1))
            if done:
                records.append([J.DONE, "work", first, done])
            first += n
            if len(records) >= per_commit * 2:
                out.write(J.frame([J.COMMIT, records, None, 0]))
                records = []
        records.append([J.END, "prod-1", "ok"])
        out.write(J.frame([J.COMMIT, records, None, 0]))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--unsettled", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="journal-resume-") as tmp:
        folder = Path(tmp)
        (folder / "tasks.py").write_text(TASKS)
        started = time.perf_counter()
        path = write_journal(folder, args.jobs, args.unsettled)
        size = path.stat().st_size
        print(f"journal: {args.jobs:,} jobs, {args.unsettled:,} unsettled, {size / 1e6:.1f} MB "
              f"({size / args.jobs:.1f} bytes/job), written in {time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        state = load(path)
        loaded = time.perf_counter() - started
        count = sum(len(group.ids) for group in state.unsettled())
        restored = time.perf_counter() - started - loaded
        assert count == args.unsettled, count
        print(f"load (pass one) {loaded:.2f}s; restore (pass two, {count:,} jobs) {restored:.2f}s")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "runner", "resume", state.run_id, "--logs", "logs"], cwd=folder,
                                stdout=subprocess.DEVNULL, stderr=open(folder / "stderr", "w"), env=env)
        first = folder / "first"
        deadline = time.monotonic() + 120
        while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        if first.exists():
            print(f"runner resume: first job started {float(first.read_text()) - t0:.2f}s after exec")
        else:
            print("runner resume: no job started", file=sys.stderr)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        for line in (folder / "stderr").read_text().splitlines()[:6]:
            print("   ", line[:200])


if __name__ == "__main__":
    main()
