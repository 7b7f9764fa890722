"""The run config: YAML in, validated frozen models out, every mistake named by file:line and field path.

Precedence: `--set` overrides > YAML > defaults. Unknown keys are errors, with a did-you-mean.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner.durations import parse_duration
from runner.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> Any:
    """Bytes from `300000000`, `200MB`, `2GiB`, `512Mi`: KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 200MB, 2GiB or a number of bytes")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError("a size must be above 0")
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = (match.group(2) or "").lower()
            base = 1024 if "i" in unit else 1000
            scale = base ** "bkmgt".index(unit[0]) if unit else 1
            size = int(float(match.group(1)) * scale)
            if size > 0:
                return size
    raise ValueError(f"expected a size such as 200MB, 2GiB or a number of bytes, found {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
TaskRef = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]
PoolName = Annotated[str, Field(pattern=r"^[A-Za-z][\w-]*$")]


def parse_listen(value: Any) -> Any:
    """`HOST:PORT` (port 0: any free port) for the metrics and dashboard HTTP server."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9464, found {value!r}")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9464, found {value!r}")
    return value


Listen = Annotated[str, BeforeValidator(parse_listen)]
#: runner_job_duration_seconds' default buckets (seconds)
DEFAULT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _not_plain(value: Any, where: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """(where, what) of the first value JSON and msgpack cannot both keep exactly, or None."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        return None if -(1 << 63) <= value < (1 << 64) else (where, f"an integer beyond 64 bits ({value})")
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, f"a number that is not finite ({value})")
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _not_plain(item, (*where, i))
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (where, f"a key that is not a string ({key!r})")
            found = _not_plain(item, (*where, key))
            if found is not None:
                return found
        return None
    return (where, f"a {type(value).__name__} ({value})")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueConfig(_Model):
    maxsize: int = Field(100, ge=1)  #: jobs waiting per consumer pool before producers block
    batch: int = Field(256, ge=1, le=65536)  #: most jobs moved in one message on any hop


class ProducerConfig(_Model):
    name: PoolName
    task: TaskRef
    processes: int = Field(1, ge=1)
    to: str | None = None  #: target consumer pool; optional when there is only one
    params: dict[str, Any] = Field(default_factory=dict)
    resume: Literal["replay", "offset"] = "replay"  #: how a resumed run restarts it (README "Resuming a run")
    total: int | None = Field(None, ge=0)  #: jobs the pool will yield in all (for the ETA); or ctx.total(n) in the task


class ConsumerConfig(_Model):
    name: PoolName
    task: TaskRef
    processes: int = Field(1, ge=0)  #: 0: only worker hosts run this pool (needs --bind)
    min_processes: int = Field(1, ge=0)  #: capped at `processes`
    idle_timeout: Duration | None = None  #: None: never retire an idle process
    retries: int = Field(0, ge=0)
    retry_backoff: Duration = 0.5  #: doubles with each further attempt, at most 60s
    job_timeout: Duration | None = None
    max_jobs_per_process: int | None = Field(None, ge=1)
    restart_limit: int = Field(5, ge=1)  #: crashes in a row with no job finished before the pool fails
    stall_timeout: Duration | None = 300.0  #: a job this long without ctx.heartbeat() is stalled; None: never
    stall_action: Literal["warn", "kill"] = "warn"  #: warn: job.stalled with the stack; kill: also SIGKILL and retry
    max_rss: Size | None = None  #: a process above it is recycled after the job in hand (sampled)
    memory_limit: Size | None = None  #: a process above it is SIGKILLed at once, its job charged (sampled)
    to: str | None = None  #: default pool for ctx.emit
    params: dict[str, Any] = Field(default_factory=dict)  #: passed to the task as ctx.params

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ConsumerConfig:
        if self.min_processes > self.processes and self.processes > 0:
            raise ValueError(f"min_processes ({self.min_processes}) is above processes ({self.processes})")
        if self.stall_timeout is not None and self.stall_timeout <= 0:
            raise ValueError("stall_timeout must be above 0 (null turns stall detection off)")
        return self


class ShutdownConfig(_Model):
    grace: Duration = 10.0


