"""Run `runner start` (and `runner worker`) as real subprocesses, as a user would, and read the result
back from the run's own log (`run.finished`). Also: the coordinator's peak RSS, and how busy the rest of
the machine was while a measurement ran (other people's processes skew a 2-core benchmark)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

HERE = Path(__file__).resolve().parent
TASKS = HERE / "bench_tasks.py"
WORKER_NAME = "bench-worker"


class RunnerFailed(RuntimeError):
    pass


# -- how busy is the machine ----------------------------------------------------------------------
def _system_busy_s() -> float:
    """CPU-seconds all processes have used since boot (every core), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _become_subreaper() -> bool:
    """Orphans of our descendants (multiprocessing's forkserver, which the coordinator never reaps) are
    re-parented to us instead of init, so we can reap them and count their CPU (Linux PR_SET_CHILD_SUBREAPER)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


SUBREAPER = _become_subreaper()


def reap(pids: set[int], most: float = 2.0) -> None:
    """Reap the processes of `pids` that were orphaned to us, waiting up to `most` seconds for them to end.
    A pid that is not our child (its own parent reaps it) is left alone."""
    deadline = time.monotonic() + most
    pids = set(pids)
    while pids:
        for pid in list(pids):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pids.discard(pid)
                continue
            if done:
                pids.discard(pid)
        if not pids or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _rusage_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Meter:
    """Wall time of a block, and the CPU (in cores) that processes outside this benchmark used meanwhile.
    Read `noise` after every process the block started has been reaped.

    Our own CPU is this process's plus its reaped descendants' (getrusage). A descendant nobody waits for
    (multiprocessing's forkserver is never reaped by the coordinator) is missing from getrusage: set
    `sampled` to the CPU a ProcSampler saw in our process trees, and the larger of the two counts."""

    sampled = 0.0

    def __enter__(self) -> Meter:
        self.t0 = time.perf_counter()
        self.sys0 = _system_busy_s()
        self.self0 = _rusage_s(resource.RUSAGE_SELF)
        self.children0 = _rusage_s(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        children = max(_rusage_s(resource.RUSAGE_CHILDREN) - self.children0, self.sampled)
        own = self.own = _rusage_s(resource.RUSAGE_SELF) - self.self0 + children
        foreign = (_system_busy_s() - self.sys0) - own
        self.noise = max(0.0, foreign / self.wall) if self.wall > 0 else 0.0


def foreign_load(seconds: float = 0.5) -> float:
    """Cores that processes outside this benchmark keep busy, measured over `seconds` while this process
    spins (an idle pause would let the CPU slow down: the first second after idle runs slower)."""
    from bench_tasks import spin

    with Meter() as meter:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            spin(2_000)
    return meter.noise


def wait_quiet(most: float, say: Any, threshold: float = 0.1) -> float:
    """Wait up to `most` seconds until other processes use at most `threshold` cores; returns the last load."""
    deadline = time.monotonic() + most
    load = foreign_load()
    waited = False
    while load > threshold and time.monotonic() < deadline:
        if not waited:
            say(f"  waiting for other processes to quiet down ({load:.2f} cores busy)")
            waited = True
        load = foreign_load()
    return load


# -- peak RSS and CPU by process -----------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


class ProcSampler(threading.Thread):
    """Every `interval`, walk the process trees under `roots` ({pid: label}): the first root's peak RSS
    (VmHWM, the kernel's own high-water mark) and every process's CPU seconds so far (the last value seen
    before a process ends: up to one interval of CPU is missed per process). A root's CPU is counted from
    when it starts its first child, so the interpreter's start and the CLI's imports are left out."""

    def __init__(self, roots: dict[int, str], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.main = next(iter(roots))
        self.interval = interval
        self.peak_kb = 0
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = dict(roots)
        self.prefix: dict[int, str] = {}
        self.base: dict[int, float] = {}  #: a root's CPU seconds when it started its first child
        self.final: set[int] = set(roots)  #: named for good (a root, or a process with its runner title)
        self.stop = threading.Event()

    @staticmethod
    def _children(pid: int) -> list[int]:
        out: list[int] = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
        return out

    def _label(self, pid: int) -> None:
        if pid in self.final:
            return
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError):
            return
        if cmd.startswith("runner: "):  # setproctitle: "runner: work-2 [run name]"
            self.names[pid] = cmd.split()[1]
            self.final.add(pid)
        elif "forkserver" in cmd:  # the server itself, or a child of it not titled yet
            self.names[pid] = "forkserver"
        elif "resource_tracker" in cmd:
            self.names[pid] = "resource tracker"
        else:
            self.names[pid] = "?" + cmd[:60]

    def _sample(self) -> bool:
        try:
            with open(f"/proc/{self.main}/status") as f:
                for line in f:
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return False
        todo = [(pid, "" if pid == self.main else "remote ") for pid in self.roots]
        while todo:
            pid, prefix = todo.pop()
            try:
                with open(f"/proc/{pid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if rest[0] == "Z":
                continue
            self.cpu[pid] = (int(rest[11]) + int(rest[12])) / _TICK
            self.prefix[pid] = prefix
            self._label(pid)
            children = self._children(pid)
            if pid in self.roots and children and pid not in self.base:
                self.base[pid] = self.cpu[pid]  # start-up (interpreter, imports, config) ends with the first child
            todo += [(child, prefix) for child in children]
        return True

    def run(self) -> None:
        while not self.stop.is_set() and self._sample():
            self.stop.wait(self.interval)
        # The root is gone; a descendant nobody reaps (multiprocessing's forkserver) may still be finishing:
        # follow the ones seen until they are gone too (at most 2 s).
        deadline = time.monotonic() + 2.0
        alive = set(self.cpu) - set(self.roots)
        while alive and time.monotonic() < deadline:
            for pid in list(alive):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        rest = f.read().rsplit(")", 1)[1].split()
                except (FileNotFoundError, ProcessLookupError):
                    alive.discard(pid)
                    continue
                if rest[0] == "Z":
                    alive.discard(pid)
                    continue
                self.cpu[pid] = (int(rest[11]) + int(rest[12])) / _TICK
            time.sleep(0.01)

    def by_name(self) -> dict[str, float]:
        """CPU seconds by process name (a restarted process's runs add up)."""
        out: dict[str, float] = {}
        for pid, cpu in self.cpu.items():
            cpu -= self.base.get(pid, 0.0)
            name = self.names.get(pid, "?")
            if name not in self.roots.values():
                if not name.startswith(("prod", "work", "forkserver", "resource")):
                    name = "other"
                name = self.prefix.get(pid, "") + name
            out[name] = out.get(name, 0.0) + cpu
        return out


# -- one runner run -------------------------------------------------------------------------------
@dataclass
class RunnerResult:
    wall_s: float  #: `runner start` from exec to exit (interpreter, imports, config, the run)
    duration_s: float  #: the coordinator's own `run.finished` duration_s (processes start to end)
    done: int
    finished: dict[str, Any]
    started: dict[str, Any]
    peak_rss_kb: int
    noise: float
    folder: Path
    results_path: Path | None = None
    remote_done: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  #: CPU seconds by process (coordinator, prod-1, work-1, ...)

    @property
    def rate(self) -> float:
        return self.done / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def wall_rate(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0


_counter = [0]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process this module started: SIGTERM (the runner stops its children), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_runner(workdir: Path, config: dict[str, Any], *, sets: list[str] = (), worker_processes: int = 0,
               expect: int | None = None, timeout: float = 600.0, results: bool = False, port: int | None = None) -> RunnerResult:
    """Write `config` (+ bench_tasks.py) into a fresh folder and run `runner start` on it.

    worker_processes > 0: also bind a loopback port and start one `runner worker --processes N` for it.
    """
    from baselines import free_port

    _counter[0] += 1
    folder = workdir / f"run-{_counter[0]:03d}"
    folder.mkdir(parents=True)
    shutil.copy(TASKS, folder / "bench_tasks.py")
    config = dict(config)
    config["logs"] = {"dir": str(folder / "logs"), **config.get("logs", {})}
    results_path = folder / "results.jsonl" if results else None
    if results_path:
        config["results"] = str(results_path)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = Path(sys.executable).parent / "runner"  # the console script, as users type it
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "runner"]
    cmd = [*launcher, "start", "--config", str(path)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "NO_COLOR": "1"}
    worker = None
    with Meter() as meter, ExitStack() as files:
        def out(name: str) -> IO[bytes]:
            return files.enter_context(open(folder / name, "wb"))

        if worker_processes:
            address = f"tcp://127.0.0.1:{port or free_port()}"
            worker = subprocess.Popen(
                [sys.executable, "-m", "runner", "worker", "--connect", address, "--processes", str(worker_processes),
                 "--name", WORKER_NAME, "--path", str(folder), "--give-up", "60"],
                cwd=folder, stdout=out("worker.out"), stderr=out("worker.err"), env=env)
            time.sleep(0.5)  # let it import and start knocking: it should be there when the run starts
            cmd += ["--bind", address]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, stdout=out("stdout"), stderr=out("stderr"), env=env)
        roots = {proc.pid: "coordinator"}
        if worker is not None:
            roots[worker.pid] = "worker agent"
        sampler = ProcSampler(roots)
        sampler.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            sampler.stop.set()
            _stop(proc)
            if worker:
                _stop(worker)
            raise RunnerFailed(f"runner start did not finish within {timeout:g}s (folder {folder})") from None
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        meter.sampled = sum(sampler.cpu.values())
        if worker is not None:
            try:  # it leaves when the coordinator says goodbye; one that never joined (a tiny run) is ended
                worker.wait(5)
            except subprocess.TimeoutExpired:
                _stop(worker)
        if SUBREAPER:
            reap(set(sampler.cpu) - set(roots))
    logs = [p for p in (folder / "logs").glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".pending.jsonl"))]
    events = {}
    if logs:
        for line in logs[0].read_text().splitlines():
            if '"run.finished"' in line or '"run.started"' in line:
                event = json.loads(line)
                events[event["event"]] = event
    finished = events.get("run.finished")
    if code != 0 or finished is None or (expect is not None and finished["done"] != expect):
        detail = _tail(folder / "stderr")
        if worker is not None:
            detail += "\n-- worker --\n" + _tail(folder / "worker.err")
        got = finished and finished.get("done")
        raise RunnerFailed(f"runner start exited {code}, done {got} of {expect} (folder {folder}):\n{detail}")
    remote = sum(w["done"] for w in finished.get("workers", {}).values() if w.get("host") == WORKER_NAME)
    return RunnerResult(wall, finished["duration_s"], finished["done"], finished, events.get("run.started", {}),
                        sampler.peak_kb, meter.noise, folder, results_path, remote, sampler.by_name())


def import_floor_wall(workdir: Path) -> float:
    """`python -c "import typer, pydantic, structlog, zmq, msgpack, yaml"`: the floor of any run (issue 14's)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import typer, pydantic, structlog, zmq, msgpack, yaml"], cwd=workdir, check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" when it does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"
