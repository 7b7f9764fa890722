"""runner.logs keeps its documented names, and importing it (to write a log) does not load the readers."""

from __future__ import annotations

import subprocess
import sys


def test_public_names() -> None:
    from runner import logs
    from runner.logs import EVENTS, contract, writer

    assert EVENTS is logs.EVENTS is contract.EVENTS and "job.done" in EVENTS
    assert logs.RESERVED_PREFIXES is contract.RESERVED_PREFIXES and logs.LEVELS is contract.LEVELS
    assert logs.HOST == contract.HOST
    for name in ("configure", "RunLog", "dumps", "human", "iso_now"):
        assert getattr(logs, name) is getattr(writer, name)


def test_writing_does_not_import_the_readers() -> None:
    # orjson is the writer's too (runner.logs.dumps): 4 ms of import once runner.logs is in
    code = ("import sys, runner.logs; "
            "print(sorted(m for m in ('ddsketch', 'runner.logs.read', 'runner.logs.summary') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_commands_that_read_no_config_load_neither_pydantic_models_nor_structlog() -> None:
    """`runner status`, `runner logs`, `runner worker` start in about a second less without the config's models
    (runner.config) and structlog (loaded by runner.logs.configure, and preloaded by the forkserver), and the
    log commands' readers load with the command that uses them."""
    code = ("import sys, runner.cli.main; "
            "print(sorted(m for m in ('structlog', 'runner.config', 'runner.logs.summary', 'runner.logs.trace', "
            "'runner.logs.timeline', 'runner.coordinator.run') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    preload = "import sys, runner.process.loop; print('structlog' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", preload], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_dumps_writes_what_json_wrote() -> None:
    """runner.logs.dumps (orjson, json for what orjson refuses) writes a results or log line as json.dumps
    did, but for the documented differences: NaN and infinities as null, a UUID as its string."""
    import dataclasses
    import datetime
    import json
    import uuid

    from runner.logs import dumps

    @dataclasses.dataclass
    class Point:
        x: int

    class Number(float):  # numpy.float64 is a float subclass
        pass

    def old(value: object) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          default=lambda v: {"$bytes": v.hex()} if isinstance(v, bytes) else repr(v))

    same = [{"bytes": b"\x00\xff"}, {"int keys": {1: 2}}, {"big": 2**70}, {"surrogate": "\ud800"}, {"set": {1}},
            {"when": datetime.datetime(2026, 1, 1)}, {"point": Point(1)}, {"tuple": (1, "é")}, {"floats": [1.0, -0.0, 1e16, 0.1]},
            {"number": Number(1.5)}, {"object": object}, {"nested": [{"a": [None, True, "x"]}]}]
    for value in same:
        assert dumps(value) == old(value), value
    assert dumps({"x": float("nan"), "y": float("inf")}) == '{"x":null,"y":null}'
    assert dumps({"id": uuid.UUID(int=1)}) == '{"id":"00000000-0000-0000-0000-000000000001"}'
