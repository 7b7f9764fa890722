"""The image, built and run: deploy/docker/Dockerfile built with podman, then a coordinator container and
two worker containers set up as deploy/docker/compose.yaml sets them up, running the bakery to its end.

- The base image is the stand-in .ci/debian-root makes from Debian's packages (no image registry is
  reachable here), tagged with the exact name the Dockerfile pins; `--pull=never` makes sure it is the
  one used. pip in the build installs from the host's wheelhouse (the Dockerfile's PIP_FIND_LINKS and
  PIP_NO_INDEX build arguments, the wheelhouse mounted at /wheels).
- Each container gets what compose.yaml gives its service: the command, read_only, the tmpfs, cap_drop,
  security_opt, init, stop_signal and stop_grace_period, the config and key files mounted where its
  `secrets:` put them (owned by the image's uid, as the README's `chown` does), the image's non-root
  user. Changed: every container is on the host's network (.ci/containers.conf), so the coordinator
  binds a free port instead of 5555, the workers connect to 127.0.0.1 instead of `coordinator`, and
  each worker gets its own --hostname (on the host network they would all be called as the host is);
  and the coordinator runs no eater itself (`--set consumers.eater.processes=0`), so that the run
  waits for the workers however slow the machine is.
- Needs root and podman with the stand-in image (CI: .ci/run); otherwise skipped, and in CI failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import free_port, skip_or_fail, wait_for
from deploysupport import (CONTAINERS_CONF, DOCKER_DIR, PREPARE_HINT, ROOT, WHEELHOUSE, assert_buns_once, eaten_by_host,
                           events_in, grace_of, jsonl, run, seconds)

pytestmark = pytest.mark.timeout(900)  # the first test pays for the image build (minutes on a busy 2-core machine)

COMPOSE = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
IMAGE = COMPOSE["services"]["coordinator"]["image"]
#: the base image the Dockerfile pins (both stages: test_deploy checks it)
BASE = next(line.split()[1] for line in (DOCKER_DIR / "Dockerfile").read_text().splitlines() if line.upper().startswith("FROM "))
#: the image's USER (uid:gid)
IMAGE_USER = [line.split()[1] for line in (DOCKER_DIR / "Dockerfile").read_text().splitlines() if line.startswith("USER ")][-1]
#: containers made by this module are called rdp<pid>-..., and only those are removed
PREFIX = f"rdp{os.getpid()}"


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], timeout=timeout, check=check, env=podman_env())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real Dockerfile, built with podman on the stand-in base (a couple of minutes the first time)."""
    if os.geteuid() != 0:
        skip_or_fail("the container tests need root (rootful podman)")
    if not shutil.which("podman"):
        skip_or_fail("podman is not installed (apt-get install podman runc)")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        skip_or_fail(f"no stand-in base image {BASE}: {PREPARE_HINT}")
    if not any(WHEELHOUSE.glob("runner-*.whl")):
        skip_or_fail(f"no wheelhouse in {WHEELHOUSE}: {PREPARE_HINT}")
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(
            ["podman", "build", "--pull=never", "-f", str(DOCKER_DIR / "Dockerfile"),
             "--ignorefile", str(DOCKER_DIR / "Dockerfile.dockerignore"), "-t", IMAGE,
             "-v", f"{WHEELHOUSE}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels", "--build-arg", "PIP_NO_INDEX=1",
             str(ROOT)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=podman_env(), timeout=600).returncode
    assert code == 0, f"podman build failed:\n{log.read_text()[-5000:]}"
    print(f"podman build: {time.monotonic() - started:.1f}s")
    return IMAGE


def test_the_image_runs_the_cli_as_its_user(image: str) -> None:
    """ENTRYPOINT runner; the image's non-root user; the venv's python is the base image's."""
    # the image's CMD (--help); not `--version`, which this runner refuses without a command
    result = podman("run", "--rm", "--read-only", image)
    assert "Usage: runner" in result.stdout and " worker " in result.stdout, result
    uid = podman("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
    assert uid == IMAGE_USER.split(":")[0]
    version = podman("run", "--rm", "--entrypoint", "python", image, "--version").stdout
    assert version.startswith("Python 3.11"), version


def service_flags(service: dict[str, Any]) -> list[str]:
    """podman run flags for what a compose service sets besides its command, volumes and secrets."""
    flags = ["--pull=never", "--network=host"]
    if service.get("read_only"):
        flags.append("--read-only")
    flags += [f"--tmpfs={path}" for path in service.get("tmpfs", [])]
    flags += [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
    flags += [f"--security-opt={opt.replace(':true', '')}" for opt in service.get("security_opt", [])]
    if service.get("init"):
        flags.append("--init")
    flags.append(f"--stop-signal={service.get('stop_signal', 'SIGTERM')}")
    flags.append(f"--stop-timeout={int(seconds(service['stop_grace_period']))}")
    if "user" in service:
        flags.append(f"--user={service['user']}")
    return flags


class Deployment:
    """The compose project's containers, run one by one with `podman run` (output in files)."""

    def __init__(self, folder: Path, keys: Path) -> None:
        self.folder = folder
        self.keys = keys
        self.port = free_port()
        self.data = folder / "runner-data"  #: the coordinator's named volume, here a host folder
        self.data.mkdir()
        uid, gid = (int(x) for x in IMAGE_USER.split(":"))
        os.chown(self.data, uid, gid)
        self.containers: dict[str, subprocess.Popen[bytes]] = {}

    def name(self, label: str) -> str:
        return f"{PREFIX}-{label}"

    def mounts(self, service: dict[str, Any]) -> list[str]:
        flags = []
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            host = self.data if source == "runner-data" else (DOCKER_DIR / source).resolve()
            flags.append(f"--volume={host}:{target}{':' + mode[0] if mode else ''}")
        files = {name: spec["file"] for name, spec in COMPOSE["secrets"].items()}
        for secret in service.get("secrets", []):
            source = self.keys / files[secret["source"]].removeprefix("./keys/")
            flags.append(f"--volume={source}:{secret['target']}:ro")
        return flags

    def command(self, service: dict[str, Any]) -> list[str]:
        """The service's command, on the host network: a free port, the coordinator at 127.0.0.1."""
        return [word.replace("tcp://0.0.0.0:5555", f"tcp://0.0.0.0:{self.port}")
                    .replace("tcp://coordinator:5555", f"tcp://127.0.0.1:{self.port}") for word in service["command"]]

    def start(self, label: str, service_name: str, extra: list[str] = (), hostname: str | None = None) -> None:  # type: ignore[assignment]
        service = COMPOSE["services"][service_name]
        argv = ["podman", "run", f"--name={self.name(label)}", *service_flags(service), *self.mounts(service)]
        if hostname:
            argv.append(f"--hostname={hostname}")
        argv += [IMAGE, *self.command(service), *extra]
        with open(self.folder / f"{label}.out", "w") as out, open(self.folder / f"{label}.err", "w") as err:
            self.containers[label] = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=podman_env(),
                                                      start_new_session=True)

    def output(self, label: str) -> str:
        return (self.folder / f"{label}.out").read_text() + (self.folder / f"{label}.err").read_text()

    def running(self, label: str) -> bool:
        return self.containers[label].poll() is None

    def wait(self, label: str, timeout: float) -> int:
        try:
            return self.containers[label].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{label} still running after {timeout}s:\n{self.output(label)[-3000:]}") from None

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """The coordinator service's healthcheck command, run in its container."""
        test = COMPOSE["services"]["coordinator"]["healthcheck"]["test"]
        assert test[0] == "CMD"
        return podman("exec", self.name("coordinator"), *test[1:], check=False, timeout=120)

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    def results(self) -> list[dict[str, Any]]:
        return jsonl(self.data / "results" / "bakery.jsonl")

    def remove(self) -> None:
        for label, process in self.containers.items():
            podman("rm", "--force", "--time=0", self.name(label), check=False)
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def deployment(image: str, tmp_path: Path) -> Any:
    """Keys as the README makes them (`runner keys generate` in the image, chown to its user), a data folder."""
    keys = tmp_path / "keys"
    keys.mkdir()
    podman("run", "--rm", "--network=host", "--user=0:0", f"--volume={keys}:/keys", image, "keys", "generate", "/keys")
    uid, gid = (int(x) for x in IMAGE_USER.split(":"))
    for path in [keys, *keys.rglob("*")]:
        os.chown(path, uid, gid)
    made = Deployment(tmp_path, keys)
    try:
        yield made
    finally:
        made.remove()


def start_project(deployment: Deployment, extra: list[str]) -> None:
    """The coordinator, its run under way and its healthcheck passing; then the two workers.

    The coordinator runs no eaters itself (consumers.eater.processes=0: only worker hosts eat), so the
    run waits for the workers: the healthcheck cannot race the run's end, however slow the machine."""
    deployment.start("coordinator", "coordinator", ["--set", "consumers.eater.processes=0", *extra])

    def healthy() -> bool:  # as the healthcheck's start_period and retries allow: the control socket comes after run.started
        assert deployment.running("coordinator"), deployment.output("coordinator")[-3000:]
        health = deployment.healthcheck()
        return health.returncode == 0 and '"running"' in health.stdout

    wait_for(healthy, 180, "the compose healthcheck to pass in the coordinator container", interval=1)
    for label in ("worker-1", "worker-2"):
        deployment.start(label, "worker", hostname=label)


def test_compose_services_run_in_containers(deployment: Deployment) -> None:
    """A coordinator and two workers: the run ends with exit 0, every bun eaten once, both workers worked."""
    buns = 150  # at least 15 s of baking (pause 0.2): both workers join while there is work
    start_project(deployment, ["--set", f"producers.baker.params.buns={buns}", "--set", "producers.baker.params.pause=0.2"])

    def joined() -> bool:
        assert deployment.running("coordinator"), deployment.output("coordinator")[-3000:]
        return {"worker-1", "worker-2"} <= {e["host"] for e in events_in(deployment.logs, "host.joined")}

    wait_for(joined, 90, "both worker containers to join", interval=0.2)

    assert_finished_on_both_workers(deployment, buns)
    # the workers (--serve) outlive the run; `podman stop` (SIGTERM) ends them gracefully
    for label in ("worker-1", "worker-2"):
        def run_over(label: str = label) -> bool:
            return "run over" in deployment.output(label)

        wait_for(run_over, 60, f"{label} to see the run end")
        assert deployment.running(label), deployment.output(label)[-3000:]
        podman("stop", deployment.name(label), timeout=120)
        assert deployment.wait(label, 60) in (0, 143), deployment.output(label)[-3000:]


def assert_finished_on_both_workers(deployment: Deployment, buns: int) -> None:
    """The coordinator exits 0 with run.finished, every bun eaten once, and both worker containers did some."""
    assert deployment.wait("coordinator", 180) == 0, deployment.output("coordinator")[-3000:]
    events = events_in(deployment.logs)
    assert events[-1]["event"] == "run.finished" and events[-1]["status"] == "finished", events[-1]
    assert_buns_once(deployment.results(), buns)
    done = eaten_by_host(events)
    assert done["worker-1"] > 0 and done["worker-2"] > 0, f"jobs done per host: {dict(done)}"


def test_a_worker_container_stopped_mid_run_loses_nothing(deployment: Deployment) -> None:
    """`podman stop` of a worker mid-run (SIGTERM, then the grace): it finishes the jobs in hand and
    leaves; the run still ends with exit 0 and every bun eaten exactly once."""
    buns = 300
    start_project(deployment, ["--set", f"producers.baker.params.buns={buns}", "--set", "producers.baker.params.pause=0.1"])

    def working() -> bool:
        assert deployment.running("coordinator"), deployment.output("coordinator")[-3000:]
        return sum(1 for e in events_in(deployment.logs, "bun.eaten") if e.get("host") == "worker-1") >= 20

    wait_for(working, 90, "worker-1 to be eating buns", interval=0.2)
    assert not events_in(deployment.logs, "run.finished"), "the run ended before the stop: make it longer"
    started = time.monotonic()
    podman("stop", deployment.name("worker-1"), timeout=120)
    stopped_in = time.monotonic() - started
    code = deployment.wait("worker-1", 30)
    # on its own (143 after SIGTERM), before podman's SIGKILL at stop_grace_period (that would be 137)
    limit = seconds(COMPOSE["services"]["worker"]["stop_grace_period"])
    assert code in (0, 143) and stopped_in < limit, f"worker-1 exited {code} after {stopped_in:.1f}s"
    print(f"podman stop of a worker mid-run: {stopped_in:.1f}s")

    assert_finished_on_both_workers(deployment, buns)
    podman("stop", deployment.name("worker-2"), timeout=60)


def test_podman_stop_signal_is_graceful() -> None:
    """What `podman stop` sends: compose's stop_signal, then SIGKILL after stop_grace_period, which must be
    above the config's shutdown.grace (static: runs without podman)."""
    for service in COMPOSE["services"].values():
        assert signal.Signals[service.get("stop_signal", "SIGTERM")] == signal.SIGTERM
        assert seconds(service["stop_grace_period"]) > grace_of()
