"""systemd for real: deploy/README.md's systemd section, run inside a Debian root booted with
`systemd-nspawn -b` (systemd as PID 1), with the units of deploy/systemd installed as they are.

- The machine: a copy of the root .ci/debian-root prepares (Debian bookworm, python3, systemd),
  booted with `systemd-nspawn --register=no --keep-unit --private-network -D COPY -b` (this host has no
  systemd bus of its own; a private network keeps port 5555 off the host). The test drives it by
  entering its PID 1's namespaces with `nsenter` (there is no bus to use `machinectl` or `systemd-run -M`).
- The operator: the README's `# on every host`, `# on hosta` and `# on hostb` blocks run in that one
  machine, hosta's for the coordinator and hostb's twice, for workers `a` and `b` (hostb -> a, b; the
  name `hosta` resolves to 127.0.0.1 there). What the test changes, all in `Operator`: `sudo` is
  dropped (everything runs as root; `sudo -u runner` becomes `runuser -u runner --`), `apt-get` is
  skipped (the root has its packages), `pip install .` installs from the host's wheelhouse
  (`--no-index --find-links /wheels`), and the env files copied from the examples are then edited
  as an operator would (`ADJUST`: a longer run, fewer processes).
- A test-only drop-in relaxes a unit option only where it cannot work in this container (`RELAXED`,
  listed in deploy/README.md); today there is none.
- Needs root, systemd-nspawn and the prepared root (CI: .ci/run); otherwise skipped, and in CI failed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import skip_or_fail, wait_for
from deploysupport import (DEBIAN_ROOT, DEBIAN_ROOT_STAMP, DEPLOY, PREPARE_HINT, ROOT, SYSTEMD_DIR, WHEELHOUSE,
                           assert_buns_once, assert_stopped_cleanly, eaten_by_host, jsonl, run, run_logs, seconds)
from test_deploy import Block, Unit, readme_blocks, strip_privileges

#: the first test pays for booting the machine and installing the runner in it (minutes on a busy 2-core machine)
pytestmark = pytest.mark.timeout(900)

#: the worker instances the test runs (README: runner-worker@hostb)
WORKERS = ("a", "b")
#: where the checkout is inside the machine (the README's commands run from a checkout)
CHECKOUT = "/root/runner"
#: unit options relaxed by a test-only drop-in, because they cannot work under systemd-nspawn here:
#: {unit: {option: (value, why)}}. Each one is listed in deploy/README.md.
RELAXED: dict[str, dict[str, tuple[str, str]]] = {}
#: the operator's edits of the env files after copying the examples, by target file
ADJUST: dict[str, dict[str, str]] = {}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Machine:
    """A Debian root booted with systemd-nspawn; commands run in it through nsenter into its PID 1."""

    def __init__(self, root: Path, folder: Path) -> None:
        self.root = root
        self.folder = folder
        self.console = folder / "nspawn.out"
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def path(self, inside: str) -> Path:
        """A path of the machine, as seen from the host."""
        return self.root / inside.lstrip("/")

    def boot(self, timeout: float = 90) -> None:
        # the machine's own copy of the wheelhouse: another CI run may be rebuilding the shared one
        wheels = self.folder / "wheels"
        shutil.copytree(WHEELHOUSE, wheels)
        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--private-network", "--quiet", "--console=pipe",
                f"--bind-ro={wheels}:/wheels", "-D", str(self.root), "-b"]
        with open(self.console, "w") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.leader = wait_for(self.find_leader, 30, "the machine's PID 1 (systemd)", interval=0.05)

        def booted() -> bool:
            assert self.process is not None and self.process.poll() is None, f"nspawn exited: {self.console.read_text()[-3000:]}"
            state = self.exec(["systemctl", "is-system-running"], check=False).stdout.strip()
            return state in ("running", "degraded")

        wait_for(booted, timeout, "the machine to finish booting", interval=0.2)
        # systemd logs a unit's main process exit (EXIT_CODE=, EXIT_STATUS=) at debug level when it is a
        # success; `systemctl show` cannot tell it afterwards: an inactive unit is unloaded (garbage-collected)
        self.systemctl("log-level", "debug")

    def find_leader(self) -> int:
        """The container's PID 1: the descendant of nspawn that is PID 1 in its own PID namespace."""
        import psutil

        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.process.returncode}: {self.console.read_text()[-3000:]}")
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
            except FileNotFoundError:
                continue
            nspid = re.search(r"^NSpid:\s+(.+)$", status, re.MULTILINE)
            if nspid and nspid.group(1).split()[-1] == "1" and len(nspid.group(1).split()) > 1:
                return child.pid
        return 0

    def exec(self, argv: list[str], timeout: float = 60, check: bool = True, cwd: str = "/") -> subprocess.CompletedProcess[str]:
        """Run a command in the machine (all its namespaces, its root), as root, with a clean environment."""
        inner = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root", "sh", "-c", f"cd {shlex.quote(cwd)} && exec \"$@\"", "sh", *argv]
        return run(["nsenter", "-t", str(self.leader), "-a", "-r", "-w", *inner], timeout=timeout, check=check)

    def systemctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(["systemctl", *args], timeout=timeout, check=check)

    def show(self, unit: str) -> dict[str, str]:
        """A unit's runtime properties (ActiveState, Result, ExecMainStatus, MainPID, NRestarts, ...)."""
        out = self.systemctl("show", unit, "--property=ActiveState,SubState,Result,ExecMainStatus,ExecMainCode,ExecMainPID,MainPID,"
                             "NRestarts,Type").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_exit(self, unit: str) -> tuple[str, int]:
        """(EXIT_CODE, EXIT_STATUS) of the unit's last main process exit, from systemd's own journal entry."""
        out = self.exec(["journalctl", "--no-pager", "-o", "json", "-n", "2000", "-u", unit], check=False, timeout=300).stdout
        # "runner-coordinator.service: Main process exited, code=exited, status=143/n/a"
        exits = [re.search(r"Main process exited, code=(\w+), status=(\d+)", str(entry.get("MESSAGE", "")))
                 for entry in map(json.loads, out.splitlines())]
        found = [match for match in exits if match]
        assert found, f"no `Main process exited` entry for {unit} in the journal:\n{self.journal(unit)[-3000:]}"
        return found[-1].group(1), int(found[-1].group(2))

    def journal(self, unit: str) -> str:
        return self.exec(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False, timeout=300).stdout

    def poweroff(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if self.leader:
            os.kill(self.leader, signal.SIGRTMIN + 4)  # systemd: poweroff
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if self.leader:
                os.kill(self.leader, signal.SIGKILL)  # the container's PID 1: its whole PID namespace goes
            self.process.kill()
            self.process.wait(10)


class Operator:
    """Runs deploy/README.md's systemd blocks in the machine (see the module docstring for what changes)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.blocks = [b for b in readme_blocks() if b.host]
        self.skipped: list[str] = []

    def block(self, heading: str, host: str) -> Block:
        found = [b for b in self.blocks if b.heading.startswith(heading) and b.host == host]
        assert len(found) == 1, f"deploy/README.md: expected one `# on {host}` block under {heading!r}, found {len(found)}"
        return found[0]

    def run_block(self, heading: str, on: str, as_name: str | None = None) -> list[subprocess.CompletedProcess[str]]:
        """The README block of `heading` for host `on`; hostb's blocks run for worker `as_name` (hostb -> as_name)."""
        results = []
        for argv in self.block(heading, on).commands:
            if as_name:
                argv = [word.replace(on, as_name) for word in argv]
            result = self.command(argv)
            if result is not None:
                results.append(result)
        return results

    def command(self, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        command, user, env = strip_privileges(argv)
        if command[0] == "apt-get":
            self.skipped.append(f"{shlex.join(argv)} (the Debian root has its packages)")
            return None
        if command[0].endswith("/bin/pip") and command[1:] == ["install", "."]:
            command = [*command, "--no-index", "--find-links", "/wheels"]
        prefix = ["runuser", "-u", user, "--"] if user else []
        if env:
            prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
        result = self.machine.exec([*prefix, *command], cwd=CHECKOUT, timeout=600, check=False)  # pip: minutes on a busy machine
        assert result.returncode == 0, f"in the machine: {shlex.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        if command[0] == "cp" and command[1].endswith(".env.example"):
            self.adjust(command[2])
        return result

    def adjust(self, target: str) -> None:
        """The operator's edit of a freshly copied env file: ADJUST's values for it, nothing else."""
        path = self.machine.path(target)
        adjust = dict(ADJUST.get(Path(target).name, {}))
        lines = []
        for line in path.read_text().splitlines():
            match = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", line)
            if match and match.group(1) in adjust:
                line = f"{match.group(1)}={adjust.pop(match.group(1))}"
            lines.append(line)
        assert not adjust, f"the test adjusts {sorted(adjust)}, which {target} does not have"
        path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """A copy of the prepared root, booted; the checkout copied in; `hosta` resolving to this machine."""
    if os.geteuid() != 0:
        skip_or_fail("the systemd tests need root (systemd-nspawn)")
    if not shutil.which("systemd-nspawn") or not shutil.which("nsenter"):
        skip_or_fail("systemd-nspawn is not installed (apt-get install systemd-container)")
    if not DEBIAN_ROOT_STAMP.exists() or not any(WHEELHOUSE.glob("*.whl")):
        skip_or_fail(f"no prepared Debian root in {DEBIAN_ROOT}: {PREPARE_HINT}")
    folder = Path(tmp_path_factory.mktemp("nspawn"))
    root = folder / "root"
    started = time.monotonic()
    # the prepared root stays as it is: the machine writes to an overlay on it (a copy takes minutes)
    for name in ("root", "upper", "work"):
        (folder / name).mkdir()
    run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={DEBIAN_ROOT},upperdir={folder / 'upper'},workdir={folder / 'work'}",
         str(root)])
    checkout = root / CHECKOUT.lstrip("/")
    checkout.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    for name in ("runner", "configs", "deploy"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "keys"))
    with open(root / "etc" / "hosts", "a") as hosts:
        hosts.write("127.0.0.1 hosta\n")
    made = Machine(root, folder)
    try:
        made.boot()
        print(f"nspawn machine booted in {time.monotonic() - started:.1f}s")
        yield made
    finally:
        made.poweroff()
        run(["umount", str(root)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def operator(machine: Machine) -> Operator:
    """README steps 1 (install) and 2 (keys, on hosta and then on the worker host) done in the machine."""
    started = time.monotonic()
    made = Operator(machine)
    made.run_block("1. Install", "every host")
    print(f"README step 1 (install) in the machine: {time.monotonic() - started:.1f}s")
    for unit, options in RELAXED.items():
        dropin = machine.path(f"/etc/systemd/system/{unit}.d/nspawn-test.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text("[Service]\n" + "".join(f"{key}={value}\n" for key, (value, _) in options.items()))
    if RELAXED:
        machine.systemctl("daemon-reload")
    made.run_block("2. Keys", "hosta")
    made.run_block("2. Keys", "hostb")  # once: both workers are on this one machine, and the block ends with `rm`
    return made


def last_start(machine: Machine, unit: str) -> str:
    """The unit's journal since it was last started (a failure would say `Failed with result`)."""
    text = machine.journal(unit)
    tail = text[text.rindex("Started "):] if "Started " in text else text
    assert "Failed with result" not in tail, tail[-3000:]
    return tail


def unit_file(name: str) -> Unit:
    template, at, _ = name.partition("@")
    return Unit.read(SYSTEMD_DIR / (f"{template}@.service" if at else f"{name}.service"))


def wait_unit(machine: Machine, unit: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
    def reached() -> dict[str, str] | None:
        props = machine.show(unit)
        return props if props["ActiveState"] in states else None

    try:
        return wait_for(reached, timeout, f"{unit} to be {'/'.join(states)}", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {machine.show(unit)}\n{machine.journal(unit)[-4000:]}") from None


def start_workers(operator: Operator) -> None:
    for name in WORKERS:
        operator.run_block("4. Start a worker", "hostb", name)
        # a place for the Type=notify check: `systemctl start` returns once the unit is active
        assert operator.machine.show(f"runner-worker@{name}")["ActiveState"] in ("active", "activating")


def run_log(machine: Machine) -> tuple[Path, list[dict[str, Any]]]:
    """The newest run log in /var/log/runner and its events."""
    logs = run_logs(machine.path("/var/log/runner"))
    assert logs, "no run log in /var/log/runner"
    newest = max(logs, key=lambda p: p.stat().st_mtime)
    return newest, jsonl(newest)


def results_file(machine: Machine) -> Path:
    return machine.path("/var/lib/runner/results/bakery.jsonl")


def test_units_run_a_config_to_the_end(operator: Operator) -> None:
    """`enable --now runner-worker@a`, `@b` and `systemctl start runner-coordinator`: the run ends by
    itself with exit 0, every bun eaten once, both workers worked; journal and logs as the README says.
    The coordinator runs no eater itself (processes=0), so the run waits for the workers however slow
    the machine is. The workers start first (--serve: they wait for the run), so both join within a
    reconnect interval of the coordinator's bind, well inside its 15 s of baking (pause 0.2). Started
    after it, one at a time (`systemctl start` waits for each READY=1), worker b missed the baking on a
    loaded machine and the test failed."""
    machine = operator.machine
    buns = 150
    ADJUST["coordinator.env"] = {"RUNNER_START_ARGS": f"--set producers.baker.params.buns={buns} "
                                 "--set producers.baker.params.pause=0.2 --set consumers.eater.processes=0"}
    for name in WORKERS:
        ADJUST[f"worker-{name}.env"] = {"RUNNER_PROCESSES": "2"}
    before = len(jsonl(results_file(machine)))
    start_workers(operator)
    operator.run_block("3. Start the coordinator", "hosta")
    props = machine.show("runner-coordinator")
    assert props["ActiveState"] == "active" and props["Type"] == unit_file("runner-coordinator").need("Type"), props

    props = wait_unit(machine, "runner-coordinator", ("inactive", "failed"), 180)
    assert machine.main_exit("runner-coordinator") == ("exited", 0), f"{props}\n{machine.journal('runner-coordinator')[-3000:]}"
    assert props["ActiveState"] == "inactive" and last_start(machine, "runner-coordinator").count("Deactivated successfully.") == 1
    _, events = run_log(machine)
    assert events[-1]["event"] == "run.finished" and events[-1]["status"] == "finished", events[-1]
    assert_buns_once(jsonl(results_file(machine))[before:], buns)
    done = eaten_by_host(events)
    assert done["a"] > 0 and done["b"] > 0, f"jobs done per host: {dict(done)}"
    assert events[0]["bind"] == "tcp://0.0.0.0:5555"
    # the journal has the run's JSON lines (StandardError=journal)
    journal = [json.loads(line) for line in machine.journal("runner-coordinator").splitlines() if line.startswith("{")]
    assert [e["event"] for e in journal] == [e["event"] for e in events], "the journal holds the run's JSON lines"
    summary, warnings = operator.run_block("6. Read the logs", "hosta")[1:3]
    assert "a" in summary.stdout and warnings.returncode == 0
    operator.run_block("6. Read the logs", "hostb", "a")
    # every file the run wrote is under the unit's writable paths (ProtectSystem=strict holds for real)
    writable = unit_file("runner-coordinator").writable()
    for path in (run_log(machine)[0], results_file(machine)):
        inside = "/" + str(path.relative_to(machine.root))
        assert any(inside.startswith(w + "/") for w in writable), inside
    # the workers (--serve) outlive the run
    for name in WORKERS:
        def run_over(name: str = name) -> bool:
            return "run over" in machine.journal(f"runner-worker@{name}")

        wait_for(run_over, 60, f"worker {name} to see the run end")
        assert machine.show(f"runner-worker@{name}")["ActiveState"] == "active"


def test_systemctl_stop_is_graceful(operator: Operator) -> None:
    """`runner status` as the README's step 5 runs it, then `systemctl stop runner-coordinator` mid-run:
    SIGTERM to the coordinator only (KillMode=mixed); it exits 143 (a success) well within
    TimeoutStopSec, with every unfinished job in the pending file."""
    machine = operator.machine
    ADJUST["coordinator.env"] = {"RUNNER_START_ARGS": "--set producers.baker.params.buns=100000 "
                                 "--set producers.baker.params.pause=0.01 --set consumers.eater.processes=1"}
    before = len(jsonl(results_file(machine)))
    logs_before = set(run_logs(machine.path("/var/log/runner")))
    operator.run_block("3. Start the coordinator", "hosta")
    start_workers(operator)  # already running (--serve): they join the new run

    def working() -> bool:
        assert machine.show("runner-coordinator")["ActiveState"] == "active", machine.journal("runner-coordinator")[-3000:]
        new = set(run_logs(machine.path("/var/log/runner"))) - logs_before
        return bool(new) and {e.get("host") for e in jsonl(next(iter(new))) if e["event"] == "bun.eaten"} >= set(WORKERS)

    wait_for(working, 120, "both workers to be eating buns", interval=0.3)

    # 5. watch (now, while the run cannot end by itself): both workers in `runner status`, locally and over the network
    command, user, env = strip_privileges(operator.block("5. Watch", "hosta").commands[0] + ["--json"])
    reply = machine.exec(["runuser", "-u", str(user), "--", "env", *(f"{k}={v}" for k, v in env.items()), *command])
    status = json.loads(reply.stdout)
    assert status["state"] == "running" and set(WORKERS) <= set(status["hosts"]), status
    local = operator.run_block("5. Watch", "hosta")[0].stdout
    assert "host a" in local and "host b" in local, local
    remote = operator.run_block("5. Watch", "hostb")[0].stdout
    assert status["run_id"] in remote, remote

    unit = unit_file("runner-coordinator")
    started = time.monotonic()
    operator.run_block("Stopping", "hosta")  # systemctl stop returns when the unit has stopped
    stopped_in = time.monotonic() - started
    props = machine.show("runner-coordinator")
    _, events = run_log(machine)
    finished = [e for e in events if e["event"] == "run.finished"]
    why = f"{props}\n{finished}\n{machine.journal('runner-coordinator')[-3000:]}"
    assert props["ActiveState"] == "inactive" and last_start(machine, "runner-coordinator").count("Deactivated successfully.") == 1, why
    assert machine.main_exit("runner-coordinator") == ("exited", 143) and "143" in unit.need("SuccessExitStatus").split(), why
    # on its own, before systemd's SIGKILL at TimeoutStopSec (that would be Result=timeout)
    assert stopped_in < seconds(unit.need("TimeoutStopSec")), f"stopped in {stopped_in:.1f}s"
    print(f"systemctl stop runner-coordinator: {stopped_in:.1f}s")
    assert len(finished) == 1, why
    pending = jsonl(machine.path(finished[0]["pending_file"]))
    assert_stopped_cleanly(finished[0], jsonl(results_file(machine))[before:], pending)
    for name in WORKERS:
        assert machine.show(f"runner-worker@{name}")["ActiveState"] == "active", "a --serve worker waits for the next run"


def test_a_killed_worker_is_restarted(operator: Operator) -> None:
    """kill -9 of a worker's main process: systemd starts it again (Restart=always) after RestartSec."""
    machine = operator.machine
    unit = "runner-worker@a"
    start_workers(operator)
    before = machine.show(unit)
    assert before["ActiveState"] == "active" and int(before["MainPID"]) > 0, before
    machine.exec(["sh", "-c", f"kill -9 {int(before['MainPID'])}"])  # the shell's kill: minbase has no procps
    restart_sec = seconds(unit_file(unit).need("RestartSec"))

    def restarted() -> dict[str, str] | None:
        props = machine.show(unit)
        fresh = props["ActiveState"] == "active" and props["MainPID"] not in ("0", before["MainPID"])
        return props if fresh and int(props["NRestarts"]) > int(before["NRestarts"]) else None

    props = wait_for(restarted, restart_sec + 30, f"{unit} to be restarted", interval=0.2)
    assert props["NRestarts"] == str(int(before["NRestarts"]) + 1), props
    # and it is a working worker again: stopping it is graceful
    operator.run_block("Stopping", "hostb", "a")
    assert machine.show(unit)["ActiveState"] == "inactive"
    # 143 from the agent's handler; ("killed", 15) when the stop lands before the restarted agent has
    # installed its handlers (systemd counts both as clean; see the report on `runner worker` startup)
    assert machine.main_exit(unit) in (("exited", 143), ("killed", 15)), machine.journal(unit)[-3000:]


def test_relaxed_options_are_documented() -> None:
    """Each option a test-only drop-in relaxes is named in deploy/README.md, and exists in the unit."""
    text = (DEPLOY / "README.md").read_text()
    for unit, options in RELAXED.items():
        for option in options:
            assert unit_file(unit).get(option) is not None, f"{unit} has no {option}= to relax"
            assert f"`{option}=" in text, f"deploy/README.md does not list the relaxed {option}="
