"""Find the images that do not decode, before training, at any scale.

A bad file found mid-epoch would kill a loader worker and the run, so every image is
checked once up front (JPEGs at 1/8 scale: DCT scaling still reads every byte). At a few
hundred thousand images that must not cost memory or minutes on every run:
- the work is split across processes (each checks a contiguous shard; verdicts gathered, so
  every process drops the same rows) and, in each, across short-lived worker processes
  that read the image column a chunk at a time: the bytes they touch (memory-mapped Arrow
  pages, decoded pixels) never count against the training process;
- verdicts are cached by the data's identity (each file's path, size and mtime, or the
  dataset's fingerprint when images are stored in it) under
  ~/.cache/transfer-learning/image-checks/, so a second run on the same data decodes
  nothing up front. Whether the cache hits is decided together, as for features.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import time
from typing import TYPE_CHECKING

import datasets
import PIL.Image
from accelerate.utils import gather_object

from common.errors import UserError
from common.files import STALE_AFTER, read_regular_file, remove_stale_temporaries, write_json
from common.log import logger


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator

CHUNK = 512
FORMAT = 1


def identity_digest(split: datasets.Dataset, chunk: int = 2000) -> str:
    """sha256 of what identifies `split`'s images, read a chunk at a time: each file's
    absolute path, size and mtime; or the dataset fingerprint when the images are stored in
    it (Hub/parquet datasets). Nothing is decoded, nothing is kept."""
    h = hashlib.sha256(f"rows {len(split)}\n".encode())
    raw = split.cast_column("image", datasets.Image(decode=False))
    if len(raw) and raw[0]["image"].get("bytes") is not None:
        h.update(split._fingerprint.encode())
        return h.hexdigest()
    for start in range(0, len(raw), chunk):
        for src in raw[start:start + chunk]["image"]:
            st = os.stat(src["path"])
            h.update(f"{os.path.abspath(src['path'])}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check_image(source):
    """None if the image decodes, else the reason."""
    try:
        with PIL.Image.open(io.BytesIO(source["bytes"]) if source.get("bytes")
                            else source["path"]) as img:
            img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))
            img.load()
        return None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"


_SPLIT = None  # the split being checked, inherited by the forked workers


def _check_rows(bounds):
    start, end = bounds
    rows = _SPLIT[start:end]["image"]
    return [(start + i, src.get("path") or f"row {start + i}", why)
            for i, src in enumerate(rows) if (why := _check_image(src)) is not None]


def _check_shard(split, start, end, workers):
    """Bad rows among [start, end), checked by `workers` forked processes, chunk by chunk."""
    global _SPLIT
    _SPLIT = split.cast_column("image", datasets.Image(decode=False))
    chunks = [(i, min(i + CHUNK, end)) for i in range(start, end, CHUNK)]
    try:
        if workers <= 0 or len(chunks) <= 1:
            return [bad for c in chunks for bad in _check_rows(c)]
        with mp.get_context("fork").Pool(workers) as pool:
            return [bad for part in pool.imap(_check_rows, chunks) for bad in part]
    finally:
        _SPLIT = None


def _cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME",
                                       os.path.join(os.path.expanduser("~"), ".cache")),
                        "transfer-learning", "image-checks")


def _read_verdicts(path: str, rows: int):
    """The cached [(row, file, reason)] at `path`, or None where there is none; a file that
    does not parse as verdicts for `rows` rows (cut short by a crash, written by something
    else) is ignored, with one warning, and checked again."""
    raw = read_regular_file(os.path.dirname(path), os.path.basename(path),
                            max_size=256 << 20)
    if raw is None:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
        bad = [tuple(b) for b in doc["bad"]]
        if doc["format"] != FORMAT or doc["rows"] != rows or not all(
                len(b) == 3 and isinstance(b[0], int) and 0 <= b[0] < rows for b in bad):
            raise ValueError("not verdicts for these rows")
        return bad
    except Exception:  # noqa: BLE001 - any way of not being our verdicts
        logger.warning(f"{path}: an image-check cache that does not parse (a crash while it "
                       "was written?); checking the images again")
        return None


def find_unreadable(split: datasets.Dataset, name: str, accelerator: Accelerator,
                    workers: int) -> list:
    """[(row, file or 'row N', reason)] of the images in `split` that do not decode; the same
    list on every process."""
    digest = identity_digest(split)
    path = os.path.join(_cache_dir(), f"{name}-{digest[:32]}.json")
    cached = _read_verdicts(path, len(split))
    seen = [cached is not None]
    if accelerator.num_processes > 1:
        seen = gather_object(seen)
    if all(seen):
        return cached
    t0 = time.time()
    n, world, rank = len(split), accelerator.num_processes, accelerator.process_index
    start, end = n * rank // world, n * (rank + 1) // world
    bad = _check_shard(split, start, end, workers)
    if world > 1:
        bad = gather_object(bad)  # every process's list, concatenated in rank order
    bad = sorted(tuple(b) for b in bad)
    if accelerator.is_local_main_process:  # synced before its rename: never empty after
        os.makedirs(_cache_dir(), exist_ok=True)  # a power loss
        remove_stale_temporaries(_cache_dir(), time.time(), idle=STALE_AFTER)
        write_json(path, {"format": FORMAT, "rows": n, "bad": bad})
    if n >= 5000:
        logger.info(f"checked {n} {name} images in {time.time() - t0:.0f} s "
                    f"({world} process(es) x {max(workers, 1)} worker(s)); verdicts "
                    f"cached in {path}")
    return bad


def drop_unreadable(ds: datasets.Dataset, split: str, strict: bool, accelerator: Accelerator,
                    workers: int) -> datasets.Dataset:
    """Check that every image decodes. Unreadable ones (random bytes named .jpg, truncated
    or empty files) are dropped with a warning naming each, or, with --strict-images, are an
    error."""
    bad = find_unreadable(ds, split, accelerator, workers)
    if not bad:
        return ds
    if strict:
        i, name, why = bad[0]
        raise UserError(f"--strict-images: {name} cannot be read ({why}); "
                        f"{len(bad)} unreadable {split} image(s) in all")
    for _, name, why in bad:
        logger.warning(f"skipping unreadable image {name} ({why})")
    logger.warning(f"skipped {len(bad)} unreadable {split} image(s) of {len(ds)}; "
                   "--strict-images makes this an error")
    bad_rows = {i for i, _, _ in bad}
    return ds.select([i for i in range(len(ds)) if i not in bad_rows])
