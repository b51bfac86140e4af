"""Run-folder files written atomically: a crash never leaves a half-written file behind.

Every write goes to a temporary name in the same folder (so on the same filesystem) and is
renamed into place; a folder is replaced whole by renaming the old one aside first.

Kill safety needs only the renames; crash safety (power loss, a node that dies) also needs
the data on disk before the rename that publishes it: otherwise the kernel may persist the
rename first, and the file is there after a reboot, empty or cut short. So every file is
fsync'ed before its rename, and its folder after (which makes the rename itself durable).
"""

import contextlib
import csv
import io
import json
import os
import shutil
import stat
import tempfile
import time
from typing import Any, Iterator

from common.errors import UserError


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: str, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the user's usual permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(path: str) -> None:
    """Make the entries of folder `path` (files created or renamed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot sync folders
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and folder under `path` (a finished temporary folder, before the
    rename that publishes it)."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


@contextlib.contextmanager
def file_written_atomically(path: str, what: str = "") -> Iterator[str]:
    """A new temporary file's name in `path`'s folder, for a writer that takes a path (an
    exporter); when the block ends, the file is synced and renamed over `path`. A `path`
    that is a symbolic link, or whose folder is one, is refused: writing there would write
    through it, wherever it points (a run folder from elsewhere).

    Raises UserError: a link at `path` or its folder (`what` names the flag or file)."""
    folder = os.path.dirname(os.path.abspath(path))
    for p in (path, folder):
        if os.path.islink(p):
            raise UserError(f"{what or path}: {p} is a symbolic link; refusing to write "
                            "through it (remove the link, or write elsewhere)")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        usual_mode(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    """Atomically and durably replace `path` with `text`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    usual_mode(tmp)
    os.replace(tmp, path)
    fsync_dir(folder)


def write_json(path: str, obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: str) -> tuple[list, bool]:
    """(rows, torn): the JSON lines of `path`; a last line cut short by a crash (no newline,
    or not JSON) is dropped and reported as `torn`, a bad line elsewhere raises ValueError."""
    with open(path) as fh:
        lines = fh.read().split("\n")
    rows, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise
            torn = True
    return rows, torn


def write_csv(path: str, rows: list) -> None:
    """Atomically replace `path` with `rows` (dicts) as CSV: their scalar values, one column
    per key in the order keys first appear (a row without a key leaves its cell empty)."""
    columns = list(dict.fromkeys(k for r in rows for k, v in r.items()
                                 if isinstance(v, (int, float, str, bool)) or v is None))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())


def write_jsonl(path: str, rows: list) -> None:
    """Atomically replace `path` with `rows` as JSON lines."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str, obj: Any) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


SIZE_DIFFERS = "size differs"  # read_regular_file: not the size the manifest declares


def read_regular_file(path, rel, size=None, max_size=None):
    """The bytes of the regular file `rel` inside the folder `path`; None when it is absent,
    False when it, or its folder (best/), is a symbolic link or not a regular file (a link
    could name any file on the machine; a FIFO or a device would block or read without
    end), or over `max_size`; SIZE_DIFFERS when its size is not `size` (None: any size).
    The size is known before a byte is read. Opened without blocking: opening a FIFO waits
    for a writer otherwise."""
    folder = os.path.dirname(rel)
    if folder and os.path.islink(os.path.join(path, folder)):
        return False
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(os.path.join(path, rel), flags)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP: a symbolic link
        return False
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or (max_size is not None and st.st_size > max_size):
            return False
        if size is not None and st.st_size != size:
            return SIZE_DIFFERS
        return fh.read(st.st_size)


STALE_AFTER = 600  # s: a temporary file in a shared cache untouched this long has no writer
TEMPORARY_PREFIXES = (".tmp-", ".export-", ".old-")  # what the writers here name their
#                                                     temporary files and folders


def remove_stale_temporaries(folder: str, before: float, idle: float = 0.0) -> list:
    """Remove the temporary files and folders a killed writer left in `folder` (names with
    TEMPORARY_PREFIXES): those last modified before `before` (the job's start: an earlier
    job's) and at least `idle` seconds ago (a writer still at work keeps touching its file).
    Returns the names removed; anything else is left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no such folder yet
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(TEMPORARY_PREFIXES):
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
            if mtime >= before or now - mtime < idle:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def new_temp_dir(parent: str, prefix: str) -> str:
    """A fresh folder beside the final one, with the user's usual permissions."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    usual_mode(tmp, directory=True)
    return tmp


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished folder `tmp` to `final`, replacing whatever was there whole; its
    files reach the disk before the rename does."""
    parent = os.path.dirname(os.path.abspath(final))
    fsync_tree(tmp)
    old = None
    if os.path.isdir(final):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(final, os.path.join(old, "x"))
    os.replace(tmp, final)
    fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link (free: exported files are never rewritten in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
