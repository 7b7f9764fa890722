#!/usr/bin/env python3
"""The runner's benchmark: the runner and the raw transports, side by side, in one run.

    python bench/run.py                 # everything, ~3-4 minutes on 2 cores; writes bench/results.md
    python bench/run.py --quick         # the same sections with small sizes, about a minute
    python bench/run.py --only trivial,startup
    python bench/run.py --help          # sizes, repeats, output path

Sections (issue 6): trivial (throughput of do-nothing jobs), cpu (efficiency against the ideal),
latency (produce-to-consume at a fixed rate), scale (100k..10M jobs, coordinator peak RSS), startup
(a one-job run end to end). A final table compares the figures with the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import baselines
import driver
from driver import Meter, run_runner

SECTIONS = ("trivial", "cpu", "latency", "scale", "startup")
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"jobs": 1_000_000, "slow_jobs": 200_000, "repeat": 3, "cpu_jobs": 2000, "cpu_ms": 5.0, "latency_s": 5.0,
             "scale": [100_000, 1_000_000, 10_000_000], "startup_repeat": 3, "warm_up": 1.5, "noise_retries": 2},
    "quick": {"jobs": 300_000, "slow_jobs": 50_000, "repeat": 1, "cpu_jobs": 400, "cpu_ms": 5.0, "latency_s": 2.0,
              "scale": [100_000, 1_000_000], "startup_repeat": 3, "warm_up": 1.0, "noise_retries": 2},
    # for tests: proves every code path runs, measures nothing worth reading
    "smoke": {"jobs": 3_000, "slow_jobs": 1_000, "repeat": 1, "cpu_jobs": 20, "cpu_ms": 1.0, "latency_s": 0.3,
              "scale": [1_000, 3_000], "startup_repeat": 1, "warm_up": 0.0, "noise_retries": 0},
}

# The targets (2-core machine)
TARGET_CPU_EFF = 0.95
TARGET_RSS_GROWTH = 0.10  # "flat": at most 10 % more peak RSS at the largest size than at 1 M


_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- formatting -----------------------------------------------------------------------------------
def fmt_rate(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e4:
        return f"{x / 1e3:.0f} k"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def fmt_n(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000} M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000} k"
    return f"{n:,}"


def fmt_x(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×"


def fmt_noise(x: float) -> str:
    return f"{x:.2f}" + (" ⚠" if x > 0.15 else "")


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table, padded so it also reads well in a terminal. align: one of l/r per column."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = []
        for cell, width, a in zip(cells, widths, align):
            out.append(str(cell).rjust(width) if a == "r" else str(cell).ljust(width))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def cpu_line(cpu: dict[str, float], duration: float, jobs: int) -> str:
    """'coordinator 1.21 s = 1.21 µs/job (86 %) · prod-1 ...': CPU seconds, per job, and share of one core."""
    order = sorted(cpu.items(), key=lambda kv: (kv[0] != "coordinator", kv[0] != "worker agent", kv[0]))
    return " · ".join(f"{name} {sec:.2f} s = {sec / jobs * 1e6:.2f} µs/job ({sec / duration:.0%})"
                      for name, sec in order if sec >= 0.005)


# -- machine --------------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    import msgpack
    import zmq

    model = driver.cpu_model()
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    try:
        from runner import __version__ as runner_version
    except ImportError:
        runner_version = "?"
    commit = "?"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "runner"], capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
        if dirty:
            commit += f" + uncommitted changes in runner/ ({len(dirty.splitlines())} files)"
    except (OSError, subprocess.SubprocessError):
        pass
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "cpu": model,
        "cores": f"{cores} logical" + (f" ({usable} usable)" if usable != cores else ""),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyzmq / libzmq": f"{zmq.__version__} / {zmq.zmq_version()}",
        "msgpack": ".".join(map(str, msgpack.version)),
        "mpire": baselines.mpire_available() or "not installed (row skipped)",
        "runner": f"{runner_version} (commit {commit})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- measurement plumbing -------------------------------------------------------------------------
@dataclass
class Sample:
    value: float  #: jobs/s, seconds, efficiency: whatever the section measures
    noise: float  #: cores used by processes outside the benchmark meanwhile
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Series:
    key: str
    label: str
    jobs: int
    samples: list[Sample] = field(default_factory=list)
    note: str = ""
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(s.value for s in self.samples) if self.samples else None

    @property
    def noise(self) -> float:
        return max((s.noise for s in self.samples), default=0.0)

    def spread(self, fmt: Callable[[float], str]) -> str:
        if len(self.samples) < 2:
            return ""
        values = [s.value for s in self.samples]
        return f"{fmt(min(values))} – {fmt(max(values))}"

    def median_sample(self) -> Sample | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples, key=lambda s: s.value)
        return ordered[(len(ordered) - 1) // 2]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: dict[str, Any] = {}
        self.tables: list[str] = []
        self.errors: list[str] = []

    def least_noisy(self, label: str, fn: Callable[[], Any], noise_of: Callable[[Any], float], retries: int | None = None) -> Any:
        """Run `fn`; while other processes loaded the machine meanwhile, run it again (at most --noise-retries
        times) and keep the quietest attempt."""
        retries = self.args.noise_retries if retries is None else retries
        best = None
        for attempt in range(retries + 1):
            self.quiet()
            result = fn()
            if best is None or noise_of(result) < noise_of(best):
                best = result
            if noise_of(result) <= self.args.max_noise or attempt == retries:
                break
            say(f"  {label}: other processes used {noise_of(result):.2f} cores meanwhile; measuring again")
            driver.foreign_load(0.5)  # a pause that keeps a core busy (an idle CPU slows down)
        return best

    def measure(self, series: Series, fn: Callable[[], Sample]) -> None:
        """One sample of `series`, the quietest of its attempts; a failure is reported and the bench goes on."""
        try:
            sample = self.least_noisy(series.label, fn, lambda s: s.noise)
        except Exception as exc:  # noqa: BLE001 - a broken system is reported, the bench goes on
            series.error = f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{series.label}: {series.error}")
            say(f"  {series.label}: FAILED {series.error.splitlines()[0]}")
            return
        series.samples.append(sample)

    def quiet(self) -> None:
        """With --wait-idle: before a sample, wait (a while) for other people's processes to stop."""
        if self.args.wait_idle > 0:
            driver.wait_quiet(self.args.wait_idle, say)

    # -- runner runs ------------------------------------------------------------------------------
    def trivial_config(self, n: int, tuned: bool = False, journal: bool = True) -> dict[str, Any]:
        """The trivial run. Default: the pools and the job count only, as a new user writes it (journal on,
        forkserver, queue.maxsize 100). tuned: the old headline config (--maxsize, --batch, --start-method,
        logs.jobs none)."""
        config: dict[str, Any] = {"name": "bench-trivial"}
        if not journal:
            config["journal"] = False
        if tuned:
            config["queue"] = {"maxsize": self.args.maxsize, "batch": self.args.batch}
            config["start_method"] = self.args.start_method
            config["logs"] = {"jobs": "none"}
        config["producers"] = [{"name": "prod", "task": "bench_tasks:produce", "processes": 1, "to": "work", "params": {"n": n}}]
        config["consumers"] = [{"name": "work", "task": "bench_tasks:nothing", "processes": 2}]
        return config

    def runner(self, config: dict[str, Any], n: int, zmq: bool = False, results: bool = False) -> driver.RunnerResult:
        sets = ["consumers.work.processes=0"] if zmq else []  # every job crosses ZeroMQ
        timeout = max(120.0, n / 20_000)
        return run_runner(self.workdir, config, sets=sets, worker_processes=self.args.worker_processes if zmq else 0,
                          expect=n, timeout=timeout, results=results)

    def zmq_note(self) -> str:
        return (f"coordinator with no local consumer process (`processes: 0`) + one `runner worker "
                f"--processes {self.args.worker_processes}` on tcp loopback")

    # -- sections ---------------------------------------------------------------------------------
    def section_trivial(self) -> None:
        a = self.args
        n, slow = a.jobs, a.slow_jobs
        say(f"trivial: {fmt_n(n)} jobs ({fmt_n(slow)} for the slow systems), {a.repeat} round(s)")

        def runner_sample(config: dict[str, Any], jobs: int, zmq: bool = False, results: bool = False) -> Callable[[], Sample]:
            def go() -> Sample:
                r = self.runner(config, jobs, zmq, results=results)
                journals = list((r.folder / "logs").glob("*.journal"))
                extra = {"wall_rate": r.wall_rate, "remote_share": r.remote_done / r.done if r.done else 0.0,
                         "journal_bytes_per_job": journals[0].stat().st_size / r.done if journals and r.done else None,
                         "duration_s": r.duration_s, "wall_s": r.wall_s, "cpu": r.cpu,
                         "cpu_us": sum(r.cpu.values()) / r.done * 1e6 if r.done else None}
                return Sample(r.rate, r.noise, extra)
            return go

        def raw(fn: Callable[[], dict[str, Any]]) -> Callable[[], Sample]:
            def go() -> Sample:
                with Meter() as m:
                    out = fn()
                return Sample(out["jobs"] / out["seconds"], m.noise, {"cpu_us": m.own / out["jobs"] * 1e6})
            return go

        systems: list[tuple[Series, Callable[[], Sample]]] = [
            (Series("runner", "runner local, default config (journal on)", n), runner_sample(self.trivial_config(n), n)),
            (Series("runner_nojournal", "runner local, default config, journal off", n),
             runner_sample(self.trivial_config(n, journal=False), n)),
            (Series("runner_results", "runner local, default config + a results file", n),
             runner_sample(self.trivial_config(n), n, results=True)),
            (Series("runner_zmq", "runner + 1 worker over ZeroMQ, default config (run keys)", n),
             runner_sample(self.trivial_config(n), n, zmq=True)),
            (Series("runner_tuned", f"runner local, tuned (maxsize {a.maxsize}, {a.start_method})", n),
             runner_sample(self.trivial_config(n, tuned=True), n)),
            (Series("mpq_batched", f"raw mp.Queue, {a.batch} a put", n), raw(lambda: baselines.mpq(n, a.batch, 2, a.maxsize))),
            (Series("mpq_single", "raw mp.Queue, 1 a put (bounded 100)", slow), raw(lambda: baselines.mpq(slow, 1, 2, 100))),
            (Series("zmq_batched", f"raw ZeroMQ PUSH/PULL + msgpack, {a.batch} a message", n),
             raw(lambda: baselines.zmq_pushpull(n, a.batch, 2))),
            (Series("pool1", "mp.Pool imap_unordered, chunksize 1", slow), raw(lambda: baselines.pool_imap(slow, 1))),
            (Series("pool256", "mp.Pool imap_unordered, chunksize 256", n), raw(lambda: baselines.pool_imap(n, 256))),
        ]
        if baselines.mpire_available():
            systems.append((Series("mpire", "mpire map (default chunking)", slow), raw(lambda: baselines.mpire_map(slow))))
        codec = []
        for round_ in range(a.repeat):
            codec.append(baselines.msgpack_roundtrip_us())
            for series, fn in systems:
                say(f"  [{round_ + 1}/{a.repeat}] {series.label} ...")
                self.measure(series, fn)
        by_key = {s.key: s for s, _ in systems}
        mpq = by_key["mpq_batched"].median
        pool1 = by_key["pool1"].median
        rows = []
        for series, _ in systems:
            med = series.median
            note = series.error or ""
            sample = series.median_sample()
            if series.key == "runner_zmq" and sample:
                note = f"{sample.extra['remote_share']:.0%} of jobs ran on the worker"
            if series.key.startswith("runner") and sample and not series.error:
                note = (note + "; " if note else "") + f"{fmt_rate(sample.extra['wall_rate'])}/s counting CLI start"
                if sample.extra.get("journal_bytes_per_job"):
                    note += f"; journal {sample.extra['journal_bytes_per_job']:.1f} bytes/job"
            if series.key == "runner" and by_key["runner_nojournal"].median and med:
                note += f"; {med / by_key['runner_nojournal'].median:.2f}× journal off"
            cpu_us = sample.extra.get("cpu_us") if sample else None
            rows.append([series.label, fmt_n(series.jobs), fmt_rate(med), series.spread(fmt_rate),
                         fmt_x(med / mpq) if med and mpq else "–", fmt_x(med / pool1) if med and pool1 else "–",
                         f"{cpu_us:.2f}" if cpu_us else "–", fmt_noise(series.noise), note])
        self.results["trivial"] = {s.key: {"label": s.label, "jobs": s.jobs, "median": s.median, "samples": [x.value for x in s.samples],
                                           "noise": s.noise, "error": s.error,
                                           "extra": s.median_sample().extra if s.samples else {}} for s, _ in systems}
        self.results["codec_us"] = statistics.median(codec)
        text = ["### Trivial jobs: 1 producer, 2 consumer processes, a small dict a job, a consumer that does nothing",
                "",
                table(["system", "jobs", "jobs/s", f"range ({a.repeat} runs)", "× raw mp.Queue batched", "× mp.Pool cs 1",
                       "CPU µs/job", "noise", "note"], rows, "lrrrrrrrl"),
                "",
                (f"jobs/s: median of {a.repeat}; runner rows: `done / run.finished.duration_s` (the coordinator's clock, "
                 f"from its start, processes included, to the end of the run), and in the note `done / wall time` of the "
                 f"whole `runner start` command (exec to exit: interpreter, imports, config, run, shutdown); raw rows: from "
                 f"the first process start to the last job counted. Default config: the pools and the job count only "
                 f"(journal on at its default sync, start_method forkserver, queue.maxsize 100, queue.batch 256, logs.jobs "
                 f"failures, no results file). Tuned: queue.maxsize {a.maxsize}, queue.batch {a.batch}, start_method "
                 f"{a.start_method}, logs.jobs none. Over ZeroMQ: {self.zmq_note()}, with the run's own CURVE keys (the "
                 f"default on loopback), so every job crosses producer → coordinator → ZeroMQ → worker agent → consumer. "
                 f"CPU µs/job: CPU time of every process of the system (producer, coordinator, consumers, worker agent; the "
                 f"runner's interpreter start and imports left out) per job: on 2 cores, 1 M jobs/s allows 2 µs. noise: "
                 f"cores used by processes outside the benchmark during the run (⚠ above 0.15). msgpack pack + unpack of "
                 f"one job (the same dict, measured in this run): {self.results['codec_us']:.2f} µs CPU.")]
        for key in ("runner", "runner_zmq"):
            sample = by_key[key].median_sample()
            if sample and sample.extra.get("cpu"):
                text += ["", f"CPU by process, {by_key[key].label} (median run, {sample.extra['duration_s']:.2f} s; "
                         f"share of one core): " + cpu_line(sample.extra["cpu"], sample.extra["duration_s"], by_key[key].jobs)]
        self.tables.append("\n".join(text))

    def section_cpu(self) -> None:
        a = self.args
        n = a.cpu_jobs
        cores = min(2, len(os.sched_getaffinity(0)))
        say(f"cpu: {n} jobs of ~{a.cpu_ms:g} ms, {a.repeat} round(s)")
        state: dict[str, Any] = {}

        def runner_sample(zmq: bool) -> Callable[[], Sample]:
            def go() -> Sample:
                config = self.trivial_config(n)
                config["producers"][0]["task"] = "bench_tasks:cpu_produce"
                config["consumers"][0].update(task="bench_tasks:cpu_consume", params={"loops": state["loops"]})
                r = self.runner(config, n, zmq)
                ideal = n * state["per_job"] / cores
                return Sample(ideal / r.duration_s, r.noise, {"wall": r.duration_s, "ideal": ideal,
                                                            "remote_share": r.remote_done / r.done if r.done else 0.0})
            return go

        def raw(fn: Callable[[], dict[str, Any]]) -> Callable[[], Sample]:
            def go() -> Sample:
                with Meter() as m:
                    out = fn()
                ideal = n * state["per_job"] / cores
                return Sample(ideal / out["seconds"], m.noise, {"wall": out["seconds"], "ideal": ideal})
            return go

        systems = [
            (Series("runner", "runner local", n), runner_sample(False)),
            (Series("runner_zmq", "runner + 1 worker over ZeroMQ", n), runner_sample(True)),
            (Series("mpq", "raw mp.Queue, 1 a put", n), raw(lambda: baselines.cpu_mpq(n, state["loops"]))),
            (Series("pool1", "mp.Pool imap_unordered, chunksize 1", n), raw(lambda: baselines.cpu_pool(n, state["loops"]))),
        ]
        per_jobs = []
        for round_ in range(a.repeat):
            if "loops" not in state:
                state["loops"] = baselines.calibrate(a.cpu_ms)
            state["per_job"] = baselines.job_seconds(state["loops"], cores)  # again each round: the machine drifts
            per_jobs.append(state["per_job"])
            for series, fn in systems:
                say(f"  [{round_ + 1}/{a.repeat}] {series.label} ...")
                self.measure(series, fn)
        rows = []
        for series, _ in systems:
            s = series.median_sample()
            note = series.error or ""
            if series.key == "runner_zmq" and s:
                note = f"{s.extra['remote_share']:.0%} of jobs ran on the worker; {self.args.worker_processes} consumer processes on {cores} cores"
            rows.append([series.label, fmt_n(series.jobs), f"{s.extra['ideal']:.2f}" if s else "–", f"{s.extra['wall']:.2f}" if s else "–",
                         f"{series.median:.1%}" if s else "–", series.spread(lambda x: f"{x:.1%}"), fmt_noise(series.noise), note])
        self.results["cpu"] = {s.key: {"label": s.label, "jobs": n, "efficiency": s.median, "samples": [x.value for x in s.samples],
                                       "noise": s.noise, "error": s.error, "extra": s.median_sample().extra if s.samples else {}}
                               for s, _ in systems}
        self.results["cpu"]["_calibration"] = {"loops": state.get("loops"), "per_job_s": per_jobs, "cores": cores}
        text = [f"### CPU-bound jobs: ~{a.cpu_ms:g} ms of pure-Python work each, 2 consumer processes",
                "",
                table(["system", "jobs", "ideal s", "wall s", "efficiency", f"range ({a.repeat} runs)", "noise", "note"], rows, "lrrrrrrl"),
                "",
                (f"ideal = jobs × one job's CPU time, measured just before each round in {cores} processes at once "
                 f"(median {statistics.median(per_jobs) * 1000:.2f} ms) "
                 f"/ {cores} cores; efficiency = ideal / wall (median of {a.repeat}). Runner wall = run.finished.duration_s; "
                 f"the producer and the coordinator share the same {cores} cores.")]
        self.tables.append("\n".join(text))

    def section_latency(self) -> None:
        from runner.timing import nearest_rank

        a = self.args
        rate = a.latency_rate
        n = max(10, int(rate * a.latency_s))
        skip = min(int(rate * 0.2), n // 5)
        say(f"latency: {n} jobs at {rate:g} jobs/s")

        def runner_lat(zmq: bool) -> tuple[list[tuple[int, int, str]], float]:
            config = self.trivial_config(n)
            config["producers"][0].update(task="bench_tasks:paced_produce", params={"n": n, "rate": rate, "gate": "consumer-ready"})
            config["consumers"][0]["task"] = "bench_tasks:stamp_consume"
            r = self.runner(config, n + 1, zmq, results=True)  # + the probe job (i = -1), left out below
            out = []
            assert r.results_path is not None
            for line in r.results_path.read_text().splitlines():
                res = json.loads(line)["result"]
                out.append((res["i"], res["lat_ns"], res["host"]))
            return out, r.noise

        def raw_lat(fn: Callable[[], list[tuple[int, int]]]) -> tuple[list[tuple[int, int, str]], float]:
            with Meter() as m:
                lat = fn()
            return [(i, ns, "") for i, ns in lat], m.noise

        systems: list[tuple[str, str, Callable[[], tuple[list[tuple[int, int, str]], float]]]] = [
            ("runner", "runner local (producer → coordinator → consumer)", lambda: runner_lat(False)),
            ("runner_zmq", "runner + 1 worker over ZeroMQ", lambda: runner_lat(True)),
            ("mpq", "raw mp.Queue, one hop, 1 a put", lambda: raw_lat(lambda: baselines.latency_mpq(n, rate))),
            ("zmq", "raw ZeroMQ PUSH/PULL, one hop, 1 a message", lambda: raw_lat(lambda: baselines.latency_zmq(n, rate))),
        ]
        rows = []
        self.results["latency"] = {}
        for key, label, fn in systems:
            say(f"  {label} ...")
            try:
                data, noise = self.least_noisy(label, fn, lambda r: r[1])
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"{label}: {exc}")
                say(f"  {label}: FAILED {str(exc).splitlines()[0]}")
                rows.append([label, fmt_n(n), "–", "–", "–", "–", f"failed: {type(exc).__name__}"])
                continue
            groups = [(label, [x for x in data if x[0] >= skip], "")]
            if key == "runner_zmq":
                remote = [x for x in data if x[0] >= skip and x[2] == driver.WORKER_NAME]
                local = [x for x in data if x[0] >= skip and x[2] != driver.WORKER_NAME]
                groups = [(label + ": all jobs", groups[0][1], "1 local + 2 worker processes, see below"),
                          ("  … jobs that ran on the worker", remote, ""), ("  … jobs that ran locally", local, "")]
            for glabel, items, note in groups:
                ms = sorted(x[1] / 1e6 for x in items)
                stats = {"jobs": len(ms), "p50_ms": nearest_rank(ms, 0.5), "p99_ms": nearest_rank(ms, 0.99), "max_ms": ms[-1] if ms else None}
                self.results["latency"][key if glabel == label or glabel.endswith("all jobs") else key + ("_remote" if "worker" in glabel else "_local")] = {**stats, "noise": noise, "label": glabel}
                if not ms:
                    rows.append([glabel, "0", "–", "–", "–", fmt_noise(noise), note or "no job"])
                    continue
                rows.append([glabel, f"{len(ms):,}", f"{stats['p50_ms']:.3f}", f"{stats['p99_ms']:.3f}", f"{stats['max_ms']:.2f}",
                             fmt_noise(noise), note])
        text = [f"### Latency at {rate:g} jobs/s: produce → consume, 2 consumer processes",
                "",
                table(["system", "jobs", "p50 ms", "p99 ms", "max ms", "noise", "note"], rows, "lrrrrrl"),
                "",
                (f"{n:,} jobs paced on a deadline schedule; each payload carries time.monotonic_ns() taken as the producer "
                 f"yields it, the consumer records now − stamp (read back from the results file for the runner). The runner's paced "
                 f"jobs start once a consumer has run one probe job (over ZeroMQ: once the worker host has joined and "
                 f"started its processes). The first {skip} jobs (0.2 s) are left out as warm-up. One run each. Over ZeroMQ: {self.zmq_note()}; the jobs that "
                 f"ran on the worker crossed producer → coordinator → ZeroMQ → worker agent → consumer.")]
        self.tables.append("\n".join(text))

    def section_scale(self) -> None:
        a = self.args
        say(f"scale: {', '.join(fmt_n(s) for s in a.scale)} jobs through runner local")
        rows = []
        self.results["scale"] = {}
        for size in a.scale:
            say(f"  {fmt_n(size)} jobs ...")
            try:  # the largest runs take long: measured once
                r = self.least_noisy(f"{fmt_n(size)} jobs", lambda size=size: self.runner(self.trivial_config(size, tuned=True), size),
                                     lambda r: r.noise, retries=0 if size >= 5_000_000 else None)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"scale {size}: {exc}")
                say(f"  {fmt_n(size)}: FAILED {str(exc).splitlines()[0]}")
                rows.append([fmt_n(size), "–", "–", "–", "–", "–", f"failed: {type(exc).__name__}"])
                continue
            self.results["scale"][size] = {"duration_s": r.duration_s, "wall_s": r.wall_s, "rate": r.rate,
                                           "peak_rss_mb": r.peak_rss_kb / 1024, "noise": r.noise, "cpu": r.cpu}
            busy = r.cpu.get("coordinator", 0.0) / r.duration_s if r.duration_s else 0.0
            rows.append([fmt_n(size), f"{r.duration_s:.2f}", f"{r.wall_s:.2f}", fmt_rate(r.rate), f"{r.peak_rss_kb / 1024:.1f}",
                         f"{busy:.0%}", fmt_noise(r.noise)])
        text = ["### Scale: trivial jobs through runner local, coordinator peak RSS",
                "",
                table(["jobs", "run s", "wall s", "jobs/s", "coordinator peak RSS MB", "coordinator CPU busy", "noise"], rows, "rrrrrrr"),
                "",
                ("run s: run.finished.duration_s; wall s: the whole `runner start` command. Peak RSS: the coordinator "
                 "process's VmHWM from /proc, polled every 50 ms while it runs (a high-water mark: nothing is missed). Coordinator CPU busy: its CPU seconds / run s "
                 "(100 % = one core saturated: the coordinator is the bottleneck). One run each.")]
        self.tables.append("\n".join(text))

    def section_startup(self) -> None:
        a = self.args
        say(f"startup: a one-job run, {a.startup_repeat} time(s) each")
        series = [Series("version", "python -c \"import typer, pydantic, structlog, zmq, msgpack, yaml\" (the floor)", 0),
                  Series("default", "one-job run, start_method forkserver (the default)", 1),
                  Series("fork", "one-job run, start_method fork", 1)]
        durations: dict[str, list[float]] = {"default": [], "fork": []}

        def one_job(method: str | None) -> Callable[[], Sample]:
            def go() -> Sample:
                config = self.trivial_config(1)
                if method:
                    config["start_method"] = method
                r = self.runner(config, 1)
                durations["fork" if method else "default"].append(r.duration_s)
                return Sample(r.wall_s, r.noise, {"duration_s": r.duration_s, "rss_mb": r.peak_rss_kb / 1024})
            return go

        def version() -> Sample:
            with Meter() as m:
                wall = driver.import_floor_wall(self.workdir)
            return Sample(wall, m.noise)

        fns = [version, one_job(None), one_job("fork")]
        for round_ in range(a.startup_repeat):
            for s, fn in zip(series, fns):
                self.measure(s, fn)
        rows = []
        for s in series:
            ds = durations.get(s.key)
            rows.append([s.label, f"{s.median:.3f}" if s.median is not None else "–", s.spread(lambda x: f"{x:.3f}"),
                         f"{statistics.median(ds):.3f}" if ds else "–",
                         f"{s.median_sample().extra['rss_mb']:.1f}" if s.samples and s.key != "version" else "–",
                         fmt_noise(s.noise), s.error or ""])
        self.results["startup"] = {s.key: {"label": s.label, "median_s": s.median, "samples": [x.value for x in s.samples],
                                           "coordinator_s": statistics.median(durations[s.key]) if durations.get(s.key) else None,
                                           "noise": s.noise} for s in series}
        text = ["### Start-up: a one-job run end to end",
                "",
                table(["what", "wall s (median)", f"range ({a.startup_repeat} runs)", "of which coordinator s", "peak RSS MB", "noise", "note"],
                      rows, "lrrrrrl"),
                "",
                ("wall s: `runner start` (the console script) from exec to exit, as a user waits for it, default config. "
                 "coordinator s: run.finished.duration_s (process start-up, the job, shutdown); the rest is the interpreter, "
                 "imports and the config. The floor: the libraries the runner is built on, imported and nothing else.")]
        self.tables.append("\n".join(text))

    # -- targets ----------------------------------------------------------------------------------
    def targets(self) -> str:
        R = self.results
        rows: list[list[str]] = []

        def at_least(what: str, goal: float, value: float | None, show: Callable[[float], str], noise: float | None = None) -> None:
            if value is None:
                rows.append([what, f"≥ {show(goal)}", "not measured", "–"])
                return
            status = "met" if value >= goal else f"missed: {value / goal:.0%} of the goal, needs {goal / value:.2f}× more"
            rows.append([what, f"≥ {show(goal)}", show(value), status + (" (noisy run)" if noise and noise > 0.15 else "")])

        def at_most(what: str, goal: float, value: float | None, show: Callable[[float], str], noise: float | None = None) -> None:
            if value is None or math.isnan(value):
                rows.append([what, f"≤ {show(goal)}", "not measured", "–"])
                return
            status = "met" if value <= goal else f"missed: {value / goal:.2f}× the limit"
            rows.append([what, f"≤ {show(goal)}", show(value), status + (" (noisy run)" if noise and noise > 0.15 else "")])

        t = R.get("trivial", {})
        mpq = t.get("mpq_batched", {}).get("median")
        pool1 = t.get("pool1", {}).get("median")
        default = t.get("runner", {})
        whole = (default.get("extra") or {}).get("wall_rate")
        noise = default.get("noise")
        at_least("default config, whole `runner start` / raw mp.Queue batched", 0.45, whole / mpq if whole and mpq else None, fmt_x, noise)
        at_least("default config, whole `runner start` / mp.Pool chunksize 1", 20.0, whole / pool1 if whole and pool1 else None, fmt_x, noise)
        med = default.get("median")
        at_least("default config, run.finished rate / raw mp.Queue batched", 0.6, med / mpq if med and mpq else None, fmt_x, noise)
        zmq = t.get("runner_zmq", {}).get("median")
        at_least("over ZeroMQ (run keys), run.finished rate / raw mp.Queue batched", 0.6, zmq / mpq if zmq and mpq else None, fmt_x,
                 t.get("runner_zmq", {}).get("noise"))
        off = t.get("runner_nojournal", {}).get("median")
        at_least("journal on (default sync) / journal off", 0.8, med / off if med and off else None, fmt_x, noise)
        cpu_by = (default.get("extra") or {}).get("cpu") or {}
        codec = R.get("codec_us")
        coordinator_us = cpu_by.get("coordinator", 0.0) / default["jobs"] * 1e6 if cpu_by and default.get("jobs") else None
        at_most("coordinator CPU per job / msgpack pack+unpack of the job", 2.0,
                coordinator_us / codec if coordinator_us and codec else None, fmt_x, noise)
        st = R.get("startup", {})
        one, floor = st.get("default", {}).get("median_s"), st.get("version", {}).get("median_s")
        at_most("one-job run (default start method), exec to exit / import floor", 1.6, one / floor if one and floor else None, fmt_x,
                st.get("default", {}).get("noise"))
        lat = R.get("latency", {})
        hop = lat.get("mpq", {}).get("p99_ms")
        for key, label, goal in (("runner", "local", 3.0), ("runner_zmq_remote", "over ZeroMQ", 4.0)):
            p99 = lat.get(key, {}).get("p99_ms")
            at_most(f"p99 at {self.args.latency_rate:g} jobs/s, {label} / one raw mp.Queue hop", goal,
                    p99 / hop if p99 and hop else None, fmt_x, lat.get(key, {}).get("noise"))
        cpu = R.get("cpu", {}).get("runner", {})
        at_least("CPU-bound efficiency, runner local", TARGET_CPU_EFF, cpu.get("efficiency"), lambda x: f"{x:.1%}", cpu.get("noise"))
        scale = R.get("scale", {})
        sizes = sorted(scale)
        if len(sizes) >= 2:
            base = 1_000_000 if 1_000_000 in scale and sizes[-1] > 1_000_000 else sizes[-2]
            top = sizes[-1]
            growth = scale[top]["peak_rss_mb"] / scale[base]["peak_rss_mb"] - 1
            status = "met" if growth <= TARGET_RSS_GROWTH else f"missed: {growth:+.0%} (limit +{TARGET_RSS_GROWTH:.0%})"
            rows.append([f"coordinator peak RSS flat, {fmt_n(base)} → {fmt_n(top)} jobs (journal on)", f"≤ +{TARGET_RSS_GROWTH:.0%}",
                         f"{scale[base]['peak_rss_mb']:.1f} → {scale[top]['peak_rss_mb']:.1f} MB ({growth:+.1%})", status])
        else:
            rows.append(["coordinator peak RSS flat, 1 M → 10 M jobs (journal on)", f"≤ +{TARGET_RSS_GROWTH:.0%}", "not measured", "–"])
        return "\n".join(["### Targets (issue 14, 2-core machine; each a ratio to its reference, measured in this run)", "", table(["target", "goal", "measured", "status"], rows, "lrrl")])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one round: about a minute")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for tests): proves it runs, measures nothing")
    p.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--jobs", type=int, help="trivial jobs for the fast systems (full: 1M)")
    p.add_argument("--slow-jobs", type=int, help="trivial jobs for the slow systems: mp.Pool cs 1, mpire, unbatched queue (full: 200k)")
    p.add_argument("--repeat", type=int, help="rounds for medians (full: 3)")
    p.add_argument("--cpu-jobs", type=int, help="CPU-bound jobs (full: 2000)")
    p.add_argument("--cpu-ms", type=float, help="CPU time of one CPU-bound job in ms (full: 5)")
    p.add_argument("--latency-s", type=float, help="seconds of paced jobs per latency run (full: 5)")
    p.add_argument("--latency-rate", type=float, default=1000.0, help="jobs/s in the latency runs (default 1000)")
    p.add_argument("--scale", help="comma-separated job counts for the scale section (full: 100000,1000000,10000000)")
    p.add_argument("--startup-repeat", type=int, help="one-job runs per variant (full: 3)")
    p.add_argument("--maxsize", type=int, default=10_000, help="runner queue.maxsize, and the raw batched queue's bound in jobs (default 10000)")
    p.add_argument("--batch", type=int, default=256, help="runner queue.batch and the raw baselines' batch (default 256)")
    p.add_argument("--start-method", default="fork", choices=["fork", "forkserver", "spawn"], help="runner start_method (default fork, like the baselines)")
    p.add_argument("--worker-processes", type=int, default=2, help="processes of the `runner worker` in the ZeroMQ rows (default 2)")
    p.add_argument("--max-noise", type=float, default=0.25, help="re-measure when other processes used more cores than this (default 0.25)")
    p.add_argument("--noise-retries", type=int, help="how many times to re-measure a noisy sample (default 2; --smoke: 0)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before the bench and before each sample, wait up to this many seconds until other processes "
                        "use under 0.1 cores (for shared machines; default 0: no wait)")
    p.add_argument("--out", type=Path, default=HERE / "results.md", help="markdown report (default bench/results.md)")
    p.add_argument("--json", type=Path, help="also write the raw figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders (printed at the end)")
    args = p.parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    args.preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.scale, str):
        args.scale = [int(x.replace("_", "")) for x in args.scale.split(",") if x.strip()]
    sections = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; sections are {', '.join(SECTIONS)}")
    args.sections = sections
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    if args.wait_idle > 0:
        driver.wait_quiet(args.wait_idle, say)
    info["other processes at start"] = f"{driver.foreign_load(0.5):.2f} cores busy"
    say("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    workdir = Path(tempfile.mkdtemp(prefix="runner-bench-"))
    bench = Bench(args, workdir)
    started = time.monotonic()
    if args.warm_up:
        say(f"warming up ({args.warm_up:g} s on every core, and a small run)")
        baselines.warm_up(args.warm_up)
        try:
            run_runner(workdir, bench.trivial_config(10_000), expect=10_000)
            baselines.mpq(100_000)
        except Exception as exc:  # noqa: BLE001 - the sections report failures themselves
            say(f"warm-up run failed: {exc}")
    for section in args.sections:
        getattr(bench, f"section_{section}")()
    elapsed = time.monotonic() - started

    machine = table(["", ""], [[k, v] for k, v in info.items()], "ll")
    command = "python bench/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    parts = [f"## runner benchmark ({args.preset}{', sections ' + ', '.join(args.sections) if len(args.sections) < len(SECTIONS) else ''})",
             "", f"Command: `{command}` — took {elapsed:.0f} s.", "", machine, "", *(t + "\n" for t in bench.tables),
             bench.targets()]
    if bench.errors:
        parts += ["", "### Errors", "", *(f"- {e.splitlines()[0]}" for e in bench.errors)]
    report = "\n".join(parts) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    say(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
                                         "results": bench.results}, indent=2, default=str))
        say(f"wrote {args.json}")
    if args.keep:
        say(f"run folders kept in {workdir}")
    else:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
