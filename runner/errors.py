"""One error tree and the exit codes users and scripts rely on."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of every `runner` command."""

    OK = 0  #: every job done
    FAILED = 1  #: a job was dead-lettered, a producer or a pool failed
    USAGE = 2  #: bad config, bad flags, task code not importable, a file that cannot be written
    CRASHED = 3  #: the runner itself failed (a bug, a full disk): processes stopped, unfinished jobs pending
    SIGINT = 130  #: stopped by SIGINT (128 + 2)
    SIGTERM = 143  #: stopped by SIGTERM (128 + 15)


class RunnerError(Exception):
    """Base of every error the runner reports to a user as a message, not a traceback."""

    exit_code: ExitCode = ExitCode.FAILED


class UsageError(RunnerError):
    """The user's input is wrong: config, flags, task references. Exit 2."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """A config file is malformed or invalid; the message names file:line and field path."""


class TaskImportError(UsageError):
    """A `module:function` task reference cannot be imported."""


class ProtocolError(RunnerError):
    """A frame that is not a valid message of our protocol (bad bytes, version, type, size)."""
