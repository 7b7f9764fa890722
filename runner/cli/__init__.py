"""The `runner` command line: main.py (start, check, worker, status, stop, keys) and logs.py (runs, logs).

`runner.cli:main` is the console script's entry point; `runner.cli.app` the typer application."""

from runner.cli.main import app, main

__all__ = ["app", "main"]
