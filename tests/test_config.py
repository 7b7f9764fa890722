"""Config validation: every mistake named by file:line and field path, all at once, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CONFIGS, runner_cli
from runner.config import load_config, parse_duration
from runner.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

GOOD = """\
name: bakery
producers:
  - {name: baker, task: bakery:bake, processes: 2, params: {buns: 5}}
consumers:
  - name: eater
    task: bakery:eat
    processes: 3
    idle_timeout: 3s
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, seconds", [(3, 3.0), ("3", 3.0), ("3s", 3.0), ("500ms", 0.5), ("2m", 120.0), ("1.5s", 1.5), ("1h", 3600.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["3 parsecs", "-1", "", True, "ms"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_defaults_and_target(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD)).run
    assert cfg.queue.maxsize == 100 and cfg.start_method == "forkserver"
    assert cfg.consumers[0].idle_timeout == 3.0 and cfg.consumers[0].min_processes == 1
    assert cfg.target_of(cfg.producers[0]) == "eater"
    assert cfg.logs.dir == "logs" and cfg.logs.jobs == "failures"


def test_every_example_config_is_valid() -> None:
    for path in CONFIGS.glob("*.yaml"):
        load_config(path)


def test_unknown_keys_with_did_you_mean_and_lines(tmp_path: Path) -> None:
    text = GOOD.replace("    idle_timeout: 3s\n", "    idle_timeot: 3s\n") + "shutdwn: {grace: 1s}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "run.yaml:8: consumers[0] (eater).idle_timeot: unknown key 'idle_timeot' (did you mean 'idle_timeout'?)" in message
    assert "run.yaml:9: shutdwn: unknown key 'shutdwn' (did you mean 'shutdown'?)" in message


def test_all_schema_errors_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("processes: 3", "processes: three").replace("idle_timeout: 3s", "idle_timeout: soon")
    text += "start_method: clone\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "run.yaml:7: consumers[0] (eater).processes:" in message and "'three'" in message
    assert "run.yaml:8: consumers[0] (eater).idle_timeout:" in message and "'soon'" in message
    assert "run.yaml:9: start_method:" in message and "'clone'" in message


def test_cross_field_errors(tmp_path: Path) -> None:
    text = GOOD.replace("processes: 3", "processes: 1\n    min_processes: 2").replace("params:", "to: eatr, params:")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "run.yaml:5: consumers[0] (eater): min_processes (2) is above processes (1)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace("params:", "to: eatr, params:")))
    assert "run.yaml:3: producers[0] (baker).to: unknown consumer pool 'eatr' (did you mean 'eater'?)" in str(info.value)


@pytest.mark.parametrize("value, named", [("2024-01-01", "params.since: a date (2024-01-01)"),
                                          (".inf", "params.since: a number that is not finite (inf)"),
                                          ("[1, {2: 3}]", "params.since[1]: a key that is not a string (2)")])
def test_params_a_resume_could_not_give_back_exactly_are_refused(tmp_path: Path, value: str, named: str) -> None:
    """The journal keeps the config as JSON and worker hosts get params over msgpack: a YAML date became a string
    on resume (and broke the replay contract silently). Refused at the start, naming it; quoted, it is fine."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace("params: {buns: 5}", f"params: {{buns: 5, since: {value}}}")))
    assert f"run.yaml:3: producers[0] (baker).{named}" in str(info.value), str(info.value)
    assert load_config(write(tmp_path, GOOD.replace("params: {buns: 5}", "params: {since: '2024-01-01'}"))).run.producers[0].params


def test_missing_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "name: x\nproducers: []\n"))
    message = str(info.value)
    assert "consumers: required key is missing" in message
    assert "producers:" in message


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + "  - {name: broken\n"))
    assert "run.yaml:10:1: malformed YAML" in str(info.value) or "run.yaml:10:" in str(info.value)


def test_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), ["consumers.eater.processes=8", "queue.maxsize=5", "producers.0.params.buns=7"]).run
    assert cfg.consumers[0].processes == 8 and cfg.queue.maxsize == 5 and cfg.producers[0].params == {"buns": 7}
    with pytest.raises(ConfigError, match="no pool 'eatr' \\(did you mean 'eater'\\?\\)"):
        load_config(write(tmp_path, GOOD), ["consumers.eatr.processes=8"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, GOOD), ["consumers.eater.processes"])


def test_cli_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("idle_timeout", "idle_timout"))
    for command in ("start", "check"):
        result = runner_cli(command, "--config", str(path), cwd=tmp_path)
        assert result.returncode == 2
        assert "did you mean 'idle_timeout'" in result.stderr
        assert "Traceback" not in result.stderr
    missing = runner_cli("start", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read config" in missing.stderr


def test_unknown_task_module_and_function_are_named(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = runner_cli("check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "no module named 'bakery'" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "bakery.py").write_text("def bake(ctx):\n    yield 1\n")
    result = runner_cli("start", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "module 'bakery' has no function 'eat'" in result.stderr
    debug = runner_cli("--debug", "check", "--config", str(path), cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_check_prints_the_plan() -> None:
    result = runner_cli("check", "--config", str(CONFIGS / "bakery.yaml"))
    assert result.returncode == 0, result.stderr
    assert "producer baker: bakery:bake x2 -> eater" in result.stdout
    assert "consumer eater: bakery:eat processes 1..3, retries 2" in result.stdout
