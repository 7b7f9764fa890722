"""runner: a producer-consumer job runner that loses no job.

`runner.run(config)` runs a config from Python (see runner/api.py); importing `runner` stays cheap:
the runner itself is imported only when a run starts.
"""

from __future__ import annotations

TYPE_CHECKING = False  #: not `typing.TYPE_CHECKING`: `import runner` imports nothing else
if TYPE_CHECKING:
    from typing import Any

    from runner.api import RunResult

__version__ = "0.1.0"
__all__ = ["__version__", "run"]


def run(config: Any, overrides: list[str] | None = None, **options: Any) -> RunResult:
    """Run a config (a path, a dict or a config model) to the end in this process, as `runner start` does.

    Keyword options: bind, keys, metrics, dashboard, quiet. Returns a RunResult; a config or usage
    error raises runner.errors.UsageError (or a subclass) with the same message the CLI prints."""
    from runner.api import run as _run

    return _run(config, overrides, **options)
