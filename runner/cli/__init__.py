"""The `runner` command line: main.py (start, check, worker, status, stop, keys) and logs.py (runs, logs).

`runner.cli.main` runs the command line (the console script enters through runner/__main__.py, which holds
signals during these imports first); `runner.cli.app` is the typer application."""

from runner.cli.main import app, main

__all__ = ["app", "main"]