class LogsConfig(_Model):
    dir: str = "logs"
    level: Literal["debug", "info", "warning", "error"] = "info"
    jobs: Literal["none", "failures", "all"] = "failures"
    progress_interval: Duration = 1.0  #: above 0: a progress line (and a results flush) every this long

    @field_validator("progress_interval")
    @classmethod
    def _progress_above_zero(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above 0, e.g. 1s or 500ms (for fewer progress lines, make it longer: 1m)")
        return value


def _journal_switch(value: Any) -> Any:
    """`journal: false` turns the journal off (None); `journal: true` is the default journal."""
    if value is False:
        return None
    if value is True:
        return {}
    return value


class JournalConfig(_Model):
    #: group-commit interval for fsync (a duration), `always` (every loop step), or `never` (written, never fsynced)
    sync: Literal["always", "never"] | Duration = 0.02


class TransportConfig(_Model):
    bind: str | None = None  #: e.g. tcp://0.0.0.0:5555 to accept remote workers


class HeartbeatConfig(_Model):
    interval: Duration = 1.0
    timeout: Duration = 5.0


class MetricsConfig(_Model):
    listen: Listen | None = None  #: serve /metrics and /healthz here, e.g. 127.0.0.1:9464 (as --metrics)
    linger: Duration = 0.0  #: keep serving this long after the run ends, so the final counts get scraped
    buckets: list[Duration] = Field(default_factory=lambda: list(DEFAULT_BUCKETS), min_length=1)  #: job-duration histogram


class DashboardConfig(_Model):
    listen: Listen | None = None  #: serve the dashboard here, e.g. 127.0.0.1:8080 (as --dashboard); may equal metrics.listen


class RunConfig(_Model):
    name: PoolName
    queue: QueueConfig = Field(default_factory=QueueConfig)
    producers: list[ProducerConfig] = Field(min_length=1)
    consumers: list[ConsumerConfig] = Field(min_length=1)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    results: str | None = None  #: may hold {run_id} and {name}
    journal: Annotated[JournalConfig | None, BeforeValidator(_journal_switch)] = Field(default_factory=JournalConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)
    start_method: Literal["fork", "spawn", "forkserver"] = "forkserver"
    transport: TransportConfig = Field(default_factory=TransportConfig)
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)

    def problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """Mistakes that span fields: (location, message), located where a person would fix them."""
        found: list[tuple[tuple[Any, ...], str]] = []
        seen: set[str] = set()
        located: list[tuple[str, int, ProducerConfig | ConsumerConfig]] = [
            *(("producers", i, p) for i, p in enumerate(self.producers)),
            *(("consumers", i, c) for i, c in enumerate(self.consumers)),
        ]
        for key, index, pool in located:
            if pool.name in seen:
                found.append(((key, index, "name"), f"pool name {pool.name!r} is used twice"))
            seen.add(pool.name)
        for key, index, pool in located:
            odd = _not_plain(pool.params)
            if odd is not None:
                where, what = odd
                found.append(((key, index, "params", *where), f"{what}: params travel as JSON (the journal a resume reads "
                              "them back from) and msgpack (worker hosts), which cannot keep it exactly; quote it "
                              "(YAML reads 2024-01-01 as a date, .inf as infinity)"))
        consumers = [c.name for c in self.consumers]
        for index, producer in enumerate(self.producers):
            if producer.to is None and len(consumers) > 1:
                found.append((("producers", index), f"producer {producer.name!r} needs `to:` (one of {', '.join(consumers)})"))
            if producer.to is not None and producer.to not in consumers:
                hint = _did_you_mean(producer.to, consumers)
                found.append((("producers", index, "to"), f"unknown consumer pool {producer.to!r}{hint}"))
        if self.results:
            try:
                self.results.format(run_id="x", name="x")
            except (KeyError, IndexError, ValueError) as exc:
                found.append((("results",), f"results path {self.results!r}: only {{run_id}} and {{name}} may be used ({exc!r})"))
        for index, consumer in enumerate(self.consumers):
            if consumer.to is not None and consumer.to not in consumers:
                hint = _did_you_mean(consumer.to, consumers)
                found.append((("consumers", index, "to"), f"unknown consumer pool {consumer.to!r}{hint}"))
        return found

    def results_path(self, run_id: str) -> str | None:
        """`results:` with its {run_id} and {name} placeholders filled in."""
        return self.results.format(run_id=run_id, name=self.name) if self.results else None

    def target_of(self, producer: ProducerConfig) -> str:
        return producer.to or self.consumers[0].name

    def all_pools(self) -> list[ProducerConfig | ConsumerConfig]:
        return [*self.producers, *self.consumers]

    def pool(self, name: str) -> ProducerConfig | ConsumerConfig:
        for pool in self.all_pools():
            if pool.name == name:
                return pool
        raise KeyError(name)


