"""Run-folder files written atomically: a crash never leaves a half-written file behind.

Every write goes to a temporary name in the same folder (so on the same filesystem) and is
renamed into place; a folder is replaced whole by renaming the old one aside first.
"""

import json
import os
import shutil
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path, directory=False):
    """mkstemp/mkdtemp create 0600/0700 entries; give the user's usual permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_text(path, text):
    """Atomically replace `path` with `text`."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    usual_mode(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    """Atomically replace `path` with `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, obj):
    with open(path, "a") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def new_temp_dir(parent, prefix):
    """A fresh folder beside the final one, with the user's usual permissions."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    usual_mode(tmp, directory=True)
    return tmp


def replace_dir(tmp, final):
    """Move the finished folder `tmp` to `final`, replacing whatever was there whole."""
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.isdir(final):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(final, os.path.join(old, "x"))
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src, dst):
    """A hard link (free: exported files are never rewritten in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
