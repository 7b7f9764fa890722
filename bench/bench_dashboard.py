"""What the metrics endpoint and the dashboard cost the coordinator, in trivial jobs per second.

Three rounds, interleaved so that a slow spell of the machine hits each alike:
  off        no --metrics, no --dashboard
  served     --metrics and --dashboard on one port, nobody looking
  watched    the same, with a headless Chromium polling the dashboard page (selenium) and a /metrics scrape every second

jobs/s = done / run.finished.duration_s. Coordinator CPU µs/job: the `runner start` process's own CPU (its
HTTP thread included; the browser, the producer and the consumers left out) from its first child to its
exit, sampled from /proc every 50 ms (driver.ProcSampler), per job: what the dashboard costs the
coordinator itself, apart from what the browser takes from the same 2 cores. Usage: python bench/bench_dashboard.py [--jobs 2000000] [--rounds 3]
(needs Debian's chromium and chromium-driver, and selenium from the test extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from driver import ProcSampler  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


def one_run(folder: Path, jobs: int, mode: str, driver: Any) -> tuple[float, float]:
    """(jobs/s, coordinator CPU µs per job) of one run."""
    port = free_port()
    args = [] if mode == "off" else ["--metrics", f"127.0.0.1:{port}", "--dashboard", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([sys.executable, "-m", "runner", "start", "--config", "run.yaml", "--set", f"producers.prod.params.n={jobs}", *args],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = ProcSampler({proc.pid: "coordinator"})
    sampler.start()
    stop = threading.Event()
    if mode == "watched":
        assert proc.stdout is not None
        url = next(line.split(" ", 1)[1].strip() for line in proc.stdout if line.startswith("dashboard: "))
        driver.get(url)

        def scrape() -> None:
            while not stop.wait(1.0):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
                except OSError:
                    return

        threading.Thread(target=scrape, daemon=True).start()
    proc.communicate(timeout=600)
    stop.set()
    sampler.join(5)
    log = max((folder / "logs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    finished = [json.loads(line) for line in log.read_text().splitlines() if '"run.finished"' in line][0]
    return finished["done"] / finished["duration_s"], sampler.by_name()["coordinator"] / finished["done"] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="runner-bench-dash-"))
    shutil.copy(HERE / "bench_tasks.py", folder / "bench_tasks.py")
    (folder / "run.yaml").write_text(
        "name: dash\nqueue: {maxsize: 10000}\nlogs: {jobs: none}\nstart_method: fork\n"
        "producers: [{name: prod, task: 'bench_tasks:produce'}]\n"
        "consumers: [{name: work, task: 'bench_tasks:nothing', processes: 2}]\n")
    driver = browser()
    rates: dict[str, list[float]] = {"off": [], "served": [], "watched": []}
    cpus: dict[str, list[float]] = {mode: [] for mode in rates}
    try:
        for _ in range(opts.rounds):
            for mode in rates:
                rate, cpu = one_run(folder, opts.jobs, mode, driver)
                rates[mode].append(rate)
                cpus[mode].append(cpu)
                print(f"{mode}: {rate:,.0f} jobs/s, coordinator {cpu:.2f} µs/job", file=sys.stderr, flush=True)
    finally:
        driver.quit()
    base, cpu_base = statistics.median(rates["off"]), statistics.median(cpus["off"])
    print(f"{opts.jobs:,} trivial jobs, 1 producer, 2 consumers, median of {opts.rounds}")
    print("| mode | jobs/s (median) | range | vs off | coordinator CPU µs/job (median) | range | vs off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, values in rates.items():
        median, cpu = statistics.median(values), statistics.median(cpus[mode])
        print(f"| {mode} | {median:,.0f} | {min(values):,.0f} – {max(values):,.0f} | {median / base - 1:+.1%} "
              f"| {cpu:.2f} | {min(cpus[mode]):.2f} – {max(cpus[mode]):.2f} | {cpu / cpu_base - 1:+.1%} |")


if __name__ == "__main__":
    main()
