"""Errors a user can fix, reported as one line on stderr instead of a traceback, with the exit
status of the convention: 2 for usage and configuration errors, 1 for failures while running,
130 for Ctrl-C (the training loop first saves a checkpoint; SIGTERM exits 143)."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from common.log import close_log_file, write_to_log_file


class UserError(Exception):
    """Bad input (a path, a flag, a file): the message says what is wrong and what to do.
    Exit status 2."""


class RunFailure(UserError):
    """A failure while running that the flags did not cause on their face: the training loss
    diverged, a checkpoint was refused, a download failed. Exit status 1."""


def cli(main: Callable) -> Callable:
    """Wrap an entry point: a `UserError` prints `error: <message>` and exits with status 2
    (1 for a `RunFailure`); Ctrl-C outside the training loop exits 130 without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _end(f"error: {e}", 1 if isinstance(e, RunFailure) else 2)
        except KeyboardInterrupt:
            _end("interrupted", 130)
        finally:
            close_log_file()

    return wrapper


def _end(line, status):
    """The run's last line: on stderr, and in its train.log when it has one."""
    write_to_log_file(line)
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)
