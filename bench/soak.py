"""Soak: a run that keeps losing processes, to show no job is lost or doubled, nothing is left behind
and the coordinator's memory stays flat.

One `runner start --bind` on loopback (2 local consumers, 3 producers) and one or two `runner worker`
hosts, with jobs of random durations (mostly ~1 ms, some 20-50 ms). For the soak's length it SIGKILLs,
at random every 0.2-0.6 s, a local consumer, a worker host's consumer, a whole worker agent (started
again at once, it joins as a new host) or, at most twice, a producer. Then the producers are told to
end (a file), and the run must end by itself. Checked:
  - every job the run produced is in the results exactly once (job ids 1..produced, none twice);
  - no zombie child of the coordinator stays (sampled from /proc while it runs, after the kills);
  - no orphan: no process titled `runner: ... [<run name>]` is left after the end;
  - the coordinator's VmRSS at the end is within 50 MB of the one after warm-up.

    python bench/soak.py --minutes 10        # by hand; prints runs, kills, jobs, RSS start/end
tests/test_soak.py runs `soak(20 s)` in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

TASKS = '''
import os, random, time

def produce(ctx):
    """Jobs until the file `stop-producing` appears (checked every 100 jobs)."""
    k = 0
    while True:
        if k % 100 == 0 and os.path.exists("stop-producing"):
            return
        yield {"p": ctx.worker, "k": k}
        k += 1

def work(ctx, job):
    r = random.random()
    time.sleep(random.uniform(0.02, 0.05) if r < 0.02 else random.expovariate(1000) if r < 0.5 else 0)
    return {"p": job["p"], "k": job["k"]}
'''

#: a coordinator's RSS may grow at most this much over the soak (a loose bound, not a timing)
RSS_GROWTH_LIMIT_MB = 50


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, cmdline) of the direct children of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(entry), fields[0], cmd))
        except (OSError, ValueError):
            continue
    return found


def titled(name: str) -> list[int]:
    """Live processes titled `runner: <worker> [<name>]` (zombies are not processes left behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
            if f"[{name}]" in cmd and stat[stat.rindex(")") + 2] != "Z":
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def _worker(folder: Path, address: str, index: int) -> subprocess.Popen[bytes]:
    with open(folder / f"worker-{index}.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "runner", "worker", "--connect", address, "--name", f"w{index}",
                                 "--path", str(folder), "--give-up", "30"], cwd=folder, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def soak(seconds: float, folder: Path, seed: int | None = None, say: Any = print) -> dict[str, Any]:
    """One soak run of `seconds` of kills; returns its figures and the problems found (empty: passed)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(textwrap.dedent(TASKS))
    name = f"soak{os.getpid()}x{rng.randrange(1 << 16)}"
    config = {
        "name": name, "start_method": "fork", "results": "results.jsonl",
        "logs": {"dir": "logs", "progress_interval": "1s"},
        "queue": {"maxsize": 2000},
        "heartbeat": {"interval": "0.2s", "timeout": "1.5s"},
        "shutdown": {"grace": "5s"},
        "producers": [{"name": "prod", "task": "tasks:produce", "processes": 3}],
        "consumers": [{"name": "work", "task": "tasks:work", "processes": 2, "retries": 1000, "retry_backoff": 0,
                       "restart_limit": 1000}],
    }
    (folder / "run.yaml").write_text(json.dumps(config))
    address = f"tcp://127.0.0.1:{_free_port()}"
    with open(folder / "coordinator.out", "wb") as out, open(folder / "coordinator.err", "wb") as err:
        coordinator = subprocess.Popen([sys.executable, "-m", "runner", "start", "--config", "run.yaml", "--bind", address],
                                       cwd=folder, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    workers = [_worker(folder, address, i) for i in (1, 2)]
    kills = {"local consumer": 0, "remote consumer": 0, "worker agent": 0, "producer": 0}
    problems: list[str] = []
    zombies_seen: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while not [c for c in _children(coordinator.pid) if "runner: work-" in c[2]]:
            if time.monotonic() > deadline or coordinator.poll() is not None:
                raise RuntimeError(f"the run did not start: {(folder / 'coordinator.err').read_text()[-2000:]}")
            time.sleep(0.05)
        time.sleep(1.0)  # warm-up: imports, the first batches
        rss_start = _rss_kb(coordinator.pid)
        end = time.monotonic() + seconds
        next_index = 3
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.2, 0.6))
            mine = _children(coordinator.pid)
            what = rng.choice(["local consumer"] * 4 + ["remote consumer"] * 3 + ["worker agent"] * 2 + ["producer"])
            if what == "producer" and kills["producer"] >= 2:
                what = "local consumer"
            victims: list[int] = []
            if what == "local consumer":
                victims = [pid for pid, state, cmd in mine if "runner: work-" in cmd and state != "Z"]
            elif what == "producer":
                victims = [pid for pid, state, cmd in mine if "runner: prod-" in cmd and state != "Z"]
            elif what == "remote consumer":
                victims = [pid for w in workers if w.poll() is None for pid, state, cmd in _children(w.pid)
                           if "runner: work-" in cmd and state != "Z"]
            if what == "worker agent":
                index = rng.randrange(len(workers))
                os.killpg(workers[index].pid, signal.SIGKILL)  # the agent and its processes (they die with it anyway)
                workers[index].wait()
                workers[index] = _worker(folder, address, next_index)
                next_index += 1
                kills[what] += 1
            elif victims:
                os.kill(rng.choice(victims), signal.SIGKILL)
                kills[what] += 1
            zombies_seen |= {pid for pid, state, _ in _children(coordinator.pid) if state == "Z"}
        (folder / "stop-producing").write_text("")
        # a zombie may exist for an instant (between a death and the loop reaping it); one that stays is a leak
        time.sleep(0.5)
        lasting = {pid for pid, state, _ in _children(coordinator.pid) if state == "Z"} & zombies_seen
        rss_end = _rss_kb(coordinator.pid)
        code = coordinator.wait(120)
        if lasting:
            problems.append(f"zombie children of the coordinator stayed: {sorted(lasting)}")
        if code not in (0, 1):  # 1: a producer was killed, which fails the run (its stream ended early)
            problems.append(f"exit code {code}: {(folder / 'coordinator.err').read_text()[-2000:]}")
        if kills["producer"] == 0 and code != 0:
            problems.append(f"exit {code} with no producer killed")
    finally:
        (folder / "stop-producing").write_text("")
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
        if coordinator.poll() is None:
            os.killpg(coordinator.pid, signal.SIGKILL)
            coordinator.wait()
    logs = [p for p in (folder / "logs").glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
    finished = [json.loads(line) for line in logs[0].read_text().splitlines() if '"run.finished"' in line][-1]
    ids = [json.loads(line)["job_id"] for line in (folder / "results.jsonl").read_text().splitlines()]
    produced = finished["produced"]
    if len(ids) != len(set(ids)):
        problems.append(f"{len(ids) - len(set(ids))} job(s) in the results twice")
    if set(ids) != set(range(1, produced + 1)) or finished["pending"] or finished["dead"]:
        missing = set(range(1, produced + 1)) - set(ids)
        problems.append(f"{len(missing)} produced job(s) not in the results (pending {finished['pending']}, dead {finished['dead']})")
    time.sleep(0.2)
    left = titled(name)
    if left:
        problems.append(f"processes of the run left behind: {left}")
    growth_mb = (rss_end - rss_start) / 1024
    if growth_mb > RSS_GROWTH_LIMIT_MB:
        problems.append(f"coordinator RSS grew {growth_mb:.1f} MB")
    figures = {"seconds": seconds, "exit_code": code, "kills": kills, "jobs": produced, "results": len(ids),
               "rss_start_mb": round(rss_start / 1024, 1), "rss_end_mb": round(rss_end / 1024, 1),
               "transient_zombies": len(zombies_seen), "problems": problems}
    say(json.dumps(figures))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="How long to soak (default 10).")
    parser.add_argument("--run-seconds", type=float, default=60.0, help="Kills per run before it is ended (default 60).")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    end = time.monotonic() + args.minutes * 60
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="runner-soak-") as tmp:
        while time.monotonic() < end:
            seconds = min(args.run_seconds, max(5.0, end - time.monotonic()))
            runs.append(soak(seconds, Path(tmp) / f"run{len(runs) + 1}", rng.randrange(1 << 30)))
    kills = {k: sum(r["kills"][k] for r in runs) for k in runs[0]["kills"]}
    failed = [r for r in runs if r["problems"]]
    print(f"runs {len(runs)}, failed {len(failed)}; kills {sum(kills.values())} {kills}; jobs {sum(r['jobs'] for r in runs):,}; "
          f"coordinator RSS start/end (MB): " + ", ".join(f"{r['rss_start_mb']}/{r['rss_end_mb']}" for r in runs))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
