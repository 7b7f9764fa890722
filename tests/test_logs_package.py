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
    code = ("import sys, runner.logs; "
            "print(sorted(m for m in ('orjson', 'ddsketch', 'runner.logs.read', 'runner.logs.summary') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
