"""Many worker hosts against one real coordinator, by simulation (issue 14, "Beyond one machine").

`python bench/simhosts.py` starts one real `runner start --bind tcp://127.0.0.1:PORT` whose consumer pool has
`processes: 0` (every job goes to worker hosts), then N simulated worker hosts spread over a few processes
(one ZeroMQ DEALER per host, polled together). Each simulated host speaks the real protocol
(runner.wire.zeromq header/parse): HELLO, WELCOME, READY for every SPAWN, heartbeats with its processes'
RSS, a REPORT for every JOBS at once (every job done), EXITED for every STOP, BYE for BYE. Security is the
run's own CURVE keys (the default on loopback), found as a real worker finds them; `--insecure` turns it off.

For each N it measures: the join time (first HELLO sent to the last `host.joined` in the run's log), the
coordinator's CPU at idle with every host joined (heartbeats alone), the time to notice a lost host (one
host stops sending, its socket stays open, until `host.lost`), jobs/s through the coordinator (first JOBS
received to the last REPORT sent, over every simulated host), the coordinator's CPU per job meanwhile, and
dispatch fairness (max/min jobs per host, the silenced host left out). The table goes to stdout and
bench/simhosts.md.

  python bench/simhosts.py                      # N = 10, 100, 1000
  python bench/simhosts.py --quick              # N = 10, 100; fewer jobs, shorter idle sample
  python bench/simhosts.py --hosts 50 --jobs 20000
  python bench/simhosts.py --smoke              # N = 3, 300 jobs: proves the harness runs (tests/test_simhosts_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from calendar import timegm
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASKS = '''
import os, time

def produce(ctx, n=1000, gate=""):
    """Wait for the bench's gate file (hosts joined, idle and loss measured), then n small dicts."""
    while gate and not os.path.exists(gate):
        time.sleep(0.02)
    for i in range(n):
        yield {"i": i, "name": "job", "value": 1.5}

def nothing(ctx, job):
    """Never runs here: the pool has processes: 0 and the simulated hosts answer its jobs."""
