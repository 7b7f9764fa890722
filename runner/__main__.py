"""`python -m runner` and the `runner` console script.

Signals are held (recorded, see runner/early.py) before the command line's imports, which take
seconds on a slow host: a SIGTERM or SIGINT that early ends the command with 128 + signal, never a
traceback."""

from runner import early


def main() -> None:
    early.hold()
    from runner.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
