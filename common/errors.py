"""Errors a user can fix, reported as one line on stderr instead of a traceback."""

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input (a path, a flag, a file): the message says what is wrong and what to do."""


def cli(main: Callable) -> Callable:
    """Wrap an entry point: a `UserError` prints `error: <message>` and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
