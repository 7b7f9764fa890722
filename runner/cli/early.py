"""`runner start`'s first step, before the CLI's own imports: start the forkserver.

The forkserver is a second interpreter that imports the process code (structlog, msgspec, the loops)
once. Started after the CLI has imported typer and pydantic and checked the config, its start-up adds
to every run's wall time; started here, it runs on the other core meanwhile. This is a guess made from
the config file and the --set flags alone: a wrong guess (a config the CLI will refuse) costs only the
forkserver's start, and the coordinator starts it anyway (warm_up is idempotent) when the guess missed.
"""

from __future__ import annotations

from pathlib import Path


def forkserver_first(argv: list[str]) -> None:
    if not argv or argv[0] != "start":
        return
    try:
        method = start_method_of(argv[1:])
    except Exception:  # an unreadable or invalid config: the CLI says what is wrong, with its exit code
        return
    if method == "forkserver":
        from runner.process.start import warm_up

        warm_up(method)


def start_method_of(args: list[str]) -> str | None:
    """The start method `runner start ARGS` will use: the last --set start_method=..., else the config's
    top-level start_method, else the default (forkserver). None when there is no --config."""
    config: str | None = None
    method: str | None = None
    for i, arg in enumerate(args):
        value = args[i + 1] if i + 1 < len(args) else ""
        if arg in ("--config", "-c"):
            config = value
        elif arg.startswith("--config="):
            config = arg.removeprefix("--config=")
        elif arg == "--set" and value.startswith("start_method="):
            method = value.removeprefix("start_method=")
        elif arg.startswith("--set=start_method="):
            method = arg.removeprefix("--set=start_method=")
    if method is not None or config is None:
        return method
    import yaml

    loaded = yaml.load(Path(config).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return str(loaded.get("start_method", "forkserver")) if isinstance(loaded, dict) else None