class Config(_Model):
    """A validated run config plus where it came from (the folder goes on the import path)."""

    run: RunConfig
    path: str
    base_dir: str


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; raise ConfigError with every problem at once."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of keys (name, producers, consumers, ...)")
    return config_from_data(data, overrides, path, str(path.resolve().parent), root)


def config_from_data(data: dict[str, Any], overrides: list[str] | None, path: str | Path, base_dir: str, root: Any = None) -> Config:
    """Override and validate a config already read (a YAML file's, or a dict given to `runner.run`).

    `path` names it in messages; `root` is its YAML node tree, for line numbers (None: no lines)."""
    path = Path(path)
    for override in overrides or []:
        _apply_override(data, override)
    try:
        run = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_schema_errors(path, root, data, exc.errors())) from exc
    problems = run.problems()
    if problems:
        errors = [{"loc": loc, "type": "value_error", "msg": message, "input": None} for loc, message in problems]
        raise ConfigError(_schema_errors(path, root, data, errors))
    return Config(run=run, path=str(path), base_dir=base_dir)


def with_listen(config: Config, metrics: str | None, dashboard: str | None) -> Config:
    """The config with `--metrics` / `--dashboard` put in metrics.listen / dashboard.listen (flags win over the file)."""
    updates: dict[str, Any] = {}
    run = config.run
    try:
        if metrics is not None:
            updates["metrics"] = run.metrics.model_copy(update={"listen": parse_listen(metrics)})
        if dashboard is not None:
            updates["dashboard"] = run.dashboard.model_copy(update={"listen": parse_listen(dashboard)})
    except ValueError as exc:
        flag = "--metrics" if "metrics" not in updates and metrics is not None else "--dashboard"
        raise ConfigError(f"{flag}: {exc}") from exc
    if not updates:
        return config
    return config.model_copy(update={"run": run.model_copy(update=updates)})


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    detail = f"{problem} ({context})" if context else problem
    return f"{where}: malformed YAML: {detail}"


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value`; list items (producers, consumers) are addressed by pool name or index."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. consumers.eater.processes=8")
    value = yaml.safe_load(raw) if raw else ""
    node: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            found = [item for item in node if isinstance(item, dict) and item.get("name") == part]
            if found:
                index = node.index(found[0])
            elif part.isdigit() and int(part) < len(node):
                index = int(part)
            else:
                names = [str(item.get("name")) for item in node if isinstance(item, dict)]
                raise ConfigError(f"--set {key}: no pool {part!r}{_did_you_mean(part, names)}")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _node_at(root: Any, loc: tuple[Any, ...]) -> Any:
    """The YAML node for a pydantic error location, to report its line."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return node
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _key_node(root: Any, loc: tuple[Any, ...]) -> Any:
    """The node of the key itself (for unknown keys, whose value may span lines)."""
    parent = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for key, _ in parent.value:
            if key.value == loc[-1]:
                return key
    return parent


def _field_path(data: Any, loc: tuple[Any, ...]) -> str:
    """`consumers[0] (eater).retries` style path: index and the pool name a person recognises."""
    text = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and part < len(node) and isinstance(node[part], dict) else None
            text += f"[{part}]" + (f" ({name})" if name else "")
        else:
            text += ("." if text else "") + str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return text or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _schema_errors(path: Path, root: Any, data: Any, errors: Any) -> str:
    lines = [f"{path}: {len(errors)} problem(s) in the config:"]
    for error in errors:
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        node = _key_node(root, loc) if error["type"] == "extra_forbidden" and loc else _node_at(root, loc)
        line = f"{path}:{node.start_mark.line + 1}" if node is not None and hasattr(node, "start_mark") else str(path)
        where = _field_path(data, loc)
        if error["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            fields = list(model.model_fields) if model else []
            message = f"unknown key {loc[-1]!r}{_did_you_mean(str(loc[-1]), fields)}"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            found = error.get("input")
            message = error["msg"].removeprefix("Value error, ")
            if found is not None and not isinstance(found, (dict, list)) and "found" not in message:
                message += f", found {found!r}"
        lines.append(f"  {line}: {where}: {message}")
    return "\n".join(lines)
