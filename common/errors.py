"""Errors a user can fix, reported as one line on stderr instead of a traceback, with the exit
status of the convention: 2 for usage and configuration errors, 1 for failures while running,
130 for Ctrl-C (the training loop first saves a checkpoint; SIGTERM exits 143)."""

from __future__ import annotations

import functools
import sys
from typing import Callable


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
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1 if isinstance(e, RunFailure) else 2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
