"""`runner start`'s (and `runner resume`'s, `runner retry`'s) first step, before the CLI's own imports:
start the forkserver.

The forkserver is a second interpreter that imports the process code (structlog, msgspec, the loops)
once. Started after the CLI has imported typer and pydantic and checked the config, its start-up adds
to every run's wall time; started here, it runs on the other core meanwhile. This is a guess made from
the config file and the --set flags alone (for a resume or a retry: the config in the journal's header):
a wrong guess (a config the CLI will refuse) costs only the forkserver's start, and the coordinator
starts it anyway (warm_up is idempotent) when the guess missed. A resume reads its journal meanwhile,
so there the forkserver's start overlaps both passes over the journal.
"""

from __future__ import annotations

from pathlib import Path

#: options of `runner resume`/`retry` that take a value (the rest are flags), to find RUN_ID among the words
_VALUED = {"--logs", "--set", "--bind", "--keys", "--last", "--job", "--error"}


def forkserver_first(argv: list[str]) -> None:
    if not argv or argv[0] not in ("start", "resume", "retry") or "--dry-run" in argv:
        return
    try:
        method = start_method_of(argv[1:]) if argv[0] == "start" else journaled_start_method(argv[1:])
    except Exception:  # an unreadable or invalid config or journal: the CLI says what is wrong, with its exit code
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


def journaled_start_method(args: list[str]) -> str | None:
    """The start method `runner resume|retry RUN_ID ARGS` will use: the last --set start_method=..., else
    the one in the journal's header (the run's config), else the default. None: no RUN_ID (--last), or no
    journal (a `journal: false` retry), so no guess."""
    run_id: str | None = None
    logs = "logs"
    method: str | None = None
    i = 0
    while i < len(args):
        arg, value = args[i], args[i + 1] if i + 1 < len(args) else ""
        if arg in _VALUED:
            if arg == "--logs":
                logs = value
            elif arg == "--set" and value.startswith("start_method="):
                method = value.removeprefix("start_method=")
            i += 2
            continue
        if arg.startswith("--logs="):
            logs = arg.removeprefix("--logs=")
        elif arg.startswith("--set=start_method="):
            method = arg.removeprefix("--set=start_method=")
        elif not arg.startswith("-") and run_id is None:
            run_id = arg
        i += 1
    if method is not None or run_id is None:
        return method
    from runner.coordinator import journal as J

    path = J.journal_path(Path(logs), run_id)
    if not path.exists():
        return None
    for _end, body in J.read_frames(path):
        if body[0] == J.HEADER and isinstance(body[4], dict):
            return str(body[4].get("start_method", "forkserver"))
        break
    return None
