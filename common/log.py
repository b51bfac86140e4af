"""What a run says: one logger, on the console and in the run folder's train.log.

`logger` is accelerate's `MultiProcessAdapter` (what `accelerate.logging.get_logger` returns):
a line is written by the main process only unless `main_process_only=False` is passed, so a
2-process run does not say everything twice. Two changes to it, below: before the Accelerate
state exists (a helper called from a test or a notebook) it logs like a plain logger instead of
raising, and only lines that every process says carry accelerate's `[RANK i]` prefix (with
several processes).

The console gets INFO lines as they are and other levels prefixed (`warning: ...`), on stdout
(as the transformers example scripts do; errors that end a run go to stderr through
errors.cli). `--log-level` sets the level; `--quiet` leaves warnings, errors and the final
result line (level RESULT) on the console, while train.log keeps everything at --log-level,
with times. train.log is appended to, so a resumed run continues its log; lines said before
the run folder exists are held and written there first.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from accelerate.logging import MultiProcessAdapter
from accelerate.state import PartialState


NAME = "transfer_learning"
RESULT = 25  # between INFO and WARNING: the final line, shown even with --quiet
logging.addLevelName(RESULT, "RESULT")


class _Logger(MultiProcessAdapter):
    def log(self, level, msg, *args, main_process_only=True, in_order=False, **kwargs):
        if PartialState._shared_state == {}:  # no run yet: every caller is "the main process"
            self.logger.log(level, msg, *args, **kwargs)
        elif main_process_only and not in_order or PartialState().num_processes == 1:
            if PartialState().is_main_process:  # no rank prefix: one process speaks
                self.logger.log(level, msg, *args, **kwargs)
        else:  # every process says it: accelerate's way, with its [RANK i] prefix
            super().log(level, msg, *args, main_process_only=False, in_order=in_order,
                        **kwargs)

    def result(self, msg, *args, **kwargs):
        """The run's last word (where the model is, how good it is): shown even with --quiet."""
        self.log(RESULT, msg, *args, **kwargs)


logger = _Logger(logging.getLogger(NAME), {})


class _Console(logging.StreamHandler):
    """Writes to sys.stdout as it is at each line (a notebook or a test may swap it)."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ assigns one; we always use sys.stdout
        pass

    def filter(self, record):
        return (record.levelno >= self.threshold or record.levelno == RESULT) \
            and super().filter(record)


class _Prefix(logging.Formatter):
    """INFO and RESULT lines as they are, others with their level: `warning: ...`."""

    def format(self, record):
        if record.levelno not in (logging.INFO, RESULT):
            record = logging.makeLogRecord(dict(
                record.__dict__, msg=f"{record.levelname.lower()}: {record.getMessage()}",
                args=None))
        return super().format(record)


def setup_logging(level: str = "info", quiet: bool = False) -> None:
    """Console handler at `level` (`quiet`: warnings and the result line only) and a buffer
    for train.log until `log_to_file` names the run folder. Replaces the handlers of an
    earlier run in the same process."""
    global _show_progress
    log = _remove_handlers(logging.Handler)
    log.setLevel(level.upper())
    log.propagate = False  # our lines once, whatever the root logger does (notebooks)
    console = _Console(logging.WARNING if quiet else logging.getLevelName(level.upper()))
    console.setFormatter(_Prefix("%(message)s"))
    log.addHandler(console)
    _show_progress = not quiet and log.getEffectiveLevel() <= logging.INFO
    _datasets_progress_bars(_show_progress)
    # capacity is a line count; flushLevel above CRITICAL: held until log_to_file
    log.addHandler(logging.handlers.MemoryHandler(capacity=10_000,
                                                  flushLevel=logging.CRITICAL + 1))


_show_progress = True  # this run shows progress bars
_bars_hidden = False   # we hid datasets' progress bars (not the user, by its env var)


def progress_bars() -> bool:
    """Whether this run shows progress bars: not with --quiet or a --log-level above info."""
    return _show_progress


def _datasets_progress_bars(show):
    """datasets' bars follow ours; a later run in the same process that shows bars gets
    them back."""
    global _bars_hidden
    import datasets

    if not show and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        _bars_hidden = True
    elif show and _bars_hidden:
        datasets.enable_progress_bars()
        _bars_hidden = False


def _remove_handlers(kinds) -> logging.Logger:
    """Detach and close our logger's handlers of `kinds`; returns the logger."""
    log = logging.getLogger(NAME)
    for h in list(log.handlers):
        if isinstance(h, kinds):
            log.removeHandler(h)
            h.close()
    return log


def log_to_file(path: str) -> None:
    """From now on (and the lines held so far) also into `path`, appended, with times.
    Called by the main process only: one train.log per run."""
    log = logging.getLogger(NAME)
    file = logging.FileHandler(path, encoding="utf-8")
    file.setFormatter(_Prefix("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    for h in log.handlers:
        if isinstance(h, logging.handlers.MemoryHandler):
            h.setTarget(file)
            h.flush()
    _remove_handlers(logging.handlers.MemoryHandler)
    log.addHandler(file)


def drop_held_lines() -> None:
    """Other ranks write no train.log: stop holding their lines."""
    _remove_handlers(logging.handlers.MemoryHandler)


def write_to_log_file(line: str) -> None:
    """`line` into train.log alone (the error that ends a run: the console has it on stderr)."""
    record = logging.LogRecord(NAME, logging.INFO, __file__, 0, line, None, None)
    for h in logging.getLogger(NAME).handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def close_log_file() -> None:
    """Close train.log (the end of a run in a process that goes on: a notebook, a test)."""
    _remove_handlers((logging.FileHandler, logging.handlers.MemoryHandler))


def log_path(output_dir: str) -> str:
    return os.path.join(output_dir, "train.log")