'''

#: the simulated hosts' processes report this RSS in their heartbeats
FAKE_RSS = 30 << 20
#: most simulated hosts in one process
HOSTS_PER_PROCESS = 250


# -- a simulated worker host process --------------------------------------------------------------------------
class SimHost:
    """One worker host: its DEALER, its session numbers, its processes, the jobs it answered."""

    def __init__(self, name: str, sock: Any) -> None:
        self.name = name
        self.sock = sock
        self.sent = 0
        self.procs: dict[str, dict[str, Any]] = {}
        self.joined = False
        self.silent = False
        self.over = False
        self.interval = 1.0
        self.next_beat = 0.0
        self.jobs = 0
        self.resets = 0


def _sim_main(address: str, first: int, count: int, processes: int, insecure: bool) -> None:
    """Run `count` simulated hosts in this process until each has been told the run is over (or silenced).
    Commands on stdin: `silence NAME`. Events on stdout, one JSON object a line."""
    import msgpack
    import zmq

    from runner.timing import time_bucket
    from runner.wire import messages
    from runner.wire import zeromq as wire

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * count + 256)), hard))
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, 2 * count + 64)
    keys = None if insecure else wire.find_run_keys(address)
    if not insecure and keys is None:
        raise SystemExit(f"no run keys for {address} (is the run up?)")
    pid = os.getpid()
    bucket = time_bucket(1e-6)
    out = sys.stdout

    def say(**event: Any) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    poller = zmq.Poller()
    hosts: dict[Any, SimHost] = {}
    by_name: dict[str, SimHost] = {}
    for i in range(first, first + count):
        host = SimHost(f"sim{i:04d}", wire.connect_dealer(context, address, keys))
        hosts[host.sock] = by_name[host.name] = host
        poller.register(host.sock, zmq.POLLIN)
    poller.register(sys.stdin, zmq.POLLIN)
    hello_at = time.time()
    for host in hosts.values():
        host.sock.send(wire.header(wire.HELLO, 0, host.name, ["eater"], processes, pid, None))

    def send(host: SimHost, kind: int, *fields: Any, frame: bytes | None = None) -> None:
        host.sent += 1
        parts = [wire.header(kind, host.sent, *fields)]
        if frame is not None:
            parts.append(frame)
        host.sock.send_multipart(parts)

    first_job = last_job = None
    joined = 0
    live = count
    while live:
        now = time.monotonic()
        for sock, _ in poller.poll(50):
            if sock is sys.stdin or sock == sys.stdin.fileno():
                line = sys.stdin.readline().split()
                if line and line[0] == "silence" and line[1] in by_name:
                    target = by_name[line[1]]
                    target.silent, live = True, live - 1
                    poller.unregister(target.sock)
                    say(event="silenced", host=target.name, t=time.time())
                elif not line:
                    poller.unregister(sys.stdin)
                continue
            host = hosts[sock]
            while not host.over:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                envelope = wire.parse(parts)
                message = envelope.message
                if envelope.kind == wire.WELCOME:
                    host.joined, host.interval, host.next_beat = True, message.heartbeat.interval, now  # type: ignore[attr-defined]
                    joined += 1
                    if joined == count:
                        say(event="joined", hello_at=hello_at, t=time.time())
                elif envelope.kind == wire.SPAWN:
                    host.procs[message.worker] = {"rss": FAKE_RSS, "running": None, "running_s": None}  # type: ignore[attr-defined]
                    send(host, wire.FWD, message.worker, frame=messages.pack([messages.READY, pid]))  # type: ignore[attr-defined]
                elif envelope.kind == wire.TO:
                    inner = msgpack.unpackb(envelope.frame)
                    worker = message.worker  # type: ignore[attr-defined]
                    if inner[0] == messages.JOBS:
                        n = inner[3]
                        stamp = time.monotonic()
                        first_job = first_job or stamp
                        send(host, wire.FWD, worker, frame=messages.pack([messages.REPORT, inner[1], n, None, [], [], {bucket: n}]))
                        host.jobs += n
                        last_job = time.monotonic()
                    elif inner[0] == messages.STOP:
                        host.procs.pop(worker, None)
                        send(host, wire.EXITED, worker, 0, None, "exit code 0", None, None, "crashed")
                elif envelope.kind == wire.BYE:
                    send(host, wire.BYE, "bye")
                    host.over, live = True, live - 1
                    poller.unregister(sock)
                elif envelope.kind in (wire.RESET, wire.REFUSE):
                    host.resets += 1
                    host.over, live = True, live - 1
                    poller.unregister(sock)
                    say(event="reset", host=host.name, reason=getattr(message, "reason", ""))
        now = time.monotonic()
        for host in hosts.values():
            if host.joined and not host.silent and not host.over and now >= host.next_beat:
                host.next_beat = now + host.interval
                send(host, wire.HEARTBEAT, host.procs)
    say(event="report", jobs={h.name: h.jobs for h in hosts.values()}, first_job=first_job, last_job=last_job,
        resets=sum(h.resets for h in hosts.values()))
    for host in hosts.values():
        host.sock.close(0)
    context.term()


# -- the harness ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (its own, not its children's), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ts(line: dict[str, Any]) -> float:
    """A log line's timestamp (ISO UTC with ms) as time.time()."""
    stamp = line["timestamp"]
    return timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + int(stamp[20:23]) / 1000


class Log:
    """The run's JSON-lines log, read as it grows."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path: Path | None = None
        self.offset = 0
        self.lines: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        if self.path is None:
            found = sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []
            found = [p for p in found if not p.name.endswith((".results.jsonl", ".dead.jsonl", ".pending.jsonl"))]
            if not found:
                return self.lines
            self.path = found[0]
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        self.lines += [json.loads(x) for x in data[:end].splitlines() if x.strip()]
        return self.lines

    def wait(self, pred: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = pred(self.read())
            if found:
                return found
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited ({proc.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.05)


class Behind(RuntimeError):
    """Hosts were lost while they joined: the coordinator (or the simulator) fell behind on heartbeats."""


def _lost_in_join(lines: list[dict[str, Any]], n: int) -> bool:
    lost = _events(lines, "host.lost")
    if lost:
        raise Behind(f"{len(lost)} of {n} hosts lost while joining (first: {lost[0].get('reason')})")
    return False


def _events(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == name]


class Sims:
    """The simulated-host processes and the events they print."""

    def __init__(self, address: str, n: int, processes: int, insecure: bool, folder: Path) -> None:
        per = -(-n // max(1, -(-n // HOSTS_PER_PROCESS)))
        self.procs: list[subprocess.Popen[str]] = []
        self.selector = selectors.DefaultSelector()
        self.events: list[dict[str, Any]] = []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        for first in range(0, n, per):
            count = min(per, n - first)
            err = (folder / f"sim-{first}.err").open("w")
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--sim-child", address, str(first), str(count),
                                     str(processes), "1" if insecure else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=env, cwd=folder)
            self.procs.append(proc)
            assert proc.stdout is not None
            self.selector.register(proc.stdout, selectors.EVENT_READ)

    def pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if line:
                self.events.append(json.loads(line))
            else:
                self.selector.unregister(key.fileobj)

    def wait(self, pred: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = pred(self.events)
            if found:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g}s waiting for {what} from the simulated hosts")
            if not self.selector.get_map():
                raise RuntimeError(f"the simulated hosts ended before {what}")
            self.pump(0.1)

    def command(self, index: int, line: str) -> None:
        stdin = self.procs[index].stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def measure(n: int, jobs: int, idle_s: float, processes: int, insecure: bool, keep: bool, say: Any,
            heartbeat: tuple[float, float] | None = None) -> dict[str, Any]:
    """One coordinator, n simulated hosts: join, idle CPU, one lost host, then `jobs` trivial jobs."""
    folder = Path(tempfile.mkdtemp(prefix=f"simhosts-{n}-"))
    (folder / "simtasks.py").write_text(textwrap.dedent(TASKS))
    gate = folder / "gate"
    config = {"name": "simhosts", "logs": {"dir": "logs"},
              "producers": [{"name": "maker", "task": "simtasks:produce", "params": {"n": jobs, "gate": str(gate)}}],
              "consumers": [{"name": "eater", "task": "simtasks:nothing", "processes": 0}]}
    if heartbeat is not None:
        config["heartbeat"] = {"interval": heartbeat[0], "timeout": heartbeat[1]}
    import yaml

    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    address = f"tcp://127.0.0.1:{_free_port()}"
    profile = os.environ.get("SIMHOSTS_PROFILE")  # a folder: the coordinator runs under cProfile, its stats written there
    prof = ["-m", "cProfile", "-o", str(Path(profile).resolve() / f"coordinator-{n}.prof")] if profile else []
    args = [sys.executable, *prof, "-m", "runner", "start", "--config", "run.yaml", "--bind", address, *(["--insecure"] if insecure else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with (folder / "stdout.txt").open("wb") as out, (folder / "stderr.txt").open("wb") as err:
        coordinator = subprocess.Popen(args, cwd=folder, stdout=out, stderr=err, env=env)
    log = Log(folder / "logs")
    sims = None
    try:
        started = log.wait(lambda ls: _events(ls, "run.started"), 60, "run.started", coordinator)[0]
        pid = started["coordinator_pid"]
        sims = Sims(address, n, processes, insecure, folder)
        joined = sims.wait(lambda es: [e for e in es if e["event"] == "joined"], 60 + n * 0.5, "every host joined")
        hello_at = min(e["hello_at"] for e in joined)
        hosts_joined = log.wait(lambda ls: len(_events(ls, "host.joined")) >= n and _events(ls, "host.joined"), 60 + n * 0.2,
                                f"{n} host.joined", coordinator)
        log.wait(lambda ls: _lost_in_join(ls, n) or len(_events(ls, "worker.started")) >= n * processes, 60 + n * 0.2,
                 "every process ready", coordinator)
        join_s = max(_ts(line) for line in hosts_joined) - hello_at
        time.sleep(1.0)  # the join's own work settles
        cpu0, t0 = _cpu_s(pid), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = (_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
        say(f"  N={n}: joined in {join_s:.2f}s; idle CPU {idle_cpu:.3f} cores")
        victim = "sim0000"
        sims.command(0, f"silence {victim}")
        silenced = sims.wait(lambda es: [e for e in es if e["event"] == "silenced"], 30, "the silenced host")[0]
        lost = log.wait(lambda ls: [x for x in _events(ls, "host.lost") if x.get("host") == victim], 60, "host.lost", coordinator)[0]
        lost_s = _ts(lost) - silenced["t"]
        say(f"  N={n}: lost host noticed in {lost_s:.2f}s ({lost.get('reason')})")
        cpu1 = cpu2 = _cpu_s(pid)
        gate.write_text("go")
        finished = None
        deadline = time.monotonic() + 600 + jobs / 500
        while finished is None:
            lines = log.read()
            if _events(lines, "run.finished"):
                finished = _events(lines, "run.finished")[0]
                break
            try:
                cpu2 = _cpu_s(pid)
            except OSError:
                pass
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run did not finish (exit {coordinator.returncode})")
            sims.pump(0.2)
        coordinator.wait(60)
        reports = sims.wait(lambda es: len([e for e in es if e["event"] == "report"]) == len(sims.procs)
                            and [e for e in es if e["event"] == "report"], 60, "the reports")
        per_host: dict[str, int] = {}
        for report in reports:
            per_host.update(report["jobs"])
        per_host.pop(victim, None)
        first = min(r["first_job"] for r in reports if r["first_job"])
        last = max(r["last_job"] for r in reports if r["last_job"])
        done = sum(per_host.values())
        counts = sorted(per_host.values())
        return {"n": n, "jobs": jobs, "done": finished["done"], "status": finished["status"], "rate": done / max(last - first, 1e-9),
                "cpu_per_job_us": (cpu2 - cpu1) / max(done, 1) * 1e6, "idle_cpu": idle_cpu, "join_s": join_s, "lost_s": lost_s,
                "fair_max": counts[-1], "fair_min": counts[0], "resets": sum(r["resets"] for r in reports), "folder": str(folder)}
    finally:
        if sims is not None:
            sims.close()
        if coordinator.poll() is None:
            coordinator.terminate()
            try:
                coordinator.wait(30)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait()
        if not keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def _machine() -> str:
    from driver import cpu_model  # bench/driver.py, beside this script

    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "runner"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + (" (runner/ modified)" if dirty else "") if head else "unknown"
    except OSError:
        return "unknown"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    security = "--insecure" if args.insecure else "the run's own CURVE keys (the loopback default)"
    lines = [
        "# Many hosts (simulated)", "",
        f"Commit {_commit()}; {_machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"One real coordinator (`runner start --bind tcp://127.0.0.1:PORT`, {security}; default config otherwise: journal on, "
        f"`queue.maxsize` 100, heartbeat {args.heartbeat[0]:g} s / timeout {args.heartbeat[1]:g} s), producer pool of 1 local process, consumer pool `processes: 0`; "
        f"N simulated hosts with {args.processes} process(es) each, in up to {HOSTS_PER_PROCESS} hosts per simulator process, "
        "answering every job at once. `python bench/simhosts.py" + (" --quick" if args.quick else " --smoke" if args.smoke else "") + "`.",
        "",
        "| hosts | jobs | jobs/s | coordinator µs CPU/job | idle CPU (cores) | join all (s) | lost host noticed (s) | jobs/host max/min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "behind" in r:
            lines.append(f"| {r['n']:,} | {r['jobs']:,} | — | — | — | — | — | — ({r['behind']}) |")
            continue
        ratio = f"{r['fair_max'] / r['fair_min']:.2f}" if r["fair_min"] else "∞"
        lines.append(f"| {r['n']:,} | {r['jobs']:,} | {r['rate']:,.0f} | {r['cpu_per_job_us']:.1f} | {r['idle_cpu']:.3f} | "
                     f"{r['join_s']:.2f} | {r['lost_s']:.2f} | {r['fair_max']:,}/{r['fair_min']:,} ({ratio}) |")
    bad = [r for r in rows if "behind" not in r and (r["status"] != "finished" or r["done"] != r["jobs"] or r["resets"])]
    for r in bad:
        lines.append(f"\n⚠ N={r['n']}: run {r['status']}, {r['done']}/{r['jobs']} jobs done, {r['resets']} sessions reset.")
    lines += ["", "jobs/s: first JOBS received to last REPORT sent, over every simulated host. Idle CPU: the coordinator's CPU "
              f"seconds per second over {args.idle:g} s with every host joined and nothing to do. Lost host: one host stops "
              "sending (its socket stays open) until `host.lost` is logged. Fairness leaves that host out."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="10,100,1000", help="comma-separated host counts (default 10,100,1000)")
    parser.add_argument("--jobs", default=None, help="jobs per N, comma-separated to match --hosts (default 200000,100000,50000)")
    parser.add_argument("--processes", type=int, default=1, help="processes per simulated host (default 1)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle CPU sample (default 5)")
    parser.add_argument("--heartbeat", default="1,5", help="heartbeat.interval,heartbeat.timeout in seconds (default 1,5: the config's defaults)")
    parser.add_argument("--insecure", action="store_true", help="no CURVE (the default is the run's own keys)")
    parser.add_argument("--quick", action="store_true", help="N = 10,100; 20k jobs; 3 s idle sample")
    parser.add_argument("--smoke", action="store_true", help="N = 3, 300 jobs, 1 s idle sample; writes the table elsewhere unless --out")
    parser.add_argument("--out", default=None, help="where the table goes (default bench/simhosts.md)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (its log)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hosts, args.jobs, args.idle = "3", args.jobs or "300", 1.0
        args.heartbeat = "0.2,1" if args.heartbeat == "1,5" else args.heartbeat  # the lost host is noticed in about a second
    elif args.quick:
        args.hosts = args.hosts if args.hosts != "10,100,1000" else "10,100"
        args.jobs, args.idle = args.jobs or "20000", 3.0
    interval, timeout = (float(x) for x in args.heartbeat.split(","))
    args.heartbeat = (interval, timeout)
    hosts = [int(x) for x in args.hosts.split(",")]
    default_jobs = {10: 200_000, 100: 100_000, 1000: 50_000}
    jobs = [int(x) for x in args.jobs.split(",")] if args.jobs else [default_jobs.get(n, 50_000) for n in hosts]
    jobs = (jobs * len(hosts))[: len(hosts)] if len(jobs) == 1 else jobs
    rows = []
    for n, j in zip(hosts, jobs):
        print(f"N={n}, {j:,} jobs ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(n, j, args.idle, args.processes, args.insecure, args.keep, lambda s: print(s, file=sys.stderr, flush=True),
                                args.heartbeat))
        except Behind as exc:  # a figure of its own: where this coordinator (on this machine) stops keeping up
            print(f"  N={n}: {exc}", file=sys.stderr, flush=True)
            rows.append({"n": n, "jobs": j, "behind": str(exc)})
    text = table(rows, args)
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "simhosts-smoke.md" if args.smoke else HERE / "simhosts.md"
    out.write_text(text)
    print(text)
    return 1 if any("behind" in r for r in rows) and args.smoke else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sim-child":
        _sim_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
    else:
        sys.exit(main())
