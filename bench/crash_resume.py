"""SIGKILL a run's coordinator at many random points and check that `runner resume` keeps exactly once.

    python bench/crash_resume.py --kills 20 --jobs 3000 [--seed 7] [--chain 3]

Each round starts a fresh run, waits until the results file holds a random number of lines, SIGKILLs
the coordinator alone, and resumes it; with --chain K the resume itself is killed K-1 times more at
later points. After the last resume it checks: exit 0, every job in the results exactly once, the
dead coordinators' processes gone. Synchronised on the results file, never on time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

TASKS = '''
import time

def produce(ctx, n):
    for i in range(n):
        yield {"i": i}

def consume(ctx, job):
    time.sleep(0.0005)
    return {"i": job["i"]}
'''


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_lines(path: Path, proc: subprocess.Popen[bytes], count: int, limit: float = 120.0) -> bool:
    deadline = time.monotonic() + limit
    while lines(path) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def one_round(folder: Path, jobs: int, rng: random.Random, chain: int, env: dict[str, str]) -> str:
    cfg = {"name": "crash", "producers": [{"name": "prod", "task": "tasks:produce", "params": {"n": jobs}}],
           "consumers": [{"name": "work", "task": "tasks:consume", "processes": 2}], "queue": {"maxsize": 200, "batch": 32},
           "results": "results.jsonl", "logs": {"dir": "logs", "progress_interval": "50ms"}, "start_method": "fork"}
    (folder / "tasks.py").write_text(TASKS)
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    results = folder / "results.jsonl"
    cmd = [sys.executable, "-m", "runner", "start", "--config", "run.yaml"]
    points = sorted(rng.randrange(1, jobs) for _ in range(chain))
    for point in points:
        proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        reached = wait_lines(results, proc, point)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        run_id = next((folder / "logs").glob("*.journal")).name.removesuffix(".journal")
        cmd = [sys.executable, "-m", "runner", "resume", run_id, "--logs", "logs"]
        if not reached:
            break
    final = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env, timeout=600)
    seen = [json.loads(line)["result"]["i"] for line in results.read_text().splitlines()]
    ok = final.returncode == 0 and sorted(seen) == list(range(jobs))
    return f"kills at {points}: exit {final.returncode}, {len(seen)} lines, {len(set(seen))} distinct: {'ok' if ok else 'WRONG'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="rounds (one fresh run each)")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--chain", type=int, default=1, help="kills per round (the resumes are killed too)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    print(f"seed {seed}")
    bad = 0
    for round_ in range(args.kills):
        with tempfile.TemporaryDirectory(prefix="crash-resume-") as tmp:
            verdict = one_round(Path(tmp), args.jobs, rng, args.chain, env)
        bad += "WRONG" in verdict
        print(f"[{round_ + 1}/{args.kills}] {verdict}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
